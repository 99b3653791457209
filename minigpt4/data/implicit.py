"""The implicit full-ranking shape of the data contract, as DiffMM, MDMNS and GenRec use it: train, valid
and test (user, item) pairs plus per-modality item feature matrices.

On disk, inside a dataset folder: ``implicit/{train,valid,test}.parquet`` (columns ``uid, iid``, ids
dense from 1, 0 is padding), ``implicit/features/<modality>.npy`` (n_items x dim, row i is item i + 1)
and ``implicit/meta.json``. ``import_diffmm_folder`` reads the DiffMM family's published folders
(``trnMat.pkl``, ``valMat.pkl``, ``tstMat.pkl``: pickled SciPy COO user x item matrices, read through
the restricted unpickler; ``image_feat.npy``, ``text_feat.npy``, ``audio_feat.npy``: any subset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from minigpt4.data.restricted_pickle import load_restricted_pickle
from minigpt4.errors import DiffRecError

SPLITS = ("train", "valid", "test")
DIFFMM_MATRICES = {"train": "trnMat.pkl", "valid": "valMat.pkl", "test": "tstMat.pkl"}
DIFFMM_FEATURES = {"image": "image_feat.npy", "text": "text_feat.npy", "audio": "audio_feat.npy"}
FOLDER = "implicit"


@dataclass
class ImplicitDataset:
    """Interaction matrices (users x items, 0-based rows and columns for ids 1..n) and item features per modality."""

    root: Path
    matrices: dict[str, sp.csr_matrix]
    features: dict[str, np.ndarray]
    meta: dict

    @property
    def n_users(self) -> int:
        return self.matrices["train"].shape[0]

    @property
    def n_items(self) -> int:
        return self.matrices["train"].shape[1]


def import_diffmm_folder(folder: str | Path) -> tuple[dict[str, pd.DataFrame], dict[str, np.ndarray], dict]:
    """Pairs tables, features and meta from a DiffMM-family dataset folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffRecError(f"{folder}: not a folder (expected trnMat.pkl, valMat.pkl, tstMat.pkl and *_feat.npy)")
    matrices = {}
    for split, name in DIFFMM_MATRICES.items():
        matrix = load_restricted_pickle(folder / name)
        if not sp.issparse(matrix):
            raise DiffRecError(f"{folder / name}: expected a scipy sparse user x item matrix, found {type(matrix).__name__}")
        matrices[split] = matrix.tocoo()
    shapes = {matrix.shape for matrix in matrices.values()}
    if len(shapes) != 1:
        raise DiffRecError(f"{folder}: the split matrices disagree on users x items: {sorted(shapes)}")
    n_users, n_items = shapes.pop()
    features = {}
    for modality, name in DIFFMM_FEATURES.items():
        if (folder / name).is_file():
            values = np.load(folder / name, allow_pickle=False)
            if values.ndim != 2 or values.shape[0] != n_items:
                raise DiffRecError(f"{folder / name}: expected {n_items} rows (one per item) x dim, found shape {values.shape}")
            features[modality] = values.astype(np.float32)
    splits = {split: pd.DataFrame({"uid": matrix.row.astype(np.int64) + 1, "iid": matrix.col.astype(np.int64) + 1}) for split, matrix in matrices.items()}
    meta = {"source": f"DiffMM-format folder {folder.name}", "n_users": int(n_users), "n_items": int(n_items), "modalities": sorted(features), **{f"{split}_pairs": len(frame) for split, frame in splits.items()}}
    return splits, features, meta


def save_implicit_dataset(root: str | Path, splits: dict[str, pd.DataFrame], features: dict[str, np.ndarray], meta: dict) -> Path:
    """Write the implicit shape into ``root/implicit``."""
    folder = Path(root) / FOLDER
    (folder / "features").mkdir(parents=True, exist_ok=True)
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
    meta = json.loads(meta_path.read_text())
    n_users, n_items = meta["n_users"], meta["n_items"]
    matrices = {}
    for split in SPLITS:
        path = folder / f"{split}.parquet"
        if not path.is_file():
            raise DiffRecError(f"{path}: missing")
        frame = pd.read_parquet(path)
        if not {"uid", "iid"} <= set(frame.columns):
            raise DiffRecError(f"{path}: expected columns uid, iid; found {', '.join(frame.columns)}")
        users, items = frame["uid"].to_numpy() - 1, frame["iid"].to_numpy() - 1
        if len(frame) and (users.min() < 0 or users.max() >= n_users or items.min() < 0 or items.max() >= n_items):
            raise DiffRecError(f"{path}: ids outside 1..{n_users} (users) / 1..{n_items} (items) of {meta_path}")
        matrices[split] = sp.csr_matrix((np.ones(len(frame), dtype=np.float32), (users, items)), shape=(n_users, n_items))
        matrices[split].data[:] = 1.0  # a repeated pair counts once
    features = {}
    for modality in modalities if modalities is not None else meta.get("modalities", []):
        path = folder / "features" / f"{modality}.npy"
        if not path.is_file():
            raise DiffRecError(f"{path}: feature file missing for modality '{modality}' (this dataset has: {', '.join(meta.get('modalities', [])) or 'none'})")
        features[modality] = np.load(path, allow_pickle=False)
    return ImplicitDataset(root, matrices, features, meta)
