"""The ranking evaluators and the implicit shape: the vectorised Recall/NDCG/Precision@K against a per-user
reference, leave-one-out HR/NDCG worked by hand (masking, padding, per-batch means, ties, trimming), the
DiffMM importer, and the most-popular floor on DiffMM's TikTok data."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import SHARED_DATA

from minigpt4.cli import main
from minigpt4.data.implicit import import_diffmm_folder, load_implicit_dataset, save_implicit_dataset
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.ranking import full_ranking_metrics, leave_one_out_metrics

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


def test_one_target_user_is_ranked_and_integer_scores_rank_like_floats():
    """A single user with targets is a mean of one, not missing; integer scores (popularity counts) rank as
    their float values do."""
    train, test, scores = random_split()
    one = sp.csr_matrix(test.multiply(sp.csr_matrix(np.eye(50)[[7]].T * np.ones((1, 40)))))  # user 7's row only
    assert np.flatnonzero(np.diff(one.indptr)).tolist() == [7]
    counts = torch.as_tensor(scores).long()
    ours = full_ranking_metrics(lambda users: counts[users], train, one, ks=(5,))
    assert ours == pytest.approx(reference_metrics(scores, train, one, 5) | {"users": 1}, abs=1e-12)


def test_a_group_without_target_users_is_missing_without_a_warning():
    train, test, scores = random_split()
    nobody = np.zeros(50, dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mean of an empty slice is taken
        metrics = full_ranking_metrics(
            lambda users: torch.as_tensor(scores)[users], train, test, ks=(10,), groups={"nobody": nobody}
        )
    assert metrics["by_group"]["nobody"]["users"] == 0
    assert all(np.isnan(metrics["by_group"]["nobody"][name]) for name in ("recall@10", "ndcg@10", "precision@10"))


# --- leave-one-out (one target item per row, DiffuRec's protocol) ----------------------------------------


def test_leave_one_out_metrics_by_hand():
    # 3 rows over item ids 0..4 (0 is padding); scores rank the ids 0 > 4 > 3 > 2 > 1 for every row.
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0]])

    def score(histories):
        return scores.expand(len(histories), -1)

    histories = np.array([[0, 4], [1, 4], [3, 4]])
    targets = np.array([4, 3, 2])
    seen = sp.csr_matrix((np.ones(5), ([0, 1, 1, 2, 2], [4, 1, 4, 3, 4])), shape=(3, 5))
    discount = 1 / np.log2(np.arange(2, 4))  # ranks 0 and 1
    plain = leave_one_out_metrics(score, histories, targets, None, ks=(1, 2), batch_size=2)
    # padding excluded: the targets rank 0 (id 4), 1 (id 3) and 2 (id 2)
    assert plain == pytest.approx(
        {"hr@1": 100 / 3, "ndcg@1": 100 / 3, "hr@2": 200 / 3, "ndcg@2": 100 * discount.sum() / 3, "users": 3},
        rel=1e-12,  # the discount is float64
    )
    masked = leave_one_out_metrics(score, histories, targets, seen, ks=(1, 2), batch_size=2)
    # row 0's target is in its history (masked: a miss); rows 1 and 2: ids 3 and 4 masked, the target first
    assert masked == pytest.approx({"hr@1": 200 / 3, "ndcg@1": 200 / 3, "hr@2": 200 / 3, "ndcg@2": 200 / 3, "users": 3})
    padded = leave_one_out_metrics(score, histories, targets, None, ks=(1, 2), batch_size=2, score_padding=True)
    assert padded == pytest.approx(
        {"hr@1": 0, "ndcg@1": 0, "hr@2": 100 / 3, "ndcg@2": 100 * discount[1] / 3, "users": 3}
    )
    per_batch = leave_one_out_metrics(score, histories, targets, None, ks=(1, 2), batch_size=2, per_batch_mean=True)
    # batch means: rows 0-1 hit at ranks 0 and 1, row 2 misses; the two batches weigh alike
    assert per_batch == pytest.approx(
        {"hr@1": 100 * (1 / 2) / 2, "ndcg@1": 100 * (1 / 2) / 2, "hr@2": 100 * (2 / 2) / 2,
         "ndcg@2": 100 * (discount.sum() / 2) / 2, "users": 3}
    )  # fmt: skip
    one = leave_one_out_metrics(score, histories[:1], targets[:1], None, ks=(1,))
    assert one == {"hr@1": 100.0, "ndcg@1": 100.0, "users": 1}


def test_leave_one_out_with_nothing_to_rank_is_missing():
    nothing = leave_one_out_metrics(
        lambda h: torch.zeros(len(h), 3), np.zeros((0, 2), int), np.zeros(0, int), None, (1,)
    )
    assert nothing["users"] == 0 and np.isnan(nothing["hr@1"]) and np.isnan(nothing["ndcg@1"])
    per_batch = leave_one_out_metrics(
        lambda h: torch.zeros(len(h), 3), np.zeros((0, 2), int), np.zeros(0, int), None, (1,), per_batch_mean=True
    )
    assert per_batch["users"] == 0 and np.isnan(per_batch["hr@1"])


def test_leave_one_out_ties_rank_the_lower_item_id_first():
    """Equal scores over a catalogue large enough for an unstable sort to reorder them: the lower id wins."""
    n_items = 5000
    targets = np.arange(1, 65)  # each row's target is one of the first ids; every item ties
    ours = leave_one_out_metrics(
        lambda h: torch.zeros(len(h), n_items + 1), np.ones((64, 3), int), targets, None, ks=(64,), batch_size=64
    )
    assert ours["hr@64"] == 100.0
    assert ours["ndcg@64"] == pytest.approx(100 * np.mean(1 / np.log2(targets + 1)), rel=1e-12)


def test_leave_one_out_integer_scores_rank_like_floats():
    counts = torch.tensor([[0, 5, 3, 9, 1]])
    histories, targets = np.ones((2, 1), int), np.array([3, 2])
    ints = leave_one_out_metrics(lambda h: counts.expand(len(h), -1), histories, targets, None, ks=(1, 2))
    floats = leave_one_out_metrics(lambda h: counts.float().expand(len(h), -1), histories, targets, None, ks=(1, 2))
    assert ints == floats and ints["hr@1"] == 50.0


def test_trim_padding_drops_only_the_columns_that_are_padding_in_every_row():
    widths = []

    def score(batch):
        widths.append(batch.shape[1])
        return torch.arange(6.0).expand(len(batch), -1)

    histories = np.array([[0, 0, 0, 2], [0, 0, 3, 4], [0, 0, 0, 0], [0, 1, 0, 5], [0, 0, 0, 1]])
    targets = np.array([5, 5, 5, 5, 5])
    trimmed = leave_one_out_metrics(score, histories, targets, None, ks=(1,), batch_size=2, trim_padding=True)
    assert widths == [2, 3, 1]  # rows 0-1: from column 2; rows 2-3: from column 1; row 4: the last column
    widths.clear()
    assert leave_one_out_metrics(score, histories, targets, None, ks=(1,), batch_size=2) == trimmed
    assert widths == [4, 4, 4]  # untrimmed by default


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
