"""A corpus of malformed inputs, one or more per class of bad input, each run through the command a user would
type: exit code 2, one line on stderr naming the file (and column and first bad row where there is one), no
traceback, and nothing written."""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from conftest import write_config

from minigpt4.cli import main


def expect_one_line_error(argv: list[str], capsys, *fragments: str) -> str:
    """Run the command; it must fail with exit 2 and one stderr line holding every fragment."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --- rating datasets: every reader of the contract's tables (here `diffrec data sequences`, which writes
# --- sequences/ only after the dataset loaded)


def rating_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ratings"
    shutil.copytree(tiny_dataset, folder)
    return folder


def set_cell(frame: pd.DataFrame, column: str, row: int, value) -> pd.DataFrame:
    frame[column] = frame[column].astype(object)
    frame.at[row, column] = value
    return frame


RATING_CASES = {
    "uid as text": (lambda f: f.assign(uid="u" + f["uid"].astype(str)), ["column 'uid', row 0: expected an integer id, found str 'u"]),
    "iid a fraction": (lambda f: set_cell(f, "iid", 3, 2.5), ["column 'iid', row 3: expected an integer id, found float 2.5"]),
    "label as text": (lambda f: f.assign(label=np.where(f["label"] == 1, "yes", "no")), ["column 'label', row 0: expected a label 0 or 1, found str"]),
    "title as bytes": (lambda f: f.assign(title=f["title"].str.encode("utf-8")), ["column 'title', row 0: expected text, found bytes"]),
    "history NaN": (lambda f: set_cell(f, "his", 5, None), ["column 'his', row 5: expected a list of item ids, found NoneType"]),
    "history outside the catalogue": (lambda f: set_cell(f, "his", 4, np.array([1, 999])), ["column 'his', row 4: history item id out of range 1..30"]),
    "history misaligned with titles": (lambda f: set_cell(f, "his_title", 2, ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t", "u", "v", "w", "x", "y", "z"][: len(f.at[2, "his"]) + 1]), ["column 'his_title', row 2: 'his' and 'his_title' have different lengths"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RATING_CASES))
def test_a_bad_rating_table_names_file_column_and_row(case, tiny_dataset, tmp_path, capsys):
    folder = rating_copy(tiny_dataset, tmp_path)
    change, fragments = RATING_CASES[case]
    path = folder / "train.parquet"
    change(pd.read_parquet(path)).to_parquet(path, index=False)
    expect_one_line_error(["data", "sequences", str(folder)], capsys, str(path), *fragments)
    assert not (folder / "sequences").exists()


def test_a_bad_items_table_and_meta_json(tiny_dataset, tmp_path, capsys):
    folder = rating_copy(tiny_dataset, tmp_path)
    items = folder / "items.parquet"
    good = pd.read_parquet(items)
    good.assign(title=good["title"].str.encode("utf-8")).to_parquet(items, index=False)
    expect_one_line_error(
        ["data", "sequences", str(folder)], capsys, str(items), "column 'title', row 0: expected text"
    )
    good.to_parquet(items, index=False)
    meta = folder / "meta.json"
    for content, fragment in (
        (b'{"n_users": 40, "n_items": ', "not valid JSON"),
        (b'{"n_users": 40, "n_items": "30"}', "key 'n_items' must be a positive integer below 2**31, found '30'"),
        (b'{"name": "\xff"}', "not valid JSON"),
    ):
        meta.write_bytes(content)
        expect_one_line_error(["data", "sequences", str(folder)], capsys, str(meta), fragment)
    assert not (folder / "sequences").exists()


# --- CoLLM's pickles (`diffrec data import-collm`)


def collm_folder(tiny_dataset: Path, tmp_path: Path) -> Path:
    """The tiny dataset in CoLLM's published layout: histories start with item 0 and an empty title."""
    folder = tmp_path / "collm"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        frame = pd.read_parquet(tiny_dataset / f"{split}.parquet")
        frame["his"] = [[0, *his] for his in frame["his"]]
        frame["his_title"] = [["", *titles] for titles in frame["his_title"]]
        frame.to_pickle(folder / f"{split}_ood2.pkl")
    return folder


class Rebuilds:
    """Pickles as a call of an allowed class with arguments it refuses: passes the allow-list, fails on load."""

    def __init__(self, target, *args) -> None:
        self.target, self.args = target, args

    def __reduce__(self):
        return self.target, self.args


COLLM_CASES = {
    "history NaN": (lambda f: set_cell(f, "his", 3, np.nan), "column 'his', row 3: expected a list of item ids, found float nan"),
    "history holds text": (lambda f: set_cell(f, "his", 1, [0, "seven"]), "column 'his', row 1: expected integer item ids in the list"),
    "history misaligned": (lambda f: set_cell(f, "his_title", 6, ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "13", "14", "15", "16", "17", "18", "19", "20"][: len(f.at[6, "his"]) + 2]), "column 'his_title', row 6: 'his' and 'his_title' have different lengths"),
    "uid as text": (lambda f: set_cell(f, "uid", 2, "user-2"), "column 'uid', row 2: expected an integer id, found str 'user-2'"),
    "title as bytes": (lambda f: set_cell(f, "title", 0, b"Item"), "column 'title', row 0: expected text, found bytes"),
    "label as text": (lambda f: set_cell(f, "label", 4, "like"), "column 'label', row 4: expected a label 0 or 1, found str 'like'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(COLLM_CASES))
def test_a_bad_collm_pickle_names_file_column_and_row(case, tiny_dataset, tmp_path, capsys):
    folder = collm_folder(tiny_dataset, tmp_path)
    change, fragment = COLLM_CASES[case]
    path = folder / "valid_ood2.pkl"
    change(pd.read_pickle(path)).to_pickle(path)
    out = tmp_path / "out"
    expect_one_line_error(["data", "import-collm", str(folder), "--out", str(out)], capsys, str(path), fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    "payload",
    [
        Rebuilds(np.ndarray, "not a shape"),
        Rebuilds(pd.DataFrame, "not data", 5),
        Rebuilds(sp.coo_matrix, ("rows", "cols")),
    ],
    ids=["ndarray", "DataFrame", "coo_matrix"],
)
def test_a_pickle_that_fails_while_being_rebuilt(payload, tiny_dataset, tmp_path, capsys):
    folder = collm_folder(tiny_dataset, tmp_path)
    path = folder / "test_ood2.pkl"
    path.write_bytes(pickle.dumps(payload))
    out = tmp_path / "out"
    expect_one_line_error(
        ["data", "import-collm", str(folder), "--out", str(out)], capsys, str(path), "not a readable pickle"
    )
    assert not out.exists()


# --- DiffMM-family folders (`diffrec data import-diffmm`): matrices and feature files


def diffmm_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "diffmm"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("trnMat.pkl", "valMat.pkl", "tstMat.pkl"):
        dense = (rng.random((12, 9)) < 0.3).astype(np.float32)
        (folder / name).write_bytes(pickle.dumps(sp.coo_matrix(dense)))
    np.save(folder / "image_feat.npy", rng.normal(size=(9, 4)).astype(np.float32))
    return folder


def test_interaction_matrices_outside_their_catalogue(tmp_path, capsys):
    folder = diffmm_folder(tmp_path)
    matrix = pickle.loads((folder / "valMat.pkl").read_bytes())
    matrix.col[2] = 40  # SciPy checks indices when a matrix is built, never when it is unpickled
    (folder / "valMat.pkl").write_bytes(pickle.dumps(matrix))
    out = tmp_path / "out"
    expect_one_line_error(
        ["data", "import-diffmm", str(folder), "--out", str(out)],
        capsys,
        str(folder / "valMat.pkl"),
        "entry 2: item (column) index 40 outside the matrix's 0..8",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "write, fragment",
    [
        (lambda path: path.write_bytes(b"\x93NUMPY\x01\x00garbage"), "not a readable numeric .npy file"),
        (lambda path: path.write_bytes(path.read_bytes()[:90]), "not a readable numeric .npy file"),
        (lambda path: np.save(path, np.array([{"a": 1}] * 9, dtype=object), allow_pickle=True), "not a readable numeric .npy file"),
        (lambda path: np.save(path, np.array([["x"] * 4] * 9)), "expected a numeric array, found dtype <U1"),
        (lambda path: np.save(path, np.full((9, 4), np.nan, dtype=np.float32)), "value nan at [0, 0]"),
        (lambda path: np.save(path, np.ones((8, 4), dtype=np.float32)), "expected 9 rows (one per item) x dim, found shape (8, 4)"),
    ],
    ids=["corrupt", "truncated", "objects", "text", "nan", "rows"],
)  # fmt: skip
def test_a_bad_feature_file(write, fragment, tmp_path, capsys):
    folder = diffmm_folder(tmp_path)
    write(folder / "image_feat.npy")
    out = tmp_path / "out"
    argv = ["data", "import-diffmm", str(folder), "--out", str(out)]
    expect_one_line_error(argv, capsys, str(folder / "image_feat.npy"), fragment)
    assert not out.exists()


def test_a_bad_implicit_dataset_on_load(tmp_path, capsys):
    folder = diffmm_folder(tmp_path)
    out = tmp_path / "imported"
    assert main(["data", "import-diffmm", str(folder), "--out", str(out)]) == 0
    capsys.readouterr()
    config = write_config(tmp_path, out, "mostpop", run={"select_metric": "recall@10", "ranking_ks": [10]})
    text = yaml.safe_load(config.read_text())
    text["model"].pop("embedding_size")
    text["datasets"]["shape"] = "implicit"
    config.write_text(yaml.safe_dump(text))
    pairs = out / "implicit" / "test.parquet"
    frame = pd.read_parquet(pairs)
    frame.assign(iid=frame["iid"].astype(str) + "x").to_parquet(pairs, index=False)
    expect_one_line_error(
        ["pretrain", "--cfg-path", str(config)], capsys, str(pairs), "column 'iid', row 0: expected an integer id"
    )
    frame.assign(uid=frame["uid"] + 100).to_parquet(pairs, index=False)
    expect_one_line_error(
        ["pretrain", "--cfg-path", str(config)], capsys, str(pairs), "column 'uid', row 0: id out of range 1..12"
    )
    assert not (tmp_path / "runs").exists()


# --- DiffuRec's pickle (`diffrec data import-diffurec`)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda raw: raw["train"].__setitem__(1, [1, 2, 99]), "column 'train', row 1: item id out of range 1..5"),
        (lambda raw: raw["train"].__setitem__(0, [1, float("nan")]), "column 'train', row 0: expected integer item ids in the list"),
        (lambda raw: raw["test"].__setitem__(2, [17]), "column 'test', row 2: item id out of range 1..5"),
        (lambda raw: raw["val"].__setitem__(0, 3), "'val' must hold exactly one item per user; user 0 has 3"),
        (lambda raw: raw.__setitem__("smap", [1, 2]), "'smap' must be a dict, found list"),
    ],
    ids=["train outside", "train NaN", "test outside", "val not a list", "smap"],
)  # fmt: skip
def test_a_bad_diffurec_pickle(change, fragment, tmp_path, capsys):
    raw = {
        "train": {0: [1, 2, 3], 1: [2, 3], 2: [4, 5, 1]},
        "val": {0: [4], 1: [4], 2: [2]},
        "test": {0: [5], 1: [5], 2: [3]},
        "umap": {1: 0, 2: 1, 3: 2},
        "smap": {i: i for i in range(1, 6)},
    }
    change(raw)
    path = tmp_path / "dataset.pkl"
    path.write_bytes(pickle.dumps(raw))
    out = tmp_path / "out"
    expect_one_line_error(["data", "import-diffurec", str(path), "--out", str(out)], capsys, str(path), fragment)
    assert not out.exists()


# --- text that is not UTF-8, malformed YAML, raw MovieLens and Amazon files


def test_text_that_is_not_utf8_or_not_yaml(tiny_dataset, tmp_path, capsys):
    config = write_config(tmp_path, tiny_dataset, "mf")
    config.write_bytes(config.read_bytes().replace(b"tiny", b"t\xffny", 1))
    expect_one_line_error(["pretrain", "--cfg-path", str(config)], capsys, str(config), "not UTF-8 text (byte")
    config.write_text("model: {arch: mf\nrun: [1, 2\n")
    expect_one_line_error(["pretrain", "--cfg-path", str(config)], capsys, str(config), "not valid YAML (", "line 2")


def test_a_prompt_template_that_is_not_utf8(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path, capsys):
    from test_llm import llm_config

    template = tmp_path / "template.txt"
    template.write_bytes(b"User {history} liked; will they like {target}? caf\xe9 Answer:")
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, "tallrec", None, model={"prompt": {"template": str(template)}})
    expect_one_line_error(["train", "--cfg-path", str(path)], capsys, str(template), "not UTF-8 text")
    assert not (tmp_path / "runs").exists()


def test_raw_movielens_files(tmp_path, capsys):
    raw = tmp_path / "ml-1m"
    raw.mkdir()
    (raw / "movies.dat").write_text("1::Toy Story (1995)::Animation|Comedy\n2::Heat (1995)::Action\n")
    (raw / "ratings.dat").write_text("1::1::5::978300760\n1::2::three::978300761\n")
    out = tmp_path / "out"
    argv = ["data", "prepare", "ml-1m", "--raw", str(raw), "--out", str(out)]
    expect_one_line_error(
        argv, capsys, str(raw / "ratings.dat"), "column 'rating', row 1: expected a finite number, found 'three'"
    )
    (raw / "ratings.dat").write_bytes(b"1::1::5::978300760\n1::2::\xff::978300761\n")
    expect_one_line_error(argv, capsys, str(raw / "ratings.dat"), "line 2: not utf-8 text")
    assert not out.exists()


def test_raw_amazon_files(tmp_path, capsys):
    meta = tmp_path / "meta_Books.jsonl"
    meta.write_text('{"parent_asin": "B1", "title": "A book"}\n')
    reviews = tmp_path / "Books.jsonl.gz"
    out = tmp_path / "out"
    argv = ["data", "prepare", "amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out)]
    for content, fragment in (
        (b'{"user_id": "U", "parent_asin": "B1", "rating": "five", "timestamp": 1}\n', "line 1: 'rating' must be a finite number and 'timestamp' a whole millisecond time between 1970 and 2100, found 'five'"),
        (b'["user_id", "U"]\n', "line 1 is a JSON list, not an object"),
        (b'{"user_id": "U", "parent_asin": "B1", "rating": 5, "timestamp": 1}\n\xff\xfe\n', "not UTF-8 text"),
    ):  # fmt: skip
        reviews.write_bytes(gzip.compress(content))
        expect_one_line_error(argv, capsys, str(reviews), fragment)
    lines = "".join(f'{{"user_id": "U{n}", "parent_asin": "B1", "rating": 5, "timestamp": {n}}}\n' for n in range(3000))
    packed = gzip.compress(lines.encode())
    reviews.write_bytes(packed[: len(packed) // 2])  # a download cut short
    expect_one_line_error(argv, capsys, str(reviews), "not readable after line")
    assert not out.exists()


def test_a_checkpoint_whose_config_json_is_not_json(tiny_dataset, mf_checkpoint, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(mf_checkpoint, checkpoint)
    config = write_config(tmp_path, tiny_dataset, "mf")
    argv = ["evaluate", "--cfg-path", str(config), "--options", f"run.ckpt={checkpoint}"]
    for content in (b'{"model": {"arch": "mf"', b'{"model": "\xff"}'):
        (checkpoint / "config.json").write_bytes(content)
        expect_one_line_error(argv, capsys, str(checkpoint / "config.json"), "not valid JSON")
    assert not (tmp_path / "runs").exists()


# --- one named regression test per class of bad input (the fuzz tests in test_fuzz.py draw from the same classes);
# --- the CoLLM importer is the running example, as four of the five misses of the last independent check were there


def import_collm_with(tiny_dataset, tmp_path, capsys, change, *fragments, split: str = "valid") -> None:
    """Break one split of the CoLLM folder with ``change``; the import must end in one line and write nothing."""
    folder = collm_folder(tiny_dataset, tmp_path)
    path = folder / f"{split}_ood2.pkl"
    changed = change(pd.read_pickle(path))
    if changed is not None:
        changed.to_pickle(path)
    out = tmp_path / "out"
    expect_one_line_error(["data", "import-collm", str(folder), "--out", str(out)], capsys, str(path), *fragments)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda f: f.drop(columns=["his_title"]), "missing column 'his_title'"),
        (lambda f: f.rename(columns={"iid": "item"}), "missing column 'iid'"),
        (lambda f: pd.concat([f, f[["title"]]], axis=1), "column 'title' appears 2 times"),
    ],
    ids=["dropped", "renamed", "repeated"],
)
def test_regression_a_missing_renamed_or_repeated_column(change, fragment, tiny_dataset, tmp_path, capsys):
    import_collm_with(tiny_dataset, tmp_path, capsys, change, fragment)


def test_regression_an_id_column_of_text(tiny_dataset, tmp_path, capsys):
    # text of digits too: the source's dtype is checked, not guessed (it used to end in a '>=' TypeError)
    import_collm_with(
        tiny_dataset,
        tmp_path,
        capsys,
        lambda f: f.assign(uid=f["uid"].astype(str)),
        "column 'uid', row 0: expected an integer id, found str",
    )


@pytest.mark.parametrize(
    "column, value, fragment",
    [
        ("timestamp", np.nan, "column 'timestamp', row 2: expected a finite number, found float nan"),
        ("timestamp", np.inf, "column 'timestamp', row 2: expected a finite number, found float inf"),
        ("iid", -3, "column 'iid', row 2: id out of range 1.."),
        ("uid", 2**62, "column 'uid', row 2: expected an integer id, found int 4611686018427387904"),
        ("not_cold", 2, "column 'not_cold', row 2: expected one of 0, 1, found int 2"),
        ("label", True, "column 'label', row 2: expected a label 0 or 1, found bool True"),
    ],
    ids=["nan", "inf", "negative", "huge", "not_cold 2", "bool label"],
)  # fmt: skip
def test_regression_nan_inf_negative_or_huge_values(column, value, fragment, tiny_dataset, tmp_path, capsys):
    import_collm_with(tiny_dataset, tmp_path, capsys, lambda f: set_cell(f, column, 2, value), fragment)


def test_regression_history_ids_outside_the_catalogue(tiny_dataset, tmp_path, capsys):
    # accepted silently before: a dataset of 99,999 items was written
    def change(frame):
        frame.at[3, "his"] = [*frame.at[3, "his"], 99_999]
        frame.at[3, "his_title"] = [*frame.at[3, "his_title"], "Unknown"]
        return frame

    import_collm_with(
        tiny_dataset,
        tmp_path,
        capsys,
        change,
        "column 'his', row 3: history item id out of range 1..30",
    )


def test_regression_ids_that_leave_the_catalogue_sparse(tiny_dataset, tmp_path, capsys):
    import_collm_with(
        tiny_dataset,
        tmp_path,
        capsys,
        lambda f: set_cell(f, "iid", 1, 5000),
        "column 'iid', row 1: item id 5000 lies outside the catalogue 1..31 (31 distinct ids",
    )


def test_regression_an_empty_split(tiny_dataset, tmp_path, capsys):
    # a 38-line traceback before (a dtype cast deep inside)
    import_collm_with(tiny_dataset, tmp_path, capsys, lambda f: f.iloc[:0], "no rows")


@pytest.mark.parametrize("cut", [0, 40, -20], ids=["empty", "truncated", "tail cut"])
def test_regression_a_truncated_or_corrupt_file(cut, tiny_dataset, tmp_path, capsys):
    def change(frame):
        data = pickle.dumps(frame)
        (tmp_path / "collm" / "valid_ood2.pkl").write_bytes(data[:cut] if cut else b"")

    import_collm_with(tiny_dataset, tmp_path, capsys, change, "not a readable pickle")


@pytest.mark.parametrize(
    "wrong, found", [(lambda f: f["uid"], "Series"), (lambda f: f.to_dict("list"), "dict"), (lambda f: [1, 2], "list")]
)
def test_regression_a_container_of_another_type(wrong, found, tiny_dataset, tmp_path, capsys):
    def change(frame):
        (tmp_path / "collm" / "valid_ood2.pkl").write_bytes(pickle.dumps(wrong(frame)))

    import_collm_with(tiny_dataset, tmp_path, capsys, change, f"expected a pickled pandas DataFrame, got {found}")


@pytest.mark.parametrize("column", ["title", "his_title"])
def test_regression_text_that_is_not_utf8(column, tiny_dataset, tmp_path, capsys):
    # a pyarrow traceback while writing before, with an empty output folder left behind
    undecodable = b"Caf\xe9".decode("utf-8", "surrogateescape")

    def change(frame):
        row = int(np.flatnonzero(frame["his"].map(len) > 1)[0])
        value = undecodable if column == "title" else [*frame.at[row, column][:-1], undecodable]
        return set_cell(frame, column, row, value)

    import_collm_with(
        tiny_dataset, tmp_path, capsys, change, f"column '{column}', row", "not valid UTF-8", "errors='replace'"
    )


def test_regression_nested_or_misaligned_lists(tiny_dataset, tmp_path, capsys):
    import_collm_with(
        tiny_dataset,
        tmp_path,
        capsys,
        lambda f: set_cell(f, "his", 2, [[0, 1]]),
        "column 'his', row 2: expected a flat list of item ids",
    )


def test_regression_matrices_of_disagreeing_shapes_name_the_file(tmp_path, capsys):
    # it named the folder, not which file disagrees
    folder = diffmm_folder(tmp_path)
    (folder / "tstMat.pkl").write_bytes(pickle.dumps(sp.coo_matrix(np.eye(12, 10, dtype=np.float32))))
    out = tmp_path / "out"
    expect_one_line_error(
        ["data", "import-diffmm", str(folder), "--out", str(out)],
        capsys,
        f"{folder / 'tstMat.pkl'}: 12 users x 10 items, but {folder / 'trnMat.pkl'} has 12 x 9",
    )
    assert not out.exists()


def test_regression_a_library_message_of_several_lines_is_one_line(tiny_dataset, tmp_path, capsys):
    folder = rating_copy(tiny_dataset, tmp_path)
    path = folder / "train.parquet"
    data = path.read_bytes()
    path.write_bytes(data[:4] + b"\xff\xfe" + data[4:])  # pyarrow's thrift error spans two lines
    expect_one_line_error(["data", "sequences", str(folder)], capsys, str(path), "not a readable Parquet file")
    assert not (folder / "sequences").exists()


def test_regression_a_nan_or_infinite_config_value(tiny_dataset, tmp_path, capsys):
    for value in (float("nan"), float("inf")):
        config = write_config(tmp_path, tiny_dataset, "mf", model={"init_std": value})
        expect_one_line_error(
            ["pretrain", "--cfg-path", str(config)],
            capsys,
            str(config),
            "key 'model.init_std': Input should be a finite number",
        )
    assert not (tmp_path / "runs").exists()
