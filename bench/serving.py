"""Latency of serving a trained run (``minigpt4/serving.py``), on the demo run by default.

- ``recommend`` (K = 10 of 50 collaborative candidates) over ``--requests`` seeded dataset users: p50 / p95
  seconds, plain, with a reply per item, and with an image per item;
- the LLM's scoring of one request's 50 candidates: batched (``run.eval_batch_size`` prompts per forward
  pass, as ``recommend`` does) against one prompt at a time, the same prompts in the same run, and the ratio;
- and, where the mode allows it (TALLRec, CoLLM), batched with the prompts' common beginning (the user's
  part, up to the target title) run once per batch and its key/value cache shared by the candidates.
  CoRA cannot share it: its per-sample LoRA weights (generated from the user *and* the item embedding)
  change every layer's output at every position, the prefix's included. The share of prompt tokens in
  that prefix is printed for every mode.

    python bench/serving.py [--run train_configs/demo_ml100k.yaml] [--requests 20] [--extras 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit  # noqa: E402  (bench/measure.py)

from minigpt4.llm.recommender import prompt_rows  # noqa: E402
from minigpt4.llm.scoring import shared_prefix_length  # noqa: E402
from minigpt4.serving import DiffRec  # noqa: E402


def percentiles(seconds: list[float]) -> dict:
    """p50 / p95 / mean of request times."""
    return {
        "p50_s": round(float(np.percentile(seconds, 50)), 3),
        "p95_s": round(float(np.percentile(seconds, 95)), 3),
        "mean_s": round(float(np.mean(seconds)), 3),
        "requests": len(seconds),
    }


def main() -> None:
    """Time the requests and the ways of scoring candidates, and count the shareable prefix."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "train_configs" / "demo_ml100k.yaml")
    parser.add_argument("--options", nargs="*", default=[])
    parser.add_argument("--requests", type=int, default=20, help="plain recommend requests (default 20)")
    parser.add_argument("--extras", type=int, default=20, help="requests with replies, and with images (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    served = DiffRec.load(args.run, args.options)
    dtype, device = served.precision(), served.rec.llm.device
    users = (
        np.random.default_rng(args.seed)
        .choice(sorted(served.dataset.splits["train"]["uid"].unique()), size=args.requests, replace=False)
        .tolist()
    )
    served.recommend(users[0])  # warm-up: first-call allocations and kernel choices are not a request's cost
    arms = {"plain": ({}, users), "replies": ({"replies": True}, users[: args.extras])}
    if served.image_model is not None:
        arms["images"] = ({"images": True}, users[: args.extras])
    for arm, (extra, arm_users) in arms.items():
        if not arm_users:
            continue
        seconds = []
        for uid in arm_users:
            start = time.perf_counter()
            served.recommend(int(uid), k=10, candidates=50, **extra)
            seconds.append(time.perf_counter() - start)
        emit(
            dtype,
            device,
            figure=f"serving/recommend/{arm}",
            run=str(served.checkpoint),
            k=10,
            candidates=50,
            **percentiles(seconds),
        )

    timings: dict[str, list[float]] = {"one_by_one": [], "batched": [], "batched_shared_prefix": []}
    prefix_shares = []
    differences, agreement = defaultdict(list), defaultdict(list)
    config, history = served.rec_config, served.rec.collab.max_history if served.rec.collab is not None else 0
    ways = {"one_by_one": None, "batched": False, "batched_shared_prefix": True}
    if not served.rec.shares_prefixes:
        del ways["batched_shared_prefix"], timings["batched_shared_prefix"]
    for uid in users:
        profile = served.user(int(uid))
        pool, _ = served.candidates(profile, 50)
        scores = {}
        for way, shared in ways.items():
            start = time.perf_counter()
            if way == "one_by_one":
                scores[way] = torch.cat([served.llm_scores(profile, [item]) for item in pool])
            else:
                scores[way] = served.llm_scores(profile, pool, shared_prefix=shared)
            timings[way].append(time.perf_counter() - start)
        for way, values in scores.items():  # the same scores up to rounding (exact in fp32: tests/test_llm.py)
            differences[way].append(float((values - scores["one_by_one"]).abs().max()))
            agreement[way].append(float(spearmanr(values, scores["one_by_one"])[0]))
        ids = prompt_rows(
            served.rating_rows(profile, pool), config, served.template, served.tokenizer, history, "bench"
        ).input_ids
        prefix = shared_prefix_length(ids)
        prefix_shares.append(prefix * (len(ids) - 1) / sum(map(len, ids)))
    medians = {f"{way}_s": round(float(np.median(values)), 3) for way, values in timings.items()}
    rounding = {f"{way}_max_abs_difference": round(max(differences[way]), 4) for way in timings if way != "one_by_one"}
    rounding |= {
        f"{way}_spearman_with_one_by_one": round(float(np.mean(agreement[way])), 4)
        for way in timings
        if way != "one_by_one"
    }
    speedups = {
        f"{way}_speedup_over_one_by_one": round(float(np.median(timings["one_by_one"]) / np.median(values)), 2)
        for way, values in timings.items()
        if way != "one_by_one"
    }
    emit(
        dtype, device, figure="serving/llm_candidate_scoring", run=str(served.checkpoint), mode=config.mode, candidates=50,
        batch_size=served.config.run.eval_batch_size, requests=len(users), **medians, **speedups, **rounding,
        shareable_token_share=round(float(np.mean(prefix_shares)), 3), shared_prefix_applies=served.rec.shares_prefixes,
    )  # fmt: skip


if __name__ == "__main__":
    main()
