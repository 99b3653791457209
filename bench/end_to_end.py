"""The demo's stages, each timed with its peak memory: one JSON line per stage, then the total.

Runs the same stage functions as ``diffrec demo`` (``minigpt4/demo.py``) with the same configs; options
pass through. Delete ``models/demo/sd3-cards`` first to include the base training in a first-run figure
(a second run finds it cached).

    python bench/end_to_end.py [--options k=v ...] [--joint-options k=v ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit, peak_bytes, precision_label, start_peak  # noqa: E402  (bench/measure.py)

from minigpt4.demo import STAGES, DemoState  # noqa: E402


def main() -> None:
    """Run and measure every stage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="*", default=[], help="overrides for train_configs/demo_mf_ml100k.yaml")
    parser.add_argument("--joint-options", nargs="*", default=[], help="overrides for train_configs/demo_ml100k.yaml")
    args = parser.parse_args()
    device = torch.device("cpu")
    state = DemoState(args.options, args.joint_options)
    total = 0.0
    for name, stage in STAGES:
        baseline = start_peak(device)
        start = time.perf_counter()
        result = stage(state)
        seconds = time.perf_counter() - start
        peak = peak_bytes(device)
        state.results[name] = result
        total += seconds
        extra = {"cached": result["cached"]} if "cached" in result else {}
        emit(
            stage_dtype(result),
            bench="end_to_end",
            stage=name,
            seconds=round(seconds, 1),
            peak_mb=round(peak / 2**20),
            peak_growth_mb=round((peak - baseline) / 2**20),
            **extra,
        )
    emit(stage_dtype(state.results["train_joint"]), bench="end_to_end", stage="total", seconds=round(total, 1))


def stage_dtype(result: dict) -> str:
    """What a stage computed in: a training stage's resolved precision, float32 for the rest."""
    return precision_label(result.get("hardware", {}).get("precision", {}))


if __name__ == "__main__":
    main()
