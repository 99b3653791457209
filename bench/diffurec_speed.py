"""DiffuRec next to SASRec on a leave-one-out split: training samples per second (our length-grouped,
trimmed batches and bf16 autocast against the straightforward full-width fp32 batches, same model, same
samples), and
inference users per second with HR@10 at 1, 4, 8 and 32 reverse steps. Prints one JSON line per figure.

Checkpoints from ``diffrec pretrain`` give meaningful HR@10; without them the models are freshly
initialised and only the timings mean something.

    python bench/diffurec_speed.py --dataset dataset/diffurec-amazon_beauty \\
        --diffurec-ckpt runs/diffurec_beauty/latest/checkpoints/best --sasrec-ckpt runs/sasrec_seq_beauty/latest/checkpoints/best
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit  # noqa: E402  (bench/measure.py)

from minigpt4.config import Config, DatasetConfig, DiffuRecConfig, RunConfig, SASRecConfig  # noqa: E402
from minigpt4.data.sequences import load_sequence_dataset  # noqa: E402
from minigpt4.evaluation.ranking import leave_one_out_metrics  # noqa: E402
from minigpt4.recommenders import build_recommender, load_recommender  # noqa: E402
from minigpt4.training.sequential import NextItemTask  # noqa: E402

SASREC = SASRecConfig(embedding_size=128, max_history=50, num_blocks=2, num_heads=2, dropout=0.5, init_std=0.02)


def training_speed(model, data, config: Config, batches: int, grouped: bool) -> float:
    """Samples per second over ``batches`` timed optimizer steps after one untimed one, each step the trainer's
    own loss (``NextItemTask``); the full-width variant reads every window at ``max_history``."""
    task = NextItemTask(model, data, config, torch.device("cpu"))
    task.trim = grouped  # False: the straightforward path (no trimming, no grouping)
    plan = task.epoch_batches(0, None)[: batches + 1]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step, rows in enumerate(plan):
        if step == 1:  # the first step (allocations, kernel selection) is not timed
            begin = time.perf_counter()
        loss = task.loss(model, rows, None)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sum(len(rows) for rows in plan[1:]) / (time.perf_counter() - begin)


def inference(model, data, users: np.ndarray, batch_size: int, steps: int | None) -> tuple[float, float]:
    """(users per second, HR@10 x100) on the test targets of ``users``, grouped by length and trimmed."""
    histories, targets, seen = data.evaluation_inputs("test", model.max_history)
    order = users[np.argsort((histories[users] != 0).sum(1), kind="stable")]
    generator = torch.Generator().manual_seed(0)
    score = (
        (lambda batch: model.next_item_scores(batch, generator, steps))
        if steps
        else (lambda batch: model.next_item_scores(batch, generator))
    )
    model.eval()
    begin = time.perf_counter()
    metrics = leave_one_out_metrics(
        score, histories[order], targets[order], seen[order], (10,), batch_size, trim_padding=True
    )
    return len(users) / (time.perf_counter() - begin), metrics["hr@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT / "dataset" / "diffurec-amazon_beauty")
    parser.add_argument("--diffurec-ckpt", type=Path)
    parser.add_argument("--sasrec-ckpt", type=Path)
    parser.add_argument("--train-batches", type=int, default=20, help="optimizer steps timed per variant")
    parser.add_argument("--users", type=int, default=2048, help="test users ranked per figure (a seeded sample)")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_sequence_dataset(args.dataset)
    users = np.sort(np.random.default_rng(0).choice(len(data.uid), size=min(args.users, len(data.uid)), replace=False))
    common = {"dataset": data.meta["source"], "batch_size": args.batch_size}
    models = {
        "diffurec": (args.diffurec_ckpt, DiffuRecConfig()),
        "sasrec": (args.sasrec_ckpt, SASREC),
    }
    for name, (checkpoint, config) in models.items():
        fresh = build_recommender(config, data.n_users, data.n_items)
        speeds = {}
        for grouped in (False, True):
            for bf16 in (False, True):
                run = RunConfig(
                    batch_size=args.batch_size,
                    group_by_length=grouped,
                    mixed_precision="bf16" if bf16 else "no",
                    select_metric="hr@10",
                )
                setting = Config(
                    model=config, datasets=DatasetConfig(name="bench", path=args.dataset, shape="sequence"), run=run
                )
                variant = f"{'length_grouped' if grouped else 'full_width'}{'_bf16' if bf16 else ''}"
                speeds[variant] = training_speed(fresh, data, setting, args.train_batches, grouped and fresh.padding_invariant)  # fmt: skip
        ratios = {
            f"{variant}_ratio": round(speed / speeds["full_width"], 2)
            for variant, speed in speeds.items()
            if variant != "full_width"
        }
        emit(
            "float32; *_bf16: bf16 autocast",
            **common,
            model=name,
            figure="train_samples_per_second",
            **{variant: round(speed, 1) for variant, speed in speeds.items()},
            **ratios,
        )
        model = load_recommender(checkpoint) if checkpoint else fresh
        for steps in (1, 4, 8, 32) if name == "diffurec" else (None,):
            speed, hr = inference(model, data, users, args.batch_size, steps)
            emit(
                "float32",
                **common,
                model=name,
                figure="inference",
                reverse_steps=steps,
                users_per_second=round(speed, 1),
                test_hr10=round(hr, 4),
                users=len(users),
                checkpoint=str(checkpoint) if checkpoint else None,
            )


if __name__ == "__main__":
    main()
