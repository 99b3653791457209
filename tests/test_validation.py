"""Every bad-input class on load gets one clear error naming file, column and first bad row."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from minigpt4.data.contract import load_rating_dataset
from minigpt4.errors import DiffRecError


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_dataset, folder)
    return folder


def rewrite(folder, split, change):
    path = folder / f"{split}.parquet"
    frame = pd.read_parquet(path)
    changed = change(frame)
    frame = frame if changed is None else changed
    frame.to_parquet(path, index=False)
    return frame


def test_missing_folder_and_files(dataset_copy, tmp_path):
    with pytest.raises(DiffRecError, match="dataset folder not found: .*nowhere"):
        load_rating_dataset(tmp_path / "nowhere")
    (dataset_copy / "valid.parquet").unlink()
    with pytest.raises(DiffRecError, match=r"valid.parquet: missing \(a dataset folder holds"):
        load_rating_dataset(dataset_copy)
    (dataset_copy / "meta.json").unlink()
    with pytest.raises(DiffRecError, match=r"meta.json: missing"):
        load_rating_dataset(dataset_copy)


def test_missing_column(dataset_copy):
    path = dataset_copy / "train.parquet"
    pd.read_parquet(path).drop(columns=["his_title"]).to_parquet(path)
    with pytest.raises(DiffRecError, match=r"train.parquet: missing column 'his_title' \(has: uid, iid"):
        load_rating_dataset(dataset_copy)


def test_id_out_of_range(dataset_copy):
    n_users = json.loads((dataset_copy / "meta.json").read_text())["n_users"]
    rewrite(
        dataset_copy, "test", lambda f: f.__setitem__("uid", np.where(np.arange(len(f)) == 2, n_users + 5, f["uid"]))
    )
    with pytest.raises(
        DiffRecError, match=rf"test.parquet: column 'uid', row 2: id out of range 1..{n_users} \(1 bad rows\)"
    ):
        load_rating_dataset(dataset_copy)


def test_history_item_out_of_range(dataset_copy):
    def corrupt(frame):
        frame.at[3, "his"] = [0]
        frame.at[3, "his_title"] = [""]

    rewrite(dataset_copy, "valid", corrupt)
    with pytest.raises(DiffRecError, match=r"valid.parquet: column 'his', row 3: history item id out of range"):
        load_rating_dataset(dataset_copy)


def test_nan_label(dataset_copy):
    rewrite(
        dataset_copy, "train", lambda f: f.__setitem__("label", np.where(np.arange(len(f)) == 4, np.nan, f["label"]))
    )
    with pytest.raises(
        DiffRecError, match=r"train.parquet: column 'label', row 4: expected a label 0 or 1, found float nan"
    ):
        load_rating_dataset(dataset_copy)


def test_history_title_length_mismatch(dataset_copy):
    def corrupt(frame):
        row = int(np.flatnonzero(frame["his"].map(len) > 0)[0])
        frame.at[row, "his_title"] = []
        corrupt.row = row

    rewrite(dataset_copy, "test", corrupt)
    with pytest.raises(
        DiffRecError,
        match=rf"test.parquet: column 'his_title', row {corrupt.row}: 'his' and 'his_title' have different lengths",
    ):
        load_rating_dataset(dataset_copy)


def test_empty_split(dataset_copy):
    rewrite(dataset_copy, "valid", lambda f: f.iloc[:0])
    with pytest.raises(DiffRecError, match=r"valid.parquet: no rows \(an empty table"):
        load_rating_dataset(dataset_copy)


def test_corrupt_parquet(dataset_copy):
    (dataset_copy / "items.parquet").write_bytes(b"not parquet")
    with pytest.raises(DiffRecError, match=r"items.parquet: not a readable Parquet file"):
        load_rating_dataset(dataset_copy)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"n_users": 40,', r"meta.json: not valid JSON \(Expecting"),
        (b'{"name": "\xff\xfe"}', r"meta.json: not valid JSON \('utf-8' codec can't decode"),
        (b"[1, 2]", r"meta.json: expected a JSON object, found list"),
    ],
)
def test_meta_json_that_is_not_a_json_object(dataset_copy, content, message):
    (dataset_copy / "meta.json").write_bytes(content)
    with pytest.raises(DiffRecError, match=message):
        load_rating_dataset(dataset_copy)


def test_checkpoint_config_json_that_is_not_json(mf_checkpoint, tmp_path):
    from minigpt4.recommenders import load_recommender

    folder = tmp_path / "checkpoint"
    shutil.copytree(mf_checkpoint, folder)
    (folder / "config.json").write_text('{"model": {"arch": "mf"')
    with pytest.raises(DiffRecError, match=r"checkpoint/config.json: not valid JSON"):
        load_recommender(folder)
