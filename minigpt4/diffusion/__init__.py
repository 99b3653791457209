"""The image side: loading SD3/SD3.5 pipelines, adaptive fusion of the user's preference with the
instruction, LoRA flow-matching training, seeded sampling and the image store."""
