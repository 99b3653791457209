"""``diffrec demo`` / ``make demo``: DiffRec end to end on ML-100K on the CPU.

Stages: prepare ML-100K and its item cards; MF (``train_configs/demo_mf_ml100k.yaml``); the tiny
SD3.5-shaped pipeline, CLIP and VLM folders; base weights for the tiny pipeline trained on the cards
(cached under a fingerprint, so a second run skips them); the in-domain CLIP scorer that judges the
images (kept once trained); the joint DiffRec run — CoRA on SmolLM2 and personalized images — with its
evaluation (``train_configs/demo_ml100k.yaml``); and ``runs/demo/report.html``. Each stage is a function
of the shared state, so ``bench/end_to_end.py`` can time and measure them one by one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from minigpt4.config import Config, load_config
from minigpt4.io import json_safe

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"
TINY_MODELS = CONFIGS.parent / "models" / "tiny"  # `diffrec models make-tiny models/tiny`
MF_CONFIG = CONFIGS / "demo_mf_ml100k.yaml"
JOINT_CONFIG = CONFIGS / "demo_ml100k.yaml"
CARD_SIZE = 64


@dataclass
class DemoState:
    """What the stages hand to each other."""

    mf_options: list[str]
    joint_options: list[str]
    mf_config: Config | None = None
    joint_config: Config | None = None
    results: dict = field(default_factory=dict)


def prepare_data(state: DemoState) -> dict:
    """ML-100K in the data contract and a card per movie as its images table (both only when missing)."""
    from minigpt4.data.contract import save_rating_dataset
    from minigpt4.data.images import IMAGE_TABLE, render_item_cards
    from minigpt4.data.movielens import prepare_ml100k

    state.mf_config = load_config(MF_CONFIG, state.mf_options)
    root = state.mf_config.datasets.path
    if not (root / "meta.json").is_file():
        print(f"preparing ML-100K into {root}", file=sys.stderr)
        save_rating_dataset(root, *prepare_ml100k())
    if not (root / IMAGE_TABLE).is_file():
        render_item_cards(root, CARD_SIZE)
    return {"dataset": str(root)}


def train_mf(state: DemoState) -> dict:
    """The collaborative model behind CoRA and the image fusion."""
    from minigpt4.training.pretrain import pretrain

    mf = pretrain(state.mf_config)
    state.joint_config = load_config(
        JOINT_CONFIG,
        [
            f"model.rec.collab.ckpt={mf['checkpoint']}",
            f"datasets.path={state.mf_config.datasets.path}",
            *state.joint_options,
        ],
    )
    return {key: value for key, value in mf.items() if key != "curve"}


def tiny_models(state: DemoState) -> dict:
    """The tiny SD3, open_clip and VLM folders (written once); the SD3 one is where the base training starts."""
    from minigpt4.diffusion.tiny import write_tiny_clip, write_tiny_sd3, write_tiny_vlm

    folder = TINY_MODELS
    written = {}
    for name, write in (("sd3", write_tiny_sd3), ("clip", write_tiny_clip), ("vlm", write_tiny_vlm)):
        if not (folder / name).is_dir():
            write(folder / name)
            written[name] = str(folder / name)
    return {"folder": str(folder), "written": written}


def base_weights(state: DemoState) -> dict:
    """The tiny pipeline's VAE and transformer trained on every card, cached by fingerprint."""
    from minigpt4.training.base_pipeline import BaseTrainingSettings, train_base_pipeline

    image = state.joint_config.model.image
    settings = BaseTrainingSettings(caption=image.flow.caption, resolution=image.flow.resolution)
    return train_base_pipeline(TINY_MODELS / "sd3", state.joint_config.datasets.path, image.pipeline.path, settings)


def train_scorer(state: DemoState) -> dict:
    """The in-domain CLIP scorer the images are judged by, trained on the cards' held-out split once (kept)."""
    from minigpt4.training.clip_scorer import train_clip

    image = state.joint_config.model.image
    kept = image.clip.path / "train_clip_metrics.json"
    if kept.is_file():
        return {**json.loads(kept.read_text()), "cached": True}
    return {
        **train_clip(state.joint_config.datasets.path, image.clip.path, caption=image.flow.caption),
        "cached": False,
    }


def train_joint(state: DemoState) -> dict:
    """CoRA and the personalized images in one run, then both evaluated."""
    from minigpt4.training.joint import train_diffrec

    return train_diffrec(state.joint_config)


def write_demo_report(state: DemoState) -> dict:
    """MF on the rows CoRA was scored on, and the report page."""
    from minigpt4.data.contract import load_rating_dataset, subsample
    from minigpt4.evaluation.ctr import frame_metrics
    from minigpt4.evaluation.report import write_report
    from minigpt4.recommenders import load_recommender

    config, joint = state.joint_config, state.results["train_joint"]
    dataset = load_rating_dataset(config.datasets.path)
    rows = subsample(dataset.splits["test"], config.run.test_rows, config.run.seed)
    mf = json_safe(frame_metrics(load_recommender(config.model.rec.collab.ckpt), rows))
    table = [("MF (the collaborative model)", mf), ("DiffRec: CoRA on SmolLM2-135M + MF weights", joint)]
    path = write_report(config.run.output_dir.parent, table, joint, dataset, Path(joint["run_dir"]) / "images")
    return {"report": str(path), "mf_on_the_same_rows": mf}


STAGES: list[tuple[str, Callable[[DemoState], dict]]] = [
    ("prepare_data", prepare_data),
    ("train_mf", train_mf),
    ("tiny_models", tiny_models),
    ("base_weights", base_weights),
    ("train_scorer", train_scorer),
    ("train_joint", train_joint),
    ("report", write_demo_report),
]


def run_demo(mf_options: list[str], joint_options: list[str]) -> dict:
    """Run every stage in order; write every stage's figures to ``results.json`` beside the report and print a
    short summary last; returns the figures and each stage's wall seconds."""
    state = DemoState(mf_options, joint_options)
    seconds = {}
    for name, stage in STAGES:
        start = time.perf_counter()
        state.results[name] = stage(state)
        seconds[name] = round(time.perf_counter() - start, 1)
    figures = {name: {k: v for k, v in result.items() if k != "curve"} for name, result in state.results.items()}
    results = json_safe({"seconds": seconds, **figures})
    path = Path(state.results["report"]["report"]).with_name("results.json")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(demo_summary(results, path, joint_options))
    return results


def demo_summary(results: dict, results_path: Path, joint_options: list[str]) -> str:
    """The demo's last screen: the AUC table, the image and reply arms, seconds, hardware, where the report and
    the full figures are, and how to use the run; figures rounded, every line short."""
    from minigpt4.diffusion.generate import ARMS

    joint, mf, seconds = results["train_joint"], results["report"]["mf_on_the_same_rows"], results["seconds"]
    images = joint["images"]
    lines = [
        f"DiffRec demo on ML-100K: {joint['test']['n']} seeded test rows",
        f"  {'':<30} {'AUC':>7} {'UAUC':>7} {'warm AUC':>9} {'cold AUC':>9}",
        *(
            f"  {name:<30} {_fmt(m['test']['auc']):>7} {_fmt(m['test']['uauc']):>7} {_fmt(m['test_warm']['auc']):>9} {_fmt(m['test_cold']['auc']):>9}"
            for name, m in (("MF", mf), ("DiffRec (CoRA, SmolLM2-135M)", joint))
        ),
        f"images for {images['pairs']} liked test pairs, scored by {images['backbone']}:",
        *(
            f"  {arm:<9} CLIP-T {_fmt(images[arm]['clip_t'], 2)}  CLIP-I {_fmt(images[arm]['clip_i'], 2)}  margin {_margin(images[arm]['personalization'])}"
            for arm in ARMS
        ),
        *_generic_lines(images["generic"]),
        *_reply_lines(images.get("reply_personalization")),
        "seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items()) + f"; total {sum(seconds.values()):.0f}",
        f"hardware: {_hardware_line(joint['hardware'])}",
        f"report:  {results['report']['report']}",
        f"figures: {results_path}",
        *_serving_lines(joint_options),
    ]  # fmt: skip
    return "\n".join(lines)


def _serving_lines(joint_options: list[str]) -> list[str]:
    """How to use the demo run: the app and the command line."""
    config = JOINT_CONFIG.relative_to(Path.cwd()) if JOINT_CONFIG.is_relative_to(Path.cwd()) else JOINT_CONFIG
    options = f" --options {' '.join(joint_options)}" if joint_options else ""
    return [
        f"use the run: .venv/bin/diffrec app --cfg-path {config}{options}   (then open http://127.0.0.1:7860)",
        f"         or: .venv/bin/diffrec recommend --cfg-path {config}{options} --user 5 --replies",
    ]


def _hardware_line(hardware: dict) -> str:
    """The joint run's CPU, threads and the precision ``auto`` chose, on one line."""
    precision = ", ".join(f"{key} {value['resolved']}" for key, value in hardware["precision"].items())
    return f"{hardware['cpu']} ({hardware['cpu_capability']}, native bf16: {hardware['native_bf16']}), {hardware['threads']} threads; {precision}"


def _generic_lines(generic: dict) -> list[str]:
    """The held-out users' generic-instruction arms, or why they are missing."""
    from minigpt4.diffusion.generate import ARMS

    if "missing" in generic:
        return [f"generic instruction: missing ({generic['missing']})"]
    return [
        f"'{generic['instruction']}' for {generic['users']} held-out users:",
        *(f"  {arm:<9} margin {_margin(generic[arm]['personalization'])}" for arm in ARMS),
    ]


def _reply_lines(replies: dict | None) -> list[str]:
    """The replies' personalization margin per arm, or why it is missing."""
    if replies is None:
        return ["replies: personalization not measured (model.joint.reply_users 0)"]
    if "missing" in replies:
        return [f"replies: missing ({replies['missing']})"]
    return [
        f"replies of {replies['users']} held-out users, embedded by {replies['embedding']}:",
        *(f"  {arm:<9} margin {_margin(metrics)}" for arm, metrics in replies["arms"].items()),
    ]


def _margin(personalization: dict) -> str:
    """The personalization margin with its identification p-value, or why it is missing."""
    if "missing" in personalization:
        return f"missing ({personalization['missing']})"
    return f"{_fmt(personalization['margin'], 2)} (identification {personalization['identification_acc1']:.2f}, p {personalization['identification_p_value']:.3f})"


def _fmt(value: float | None, digits: int = 4) -> str:
    """A metric for people: ``digits`` decimals, or 'missing'."""
    return "missing" if value is None else f"{value:.{digits}f}"
