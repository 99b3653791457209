"""Property-based fuzzing of every importer and loader (hypothesis): each example starts from a valid tiny input,
applies one mutation from a class of bad input (tests/fuzzing.py), runs the command a user would type (or the
loader a command calls) and checks the property: exit 2 with one stderr line naming the file and nothing
written, or an output that passes the contract's own validation. ``make test`` runs the ``ci`` profile (a
few dozen examples per importer); ``pytest tests/test_fuzz.py --hypothesis-profile=long`` runs 10,000 each."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from conftest import synthetic_ratings
from fuzzing import (
    check_loader,
    check_refused_or_valid,
    copy_tree,
    file_mutation,
    mutated_frame,
    mutated_json,
    mutated_text_table,
    run_command,
    write_frame,
    write_text_tables,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from minigpt4.config import load_config
from minigpt4.data.build import assemble_dataset, ratio_split
from minigpt4.data.contract import SPLITS, load_rating_dataset, save_rating_dataset
from minigpt4.data.images import load_image_table, open_image, render_item_cards
from minigpt4.data.implicit import derive_implicit, load_implicit_dataset
from minigpt4.data.sequences import derive_sequences, load_sequence_dataset
from minigpt4.recommenders import load_recommender

SOURCES = Path(tempfile.mkdtemp(prefix="fuzz-sources-"))


@cache
def rating_tables() -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """A valid tiny rating dataset (12 users, 10 items) as contract tables."""
    ratings, items = synthetic_ratings(n_users=12, n_items=10, per_user=6, seed=3)
    items["genres"] = [["Drama"] if i % 2 else ["Comedy", "Drama"] for i in range(len(items))]
    return assemble_dataset(
        ratings, items, 4, lambda ts: ratio_split(ts, (0.6, 0.2, 0.2)), {"name": "fuzz", "source": "synthetic"}
    )


@cache
def rating_folder() -> Path:
    """The tiny dataset saved in the contract's layout, with a rendered card per item and the sequence and
    implicit shapes."""
    root = save_rating_dataset(SOURCES / "ratings", *rating_tables())
    render_item_cards(root, size=16)
    derive_sequences(root, min_length=3)
    derive_implicit(root, text=False)
    return root


def workdir_for(name: str) -> tuple[tempfile.TemporaryDirectory, Path]:
    """A fresh folder for one example."""
    holder = tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-")
    return holder, Path(holder.name)


# --- CoLLM pickles


@cache
def collm_frames() -> dict[str, pd.DataFrame]:
    """The tiny dataset in CoLLM's published layout: histories start with item 0 and an empty title."""
    splits, _, _ = rating_tables()
    frames = {}
    for name in SPLITS:
        frame = splits[name].drop(columns=["rating"]).copy()
        frame["his"] = [[0, *map(int, his)] for his in frame["his"]]
        frame["his_title"] = [["", *titles] for titles in frame["his_title"]]
        frames[name] = frame
    return frames


@given(data=st.data())
def test_fuzz_collm_import(data):
    holder, work = workdir_for("collm")
    with holder:
        folder = work / "collm"
        folder.mkdir()
        target = data.draw(st.sampled_from(SPLITS))
        why = f"{target}: "
        for name, frame in collm_frames().items():
            if name == target and data.draw(st.booleans()):
                frame, what = data.draw(mutated_frame(frame))
                why += what
            frame.to_pickle(folder / f"{name}_ood2.pkl")
        if why == f"{target}: ":
            container = data.draw(st.sampled_from(["file", "list", "series", "dict"]))
            path = folder / f"{target}_ood2.pkl"
            if container == "file":
                why += data.draw(file_mutation())(path)
            else:
                frame = collm_frames()[target]
                wrong = {"list": frame.to_dict("records"), "series": frame["uid"], "dict": frame.to_dict()}[container]
                path.write_bytes(pickle.dumps(wrong))
                why += f"a pickled {container}"
        out = work / "out"
        code, err = run_command(["data", "import-collm", str(folder), "--out", str(out)])
        sources = [folder / f"{name}_ood2.pkl" for name in SPLITS]
        check_refused_or_valid(code, err, sources, out, work, load_rating_dataset, why)


# --- raw MovieLens files (GroupLens layouts)


def ml100k_raw_rows() -> tuple[list[list[str]], list[list[str]]]:
    """u.data and u.item rows of the tiny dataset."""
    ratings, items = synthetic_ratings(n_users=12, n_items=10, per_user=6, seed=3)
    data = [[u[1:], i[1:], str(r), str(t)] for u, i, r, t in ratings.itertuples(index=False)]
    item_rows = [
        [str(n), f"Item {n} (1995)", "01-Jan-1995", "", "http://x"] + ["0"] * 8 + ["1"] + ["0"] * 10 for n in range(10)
    ]
    return data, item_rows


@given(data=st.data())
def test_fuzz_ml100k_raw_import(data):
    holder, work = workdir_for("ml100k")
    with holder:
        raw = work / "ml-100k"
        raw.mkdir()
        ratings, items = ml100k_raw_rows()
        tables = {"u.data": (ratings, "\t", "utf-8"), "u.item": (items, "|", "latin-1")}
        _, why = write_text_tables(data.draw, raw, tables)
        out = work / "out"
        code, err = run_command(["data", "prepare", "ml-100k", "--raw", str(raw), "--out", str(out)])
        check_refused_or_valid(code, err, [raw / "u.data", raw / "u.item", raw], out, work, load_rating_dataset, why)


@given(data=st.data())
def test_fuzz_ml1m_raw_import(data):
    holder, work = workdir_for("ml1m")
    with holder:
        raw = work / "ml-1m"
        raw.mkdir()
        ratings, items = ml100k_raw_rows()
        ratings = [[u, i, r, str(978_300_000 + int(t))] for u, i, r, t in ratings]
        movies = [[row[0], row[1], "Drama|Comedy"] for row in items]
        tables = {"ratings.dat": (ratings, "::", "latin-1"), "movies.dat": (movies, "::", "latin-1")}
        _, why = write_text_tables(data.draw, raw, tables)
        out = work / "out"
        code, err = run_command(["data", "prepare", "ml-1m", "--raw", str(raw), "--out", str(out)])
        sources = [raw / "ratings.dat", raw / "movies.dat", raw]
        check_refused_or_valid(code, err, sources, out, work, load_rating_dataset, why)


# --- Amazon Reviews JSON lines


def amazon_records() -> tuple[list[dict], list[dict]]:
    """2023-layout review and metadata records of the tiny dataset (timestamps in milliseconds)."""
    ratings, items = synthetic_ratings(n_users=12, n_items=10, per_user=6, seed=3)
    reviews = [
        {"user_id": u, "parent_asin": i, "rating": float(r), "timestamp": int(t) * 1000 + 1_500_000_000_000}
        for u, i, r, t in ratings.itertuples(index=False)
    ]
    metas = [{"parent_asin": i, "title": t, "main_category": "Books"} for i, t in items.itertuples(index=False)]
    return reviews, metas


@given(data=st.data())
def test_fuzz_amazon_import(data):
    holder, work = workdir_for("amazon")
    with holder:
        reviews, metas = amazon_records()
        target = data.draw(st.sampled_from(["reviews", "meta"]))
        records = {"reviews": reviews, "meta": metas}
        line = data.draw(st.integers(0, len(records[target]) - 1))
        records[target] = list(records[target])
        records[target][line], why = data.draw(mutated_json(records[target][line]))
        paths = {"reviews": work / "Books.jsonl.gz", "meta": work / "meta_Books.jsonl"}
        for name, path in paths.items():
            text = "".join(json.dumps(record) + "\n" for record in records[name]).encode()
            path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
        if data.draw(st.booleans()):
            why = data.draw(file_mutation())(paths[target])
        out = work / "out"
        argv = ["data", "prepare", "amazon", "--reviews", str(paths["reviews"]), "--meta", str(paths["meta"])]
        code, err = run_command([*argv, "--out", str(out)])
        check_refused_or_valid(code, err, list(paths.values()), out, work, load_rating_dataset, why)


# --- DiffMM-family folders (also MDMNS and GenRec-V1): pickled COO matrices and feature files


@cache
def diffmm_sources() -> dict[str, object]:
    """Three split matrices (12 users x 9 items) and two feature files."""
    rng = np.random.default_rng(0)
    sources: dict[str, object] = {}
    for name in ("trnMat.pkl", "valMat.pkl", "tstMat.pkl"):
        sources[name] = sp.coo_matrix((rng.random((12, 9)) < 0.3).astype(np.float32))
    sources["image_feat.npy"] = rng.normal(size=(9, 4)).astype(np.float16)
    sources["audio_feat.npy"] = rng.normal(size=(9, 3)).astype(np.float32)
    return sources


@st.composite
def mutated_matrix(draw: st.DrawFn, matrix: sp.coo_matrix) -> tuple[object, str]:
    """A COO matrix broken in one way: shape, an index, a value, emptied, or another container."""
    kind = draw(st.sampled_from(["shape", "row", "col", "value", "empty", "dense", "csr", "list"]))
    coo = matrix.copy()
    entry = draw(st.integers(0, coo.nnz - 1))
    bad = draw(st.sampled_from([-1, 12, 9, 2**31 - 1]))  # written in place: SciPy's index arrays are int32 here
    if kind == "shape":
        return sp.coo_matrix((coo.data, (coo.row, coo.col)), shape=(12 + draw(st.integers(1, 3)), 9)), kind
    if kind in ("row", "col"):
        getattr(coo, kind)[entry] = bad
        return coo, f"{kind}[{entry}] = {bad}"
    if kind == "value":
        coo.data[entry] = draw(st.sampled_from([np.nan, np.inf, 0.0, -1.0]))
        return coo, f"data[{entry}] = {coo.data[entry]}"
    if kind == "empty":
        return sp.coo_matrix(coo.shape, dtype=np.float32), kind
    return {"dense": coo.toarray(), "csr": coo.tocsr(), "list": coo.toarray().tolist()}[kind], kind


@st.composite
def mutated_features(draw: st.DrawFn, values: np.ndarray) -> tuple[np.ndarray, str]:
    """A feature matrix with another shape, a NaN/inf, or text/object values."""
    kind = draw(st.sampled_from(["rows", "dim0", "1d", "nan", "inf", "text", "objects"]))
    changed = {
        "rows": lambda: values[:-1],
        "dim0": lambda: values[:, :0],
        "1d": lambda: values[:, 0],
        "nan": lambda: np.where(np.arange(values.size).reshape(values.shape) == 3, np.nan, values),
        "inf": lambda: np.where(np.arange(values.size).reshape(values.shape) == 5, np.inf, values),
        "text": lambda: values.astype(str),
        "objects": lambda: values.astype(object),
    }[kind]()
    return changed, kind


@given(data=st.data())
def test_fuzz_diffmm_import(data):
    holder, work = workdir_for("diffmm")
    with holder:
        folder = work / "diffmm"
        folder.mkdir()
        sources = diffmm_sources()
        target = data.draw(st.sampled_from(sorted(sources)))
        for name, value in sources.items():
            if name.endswith(".npy"):
                if name == target:
                    value, why = data.draw(mutated_features(value))
                np.save(folder / name, value, allow_pickle=value.dtype == object)
            else:
                if name == target:
                    value, why = data.draw(mutated_matrix(value))
                (folder / name).write_bytes(pickle.dumps(value))
        if data.draw(st.booleans()):
            why = data.draw(file_mutation())(folder / target)
        out = work / "out"
        code, err = run_command(["data", "import-diffmm", str(folder), "--out", str(out)])
        check_refused_or_valid(
            code, err, [folder / name for name in sources] + [folder], out, work, load_implicit_dataset, why
        )


# --- DiffuRec's dataset.pkl


def diffurec_source() -> dict:
    """A valid DiffuRec dict: 4 users (0-based), 6 items, leave-one-out."""
    return {
        "train": {0: [1, 2, 3], 1: [2, 3], 2: [4, 5, 1], 3: [6]},
        "val": {0: [4], 1: [4], 2: [2], 3: [1]},
        "test": {0: [5], 1: [5], 2: [3], 3: [2]},
        "umap": {10: 0, 11: 1, 12: 2, 13: 3},
        "smap": {i: i for i in range(1, 7)},
    }


@given(data=st.data())
def test_fuzz_diffurec_import(data):
    holder, work = workdir_for("diffurec")
    with holder:
        raw = diffurec_source()
        key = data.draw(st.sampled_from(["train", "val", "test", "smap", None]))
        bad = data.draw(st.sampled_from([None, -1, 0, 7, 2**40, 1.5, np.nan, "x", True, [], [1, 2], [[1]], {}, (1,)]))
        if key is None:
            raw, why = data.draw(st.sampled_from([[1, 2], "dataset", {"train": {}}, {0: 1}])), "another container"
        elif data.draw(st.booleans()):
            user = data.draw(st.sampled_from([0, 3, 9, -1, "0", True, 1.0]))
            raw[key] = {**raw[key], user: bad} if isinstance(raw[key], dict) else raw[key]
            why = f"{key}[{user!r}] = {bad!r}"
        elif key in ("train", "val", "test"):
            user = data.draw(st.integers(0, 3))
            raw[key][user] = [*raw[key][user], bad]
            why = f"{key}[{user}] gains {bad!r}"
        else:
            raw[key] = bad
            why = f"{key} = {bad!r}"
        path = work / "beauty" / "dataset.pkl"
        path.parent.mkdir()
        path.write_bytes(pickle.dumps(raw))
        if data.draw(st.booleans()):
            why = data.draw(file_mutation())(path)
        out = work / "out"
        code, err = run_command(["data", "import-diffurec", str(path), "--out", str(out)])
        check_refused_or_valid(code, err, [path], out, work, load_sequence_dataset, why)


# --- processed folders: rating tables, images table, sequence and implicit shapes


@given(data=st.data())
def test_fuzz_processed_rating_folder(data):
    holder, work = workdir_for("processed")
    with holder:
        folder = copy_tree(rating_folder(), work / "ratings")
        target = data.draw(st.sampled_from(["train", "valid", "test", "items", "meta.json"]))
        if target == "meta.json":
            meta = json.loads((folder / target).read_text())
            value, why = data.draw(mutated_json({k: meta[k] for k in ("n_users", "n_items", "name")}))
            (folder / target).write_text(json.dumps(value))
            path = folder / target
        else:
            path = folder / f"{target}.parquet"
            frame, why = data.draw(mutated_frame(pd.read_parquet(path)))
            why = write_frame(data.draw, frame, path, why)
        if path.is_file() and data.draw(st.booleans()):
            why = data.draw(file_mutation())(path)
        (folder / "sequences").rename(work / "kept-sequences")
        code, err = run_command(["data", "sequences", str(folder)])
        check_refused_or_valid(
            code, err, [path, folder], folder / "sequences", folder, lambda _: load_sequence_dataset(folder), why
        )


@given(data=st.data())
def test_fuzz_images_table(data):
    holder, work = workdir_for("images")
    with holder:
        folder = copy_tree(rating_folder(), work / "ratings")
        table_path = folder / "images.parquet"
        if data.draw(st.booleans()):
            frame, why = data.draw(mutated_frame(pd.read_parquet(table_path)))
            why = write_frame(data.draw, frame, table_path, why)
            sources = [table_path]
        else:
            item = data.draw(st.integers(1, 10))
            sources = [folder / "images" / f"{item}.png"]
            why = data.draw(file_mutation())(sources[0])
            sources.append(table_path)

        def load() -> None:
            table = load_image_table(folder, 10)
            for relative in table["path"]:
                open_image(folder / relative, min_size=1)

        check_loader(load, sources, why)


@cache
def picture_folder() -> Path:
    """A 64-px picture per item of the tiny dataset, named by its raw id, and a CSV map of them."""
    from PIL import Image

    folder = SOURCES / "pictures"
    folder.mkdir()
    items = pd.read_parquet(rating_folder() / "items.parquet")
    for index, raw in enumerate(items["raw_id"]):
        Image.new("RGB", (64, 64), (index * 20, 40, 90)).save(folder / f"{raw}.png")
    pd.DataFrame({"raw_id": items["raw_id"], "file": [f"{raw}.png" for raw in items["raw_id"]]}).to_csv(
        SOURCES / "map.csv", index=False
    )
    return folder


@given(data=st.data())
def test_fuzz_picture_import(data):
    holder, work = workdir_for("pictures")
    with holder:
        folder = copy_tree(rating_folder(), work / "ratings")
        (folder / "images.parquet").unlink()
        shutil.rmtree(folder / "images")
        pictures = copy_tree(picture_folder(), work / "pictures")
        mapping = work / "map.csv"
        shutil.copyfile(SOURCES / "map.csv", mapping)
        if data.draw(st.booleans()):
            rows = [line.split(",") for line in mapping.read_text().splitlines()]
            text, why = data.draw(mutated_text_table(rows, ","))
            mapping.write_text(text)
            sources = [mapping]
        else:
            target = data.draw(st.sampled_from(sorted(pictures.iterdir())))
            why = data.draw(file_mutation())(target)
            sources = [target, pictures]
        argv = ["data", "images", str(folder), "--folder", str(pictures), "--map", str(mapping), "--min-size", "8"]
        code, err = run_command(argv)

        def loads(_: Path) -> None:
            table = load_image_table(folder, 10)
            for relative in table["path"]:
                open_image(folder / relative)

        check_refused_or_valid(code, err, sources, folder / "images.parquet", folder, loads, why)
        assert code == 0 or not (folder / "images").exists(), f"{why}: images/ written"


@given(data=st.data())
def test_fuzz_sequence_and_implicit_folders(data):
    holder, work = workdir_for("shapes")
    with holder:
        folder = copy_tree(rating_folder(), work / "ratings")
        shape = data.draw(st.sampled_from(["sequences", "implicit"]))
        names = (
            ["sequences.parquet", "meta.json"]
            if shape == "sequences"
            else [*(f"{s}.parquet" for s in SPLITS), "meta.json"]
        )
        path = folder / shape / data.draw(st.sampled_from(names))
        if path.suffix == ".parquet":
            frame, why = data.draw(mutated_frame(pd.read_parquet(path)))
            why = write_frame(data.draw, frame, path, why)
        else:
            value, why = data.draw(mutated_json(json.loads(path.read_text())))
            path.write_text(json.dumps(value))
        load = load_sequence_dataset if shape == "sequences" else load_implicit_dataset
        check_loader(lambda: load(folder), [path, folder / shape, folder], why)


# --- checkpoints and configs


@cache
def mf_checkpoint_folder() -> Path:
    """A valid MF checkpoint folder for the tiny dataset (random weights: loading is what is fuzzed)."""
    folder = SOURCES / "mf-checkpoint"
    folder.mkdir()
    rng = np.random.default_rng(0)
    import torch

    state = {
        "user_embedding.weight": torch.from_numpy(rng.normal(size=(13, 4)).astype(np.float32)),
        "item_embedding.weight": torch.from_numpy(rng.normal(size=(11, 4)).astype(np.float32)),
    }
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"model": {"arch": "mf", "embedding_size": 4}, "n_users": 12, "n_items": 10})
    )
    load_recommender(folder)  # the valid input loads
    return folder


@given(data=st.data())
def test_fuzz_checkpoint_folder(data):
    holder, work = workdir_for("checkpoint")
    with holder:
        folder = copy_tree(mf_checkpoint_folder(), work / "checkpoint")
        if data.draw(st.booleans()):
            path = folder / "config.json"
            value, why = data.draw(mutated_json(json.loads(path.read_text())))
            path.write_text(json.dumps(value))
        else:
            path = folder / "model.safetensors"
            why = data.draw(file_mutation())(path)
        check_loader(lambda: load_recommender(folder), [path, folder], why)


@given(data=st.data())
def test_fuzz_config_file(data):
    holder, work = workdir_for("config")
    with holder:
        config = {
            "model": {"arch": "mf", "embedding_size": 8},
            "datasets": {"name": "tiny", "path": str(rating_folder())},
            "run": {"cpu": True, "batch_size": 64, "lr": 0.01, "max_epochs": 3, "seed": 1, "output_dir": "runs"},
        }
        value, why = data.draw(mutated_json(config))
        path = work / "mf.yaml"
        path.write_text(yaml.safe_dump(value, allow_unicode=False))
        if data.draw(st.booleans()):
            why = data.draw(file_mutation())(path)
        check_loader(lambda: load_config(path), [path], why)
