"""A run is reproducible from its seed alone: every trainer that builds random weights gives the same initial
and final weights when the same config runs twice in one process, whatever random numbers were drawn before.

The trainers are called as a user calls them, with no seeding by hand; the draws consumed before each run
differ, so a trainer that builds (or shuffles) from the global random state before seeding fails here.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from conftest import joint_config, write_config
from safetensors.torch import load_file
from test_diffusion import photo_dataset, sd3_config  # noqa: F401  (a fixture)
from test_graph_diffusion import implicit_root, write_implicit_config  # noqa: F401  (a fixture)
from test_llm import llm_config
from test_sequential import sequence_root, write_sequence_config  # noqa: F401  (a fixture)

from minigpt4.config import load_config
from minigpt4.training import diffusion, joint, llm, pretrain
from minigpt4.training import implicit as implicit_training
from minigpt4.training import sequential as sequential_training


def draw_from_every_generator(count: int) -> None:
    """Move Python's, NumPy's and torch's global random states by ``count`` draws each."""
    for _ in range(count):
        random.random()
    np.random.rand(count)
    torch.rand(count)


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file below a checkpoint folder, keyed by file and name."""
    return {
        f"{path.relative_to(folder)}:{name}": tensor
        for path in sorted(folder.rglob("*.safetensors"))
        for name, tensor in load_file(path).items()
    }


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of a freshly built model's weights."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def run_twice(monkeypatch, module, builder: str, train, config_path: Path) -> None:
    """Train the config twice, after different draws; the built and the trained weights must be equal (and each
    run reports its samples per second)."""
    built: list[dict[str, torch.Tensor]] = []
    original = getattr(module, builder)

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        built.append(snapshot(result[0] if isinstance(result, tuple) else result))
        return result

    monkeypatch.setattr(module, builder, recording)
    checkpoints = []
    for draws in (1, 1000):
        draw_from_every_generator(draws)
        metrics = train(load_config(config_path))
        checkpoints.append(Path(metrics["checkpoint"]))
        assert metrics["train_samples_per_second"] > 0  # every trainer reports its throughput
    assert len(built) == 2 and built[0].keys() == built[1].keys()
    for name in built[0]:
        assert torch.equal(built[0][name], built[1][name]), f"initial weight {name} depends on earlier draws"
    first, second = tensors_of(checkpoints[0]), tensors_of(checkpoints[1])
    assert first and first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"trained weight {name} depends on earlier draws"


def test_rating_pretraining(monkeypatch, tiny_dataset, tmp_path):
    """MF on rating rows (``diffrec pretrain``, ratings shape)."""
    run_twice(monkeypatch, pretrain, "build_recommender", pretrain.pretrain, write_config(tmp_path, tiny_dataset))


def test_full_ranking_pretraining(monkeypatch, implicit_root, tmp_path):  # noqa: F811 (the imported fixture)
    """LightGCN with BPR on the implicit shape (its negatives drawn per epoch)."""
    config = write_implicit_config(
        tmp_path, implicit_root, "lightgcn", model={"embedding_size": 8}, run={"max_epochs": 2}
    )
    run_twice(monkeypatch, implicit_training, "build_recommender", implicit_training.pretrain_implicit, config)


def test_sequence_pretraining(monkeypatch, sequence_root, tmp_path):  # noqa: F811 (the imported fixture)
    """DiffuRec on the sequence shape (diffusion noise and the reverse chain)."""
    model = {"embedding_size": 16, "num_blocks": 1, "num_heads": 2, "max_history": 8}
    config = write_sequence_config(tmp_path, sequence_root, "diffurec", model=model, run={"max_epochs": 2})
    run_twice(monkeypatch, sequential_training, "build_recommender", sequential_training.pretrain_sequential, config)


def test_llm_training(monkeypatch, tiny_dataset, tiny_llm, mf_checkpoint, tmp_path):
    """CoRA on the tiny LLM: the LoRA (with dropout, drawn from the global stream) and the weight generator."""
    lora = {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}}
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, "cora", mf_checkpoint, model=lora)
    run_twice(monkeypatch, llm, "build_llm_recommender", llm.train_llm, path)


def test_image_training(monkeypatch, photo_dataset, tiny_models, tmp_path):  # noqa: F811 (the imported fixture)
    """The image LoRA and the fusion on the tiny SD3 pipeline."""
    path = sd3_config(tmp_path, tiny_models, photo_dataset, run={"max_steps": 4, "eval_every_steps": 2})
    run_twice(monkeypatch, diffusion, "build_personalized", diffusion.train_images, path)


def test_joint_training(monkeypatch, card_dataset, tiny_llm, tiny_models, mf_checkpoint, tmp_path):
    """DiffRec: CoRA and the image half built in one model."""
    path = joint_config(tmp_path, card_dataset, tiny_llm, tiny_models, mf_checkpoint, run={"max_steps": 3})
    run_twice(monkeypatch, joint, "build_diffrec", joint.train_diffrec, path)


def test_scorer_and_base_pipeline_training(card_dataset, tiny_models, tmp_path):
    """The in-domain CLIP scorer (a ViT built from random weights) and the base pipeline (random batches and noise):
    the same weights from the same settings, whatever was drawn before."""
    from minigpt4.training.base_pipeline import BaseTrainingSettings, train_base_pipeline
    from minigpt4.training.clip_scorer import train_clip

    settings = BaseTrainingSettings(caption="a poster for {title}", vae_steps=3, transformer_steps=3, batch_size=4)
    for draws in (1, 1000):
        draw_from_every_generator(draws)
        scorer = train_clip(card_dataset, tmp_path / f"clip-{draws}", caption="{title}", steps=3, batch_size=8)
        assert scorer["train_samples_per_second"] > 0
        draw_from_every_generator(draws)
        base = train_base_pipeline(tiny_models / "sd3", card_dataset, tmp_path / f"sd3-{draws}", settings)
        assert base["samples_per_second"]["vae"] > 0 and base["samples_per_second"]["transformer"] > 0
    for name in ("clip-{}", "sd3-{}"):
        first, second = tensors_of(tmp_path / name.format(1)), tensors_of(tmp_path / name.format(1000))
        assert first and first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"trained weight {key} depends on earlier draws"
