"""LLM-side speed: two-row Yes/No scoring against full-vocabulary logits, and a CoRA training step (our
generator with the text LoRA; the published generator without it) against a plain LoRA (TALLRec) step, each
on the same batches, with peak memory.

SmolLM2-135M-Instruct on CoLLM's ML-1M prompts (the configs `train_configs/{tallrec,cora}_collm_ml1m.yaml`,
`--dtype`, auto by default: bf16 only where native). Peak memory as in bench/measure.py: the peak during
each measurement and its growth over the usage before. Prints one JSON line per figure with the ratio.

    python bench/llm_speed.py [--batches 4] [--batch-size 16] [--train-steps 5] [--dtype auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit, timed  # noqa: E402  (bench/measure.py)

from minigpt4.config import MFConfig, load_config  # noqa: E402
from minigpt4.data.contract import load_rating_dataset  # noqa: E402
from minigpt4.llm.recommender import build_llm_recommender  # noqa: E402
from minigpt4.llm.scoring import full_vocabulary_yes_no, yes_no_logits  # noqa: E402
from minigpt4.recommenders import build_recommender, save_recommender  # noqa: E402
from minigpt4.training.llm import split_prompt_rows  # noqa: E402

OUT = ROOT / "runs" / "bench_llm_speed"


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the LLM's dtype; auto: bf16 where native",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Speed does not depend on what the collaborative model learned: a fresh MF of CoLLM's size will do.
    config = load_config(ROOT / "train_configs" / "cora_collm_ml1m.yaml")
    dataset = load_rating_dataset(config.datasets.path)
    collab = save_recommender(
        build_recommender(MFConfig(embedding_size=256), dataset.n_users, dataset.n_items),
        MFConfig(embedding_size=256),
        OUT / "mf",
    )
    models = {}
    published = ["model.cora.generator=published", "model.lora.enabled=false"]  # CoRA as published: no text LoRA
    for name, mode, extra in (("tallrec", "tallrec", []), ("cora", "cora", []), ("cora_published", "cora", published)):
        options = [
            f"model.llm.dtype={args.dtype}",
            *([f"model.collab.ckpt={collab}"] if mode == "cora" else []),
            *extra,
        ]
        config = load_config(ROOT / "train_configs" / f"{mode}_collm_ml1m.yaml", options)
        torch.manual_seed(config.run.seed)
        model, tokenizer, template = build_llm_recommender(config.model, dataset, device)
        models[name] = (model, split_prompt_rows(config, dataset, model, tokenizer, template))
    base = {"bench": "llm_speed", "device": device, "dtype": str(models["cora"][0].llm.dtype).removeprefix("torch.")}

    # Scoring: the same model and batches, two output rows against the whole LM head.
    model, rows = models["tallrec"]
    model.eval()
    batches = [
        rows["test"].__getitems__(list(range(i * args.batch_size, (i + 1) * args.batch_size))).to(device)
        for i in range(args.batches)
    ]
    results = {}
    for name, head in (("two_rows", yes_no_logits), ("full_vocabulary", full_vocabulary_yes_no)):

        def score_all(head=head):
            with torch.no_grad():
                for batch in batches:
                    head(model.llm, model.prepare_inputs(batch), batch.attention_mask, model.answer_ids)

        timing = timed(device, score_all)
        results[name] = {
            "rows_per_second": args.batches * args.batch_size / timing.seconds,
            "peak_mb": timing.peak_mb,
            "peak_growth_mb": timing.peak_growth_mb,
        }
    tokens = sum(int(b.attention_mask.sum()) for b in batches) / (args.batches * args.batch_size)
    emit(**base, figure="scoring_rows_per_second", mean_prompt_tokens=round(tokens, 1), two_rows=results["two_rows"], full_vocabulary=results["full_vocabulary"],
         speedup=results["two_rows"]["rows_per_second"] / results["full_vocabulary"]["rows_per_second"])  # fmt: skip

    # Training: a CoRA step against a plain LoRA step on the same batches.
    train_batches = [
        models["tallrec"][1]["train"]
        .__getitems__(list(range(i * args.train_batch_size, (i + 1) * args.train_batch_size)))
        .to(device)
        for i in range(args.train_steps)
    ]
    steps = {}
    for mode, (model, _) in models.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def train_all(model=model, optimizer=optimizer):
            for batch in train_batches:
                model(batch).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        timing = timed(device, train_all)
        steps[mode] = {
            "seconds_per_step": timing.seconds / args.train_steps,
            "peak_mb": timing.peak_mb,
            "peak_growth_mb": timing.peak_growth_mb,
        }
    emit(**base, figure="train_step_seconds", batch_size=args.train_batch_size, lora=steps["tallrec"], cora=steps["cora"],
         cora_published=steps["cora_published"],
         ratio_cora_over_lora=steps["cora"]["seconds_per_step"] / steps["tallrec"]["seconds_per_step"],
         ratio_cora_published_over_lora=steps["cora_published"]["seconds_per_step"] / steps["tallrec"]["seconds_per_step"])  # fmt: skip


if __name__ == "__main__":
    main()
