"""Joint DiffRec runs on tiny models: one and two processes agree, kill -9 then resume equals an
uninterrupted run, a NaN loss stops with a loadable last-good checkpoint, evaluate-only loads ``ckpt``,
every shipped config validates, the report page renders with its images, and the demo's base training of
the tiny pipeline on item cards fits them and is cached."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import joint_config, kill_when
from PIL import Image
from safetensors.torch import load_file

from minigpt4.cli import main
from minigpt4.config import DiffRecConfig, load_config
from minigpt4.data.contract import load_rating_dataset
from minigpt4.diffrec_model import DiffRecModel
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.report import write_report
from minigpt4.training import joint
from minigpt4.training.run_folder import TRAINER_STATE

ROOT = Path(__file__).resolve().parents[1]


def last_json_line(text: str) -> dict:
    """The final JSON line a command printed."""
    return json.loads(text.strip().splitlines()[-1])


def comparable(metrics: dict) -> dict:
    """Evaluation figures of a metrics dict (no paths, times or curves)."""
    return {
        "ctr": {split: metrics[split] for split in ("valid", "test", "test_warm", "test_cold")},
        "images": {
            variant: {key: metrics["images"][variant][key] for key in ("clip_t", "clip_i", "alpha", "images")}
            for variant in ("fused", "alpha0", "shuffled")
        },
    }


def test_joint_run_trains_both_halves_checkpoints_and_evaluates(trained_joint):
    metrics = trained_joint["metrics"]
    assert metrics["steps_run"] == 6 and [point["step"] for point in metrics["curve"]] == [3, 6]
    assert all({"rec_loss", "image_loss", "valid_auc"} <= set(point) for point in metrics["curve"])
    checkpoints = Path(metrics["run_dir"]) / "checkpoints"
    assert [path.name for path in checkpoints.iterdir()] == ["last"]  # no .partial left behind
    last = checkpoints / "last"
    assert json.loads((last / TRAINER_STATE).read_text())["step"] == 6
    for name in (
        "rec/adapter/adapter_model.safetensors",
        "rec/collab_modules.safetensors",
        "image/pytorch_lora_weights.safetensors",
        "image/fusion.safetensors",
        "optimizer.bin",
        "trainer_state.json",
    ):
        assert (last / name).is_file(), name
    assert not list(last.glob("model*.safetensors"))  # the frozen base models are never copied into a checkpoint
    # Both halves trained: every LoRA and CoRA B matrix starts at zero, so a non-zero one was updated.
    for name in (
        "rec/adapter/adapter_model.safetensors",
        "rec/collab_modules.safetensors",
        "image/pytorch_lora_weights.safetensors",
    ):
        b_matrices = [tensor for key, tensor in load_file(last / name).items() if "lora_B" in key or "lora_b." in key]
        assert b_matrices and any(tensor.abs().sum() > 0 for tensor in b_matrices), f"{name}: nothing trained"
    assert metrics["test"]["n"] == 32 == metrics["test_warm"]["n"] + metrics["test_cold"]["n"]
    images = metrics["images"]
    assert images["backbone"] == "open_clip clip" and images["pairs"] == 4
    assert images["fused"]["images"] == images["alpha0"]["images"] == 4 and images["alpha0"]["alpha"] == 0.0
    assert images["fused"]["clip_t"] is not None and images["fused"]["clip_i"] is not None
    assert [reply["user"] for reply in images["replies"]] and all(reply["reply"] for reply in images["replies"])
    stored = [
        json.loads(line) for line in (Path(metrics["run_dir"]) / "images" / "records.jsonl").read_text().splitlines()
    ]
    assert {record["variant"] for record in stored} == {"fused", "alpha0", "shuffled"}
    assert images["shuffled"]["images"] == 4
    # 4 pairs cannot tell 10 users apart: the metric says so instead of printing a number
    assert images["fused"]["personalization"] == {
        "missing": "needs 10 evaluated users with 2 or more held-out liked items; 3 have them"
    }
    # The 10 held-out users, drawn with the generic instruction in every arm and scored against their held-out item
    generic = images["generic"]
    assert generic["users"] == 10 and generic["held_out_items"] == 10 and generic["instruction"] == "a movie poster"
    assert generic["alpha0"]["alpha"] == 0.0 and generic["fused"]["alpha"] > 0
    for arm in ("fused", "alpha0", "shuffled"):
        scored = generic[arm]["personalization"]
        assert generic[arm]["images"] == 10 and scored["users"] == scored["scored_outputs"] == 10
        assert scored["identification_chance"] == 0.1 and math.isfinite(scored["margin"])
    # the gate reaches the images: forcing alpha to 0 changes what every held-out user is scored on
    assert (
        generic["fused"]["personalization"]["personal_similarity"]
        != generic["alpha0"]["personalization"]["personal_similarity"]
    )
    assert {record["item"] for record in stored if record["instruction"] == "a movie poster"} == {None}
    held = json.loads((Path(metrics["checkpoint"]) / "image" / "holdout.json").read_text())
    assert len(held) == 10 and all(len(record["held_out"]) == 1 for record in held)
    replies = images["reply_personalization"]
    assert replies["users"] == 10 and set(replies["arms"]) == {"own", "shuffled"}
    assert all(
        replies["arms"][arm]["scored_outputs"] == 10 and replies["arms"][arm]["examples"] for arm in ("own", "shuffled")
    )
    # the shuffled arm's replies come from other users' prompts: they score differently from the own arm's
    assert replies["arms"]["own"]["personal_similarity"] != replies["arms"]["shuffled"]["personal_similarity"]
    assert "<|im_start|>user" in images["replies"][0]["prompt"] and images["replies"][0]["prompt"].rstrip().endswith(
        "assistant"
    )  # the chat template


def test_evaluate_only_loads_the_checkpoint_and_reproduces_its_metrics(trained_joint, capsys):
    metrics = trained_joint["metrics"]
    assert (
        main(["evaluate", "--cfg-path", str(trained_joint["path"]), "--options", f"run.ckpt={metrics['checkpoint']}"])
        == 0
    )
    evaluated = last_json_line(capsys.readouterr().out)
    assert evaluated["checkpoint"] == metrics["checkpoint"]
    assert comparable(evaluated) == comparable(metrics)


def test_two_processes_report_the_same_metrics_as_one(trained_joint):
    """Predictions and image scores are gathered before any mean, so two CPU processes give one process's figures."""
    checkpoint = trained_joint["metrics"]["checkpoint"]
    options = ["--options", "run.evaluate=true", f"run.ckpt={checkpoint}"]  # CoLLM's way: evaluate: True with ckpt
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "train_collm_mf_din.py", "--cfg-path", str(trained_joint["path"]), *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert single.returncode == 0, single.stderr
    launcher = Path(sys.executable).parent / "accelerate"
    double = subprocess.run(
        [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "train_collm_mf_din.py", "--cfg-path", str(trained_joint["path"]), *options],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr
    assert "2 process(es)" in double.stderr
    one, two = comparable(last_json_line(single.stdout)), comparable(last_json_line(double.stdout))
    for split, values in one["ctr"].items():
        assert two["ctr"][split]["n"] == values["n"]
        assert two["ctr"][split]["auc"] == pytest.approx(values["auc"], abs=1e-6)
        assert two["ctr"][split]["uauc"] == pytest.approx(values["uauc"], abs=1e-6)
    for variant, values in one["images"].items():
        for key, value in values.items():
            assert two["images"][variant][key] == pytest.approx(value, abs=1e-3), (variant, key)


def test_kill_then_resume_latest_finishes_like_the_uninterrupted_run(trained_joint, tmp_path):
    """A run killed with SIGKILL after its first checkpoint, resumed with ``run.resume_from: latest``."""
    config = yaml.safe_load(trained_joint["path"].read_text())
    config["run"]["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "diffrec.yaml"
    path.write_text(yaml.safe_dump(config))
    kill_when(
        [sys.executable, "-m", "minigpt4.cli", "train", "--cfg-path", str(path)],
        lambda: bool(list((tmp_path / "runs").glob(f"*/checkpoints/last/{TRAINER_STATE}"))),
    )
    saved = json.loads(next((tmp_path / "runs").glob(f"*/checkpoints/last/{TRAINER_STATE}")).read_text())
    assert saved["step"] < 6  # it was stopped mid-run
    resumed = joint.train_diffrec(load_config(path, ["run.resume_from=latest"]))
    assert resumed["steps_run"] == 6
    # The killed steps ran in another process, whose float sums may differ in the last digits from this one's
    # (seen once the whole suite had run before: CLIP-T equal to 6 significant digits), so figures are compared
    # to 1e-4 relative; a resume from the wrong state moves them far more.
    got, want = comparable(resumed), comparable(trained_joint["metrics"])
    assert got["ctr"] == want["ctr"] and got["images"].keys() == want["images"].keys()
    for arm, figures in want["images"].items():
        assert got["images"][arm] == pytest.approx(figures, rel=1e-4)
    untimed = lambda curve: [{k: v for k, v in point.items() if k != "seconds"} for point in curve]  # noqa: E731
    for point, expected in zip(untimed(resumed["curve"]), untimed(trained_joint["metrics"]["curve"]), strict=True):
        assert point == pytest.approx(expected, rel=1e-4)


def test_nan_loss_stops_and_leaves_a_loadable_last_good_checkpoint(
    card_dataset, tiny_llm, tiny_models, mf_checkpoint, tmp_path, monkeypatch
):
    path = joint_config(tmp_path, card_dataset, tiny_llm, tiny_models, mf_checkpoint)
    calls = {"count": 0}
    real_loss = DiffRecModel.image_loss

    def poisoned(self, batch, generator):
        calls["count"] += 1
        loss = real_loss(self, batch, generator)
        return loss * float("nan") if calls["count"] == 4 else loss

    monkeypatch.setattr(DiffRecModel, "image_loss", poisoned)
    with pytest.raises(
        DiffRecError,
        match=r"loss became nan at epoch 1, step 3, .*the last checkpoint is kept at .*checkpoints/last",
    ):
        joint.train_diffrec(load_config(path))
    monkeypatch.undo()
    good = next(tmp_path.glob("runs/*/checkpoints/last"))
    assert json.loads((good / TRAINER_STATE).read_text())["step"] == 2
    metrics = joint.train_diffrec(load_config(path, ["run.evaluate=true", f"run.ckpt={good}"]))
    assert metrics["checkpoint"] == str(good) and metrics["test"]["auc"] is not None


def test_every_shipped_config_validates():
    paths = sorted((ROOT / "train_configs").glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        load_config(path)
    joint_configs = [path.name for path in paths if isinstance(load_config(path).model, DiffRecConfig)]
    assert {"demo_ml100k.yaml", "plora_pretrain_mf_ood.yaml"} <= set(joint_configs)


def test_joint_config_errors(card_dataset, tiny_llm, tiny_models, mf_checkpoint, tmp_path):
    path = joint_config(
        tmp_path, card_dataset, tiny_llm, tiny_models, mf_checkpoint, joint_section={"preferance": "llm"}
    )
    with pytest.raises(
        DiffRecError, match="unknown key 'model.joint.preferance'; did you mean 'model.joint.preference'"
    ):
        load_config(path)
    path = joint_config(tmp_path, card_dataset, tiny_llm, tiny_models, mf_checkpoint, run={"resume_from": "latest"})
    with pytest.raises(DiffRecError, match=r"no run under .* holds a complete checkpoints/last"):
        joint.train_diffrec(load_config(path))


@pytest.fixture(scope="session")
def joint_report(trained_joint, card_dataset, tmp_path_factory) -> Path:
    """The report page of the trained joint run."""
    metrics = {
        **trained_joint["metrics"],
        "images": {
            **trained_joint["metrics"]["images"],
            "replies": [
                {
                    "user": 1,
                    "item": 2,
                    "title": "Item 2",
                    "prompt": "Would they like Item 2?",
                    "reply": "You may like it.",
                }
            ],
        },
    }
    out = tmp_path_factory.mktemp("report")
    return write_report(
        out,
        [("DiffRec (tiny)", metrics)],
        metrics,
        load_rating_dataset(card_dataset),
        Path(metrics["run_dir"]) / "images",
        users=3,
    )


def test_report_has_metrics_curves_users_and_replies_with_every_file_beside_it(joint_report):
    page = joint_report.read_text()
    sources = re.findall(r"src='([^']+)'", page)
    assert "report_files/curves.png" in sources and len(sources) > 4
    assert all((joint_report.parent / source).is_file() for source in sources)
    assert "CLIP-T" in page and "open_clip clip" in page and "You may like it." in page and "DiffRec (tiny)" in page
    assert (
        "Users, generic instruction" in page
        and "held out (never trained on)" in page
        and "Would they like Item 2?" in page
    )


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(joint_report, tmp_path):
    shot = tmp_path / "report.png"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", f"--screenshot={shot}",
         "--window-size=1100,1600", "--virtual-time-budget=5000", joint_report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and shot.is_file(), result.stderr
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500  # text, the curve plot and the thumbnails, not a blank page


def test_llm_preference_sends_the_image_loss_into_the_llm(card_dataset, tiny_llm, tiny_models, mf_checkpoint, tmp_path):
    """With ``joint.preference: llm`` the fusion reads the LLM's answer-position hidden state, so the
    flow-matching loss alone gives gradients to the LLM's LoRA and CoRA generator, generic instructions included."""
    path = joint_config(
        tmp_path, card_dataset, tiny_llm, tiny_models, mf_checkpoint, joint_section={"preference": "llm"}
    )
    config = load_config(path, ["model.image.flow.generic_rate=0.5"])
    dataset = load_rating_dataset(card_dataset)
    model = joint.build_diffrec(config.model, dataset, (torch.device("cpu"), torch.device("cpu")))
    assert model.image.fusion.preference[1].in_features == model.rec.hidden_size()
    data = joint.joint_data(config, model, dataset, progress=False)
    batch = joint._image_batch(data, [0, 1], config.model.image.flow, torch.Generator().manual_seed(0))
    assert batch.preference is None and batch.prompts is not None
    model.train()
    model(None, batch, torch.Generator().manual_seed(0))[0].backward()
    llm_grads = [
        p.grad
        for name, p in model.rec.named_parameters()
        if p.requires_grad and ("lora_" in name or "generator" in name)
    ]
    assert llm_grads and all(grad is not None for grad in llm_grads) and any(grad.abs().sum() > 0 for grad in llm_grads)
    # The evaluation reads the held-out users' preferences from the LLM too (prompts built for those rows)
    short = joint.train_diffrec(
        load_config(
            path, ["run.max_steps=2", "run.eval_every_steps=2", "model.joint.replies=0", "model.joint.reply_users=0"]
        )
    )
    generic = short["images"]["generic"]
    assert (
        generic["users"] == 10
        and generic["fused"]["images"] == generic["shuffled"]["images"] == 10
        and generic["fused"]["alpha"] > 0
    )
    with_checkpointing = joint_config(
        tmp_path, card_dataset, tiny_llm, tiny_models, mf_checkpoint, joint_section={"preference": "llm"}
    )
    with pytest.raises(DiffRecError, match="gradient_checkpointing off"):
        joint.train_diffrec(load_config(with_checkpointing, ["model.rec.llm.gradient_checkpointing=true"]))


def test_every_configurable_preference_source_is_one_object():
    """The config's choices for model.joint.preference and the sources the model asks are the same names; only
    the fixed source can be cached and standardized, only the LLM's trains the LLM from the image loss."""
    from typing import get_args

    from minigpt4.config.images import JointConfig
    from minigpt4.diffrec_model import PREFERENCE_SOURCES

    assert set(get_args(JointConfig.model_fields["preference"].annotation)) == set(PREFERENCE_SOURCES)
    assert {name: source.fixed for name, source in PREFERENCE_SOURCES.items()} == {"collab": True, "llm": False}
    cached = torch.ones(2, 3)
    assert PREFERENCE_SOURCES["collab"].training_prompts(lambda rows: rows, "pairs") is None
    assert PREFERENCE_SOURCES["llm"].training_prompts(lambda rows: f"prompts of {rows}", "pairs") == "prompts of pairs"

    class Image:
        class transformer:
            device = torch.device("cpu")

    assert PREFERENCE_SOURCES["collab"].batch_vectors(None, Image, None, cached) is cached
