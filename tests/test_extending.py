"""docs/extending.md's worked examples run: a rating CSV imported with ``diffrec data prepare csv``, and the
example model of ``examples/biased_mf.py`` registered and trained through ``diffrec pretrain``."""

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Literal

import pandas as pd
import pytest
import torch
from conftest import registry_snapshot, synthetic_ratings, write_config

from minigpt4 import config as config_module
from minigpt4 import recommenders
from minigpt4.cli import main
from minigpt4.config.base import Section
from minigpt4.data.contract import load_rating_dataset
from minigpt4.data.tensors import RatingTensors
from minigpt4.errors import DiffRecError
from minigpt4.recommenders import load_recommender
from minigpt4.recommenders.mf import MatrixFactorization

ROOT = Path(__file__).resolve().parents[1]


def write_rating_csv(folder: Path) -> tuple[Path, Path]:
    """The synthetic ratings as a plain CSV with text ids (``u<n>``, ``movie-<n>``) and an items CSV."""
    ratings, items = synthetic_ratings()
    ratings = ratings.assign(user="u" + ratings["user"].astype(str), item="movie-" + ratings["item"].astype(str))
    items = items.assign(item="movie-" + items["item"].astype(str))
    ratings_path, items_path = folder / "ratings.csv", folder / "items.csv"
    ratings[["user", "item", "rating", "timestamp"]].to_csv(ratings_path, index=False)
    items[["item", "title"]].to_csv(items_path, index=False)
    return ratings_path, items_path


def test_csv_import_builds_the_contract(tmp_path, capsys):
    """Dense ids, CoLLM labels, a time-ordered split and the id maps from two CSV files."""
    ratings_path, items_path = write_rating_csv(tmp_path)
    out = tmp_path / "mine"
    argv = ["data", "prepare", "csv", "--ratings", str(ratings_path), "--items", str(items_path), "--out", str(out)]
    assert main(argv) == 0
    dataset = load_rating_dataset(out)
    raw = pd.read_csv(ratings_path)
    assert dataset.n_users == raw["user"].nunique() and dataset.n_items == raw["item"].nunique()
    rows = pd.concat(dataset.splits.values())
    assert len(rows) == len(raw) and set(rows["label"]) == {0, 1}
    assert (rows["label"] == (rows["rating"] >= 4)).all()
    assert dataset.splits["train"]["timestamp"].max() <= dataset.splits["valid"]["timestamp"].min()
    assert dataset.splits["valid"]["timestamp"].max() <= dataset.splits["test"]["timestamp"].min()
    item_map = dataset.meta["item_map"]
    titles = dict(zip(pd.read_csv(items_path)["item"], pd.read_csv(items_path)["title"]))
    first = dataset.items.iloc[0]
    assert titles[first["raw_id"]] == first["title"] and item_map[first["raw_id"]] == first["iid"]


def test_csv_import_without_items_and_bad_input(tmp_path, capsys):
    """Without an items file the titles name the raw ids; a missing column or an unknown item is one line, exit 2."""
    ratings_path, items_path = write_rating_csv(tmp_path)
    assert main(["data", "prepare", "csv", "--ratings", str(ratings_path), "--out", str(tmp_path / "a")]) == 0
    assert load_rating_dataset(tmp_path / "a").items["title"].str.startswith("item movie-").all()
    pd.read_csv(ratings_path).rename(columns={"rating": "stars"}).to_csv(tmp_path / "bad.csv", index=False)
    capsys.readouterr()
    assert main(["data", "prepare", "csv", "--ratings", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "b")]) == 2
    assert "missing column 'rating'" in capsys.readouterr().err
    pd.read_csv(items_path).iloc[1:].to_csv(tmp_path / "items_short.csv", index=False)
    argv = ["data", "prepare", "csv", "--ratings", str(ratings_path), "--items", str(tmp_path / "items_short.csv")]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "item has no row in" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.fixture
def registry():
    """The model registries as they were before the test (an example registration does not leak)."""
    with registry_snapshot():
        yield


def import_example():
    """examples/biased_mf.py imported from its path, as a user's own module would be."""
    spec = importlib.util.spec_from_file_location("biased_mf", ROOT / "examples" / "biased_mf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["biased_mf"] = module  # as an import would: pydantic resolves the annotations in it
    spec.loader.exec_module(module)
    return module


def test_preference_source_example_runs():
    """The runnable block of docs/extending.md's preference-source section executes as written."""
    text = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- runs in tests -->\n```python\n(.*?)```", text, re.S)
    assert blocks, "docs/extending.md lost its runnable example"
    for block in blocks:
        exec(compile(block, "docs/extending.md", "exec"), {})


def test_registered_model_trains_through_diffrec_pretrain(registry, tiny_dataset, tmp_path, capsys):
    """One file, one registration: the config validates, pretrain trains and selects it, the checkpoint reloads."""
    main_config = write_config(tmp_path, tiny_dataset, "biased_mf")
    with pytest.raises(DiffRecError, match="biased_mf"):  # unknown before its registration
        config_module.load_config(main_config)
    example = import_example()
    assert main(["pretrain", "--cfg-path", str(main_config)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["test"]["auc"] > 0.5 and metrics["train_samples_per_second"] > 0
    model = load_recommender(Path(metrics["checkpoint"]))
    assert isinstance(model, example.BiasedMF)
    assert model.item_bias.weight.abs().sum() > 0  # the biases trained
    batch = RatingTensors(load_rating_dataset(tiny_dataset).splits["test"], 0)[list(range(8))]
    dot = (model.user_embeddings(batch) * model.item_embeddings(batch.iid)).sum(-1)
    assert not torch.allclose(model.score(batch), dot)
    assert main(["evaluate", "--cfg-path", str(main_config), "--options", f"run.ckpt={metrics['checkpoint']}"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)


def test_registration_is_checked(registry):
    """A clashing arch, a config without a literal arch, an unknown shape or input: one error each."""

    class Clash(Section):
        arch: Literal["mf"] = "mf"

    class NoArch(Section):
        size: int = 1

    with pytest.raises(DiffRecError, match="already registered"):
        recommenders.register_recommender(Clash, MatrixFactorization, {"ratings"})
    with pytest.raises(DiffRecError, match="needs a field arch"):
        recommenders.register_recommender(NoArch, MatrixFactorization, {"ratings"})
    example = import_example()
    with pytest.raises(DiffRecError, match="data shapes"):
        recommenders.register_recommender(example.BiasedMFConfig, example.BiasedMF, {"graph"})
    with pytest.raises(DiffRecError, match="inputs"):
        recommenders.register_recommender(example.BiasedMFConfig, example.BiasedMF, {"ratings"}, ("pictures",))
