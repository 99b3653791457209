"""Rating tables as tensors on the training device, fetched a whole batch at a time.

A ``RatingTensors`` is a map-style dataset whose ``__getitems__`` turns a list of row numbers into one
``RatingBatch`` by tensor indexing, so a DataLoader (and Accelerate's sharding of it) never runs
Python per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch


@dataclass
class RatingBatch:
    """Rows of a rating table: ids, labels and left-padded recent history (most recent last)."""

    rows: torch.Tensor
    uid: torch.Tensor
    iid: torch.Tensor
    label: torch.Tensor
    his: torch.Tensor

    def to(self, device: torch.device | str) -> RatingBatch:
        """The batch on ``device`` (Accelerate calls this when it places batches)."""
        return RatingBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return len(self.rows)


def padded_history(his: pd.Series, max_len: int) -> np.ndarray:
    """The last ``max_len`` items of each history, left-padded with 0 into one int64 matrix."""
    out = np.zeros((len(his), max_len), dtype=np.int64)
    for row, items in enumerate(his):
        recent = np.asarray(items[-max_len:], dtype=np.int64) if max_len else np.empty(0, dtype=np.int64)
        if len(recent):
            out[row, max_len - len(recent) :] = recent
    return out


class RatingTensors(torch.utils.data.Dataset):
    """One split's columns as tensors on ``device``; indexing by a list of rows returns a ``RatingBatch``."""

    def __init__(self, frame: pd.DataFrame, max_history: int, device: torch.device | str = "cpu") -> None:
        self.uid = torch.as_tensor(frame["uid"].to_numpy(copy=True), dtype=torch.long, device=device)
        self.iid = torch.as_tensor(frame["iid"].to_numpy(copy=True), dtype=torch.long, device=device)
        self.label = torch.as_tensor(frame["label"].to_numpy(copy=True), dtype=torch.float32, device=device)
        self.his = torch.as_tensor(padded_history(frame["his"], max_history), device=device)
        self.not_cold = frame["not_cold"].to_numpy().astype(bool)

    def __len__(self) -> int:
        return len(self.uid)

    def __getitem__(self, row: int) -> RatingBatch:
        return self.__getitems__([row])

    def __getitems__(self, rows: list[int]) -> RatingBatch:
        index = torch.as_tensor(rows, dtype=torch.long, device=self.uid.device)
        return RatingBatch(
            rows=index, uid=self.uid[index], iid=self.iid[index], label=self.label[index], his=self.his[index]
        )


def whole_batch(batch: RatingBatch) -> RatingBatch:
    """DataLoader ``collate_fn``: ``__getitems__`` already returned the batch."""
    return batch
