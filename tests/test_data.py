"""Importers and the CoLLM rules: MovieLens (recbole copy and GroupLens folders), Amazon 2018/2023, CoLLM pickles."""

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA
from PIL import Image

from minigpt4.data.amazon import INSTRUCTION, prepare_amazon
from minigpt4.data.collm import import_collm
from minigpt4.data.contract import SPLITS, load_rating_dataset, save_rating_dataset
from minigpt4.data.movielens import prepare_ml1m, prepare_ml100k
from minigpt4.data.restricted_pickle import load_restricted_pickle
from minigpt4.errors import DiffRecError


def check_collm_rules(splits: dict[str, pd.DataFrame]) -> None:
    """Time order, his = earlier positives in time order, aligned titles, not_cold against train."""
    assert splits["train"]["timestamp"].max() <= splits["valid"]["timestamp"].min()
    assert splits["valid"]["timestamp"].max() <= splits["test"]["timestamp"].min()
    rows = pd.concat([splits[name] for name in SPLITS], ignore_index=True)
    earlier: dict[int, list[int]] = {}
    for row in rows.itertuples():
        assert list(row.his) == earlier.get(row.uid, [])
        assert len(row.his) == len(row.his_title)
        earlier.setdefault(row.uid, [])
        if row.label:
            earlier[row.uid].append(row.iid)
    train = splits["train"]
    for name in ("valid", "test"):
        frame = splits[name]
        expected = frame["uid"].isin(train["uid"]) & frame["iid"].isin(train["iid"])
        assert (frame["not_cold"] == expected.astype(int)).all()


def test_ml100k_from_recbole_wheel(tmp_path):
    splits, items, meta = prepare_ml100k()
    assert sum(len(f) for f in splits.values()) == 100_000
    assert meta["n_users"] == 943 and meta["n_items"] == 1682
    assert (splits["train"]["label"] == (splits["train"]["rating"] > 3)).all()
    check_collm_rules(splits)
    title = items.set_index("iid")["title"]
    first = splits["test"].iloc[0]
    assert first["title"] == title[first["iid"]]
    assert list(first["his_title"]) == [title[i] for i in first["his"]]
    assert items.loc[items["title"] == "Toy Story (1995)", "genres"].iloc[0] == ["Animation", "Children's", "Comedy"]
    loaded = load_rating_dataset(save_rating_dataset(tmp_path / "ml-100k", splits, items, meta))
    assert loaded.n_users == 943 and len(loaded.splits["test"]) == len(splits["test"])


def test_ml100k_from_grouplens_folder(tmp_path):
    raw = tmp_path / "ml-100k"
    raw.mkdir()
    ratings = [(1, 10, 5, 100), (1, 20, 2, 200), (2, 10, 4, 300), (2, 30, 4, 400), (1, 30, 4, 500), (3, 20, 5, 600),
               (3, 10, 1, 700), (2, 20, 3, 800), (1, 40, 5, 900), (3, 40, 4, 1000)]  # fmt: skip
    (raw / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    genres = "|".join(["0"] * 19)
    (raw / "u.item").write_text(
        "".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|{genres[:-1]}1\n" for i in (10, 20, 30, 40)),
        encoding="latin-1",
    )
    splits, items, meta = prepare_ml100k(raw)
    check_collm_rules(splits)
    assert meta["n_users"] == 3 and meta["n_items"] == 4
    assert items["title"].tolist() == ["Movie 10 (1995)", "Movie 20 (1995)", "Movie 30 (1995)", "Movie 40 (1995)"]
    assert items["genres"].iloc[0] == ["Western"]
    # user 1's fifth-earliest row (item 30 at t=500) has seen item 10 liked, item 20 disliked
    row = pd.concat(splits.values()).query("uid == 1 and iid == 3").iloc[0]
    assert list(row["his"]) == [1] and list(row["his_title"]) == ["Movie 10 (1995)"]


def test_ml1m_window_and_month_split(tmp_path):
    raw = tmp_path / "ml-1m"
    raw.mkdir()
    rng = np.random.default_rng(0)
    months = pd.date_range("2000-01-01", "2003-02-01", freq="MS")  # 37 month starts, the last one partial
    lines = []
    for month in months:
        for _ in range(6):
            t = int(month.timestamp()) + int(rng.integers(0, 20 * 86400))
            lines.append(f"{rng.integers(1, 6)}::{rng.integers(1, 8)}::{rng.integers(1, 6)}::{t}")
    (raw / "ratings.dat").write_text("\n".join(lines) + "\n")
    (raw / "movies.dat").write_text(
        "".join(f"{i}::Film {i} (2000)::Drama|War\n" for i in range(1, 8)), encoding="latin-1"
    )
    splits, items, meta = prepare_ml1m(raw)
    check_collm_rules(splits)
    month_of = {name: pd.to_datetime(f["timestamp"], unit="s").dt.to_period("M") for name, f in splits.items()}
    assert (month_of["train"].min(), month_of["train"].max()) == (pd.Period("2001-06"), pd.Period("2002-03"))
    assert (month_of["valid"].min(), month_of["valid"].max()) == (pd.Period("2002-04"), pd.Period("2002-08"))
    assert (month_of["test"].min(), month_of["test"].max()) == (pd.Period("2002-09"), pd.Period("2003-01"))
    assert sum(len(f) for f in splits.values()) == 20 * 6
    assert items["genres"].iloc[0] == ["Drama", "War"]


def write_lines(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def amazon_fixtures(tmp_path: Path) -> tuple[list[Path], list[Path], Path]:
    """A 2018-layout category (gzipped) and a 2023-layout category (plain), with an image folder."""
    reviews_2018 = [
        {"reviewerID": f"A{u}", "asin": f"B{i}", "overall": float(1 + (u + i) % 5), "unixReviewTime": 1_400_000_000 + 1000 * (u * 5 + i)}
        for u in range(4) for i in range(5)
    ]  # fmt: skip
    meta_2018 = [{"asin": f"B{i}", "title": f"Game {i}", "main_cat": "Video Games"} for i in range(5)]
    reviews_2023 = [
        {"user_id": f"U{u}", "asin": f"C{i}x", "parent_asin": f"C{i}", "rating": float(1 + (u * i) % 5),
         "timestamp": (1_600_000_000 + 1000 * (u * 4 + i)) * 1000, "title": "ok", "text": "fine"}
        for u in range(3) for i in range(4)
    ]  # fmt: skip
    meta_2023 = [{"parent_asin": f"C{i}", "title": f"Cream {i}", "main_category": "All Beauty"} for i in range(3)]
    meta_2023.append({"parent_asin": "C3", "title": "", "main_category": "All Beauty"})  # no title: left out
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(images / "B0.jpg")
    Image.new("RGB", (80, 64), (30, 30, 200)).save(images / "C1.png")
    (images / "C2.png").write_bytes(b"not a png")  # corrupt: left out and counted
    (images / "notes.txt").write_text("not an image")
    reviews = [
        write_lines(tmp_path / "Video_Games.json.gz", reviews_2018),
        write_lines(tmp_path / "All_Beauty.jsonl", reviews_2023),
    ]
    metas = [
        write_lines(tmp_path / "meta_Video_Games.json.gz", meta_2018),
        write_lines(tmp_path / "meta_All_Beauty.jsonl", meta_2023),
    ]
    return reviews, metas, images


def test_amazon_2018_and_2023_layouts(tmp_path):
    reviews, metas, images = amazon_fixtures(tmp_path)
    splits, items, meta = prepare_amazon(reviews, metas)
    rows = pd.concat(splits.values(), ignore_index=True)
    assert len(rows) == 20 + 9  # the untitled item's 3 reviews are left out
    assert meta["dropped_items_without_title"] == 1 and meta["n_items"] == 8 and meta["n_users"] == 7
    check_collm_rules(splits)
    assert (rows["label"] == (rows["rating"] >= 4)).all()
    by_title = rows.drop_duplicates("iid").set_index("title")["instruction"]
    assert by_title["Game 0"] == INSTRUCTION.format(category="Video Games")
    assert by_title["Cream 1"] == INSTRUCTION.format(category="All Beauty")
    assert "Video Games" in by_title["Game 0"]
    # 2023 timestamps are milliseconds and come out as seconds
    assert rows["timestamp"].max() < 2_000_000_000
    strict = prepare_amazon(reviews, metas, min_positive_rating=5)[0]
    assert (pd.concat(strict.values())["label"] == (pd.concat(strict.values())["rating"] >= 5)).all()


def test_amazon_bad_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"reviewerID": "A", "asin": "B", "overall": 5, "unixReviewTime": 1}\n{oops\n')
    meta = write_lines(tmp_path / "meta.jsonl", [{"asin": "B", "title": "t"}])
    with pytest.raises(DiffRecError, match="bad.jsonl: line 2 is not valid JSON"):
        prepare_amazon([bad], [meta])
    odd = write_lines(tmp_path / "odd.jsonl", [{"who": "A"}])
    with pytest.raises(DiffRecError, match="odd.jsonl: line 1: neither the 2018"):
        prepare_amazon([odd], [meta])
    partial = write_lines(tmp_path / "partial.jsonl", [{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}])
    with pytest.raises(DiffRecError, match="partial.jsonl: line 1: missing field 'overall'"):
        prepare_amazon([partial], [meta])


def test_restricted_unpickler_refuses_other_classes(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DiffRecError, match=r"evil.pkl: refusing to unpickle 'builtins.print'"):
        load_restricted_pickle(path)
    frame = pd.DataFrame({"a": [1, 2], "b": [[1], [2, 3]]})
    ok = tmp_path / "frame.pkl"
    frame.to_pickle(ok)
    assert load_restricted_pickle(ok).equals(frame)


@pytest.mark.skipif(not (SHARED_DATA / "collm-ml-1m").is_dir(), reason="published CoLLM data not available")
def test_import_collm_ml1m_matches_published_split(tmp_path):
    folder = SHARED_DATA / "collm-ml-1m"
    splits, items, meta = import_collm(folder)
    assert {name: len(f) for name, f in splits.items()} == {"train": 33891, "valid": 10401, "test": 7331}
    loaded = load_rating_dataset(save_rating_dataset(tmp_path / "collm", splits, items, meta))
    for name in SPLITS:
        original = load_restricted_pickle(folder / f"{name}_ood2.pkl").reset_index(drop=True)
        ours = loaded.splits[name]
        for column in ("uid", "iid", "label", "timestamp", "title", "not_cold"):
            assert (ours[column].to_numpy() == original[column].to_numpy()).all(), column
        assert all(list(a) == list(b)[1:] for a, b in zip(ours["his"], original["his"]))
        assert all(list(a) == list(b)[1:] for a, b in zip(ours["his_title"], original["his_title"]))
    assert loaded.n_users == 838 and loaded.n_items == 3255
    check_collm_rules(loaded.splits)


def test_data_commands_write_loadable_folders(tmp_path, capsys):
    from minigpt4.cli import main

    reviews, metas, images = amazon_fixtures(tmp_path)
    argv = ["data", "prepare", "amazon", "--reviews", *map(str, reviews), "--meta", *map(str, metas),
            "--images", str(images), "--min-positive-rating", "5", "--out", str(tmp_path / "amazon")]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded = load_rating_dataset(tmp_path / "amazon")
    assert printed["items"] == loaded.n_items == 8
    assert loaded.meta["label_rule"] == "label = rating >= 5"
    assert "instruction" in loaded.splits["test"].columns
    # Pictures named by ASIN: two usable, the corrupt one and the items without a file counted as excluded.
    assert printed["images"] == {"images": 2, "excluded": 6, "items": 8}
    table = pd.read_parquet(tmp_path / "amazon" / "images.parquet")
    raw_ids = loaded.items.set_index("iid")["raw_id"]
    assert sorted(raw_ids[table["iid"]]) == ["B0", "C1"] and set(table["source"]) == {"file"}
    assert main(["data", "prepare", "ml-100k", "--out", str(tmp_path / "ml")]) == 0
    assert load_rating_dataset(tmp_path / "ml").n_users == 943
