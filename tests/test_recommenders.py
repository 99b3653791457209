"""The collaborative models behind one interface: shapes, learning, checkpoints and their errors."""

import json

import pytest
import torch

from minigpt4.config import MODEL_CONFIGS
from minigpt4.data.contract import load_rating_dataset
from minigpt4.data.tensors import RatingTensors
from minigpt4.errors import DiffRecError
from minigpt4.recommenders import build_recommender, graph_edges, load_recommender, save_recommender

ARCHS = ["mf", "lightgcn", "sasrec", "din"]


def make(arch, dataset, **overrides):
    config = MODEL_CONFIGS[arch](embedding_size=8, **overrides)
    edges = graph_edges(dataset.splits["train"]) if arch == "lightgcn" else None
    return config, build_recommender(config, dataset.n_users, dataset.n_items, edges)


def batch_of(dataset, split="train", max_history=5):
    data = RatingTensors(dataset.splits[split], max_history)
    return data.__getitems__(list(range(len(data))))


@pytest.mark.parametrize("arch", ARCHS)
def test_interface_shapes(arch, tiny_dataset):
    dataset = load_rating_dataset(tiny_dataset)
    _, model = make(arch, dataset)
    batch = batch_of(dataset)
    assert model.score(batch).shape == (len(batch),)
    assert model.user_embeddings(batch).shape == (len(batch), 8)
    assert model.item_embeddings(batch.iid).shape == (len(batch), 8)
    assert model(batch).ndim == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss(arch, tiny_dataset):
    torch.manual_seed(0)
    dataset = load_rating_dataset(tiny_dataset)
    _, model = make(arch, dataset)
    batch = batch_of(dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.eval()
    before = model(batch).item()
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        model(batch).backward()
        optimizer.step()
    model.eval()
    assert model(batch).item() < before - 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip(arch, tiny_dataset, tmp_path):
    dataset = load_rating_dataset(tiny_dataset)
    config, model = make(arch, dataset)
    model.eval()
    folder = save_recommender(model, config, tmp_path / "best")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_recommender(folder, config, dataset.n_users, dataset.n_items).eval()
    batch = batch_of(dataset, "test")
    assert torch.equal(model.score(batch), loaded.score(batch))


def test_checkpoint_mismatches_are_errors(tiny_dataset, tmp_path):
    dataset = load_rating_dataset(tiny_dataset)
    config, model = make("mf", dataset)
    folder = save_recommender(model, config, tmp_path / "best")
    with pytest.raises(DiffRecError, match="checkpoint has n_users=.* but the dataset has 999"):
        load_recommender(folder, config, n_users=999)
    with pytest.raises(DiffRecError, match="checkpoint model config .* differs from the run's"):
        load_recommender(folder, MODEL_CONFIGS["mf"](embedding_size=16))
    info = json.loads((folder / "config.json").read_text())
    info["model"]["embedding_size"] = 16
    (folder / "config.json").write_text(json.dumps(info))
    with pytest.raises(
        DiffRecError,
        match=r"tensor 'user_embedding.weight' has shape \(41, 8\), but .*config.json describes \(41, 16\)",
    ):
        load_recommender(folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DiffRecError, match="not a readable safetensors file"):
        load_recommender(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(DiffRecError, match="checkpoint file missing: .*model.safetensors"):
        load_recommender(folder)


def test_sequence_models_read_the_history(tiny_dataset):
    """Changing only the history changes SASRec's and DIN's scores (and never MF's)."""
    dataset = load_rating_dataset(tiny_dataset)
    batch = batch_of(dataset, "test")
    emptied = type(batch)(**{**batch.__dict__, "his": torch.zeros_like(batch.his)})
    for arch in ("sasrec", "din"):
        _, model = make(arch, dataset)
        model.eval()
        assert not torch.allclose(model.score(batch), model.score(emptied))
        assert torch.isfinite(model.score(emptied)).all()
    _, mf = make("mf", dataset)
    assert torch.equal(mf.score(batch), mf.score(emptied))
