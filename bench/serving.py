"""Latency of serving a trained run (``minigpt4/serving.py``), on the demo run by default.

- ``recommend`` (K = 10 of 50 collaborative candidates) over ``--requests`` seeded dataset users: p50 / p95
  seconds, plain, with a reply per item, and with an image per item;
- the LLM's scoring of one request's 50 candidates: batched (``run.eval_batch_size`` prompts per forward
  pass, as ``recommend`` does) against one prompt at a time, the same prompts in the same run, and the ratio;
- how much of those prompts a shared prefix could skip: the candidates' prompts share the user's part
  (history titles) up to the target title. TALLRec and CoLLM could run that prefix once per request and
  only the suffixes per candidate; CoRA cannot, since its per-sample LoRA weights (generated from the
  user *and* the item embedding) change every layer's output at every position, the prefix's included.

    python bench/serving.py [--run train_configs/demo_ml100k.yaml] [--requests 20] [--extras 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt4.llm.recommender import prompt_rows  # noqa: E402
from minigpt4.serving import DiffRec  # noqa: E402
from measure import emit  # noqa: E402  (bench/measure.py)


def percentiles(seconds: list[float]) -> dict:
    """p50 / p95 / mean of request times."""
    return {"p50_s": round(float(np.percentile(seconds, 50)), 3), "p95_s": round(float(np.percentile(seconds, 95)), 3), "mean_s": round(float(np.mean(seconds)), 3), "requests": len(seconds)}


def main() -> None:
    """Time the requests, the two ways of scoring candidates, and count the shareable prefix."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "train_configs" / "demo_ml100k.yaml")
    parser.add_argument("--options", nargs="*", default=[])
    parser.add_argument("--requests", type=int, default=20, help="plain recommend requests (default 20)")
    parser.add_argument("--extras", type=int, default=20, help="requests with replies, and with images (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    served = DiffRec.load(args.run, args.options)
    dtype, device = served.precision(), served.rec.llm.device
    users = np.random.default_rng(args.seed).choice(sorted(served.dataset.splits["train"]["uid"].unique()), size=args.requests, replace=False).tolist()
    served.recommend(users[0])  # warm-up: first-call allocations and kernel choices are not a request's cost
    arms = {"plain": ({}, users), "replies": ({"replies": True}, users[: args.extras])}
    if served.image_model is not None:
        arms["images"] = ({"images": True}, users[: args.extras])
    for arm, (extra, arm_users) in arms.items():
        seconds = []
        for uid in arm_users:
            start = time.perf_counter()
            served.recommend(int(uid), k=10, candidates=50, **extra)
            seconds.append(time.perf_counter() - start)
        emit(dtype, device, figure=f"serving/recommend/{arm}", run=str(served.checkpoint), k=10, candidates=50, **percentiles(seconds))

    batched, single, prefix_shares = [], [], []
    config, history = served.rec_config, served.rec.collab.max_history if served.rec.collab is not None else 0
    for uid in users:
        profile = served.user(int(uid))
        pool = [entry.item for entry in served.recommend(profile, k=50, candidates=50)]
        start = time.perf_counter()
        together = served.llm_scores(profile, pool)
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        alone = torch.cat([served.llm_scores(profile, [item]) for item in pool])
        single.append(time.perf_counter() - start)
        # The same scores either way (up to padding's effect on bf16 kernels).
        assert torch.allclose(together, alone, atol=0.1), float((together - alone).abs().max())
        ids = prompt_rows(served.rating_rows(profile, pool), config, served.template, served.tokenizer, history, "bench").input_ids
        prefix = len(os.path.commonprefix(ids))
        prefix_shares.append(prefix * (len(ids) - 1) / sum(map(len, ids)))
    emit(
        dtype, device, figure="serving/llm_candidate_scoring", mode=config.mode, candidates=50, batch_size=served.config.run.eval_batch_size,
        batched_s=round(float(np.median(batched)), 3), one_by_one_s=round(float(np.median(single)), 3),
        speedup=round(float(np.median(single) / np.median(batched)), 2), requests=len(users),
    )  # fmt: skip
    emit(
        dtype, device, figure="serving/shared_prefix", mode=config.mode, candidates=50, shareable_token_share=round(float(np.mean(prefix_shares)), 3),
        applies=config.mode in ("tallrec", "collm"),
        note="share of the candidates' prompt tokens a once-per-request prefix would skip; CoRA's per-sample weights change the prefix too",
    )  # fmt: skip


if __name__ == "__main__":
    main()
