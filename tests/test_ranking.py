"""The implicit full-ranking shape and its evaluator: the DiffMM importer, the vectorised Recall/NDCG/
Precision@K against a per-user reference, and the most-popular floor on DiffMM's TikTok data."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import SHARED_DATA

from minigpt4.cli import main
from minigpt4.data.implicit import import_diffmm_folder, load_implicit_dataset, save_implicit_dataset
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.ranking import full_ranking_metrics

TIKTOK = SHARED_DATA / "diffmm-tiktok"


def reference_metrics(scores: np.ndarray, train: sp.csr_matrix, target: sp.csr_matrix, k: int) -> dict[str, float]:
    """Recall, NDCG and Precision@k one user at a time, as the papers' evaluators write them."""
    recall = ndcg = precision = 0.0
    users = [u for u in range(target.shape[0]) if target[u].nnz]
    for user in users:
        row = scores[user].astype(np.float64).copy()
        row[train[user].indices] = -np.inf
        top = np.argsort(-row, kind="stable")[:k]
        wanted = set(target[user].indices)
        hits = [1.0 if item in wanted else 0.0 for item in top]
        recall += sum(hits) / len(wanted)
        precision += sum(hits) / k
        ideal = sum(1 / np.log2(rank + 2) for rank in range(min(len(wanted), k)))
        ndcg += sum(hit / np.log2(rank + 2) for rank, hit in enumerate(hits)) / ideal
    return {
        f"recall@{k}": recall / len(users),
        f"ndcg@{k}": ndcg / len(users),
        f"precision@{k}": precision / len(users),
    }


def random_split(seed: int = 0, users: int = 50, items: int = 40) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """A random train/test split and distinct random scores."""
    rng = np.random.default_rng(seed)
    dense = rng.random((users, items))
    train = sp.csr_matrix(dense < 0.2)
    test = sp.csr_matrix((dense > 0.9) & ~(dense < 0.2))
    return train, test, rng.permutation(users * items).reshape(users, items).astype(np.float32)


def test_vectorised_metrics_equal_the_per_user_reference():
    train, test, scores = random_split()
    table = torch.as_tensor(scores)
    ours = full_ranking_metrics(lambda users: table[users], train, test, ks=(5, 10), batch_size=7)
    for k in (5, 10):
        for name, value in reference_metrics(scores, train, test, k).items():
            assert ours[name] == pytest.approx(value, abs=1e-12), name
    assert ours["users"] == sum(1 for u in range(test.shape[0]) if test[u].nnz)


def test_group_means_split_the_overall_mean():
    train, test, scores = random_split()
    train = train.tolil()
    train[:10] = 0  # ten users with no training items
    train = train.tocsr()
    warm = np.diff(train.indptr) > 0
    metrics = full_ranking_metrics(
        lambda users: torch.as_tensor(scores)[users],
        train,
        test,
        ks=(10,),
        batch_size=7,
        groups={"warm": warm, "cold": ~warm},
    )
    cold, hot = metrics["by_group"]["cold"], metrics["by_group"]["warm"]
    assert cold["users"] + hot["users"] == metrics["users"] and cold["users"] == sum(
        1 for u in range(10) if test[u].nnz
    )
    for name in ("recall@10", "ndcg@10", "precision@10"):
        assert (cold[name] * cold["users"] + hot[name] * hot["users"]) / metrics["users"] == pytest.approx(
            metrics[name]
        )
    cold_only = sp.diags((~warm).astype(float)) @ test
    assert cold["recall@10"] == pytest.approx(
        reference_metrics(scores, train, sp.csr_matrix(cold_only), 10)["recall@10"]
    )


def test_no_target_users_gives_missing_metrics_not_zero():
    train, _, scores = random_split()
    metrics = full_ranking_metrics(
        lambda users: torch.as_tensor(scores)[users], train, sp.csr_matrix(train.shape), ks=(10,)
    )
    assert metrics["users"] == 0 and np.isnan(metrics["recall@10"])


def write_diffmm_folder(folder, features=("image", "audio"), n_users: int = 12, n_items: int = 9) -> None:
    """A tiny DiffMM-format folder: pickled COO matrices and float16 feature files."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    dense = rng.random((n_users, n_items))
    for name, keep in (
        ("trnMat.pkl", dense < 0.4),
        ("valMat.pkl", (dense >= 0.4) & (dense < 0.5)),
        ("tstMat.pkl", dense >= 0.9),
    ):
        with open(folder / name, "wb") as handle:
            pickle.dump(sp.coo_matrix(keep.astype(np.float64)), handle)
    for modality in features:
        np.save(folder / f"{modality}_feat.npy", rng.random((n_items, 4)).astype(np.float16))


def test_diffmm_import_round_trip_and_missing_feature_file(tmp_path, capsys):
    source = tmp_path / "tiny"
    write_diffmm_folder(source)
    assert main(["data", "import-diffmm", str(source), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    dataset = load_implicit_dataset(tmp_path / "out")
    splits, features, meta = import_diffmm_folder(source)
    assert sorted(dataset.features) == ["audio", "image"] and dataset.features["image"].shape == (9, 4)
    assert (dataset.n_users, dataset.n_items) == (12, 9) and meta["modalities"] == ["audio", "image"]
    original = pickle.loads((source / "trnMat.pkl").read_bytes()).tocsr()
    assert (dataset.matrices["train"] != original).nnz == 0
    with pytest.raises(
        DiffRecError, match=r"text.npy: feature file missing for modality 'text' \(this dataset has: audio, image\)"
    ):
        load_implicit_dataset(tmp_path / "out", modalities=["image", "text"])
    with pytest.raises(DiffRecError, match=r"train.parquet \(not written\): column .iid., row 4: id out of range 1..5"):
        save_implicit_dataset(tmp_path / "bad", splits, features, {**meta, "n_items": 5})
    assert not (tmp_path / "bad").exists()
    meta_path = tmp_path / "out" / "implicit" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "n_items": 5}))
    with pytest.raises(
        DiffRecError, match=r"train.parquet \(items of .*meta.json\): column .iid., row 4: id out of range 1..5"
    ):
        load_implicit_dataset(tmp_path / "out")


def test_diffmm_import_refuses_a_foreign_pickle(tmp_path):
    source = tmp_path / "tiny"
    write_diffmm_folder(source)
    (source / "valMat.pkl").write_bytes(pickle.dumps(torch.nn.Linear(2, 2)))
    with pytest.raises(DiffRecError, match="refusing to unpickle 'torch.nn"):
        import_diffmm_folder(source)


@pytest.mark.skipif(not TIKTOK.is_dir(), reason="DiffMM's TikTok data is not beside the repository")
def test_most_popular_floor_on_tiktok_matches_the_papers(tmp_path):
    splits, features, meta = import_diffmm_folder(TIKTOK)
    assert sorted(features) == ["audio", "image"] and (meta["n_users"], meta["n_items"]) == (9308, 6710)
    dataset = load_implicit_dataset(save_implicit_dataset(tmp_path / "tiktok", splits, features, meta))
    popularity = torch.as_tensor(np.asarray(dataset.matrices["train"].sum(0)).ravel(), dtype=torch.float32)
    metrics = full_ranking_metrics(
        lambda users: popularity.expand(len(users), -1), dataset.matrices["train"], dataset.matrices["test"], ks=(20,)
    )
    assert (
        round(metrics["recall@20"], 4) == 0.0597
        and round(metrics["ndcg@20"], 4) == 0.0255
        and round(metrics["precision@20"], 4) == 0.0030
    )
    # Every TikTok test user has exactly one test item, so Precision@20 is Recall@20 / 20.
    assert metrics["precision@20"] == pytest.approx(metrics["recall@20"] / 20, rel=1e-12)
