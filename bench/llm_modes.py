"""TALLRec, CoLLM and CoRA on CoLLM's ML-1M under one fixed budget, next to their MF teacher.

Every mode trains SmolLM2-135M-Instruct (on the CPU, in the dtype `auto` picks: bf16 only where native) on the same seeded 1,024 training
rows for the same 128 optimizer steps of 8 rows, selects its checkpoint on the same 300 valid rows,
and is scored on the same 2,000 test rows (the configs `train_configs/{mode}_collm_ml1m.yaml`). The MF
teacher (`train_configs/mf_collm_ml1m.yaml`, trained here first on the full training split) is scored
on those 2,000 rows too. Prints one JSON line per model (test AUC/UAUC, warm/cold AUC, train time,
learning curve) and then a Markdown table; everything also lands in runs/bench_llm_modes/results.json,
which keeps the modes of earlier runs so that modes can be measured one invocation at a time.

    python bench/llm_modes.py [--modes tallrec collm cora] [--options run.max_steps=64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit, precision_label  # noqa: E402  (bench/measure.py)

from minigpt4.config import load_config  # noqa: E402
from minigpt4.data.collm import import_collm  # noqa: E402
from minigpt4.data.contract import load_rating_dataset, save_rating_dataset, subsample  # noqa: E402
from minigpt4.evaluation.ctr import frame_metrics  # noqa: E402
from minigpt4.io import json_safe  # noqa: E402
from minigpt4.recommenders import load_recommender  # noqa: E402
from minigpt4.training.llm import train_llm  # noqa: E402
from minigpt4.training.pretrain import pretrain  # noqa: E402

OUT = ROOT / "runs" / "bench_llm_modes"


def main() -> None:
    """Train the teacher, then each mode, and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["tallrec", "collm", "cora"])
    parser.add_argument("--options", nargs="*", default=[], help="overrides applied to every mode's config")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    mf_config = load_config(
        ROOT / "train_configs" / "mf_collm_ml1m.yaml", ["run.cpu=true", f"run.output_dir={OUT / 'mf'}"]
    )
    if not (mf_config.datasets.path / "meta.json").is_file():
        shared = Path(os.environ.get("DIFFREC_SHARED_DATA", ROOT.parent / "shared" / "data")) / "collm-ml-1m"
        save_rating_dataset(mf_config.datasets.path, *import_collm(shared))
    dataset = load_rating_dataset(mf_config.datasets.path)
    teacher_ckpt = Path(pretrain(mf_config)["checkpoint"])
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.pop("teacher", None)
    for mode in args.modes:
        options = [f"run.output_dir={OUT / mode}", *args.options]
        if mode != "tallrec":
            options.append(f"model.collab.ckpt={teacher_ckpt}")
        config = load_config(ROOT / "train_configs" / f"{mode}_collm_ml1m.yaml", options)
        metrics = train_llm(config)
        results[mode] = {
            key: metrics[key]
            for key in (
                "test",
                "test_warm",
                "test_cold",
                "valid",
                "best_step",
                "steps_run",
                "train_seconds",
                "train_samples_per_second",
                "curve",
                "hardware",
            )
        }
        if "teacher" not in results:
            test_rows = subsample(dataset.splits["test"], config.run.test_rows, config.run.seed)
            results["teacher"] = json_safe(frame_metrics(load_recommender(teacher_ckpt), test_rows))
            emit("float32", bench="llm_modes", model="mf_teacher", **results["teacher"])
        emit(
            precision_label(metrics["hardware"]["precision"]),
            bench="llm_modes",
            model=mode,
            **{key: value for key, value in results[mode].items() if key != "hardware"},
        )
        results_path.write_text(json.dumps(results, indent=2))
    print("| model | test AUC | test UAUC | warm AUC | cold AUC | train s |\n|---|---|---|---|---|---|")
    for name in ["teacher", *(mode for mode in ("tallrec", "collm", "cora") if mode in results)]:
        result = results[name]
        cells = [result["test"]["auc"], result["test"]["uauc"], result["test_warm"]["auc"], result["test_cold"]["auc"]]
        seconds = result.get("train_seconds")
        print(
            f"| {name} | "
            + " | ".join("missing" if v is None else f"{v:.4f}" for v in cells)
            + f" | {'' if seconds is None else f'{seconds:.0f}'} |"
        )


if __name__ == "__main__":
    main()
