"""TALLRec, CoLLM and CoRA on CoLLM's ML-1M split, measured so that the modes can be ranked.

Every run trains SmolLM2-135M-Instruct (dtype `auto`: bf16 only where native) from the configs
`train_configs/{mode}_collm_ml1m.yaml` on seeded batches of the whole training split, evaluates every
`--eval-every` steps on `--valid-rows` seeded valid rows (the whole split with 0), keeps the best
checkpoint by valid AUC (early stopping after `--patience` evaluations), and scores it on CoLLM's whole
test split (7,331 rows: AUC, UAUC, warm, cold). The collaborative teacher is one MF checkpoint
(`train_configs/mf_collm_ml1m.yaml`, trained here first) for every mode, and is scored on the same rows.

Variants: `tallrec`; `collm` (ours: LoRA and one GELU MLP per side, trained together); `collm-published`
(CoLLM's two stages: the same seed's TALLRec LoRA, frozen, and one shared ReLU MLP of 10 x 256); `cora`
(ours: our generator plus a text LoRA); `cora-published` (CoRA's Q-former generator, unit-norm A, dropout
0.05, fp32 update, no text LoRA).

Runs are long and resumable: each (variant, seed) trains under runs/bench_llm_modes/<variant>/seed<seed>;
invoking the script again continues an unfinished run from its newest checkpoint (`run.resume_from=latest`)
and skips finished ones. Prints one JSON line per run and per teacher, then a Markdown table (mean and
spread over seeds) and, seed by seed, CoRA-published less CoLLM. The figures of every finished run land in
bench/results/llm_modes.json, which is kept in the repository: run folders do not outlive their machine, the
record does. New runs join it only with the teacher its runs had (the same test figures): a missing teacher
checkpoint is trained again, or given with --teacher, and checked against the record.

    python bench/llm_modes.py --variants cora-published collm --seeds 0 1 2
    python bench/llm_modes.py --table        # only the table, from the record
    python bench/llm_modes.py --table --figure docs/images/llm_modes_curves.png   # and the recorded curves

Runs recorded from the docs before the record existed kept no curve: the figure leaves them out and says which.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit, precision_label  # noqa: E402  (bench/measure.py)
from scipy import stats  # noqa: E402

from minigpt4.config import load_config  # noqa: E402
from minigpt4.data.collm import import_collm  # noqa: E402
from minigpt4.data.contract import load_rating_dataset, save_rating_dataset  # noqa: E402
from minigpt4.errors import DiffRecError  # noqa: E402
from minigpt4.evaluation.ctr import frame_metrics  # noqa: E402
from minigpt4.io import json_safe, read_json  # noqa: E402
from minigpt4.recommenders import load_recommender  # noqa: E402
from minigpt4.training.llm import train_llm  # noqa: E402
from minigpt4.training.pretrain import pretrain  # noqa: E402
from minigpt4.training.run_folder import resume_folder  # noqa: E402

OUT = ROOT / "runs" / "bench_llm_modes"
RECORD = ROOT / "bench" / "results" / "llm_modes.json"
# TALLRec's stage-1 LoRA in CoLLM's published code: q and v projections.
STAGE1_LORA = "model.lora={r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}"
VARIANTS = {
    "tallrec": ("tallrec", [STAGE1_LORA]),
    "collm": ("collm", []),
    "collm-published": ("collm", [STAGE1_LORA, "model.collm.recipe=published", "model.collm.hidden=2560"]),
    "cora": ("cora", []),
    "cora-published": ("cora", ["model.cora.generator=published", "model.lora.enabled=false"]),
}
FIGURES = ("test", "test_warm", "test_cold", "valid")
CLAIM = ("cora-published", "collm")  # the pair whose ordering the benchmark is for, compared seed by seed


def teacher(results: dict, given: Path | None) -> Path:
    """The MF teacher's checkpoint: ``given``, else the recorded one when it is on disk, else one trained here; a
    new one must score on the whole test split as the recorded teacher did."""
    recorded = results.get("teacher")
    if given is None and (checkpoint := on_disk(recorded)):
        return checkpoint
    config = load_config(
        ROOT / "train_configs" / "mf_collm_ml1m.yaml", ["run.cpu=true", f"run.output_dir={OUT / 'mf'}"]
    )
    if not (config.datasets.path / "meta.json").is_file():
        shared = Path(os.environ.get("DIFFREC_SHARED_DATA", ROOT.parent / "shared" / "data")) / "collm-ml-1m"
        save_rating_dataset(config.datasets.path, *import_collm(shared))
    checkpoint = given.resolve() if given else Path(pretrain(config)["checkpoint"])
    model, splits = load_recommender(checkpoint), load_rating_dataset(config.datasets.path).splits
    scored = frame_metrics(model, splits["test"])
    if recorded and abs(scored["test"]["auc"] - recorded["test"]["auc"]) > 1e-6:
        raise DiffRecError(
            f"{RECORD.relative_to(ROOT)}: its runs used an MF teacher with test AUC {recorded['test']['auc']:.4f}, "
            f"{checkpoint} scores {scored['test']['auc']:.4f}; pass that teacher's checkpoint with --teacher, "
            "or move the record aside to start a new one"
        )
    valid = frame_metrics(model, splits["valid"])["test"]  # all valid rows (frame_metrics names them test)
    results["teacher"] = json_safe({"checkpoint": portable(checkpoint), "valid": valid, **scored})
    emit("float32", bench="llm_modes", model="mf_teacher", **results["teacher"])
    return checkpoint


def on_disk(entry: dict | None) -> Path | None:
    """The checkpoint of a recorded run or teacher, when this clone has it (entries from the docs have none)."""
    if not entry or not entry["checkpoint"]:
        return None
    path = ROOT / entry["checkpoint"]  # an absolute path stays as it is
    return path if path.is_dir() else None


def portable(path: Path | str) -> str:
    """``path`` relative to the repository when it lies inside it, so that the record reads the same on every
    clone."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_variant(variant: str, seed: int, args: argparse.Namespace, results: dict, mf: Path) -> dict:
    """Train (or continue) one variant at one seed; its figures on the whole test split."""
    mode, extra = VARIANTS[variant]
    folder = OUT / variant / f"seed{seed}"
    options = [
        f"run.output_dir={folder}", f"run.seed={seed}", "run.train_rows=null", f"run.valid_rows={args.valid_rows or 'null'}",
        "run.test_rows=null", f"run.eval_every_steps={args.eval_every}", f"run.max_steps={args.max_steps}",
        f"run.patience={args.patience}", f"run.eval_batch_size={args.eval_batch_size}", *extra, *args.options,
    ]  # fmt: skip
    if mode != "tallrec":
        options.append(f"model.collab.ckpt={mf}")
    if variant == "collm-published":
        stage1 = on_disk(results.get(f"tallrec/seed{seed}"))
        if stage1 is None:
            raise DiffRecError(
                f"collm-published at seed {seed} needs the tallrec run of that seed, finished on this disk"
            )
        options.append(f"model.collm.stage1={stage1}")
    if unfinished(folder):
        options.append("run.resume_from=latest")  # an earlier invocation stopped before the end
    metrics = train_llm(load_config(ROOT / "train_configs" / f"{mode}_collm_ml1m.yaml", options))
    keys = (
        *FIGURES,
        "best_step",
        "steps_run",
        "train_seconds",
        "evaluation_seconds",
        "train_samples_per_second",
        "curve",
    )
    return {key: metrics[key] for key in keys} | {
        "checkpoint": portable(metrics["checkpoint"]),
        "precision": precision_label(metrics["hardware"]["precision"]),
    }


def check_protocol(results: dict, args: argparse.Namespace) -> None:
    """Record the protocol with the first run; a later invocation with another one would put runs that do not
    compare into one table, so it is refused with the differing setting named."""
    protocol = {
        "max_steps": args.max_steps,
        "eval_every": args.eval_every,
        "valid_rows": args.valid_rows,
        "patience": args.patience,
        "options": list(args.options),
    }
    recorded = results.setdefault("protocol", protocol)
    differing = [key for key in protocol if recorded.get(key) != protocol[key]]
    if differing:
        key = differing[0]
        raise DiffRecError(
            f"{RECORD.relative_to(ROOT)}: its runs used --{key.replace('_', '-')} {recorded.get(key)}, this invocation "
            f"{protocol[key]}; use the recorded setting, or move the record aside to start a new one"
        )


def unfinished(folder: Path) -> bool:
    """Whether an earlier run under ``folder`` left a checkpoint to continue from (the trainers' own rule)."""
    try:
        resume_folder(Path("latest"), folder)
    except DiffRecError:
        return False
    return True


def mean_and_spread(values: list[float | None], digits: int = 4) -> str:
    """One table cell: the mean over seeds, ± their standard deviation from two seeds on; missing figures left out
    and counted."""
    known = [value for value in values if value is not None]
    if not known:
        return "missing"
    spread = f" ± {statistics.stdev(known):.{digits}f}" if len(known) > 1 else ""
    counted = f" ({len(known)} of {len(values)} runs)" if len(known) < len(values) else ""
    return f"{statistics.mean(known):.{digits}f}{spread}{counted}"


def table(results: dict) -> str:
    """Mean and spread over seeds of each variant's test figures, next to the teacher's."""
    lines = [
        "| model | seeds | test AUC | test UAUC | warm AUC | cold AUC | best step / steps run | training s | wall s (with evaluations) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mf = results.get("teacher")
    if mf:
        lines.append(f"| MF teacher | - | {mf['test']['auc']:.4f} | {mf['test']['uauc']:.4f} | {mf['test_warm']['auc']:.4f} | {mf['test_cold']['auc']:.4f} | - | - | - |")  # fmt: skip
    for variant in VARIANTS:
        runs = [run for _, run in sorted(seeds_of(results, variant).items())]
        if not runs:
            continue
        figures = [
            mean_and_spread([run[split][name] for run in runs])
            for split, name in (("test", "auc"), ("test", "uauc"), ("test_warm", "auc"), ("test_cold", "auc"))
        ]
        steps = ", ".join(f"{run['best_step']} / {run['steps_run']}" for run in runs)
        # Runs resumed from checkpoints written before evaluations were timed have no training-only figure.
        training = mean_and_spread(
            [
                None if run.get("evaluation_seconds") is None else run["train_seconds"] - run["evaluation_seconds"]
                for run in runs
            ],
            digits=0,
        )
        wall = mean_and_spread([run["train_seconds"] for run in runs], digits=0)
        lines.append(f"| {variant} | {len(runs)} | {' | '.join(figures)} | {steps} | {training} | {wall} |")
    return "\n".join(lines)


def seeds_of(results: dict, variant: str) -> dict[int, dict]:
    """The finished runs of ``variant``, by seed."""
    return {int(key.split("/seed")[1]): run for key, run in results.items() if key.startswith(f"{variant}/seed")}


def paired(results: dict, first: str, second: str) -> str:
    """``first`` less ``second`` in test AUC and UAUC on each seed both ran (same teacher, selection and test
    rows), their mean with its 95% t interval over those seeds, and on how many seeds ``first`` leads; empty when
    they share no seed."""
    ones, others = seeds_of(results, first), seeds_of(results, second)
    seeds = sorted(ones.keys() & others.keys())
    if not seeds:
        return ""
    gaps = {name: [ones[seed]["test"][name] - others[seed]["test"][name] for seed in seeds] for name in ("auc", "uauc")}
    per_seed = "; ".join(f"seed {seed} {gaps['auc'][i]:+.4f} / {gaps['uauc'][i]:+.4f}" for i, seed in enumerate(seeds))
    leads = ", ".join(
        f"{name.upper()} {sum(gap > 0 for gap in values)} of {len(seeds)}" for name, values in gaps.items()
    )
    means = " / ".join(f"{statistics.mean(values):+.4f}" for values in gaps.values())
    if len(seeds) > 1:  # the seeds are the samples: the interval says whether the gap outgrows their spread
        quantile = stats.t.ppf(0.975, len(seeds) - 1) / math.sqrt(len(seeds))
        centre_and_half = [(statistics.mean(values), quantile * statistics.stdev(values)) for values in gaps.values()]
        bounds = [f"[{centre - half:+.4f}, {centre + half:+.4f}]" for centre, half in centre_and_half]
        means += f" (95% interval over seeds {' / '.join(bounds)})"
    return (
        f"{first} less {second}, test AUC / UAUC on the same seeds: {per_seed}; mean {means}; {first} leads on {leads}"
    )


def plot(results: dict, path: Path) -> None:
    """Valid AUC against optimizer steps for every run (one colour per variant, a dot at the selected step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    colours = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    labelled, uncurved = set(), []
    for key, run in sorted(results.items()):
        variant = key.split("/")[0]
        if variant not in VARIANTS:
            continue
        if not run["curve"]:  # recorded from the docs, before the record kept curves
            uncurved.append(key)
            continue
        points = [(point["step"], point["valid_auc"]) for point in run["curve"] if point.get("valid_auc") is not None]
        axis.plot(*zip(*points), color=colours[variant], label=None if variant in labelled else variant, alpha=0.8)
        axis.plot(run["best_step"], run["valid"]["auc"], "o", color=colours[variant])  # the selected checkpoint
        labelled.add(variant)
    if "teacher" in results:
        axis.axhline(
            results["teacher"]["valid"]["auc"], color="grey", linestyle=":", label="MF teacher (all valid rows)"
        )
    axis.set_xlabel("optimizer step (8 rows)")
    axis.set_ylabel("valid AUC")
    axis.set_title("SmolLM2-135M on CoLLM's ML-1M: valid AUC while training")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    if uncurved:
        print(f"{path}: no curve in the record for {', '.join(uncurved)}; drawn without them", file=sys.stderr)


def main() -> None:
    """Train what is missing, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-steps", type=int, default=768)
    parser.add_argument("--eval-every", type=int, default=32)
    parser.add_argument("--valid-rows", type=int, default=2000, help="seeded valid rows for selection (0: all 10,401)")
    parser.add_argument(
        "--patience", type=int, default=8, help="evaluations without a better valid AUC before stopping"
    )
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--options", nargs="*", default=[], help="overrides applied to every run's config")
    parser.add_argument("--table", action="store_true", help="only print the table (and draw --figure)")
    parser.add_argument("--figure", type=Path, help="draw the valid-AUC curves of the recorded runs into this PNG")
    parser.add_argument(
        "--teacher", type=Path, help="the MF checkpoint to use, checked against the record (default: the recorded one)"
    )
    args = parser.parse_args()
    try:
        update_and_report(args)
    except DiffRecError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None


def save(results: dict) -> None:
    """Write the record whole: a stop mid-write leaves the previous one in place."""
    partial = RECORD.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(partial, RECORD)


def update_and_report(args: argparse.Namespace) -> None:
    """Train the missing runs into the record, then print the table and the seed-by-seed line."""
    results = read_json(RECORD, dict) if RECORD.is_file() else {}
    if not args.table:
        check_protocol(results, args)
        mf = teacher(results, args.teacher)
        save(results)
        for seed in args.seeds:  # seed-major: every variant's first seed lands before any second seed
            for variant in args.variants:
                key = f"{variant}/seed{seed}"
                if key in results:
                    continue
                results[key] = json_safe(run_variant(variant, seed, args, results, mf))
                emit(
                    results[key]["precision"],
                    bench="llm_modes",
                    model=key,
                    **{k: v for k, v in results[key].items() if k not in ("curve", "precision")},
                )
                save(results)
    print(table(results))
    print(paired(results, *CLAIM))
    if args.figure:
        plot(results, args.figure)


if __name__ == "__main__":
    main()
