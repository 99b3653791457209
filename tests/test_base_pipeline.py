"""The base pipeline's training (VAE, then transformer, on the item images): it learns, writes a diffusers
pipeline, is cached by fingerprint, and a run killed part-way continues from its checkpoint to the same weights."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import kill_when
from safetensors.torch import load_file

from minigpt4.config import PipelineConfig
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.training.base_pipeline import BaseTrainingSettings, train_base_pipeline
from minigpt4.training.run_folder import TRAINER_STATE


def test_base_training_fits_the_cards_writes_a_pipeline_and_is_cached(card_dataset, tiny_models, tmp_path):
    out = tmp_path / "sd3-cards"
    settings = BaseTrainingSettings(caption="a poster for {title}", vae_steps=30, transformer_steps=60, batch_size=8)
    first = train_base_pipeline(tiny_models / "sd3", card_dataset, out, settings)
    assert not first["cached"] and first["images"] == 30
    assert first["vae_loss"]["last"] < 0.5 * first["vae_loss"]["first"]
    assert first["transformer_loss"]["last"] < first["transformer_loss"]["first"]
    assert first["samples_per_second"]["vae"] > 0 and first["samples_per_second"]["transformer"] > 0
    assert not out.with_name("sd3-cards.training").exists()  # the phases' checkpoints go once the pipeline is written
    # how often checkpoints are written does not change the weights, so it does not void the cache
    again = train_base_pipeline(
        tiny_models / "sd3", card_dataset, out, settings.model_copy(update={"checkpoint_every": 7})
    )
    assert again["cached"] and again["fingerprint"] == first["fingerprint"]
    pipeline = load_sd3_pipeline(PipelineConfig(path=out, use_t5=False))
    # The posterior stays nearly deterministic (its log-variance is never trained).
    with torch.no_grad():
        posterior = pipeline.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist
    assert posterior.std.max() < 0.01


KILLED_RUN = """import sys
from pathlib import Path
from minigpt4.training.base_pipeline import BaseTrainingSettings, train_base_pipeline
settings = BaseTrainingSettings.model_validate_json(sys.argv[4])
train_base_pipeline(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), settings)
"""


@pytest.mark.parametrize("phase", ["vae", "transformer"])
def test_a_killed_base_training_continues_to_the_uninterrupted_weights(card_dataset, tiny_models, tmp_path, phase):
    """SIGKILL after the phase's first checkpoint; the same call again continues from it and writes the weights an
    uninterrupted run writes."""
    settings = BaseTrainingSettings(caption="a poster for {title}", vae_steps=8, transformer_steps=8, batch_size=4,
                                    checkpoint_every=2)  # fmt: skip
    whole = train_base_pipeline(tiny_models / "sd3", card_dataset, tmp_path / "whole", settings)

    out = tmp_path / "killed"
    script = [sys.executable, "-c", KILLED_RUN, str(tiny_models / "sd3"), str(card_dataset), str(out),
              settings.model_dump_json()]  # fmt: skip
    state = tmp_path / "killed.training" / phase / "checkpoints" / "last" / TRAINER_STATE
    kill_when(script, state.is_file, "the phase's checkpoint")
    assert not (out / "base_training.json").exists()  # stopped before the pipeline was written

    resumed = train_base_pipeline(tiny_models / "sd3", card_dataset, out, settings)
    assert not resumed["cached"] and resumed["fingerprint"] == whole["fingerprint"]
    continued = resumed["continued_from_step"]  # the checkpoint's step, not a fresh start
    assert continued == (
        {"vae": continued["vae"], "transformer": 0}
        if phase == "vae"
        else {"vae": 8, "transformer": continued["transformer"]}
    )
    assert 2 <= continued[phase] < 8 and whole["continued_from_step"] == {"vae": 0, "transformer": 0}
    for part in ("vae_loss", "transformer_loss"):
        assert resumed[part] == pytest.approx(whole[part], rel=1e-5)
    for name in ("vae/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        want, got = load_file(tmp_path / "whole" / name), load_file(out / name)
        assert want.keys() == got.keys() and all(torch.allclose(want[k], got[k], atol=1e-6) for k in want), name
