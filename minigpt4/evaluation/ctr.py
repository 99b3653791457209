"""CTR evaluation of any scoring model over rating loaders: predictions gathered from every process
(``gather_for_metrics``) into row order, then AUC/UAUC/GAUC on valid, test, test-warm and test-cold.

A model only needs ``score(batch) -> logits [B]``; a loader's batches carry ``rows`` (positions in its
dataset) and its dataset exposes ``uid`` and ``label`` tensors and a ``not_cold`` array.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from minigpt4.data.tensors import RatingTensors
from minigpt4.evaluation.metrics import ctr_metrics


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, accelerator: Accelerator, desc: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and logits of a whole split, gathered from every process, in row order."""
    model.eval()
    rows, scores = [], []
    bar = tqdm(loader, desc=desc, leave=False, disable=desc is None or not accelerator.is_local_main_process)
    for batch in bar:
        logits = accelerator.unwrap_model(model).score(batch)
        batch_rows, logits = accelerator.gather_for_metrics((batch.rows, logits))
        rows.append(batch_rows.cpu())
        scores.append(logits.float().cpu())
    rows_all, scores_all = torch.cat(rows).numpy(), torch.cat(scores).numpy()
    order = np.argsort(rows_all, kind="stable")
    return rows_all[order], scores_all[order]


def split_predictions(
    model: nn.Module, loader: DataLoader, accelerator: Accelerator, desc: str | None = None
) -> tuple[np.ndarray, ...]:
    """Users, labels, logits and warm flags of a whole split, in row order."""
    rows, scores = predict(model, loader, accelerator, desc)
    data = loader.dataset
    return data.uid.cpu().numpy()[rows], data.label.cpu().numpy()[rows], scores, np.asarray(data.not_cold)[rows]


def evaluate_split(
    model: nn.Module, loader: DataLoader, accelerator: Accelerator, desc: str | None = None
) -> dict[str, float]:
    """AUC, UAUC and GAUC of one split."""
    users, labels, scores, _ = split_predictions(model, loader, accelerator, desc)
    return ctr_metrics(users, labels, scores)


def evaluate_all(
    model: nn.Module,
    split_loaders: dict[str, DataLoader],
    accelerator: Accelerator,
    progress: bool = False,
    valid: dict | None = None,
) -> dict:
    """Metrics on valid, test, test-warm (``not_cold``) and test-cold; ``valid`` when the caller already has them for these weights."""
    metrics = {
        "valid": valid or evaluate_split(model, split_loaders["valid"], accelerator, "valid" if progress else None)
    }
    users, labels, scores, warm = split_predictions(
        model, split_loaders["test"], accelerator, "test" if progress else None
    )
    for name, keep in (("test", np.ones_like(warm)), ("test_warm", warm), ("test_cold", ~warm)):
        metrics[name] = ctr_metrics(users[keep], labels[keep], scores[keep])
    return metrics


@torch.no_grad()
def frame_metrics(model: nn.Module, frame: pd.DataFrame) -> dict:
    """A collaborative model's metrics on the rows of one table (all, warm, cold), e.g. the subset an LLM is scored on."""
    model.eval()
    data = RatingTensors(frame, model.max_history)
    scores = model.score(data.__getitems__(list(range(len(frame))))).float().cpu().numpy()
    users, labels, warm = frame["uid"].to_numpy(), frame["label"].to_numpy(), data.not_cold
    return {
        name: ctr_metrics(users[keep], labels[keep], scores[keep])
        for name, keep in (("test", np.ones_like(warm)), ("test_warm", warm), ("test_cold", ~warm))
    }
