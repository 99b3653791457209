"""MF pre-training on CoLLM's ML-1M: our trainer against a straightforward PyTorch loop, same run.

The straightforward loop is what CoLLM's baseline scripts do: a DataLoader over the rows (batch 1024),
Adam lr 1e-3, evaluation every epoch by a loop over batches, AUC by scikit-learn and UAUC user by user.
Both use the same MF, the same hyperparameters and the same early stopping on valid AUC. Prints one
JSON line per figure: wall time to the best valid AUC, wall time until both reach the same valid AUC
(the lower of the two bests), training samples/s, best valid AUC, test AUC/UAUC.

    python bench/mf_pretrain.py   # needs dataset/collm-ml-1m, or ../shared/data/collm-ml-1m to import
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit  # noqa: E402  (bench/measure.py)

from minigpt4.config import load_config  # noqa: E402
from minigpt4.data.collm import import_collm  # noqa: E402
from minigpt4.data.contract import load_rating_dataset, save_rating_dataset  # noqa: E402
from minigpt4.recommenders.mf import MatrixFactorization  # noqa: E402
from minigpt4.training.pretrain import pretrain  # noqa: E402

CONFIG = ROOT / "train_configs" / "mf_collm_ml1m.yaml"


class RowDataset(torch.utils.data.Dataset):
    """One (uid, iid, label) row per item, as the CoLLM baseline scripts read their data."""

    def __init__(self, frame):
        self.rows = frame[["uid", "iid", "label"]].to_numpy()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def loop_uauc(users, labels, scores):
    """Per-user AUC the straightforward way, averaged over users with both classes."""
    values = []
    for user in np.unique(users):
        keep = users == user
        if 0 < labels[keep].sum() < keep.sum():
            values.append(roc_auc_score(labels[keep], scores[keep]))
    return float(np.mean(values))


def loop_evaluate(model, loader):
    """Predictions batch by batch, then AUC and UAUC."""
    model.eval()
    users, labels, scores = [], [], []
    with torch.no_grad():
        for rows in loader:
            user_emb = model.user_embedding(rows[:, 0])
            item_emb = model.item_embedding(rows[:, 1])
            scores.append((user_emb * item_emb).sum(-1).numpy())
            users.append(rows[:, 0].numpy())
            labels.append(rows[:, 2].numpy())
    users, labels, scores = map(np.concatenate, (users, labels, scores))
    return roc_auc_score(labels, scores), loop_uauc(users, labels, scores)


def straightforward(config, dataset):
    """The baseline loop; returns its figures."""
    torch.manual_seed(config.run.seed)
    run = config.run
    model = MatrixFactorization(config.model, dataset.n_users, dataset.n_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    train = torch.utils.data.DataLoader(RowDataset(dataset.splits["train"]), batch_size=1024, shuffle=True)
    valid = torch.utils.data.DataLoader(RowDataset(dataset.splits["valid"]), batch_size=1024)
    test = torch.utils.data.DataLoader(RowDataset(dataset.splits["test"]), batch_size=1024)
    best, best_state, stale, samples, train_seconds, curve = (-math.inf, 0, 0.0), None, 0, 0, 0.0, []
    start = time.perf_counter()
    for epoch in range(1, run.max_epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        for rows in train:
            logits = (model.user_embedding(rows[:, 0]) * model.item_embedding(rows[:, 1])).sum(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, rows[:, 2].float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            samples += len(rows)
        train_seconds += time.perf_counter() - epoch_start
        auc, _ = loop_evaluate(model, valid)
        curve.append({"epoch": epoch, "seconds": time.perf_counter() - start, "valid_auc": auc})
        if auc > best[0]:
            best, stale = (auc, epoch, time.perf_counter() - start), 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= run.patience:
                break
    model.load_state_dict(best_state)
    test_auc, test_uauc = loop_evaluate(model, test)
    return {"seconds_to_best": best[2], "best_epoch": best[1], "valid_auc": best[0],
            "samples_per_second": samples / train_seconds, "test_auc": test_auc, "test_uauc": test_uauc, "curve": curve}  # fmt: skip


def seconds_to_reach(curve, target):
    """Wall time of the first evaluation whose valid AUC reaches ``target``."""
    return next(point["seconds"] for point in curve if point["valid_auc"] >= target)


def main():
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    config = load_config(CONFIG, ["run.cpu=true", "run.output_dir=" + str(ROOT / "runs" / "bench_mf")])
    if not (config.datasets.path / "meta.json").is_file():
        shared = Path(os.environ.get("DIFFREC_SHARED_DATA", ROOT.parent / "shared" / "data")) / "collm-ml-1m"
        save_rating_dataset(config.datasets.path, *import_collm(shared))
    dataset = load_rating_dataset(config.datasets.path)
    ours = pretrain(config)
    ours = {"seconds_to_best": ours["seconds_to_best"], "best_epoch": ours["best_epoch"], "valid_auc": ours["valid"]["auc"],
            "samples_per_second": ours["train_samples_per_second"], "test_auc": ours["test"]["auc"], "test_uauc": ours["test"]["uauc"],
            "curve": ours["curve"]}  # fmt: skip
    baseline = straightforward(config, dataset)
    target = min(ours["valid_auc"], baseline["valid_auc"])
    ours["seconds_to_same_auc"], baseline["seconds_to_same_auc"] = (
        seconds_to_reach(r["curve"], target) for r in (ours, baseline)
    )
    for figure, unit in (
        ("seconds_to_best", "s"),
        ("seconds_to_same_auc", "s"),
        ("samples_per_second", "samples/s"),
        ("valid_auc", ""),
        ("test_auc", ""),
        ("test_uauc", ""),
    ):
        line = {
            "bench": "mf_pretrain",
            "figure": figure,
            "unit": unit,
            "ours": ours[figure],
            "straightforward": baseline[figure],
        }
        if figure.startswith("seconds_to"):
            line["speedup"] = baseline[figure] / ours[figure]
        if figure == "seconds_to_best":
            line["best_epoch"] = {"ours": ours["best_epoch"], "straightforward": baseline["best_epoch"]}
        if figure == "seconds_to_same_auc":
            line["valid_auc_target"] = target
        if figure == "samples_per_second":
            line["speedup"] = ours[figure] / baseline[figure]
        emit("float32", **line)  # rating-shape training is fp32 in both


if __name__ == "__main__":
    main()
