"""Image-side speed: a LoRA + fusion training step with cached VAE latents and text embeddings against
one that recomputes them every step (same batches, same run), and sampling time per image against the
number of denoising steps, each with peak memory.

The pipeline is the tiny SD3.5-architecture one of `diffrec models make-tiny` (written under
runs/bench_diffusion_speed/ when absent), or any SD3 folder given with --pipeline; item images are
real photos from scikit-image. Prints one JSON line per figure.

    python bench/diffusion_speed.py [--pipeline DIR] [--resolution 64 (the tiny pipeline: up to 128)] [--batch-size 4] [--train-steps 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from skimage import data as skimage_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit, timed  # noqa: E402  (bench/measure.py)

from minigpt4.config import MFConfig, SD3Config  # noqa: E402
from minigpt4.data.images import image_pixels  # noqa: E402
from minigpt4.diffusion.loading import load_sd3_pipeline  # noqa: E402
from minigpt4.diffusion.personalized import PersonalizedSD3  # noqa: E402
from minigpt4.diffusion.sampling import generate_images  # noqa: E402
from minigpt4.diffusion.tiny import write_tiny_sd3  # noqa: E402
from minigpt4.recommenders import build_recommender  # noqa: E402

OUT = ROOT / "runs" / "bench_diffusion_speed"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "horse", "camera", "moon", "cat")


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, help="an SD3 pipeline folder (default: the tiny one)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[4, 8, 16, 28, 40])
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the pipeline's dtype (VAE float32); auto: bf16 where native",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline_dir = args.pipeline or OUT / "tiny-sd3"
    if not (pipeline_dir / "model_index.json").is_file():
        write_tiny_sd3(pipeline_dir)
    config = SD3Config(
        pipeline={"path": pipeline_dir, "dtype": args.dtype, "use_t5": False, "max_sequence_length": 8},
        collab={"ckpt": OUT},
        flow={"resolution": args.resolution},
    )
    torch.manual_seed(0)
    collab = build_recommender(MFConfig(embedding_size=64), 100, 100).to(device)
    model = PersonalizedSD3(config, load_sd3_pipeline(config.pipeline, device), collab)
    base = {
        "bench": "diffusion_speed",
        "dtype": str(model.transformer.dtype).removeprefix("torch."),
        "device": device,
        "pipeline": pipeline_dir.name,
        "resolution": args.resolution,
    }

    # The same batches either way: photos, captions and preferences.
    photo_dir = OUT / "photos"
    photo_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = photo_dir / f"{name}.png"
        if not path.is_file():
            Image.fromarray(getattr(skimage_data, name)()).convert("RGB").save(path)
        paths.append(path)
    batches = []
    for step in range(args.train_steps):
        chosen = [paths[(step * args.batch_size + k) % len(paths)] for k in range(args.batch_size)]
        batches.append(
            {
                "pixels": torch.stack([image_pixels(path, args.resolution) for path in chosen]),
                "captions": [f"a photo of a {path.stem.replace('_', ' ')}" for path in chosen],
                "preference": torch.randn(args.batch_size, 64, generator=torch.Generator().manual_seed(step)),
            }
        )
    cached = [
        {"latent_parameters": model.encode_images(b["pixels"]), "text": model.encode_text(b["captions"]), **b}
        for b in batches
    ]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    model.train()

    def train(recompute: bool) -> None:
        for index, batch in enumerate(cached):
            generator = torch.Generator().manual_seed(index)
            parameters = model.encode_images(batch["pixels"]) if recompute else batch["latent_parameters"]
            prompt_embeds, pooled = model.encode_text(batch["captions"]) if recompute else batch["text"]
            loss = model(
                model.latents(parameters, generator).to(device),
                prompt_embeds,
                pooled,
                batch["preference"].to(device),
                generator,
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    steps = {}
    for name, recompute in (("cached", False), ("recomputed", True)):
        timing = timed(device, lambda recompute=recompute: train(recompute))
        steps[name] = {
            "seconds_per_step": timing.seconds / args.train_steps,
            "peak_mb": timing.peak_mb,
            "peak_growth_mb": timing.peak_growth_mb,
        }
    emit(
        **base,
        figure="train_step_seconds",
        batch_size=args.batch_size,
        **steps,
        speedup_cached=steps["recomputed"]["seconds_per_step"] / steps["cached"]["seconds_per_step"],
    )

    # Sampling: seconds per image against the number of denoising steps (one image per call).
    model.eval()
    preference = torch.randn(1, 64)
    for count in args.sample_steps:
        sampling = config.sampling.model_copy(update={"steps": count, "guidance_scale": 4.5})
        timing = timed(
            device, lambda sampling=sampling: generate_images(model, preference, ["a photo of a cat"], [0], sampling)
        )
        emit(**base, figure="sample_seconds_per_image", steps=count, guidance_scale=4.5, **timing._asdict())


if __name__ == "__main__":
    main()
