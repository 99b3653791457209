"""The in-domain CLIP scorer: ``diffrec models train-clip`` writes an open_clip local-dir folder that the
scorer every run uses loads unchanged, scored on held-out items; bad arguments are one line, exit 2; a killed
training continues from its checkpoint to the uninterrupted weights."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_when
from safetensors.torch import load_file

from minigpt4.cli import main
from minigpt4.config import ClipConfig
from minigpt4.evaluation.clip_score import ClipScorer
from minigpt4.training.clip_scorer import train_clip
from minigpt4.training.run_folder import TRAINER_STATE


def test_train_clip_writes_a_folder_the_scorer_loads_and_scores_held_out_items(card_dataset, tmp_path, capsys):
    out = tmp_path / "clip"
    argv = [
        "models",
        "train-clip",
        str(card_dataset),
        "--out",
        str(out),
        "--caption",
        "{title}",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--held-out",
        "0.34",
    ]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((out / "train_clip_metrics.json").read_text()) == metrics
    assert metrics["items_held_out"] == 10 and metrics["items_train"] == 20  # 30 items, at least 10 held out
    assert (
        metrics["retrieval_chance_r1"] == pytest.approx(0.1)
        and 0 <= metrics["retrieval_r1"] <= metrics["retrieval_r5"] <= 1
    )
    assert metrics["genre_accuracy"] is None  # the tiny items have no genres: missing, not a number
    scorer = ClipScorer(ClipConfig(path=out))  # the loader that reads ViT-B/32 folders
    features = scorer.text_features(["Item 1", "Item 2"])
    assert features.shape == (2, 256) and torch.allclose(features.norm(dim=-1), torch.ones(2))
    assert not scorer.truncated("Item 1") and scorer.truncated("word " * 80)  # context 64, MiniLM's tokenizer


@pytest.mark.parametrize(
    "option, message",
    [(["--held-out", "1.5"], "--held-out must be between 0 and 1"), (["--steps", "0"], "--steps must be positive")],
)
def test_train_clip_rejects_bad_arguments(option, message, card_dataset, tmp_path, capsys):
    assert main(["models", "train-clip", str(card_dataset), "--out", str(tmp_path / "clip"), *option]) == 2
    assert message in capsys.readouterr().err
    assert not Path(tmp_path / "clip").exists()


KILLED_RUN = """import sys
from minigpt4.training.clip_scorer import train_clip
train_clip(sys.argv[1], sys.argv[2], caption="{title}", steps=12, batch_size=8, held_out=0.34, checkpoint_every=2)
"""


def test_a_killed_scorer_training_continues_to_the_uninterrupted_weights(card_dataset, tmp_path):
    """SIGKILL after the first checkpoint; the same call again continues from it (not from the start) and writes
    the scorer an uninterrupted run writes."""
    whole = train_clip(card_dataset, tmp_path / "whole", caption="{title}", steps=12, batch_size=8, held_out=0.34,
                       checkpoint_every=2)  # fmt: skip
    out = tmp_path / "killed"
    state = tmp_path / "killed.training" / "checkpoints" / "last" / TRAINER_STATE
    kill_when([sys.executable, "-c", KILLED_RUN, str(card_dataset), str(out)], state.is_file)
    assert not out.exists()
    resumed = train_clip(
        card_dataset, out, caption="{title}", steps=12, batch_size=8, held_out=0.34, checkpoint_every=2
    )
    assert whole["continued_from_step"] == 0 and 2 <= resumed["continued_from_step"] < 12
    assert resumed["train_samples_per_second"] is not None and not (tmp_path / "killed.training").exists()
    for name in ("loss_first", "loss_last", "retrieval_r1", "retrieval_r5"):
        assert resumed[name] == pytest.approx(whole[name], rel=1e-5), name
    want = load_file(tmp_path / "whole" / "open_clip_model.safetensors")
    got = load_file(out / "open_clip_model.safetensors")
    assert want.keys() == got.keys() and all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
