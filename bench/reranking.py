"""Does the LLM's re-ranking help? Ranking figures of two-stage recommendation on a trained run.

For a seeded sample of the test split's users with a liked test item, each user is served as of the end of
the validation period (``DiffRec.user(uid, splits=("train", "valid"))``: their earlier likes, every item they
rated then masked; users the collaborative model never trained on are folded in). The collaborative model
scores the catalogue and its top ``--candidates`` unseen items are ordered three ways: by the collaborative
score (the model alone), by the LLM's Yes-score (the re-ranking), by the mean of the two ranks
(``recommend(rerank="blend")``), and by a seeded shuffle (a re-ranking that knows nothing: the floor). Recall@10 / NDCG@10 (``evaluation/ranking.py``) against the user's liked
test items, over all users and warm (trained) / cold (folded-in) users apart; Recall@candidates is the
same for every order (the candidates' reach). Prints one JSON line per order and a Markdown table.

    python bench/reranking.py --run train_configs/demo_ml100k.yaml --name ml-100k
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit  # noqa: E402  (bench/measure.py)

from minigpt4.evaluation.ranking import full_ranking_metrics  # noqa: E402
from minigpt4.io import json_safe  # noqa: E402
from minigpt4.serving import DiffRec, rerank_order  # noqa: E402

OUT = ROOT / "runs" / "bench_reranking"
ORDERS = ("collaborative", "llm_reranked", "blend", "shuffled")


def main() -> None:
    """Serve every sampled user, then score each order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run's config file, run folder or checkpoint folder")
    parser.add_argument("--options", nargs="*", default=[])
    parser.add_argument("--name", required=True, help="the dataset's name in the results")
    parser.add_argument("--users", type=int, default=200, help="seeded sample of evaluated users (default 200)")
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    served = DiffRec.load(args.run, args.options)
    test = served.dataset.splits["test"]
    liked_test = test[test["label"] == 1].groupby("uid")["iid"].apply(list)
    rng = np.random.default_rng(args.seed)
    users = sorted(
        rng.choice(liked_test.index.to_numpy(), size=min(args.users, len(liked_test)), replace=False).tolist()
    )
    n_items = served.dataset.n_items
    scores = {order: np.full((len(users), n_items), -np.inf, dtype=np.float32) for order in ORDERS}
    seen_rows, target_rows, warm = [], [], np.zeros(len(users), dtype=bool)
    trained = set(served.dataset.splits["train"]["uid"].tolist())  # warm: users the collaborative model trained on
    start = time.perf_counter()
    for row, uid in enumerate(tqdm(users, desc=f"serve {args.name} users")):
        profile = served.user(uid, splits=("train", "valid"))
        warm[row] = uid in trained
        pool, collab = served.candidates(profile, args.candidates)
        llm = served.llm_scores(profile, pool).numpy()
        # The candidates are the only items ranked (K <= --candidates), each order sorting them its own way.
        columns = np.asarray(pool) - 1
        scores["collaborative"][row, columns] = collab.numpy()
        scores["llm_reranked"][row, columns] = llm
        # Candidate positions in serving order, turned into descending scores.
        scores["blend"][row, columns[rerank_order(torch.from_numpy(llm), "blend").numpy()]] = np.arange(
            args.candidates, 0, -1
        )
        scores["shuffled"][row, columns] = rng.permutation(args.candidates)
        seen_rows.append(sorted(i - 1 for i in profile.seen))
        target_rows.append(sorted({i - 1 for i in liked_test[uid]} - {i - 1 for i in profile.seen}))
    seconds = time.perf_counter() - start
    seen, target = _csr(seen_rows, n_items), _csr(target_rows, n_items)
    groups = {"warm": warm, "cold": ~warm}
    results = {}
    for order in ORDERS:
        table = torch.from_numpy(scores[order])
        metrics = full_ranking_metrics(
            lambda batch, table=table: table[batch], seen, target, ks=(args.k, args.candidates), groups=groups
        )
        results[order] = metrics
        emit(served.precision(), served.rec.llm.device, **{
            "figure": f"reranking/{args.name}/{order}", "run": str(served.checkpoint), "users": metrics["users"],
            "warm_users": metrics["by_group"]["warm"]["users"], "cold_users": metrics["by_group"]["cold"]["users"],
            f"recall@{args.k}": metrics[f"recall@{args.k}"], f"ndcg@{args.k}": metrics[f"ndcg@{args.k}"],
            f"recall@{args.candidates}": metrics[f"recall@{args.candidates}"],
            "warm": {key: metrics["by_group"]["warm"][key] for key in (f"recall@{args.k}", f"ndcg@{args.k}")},
            "cold": {key: metrics["by_group"]["cold"][key] for key in (f"recall@{args.k}", f"ndcg@{args.k}")},
            "serve_seconds": round(seconds, 1),
        })  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(
        json.dumps(
            json_safe({"run": str(served.checkpoint), "args": vars(args), "results": results}), indent=2, default=str
        )
    )
    k = args.k
    print(
        f"\n| {args.name} ({results['collaborative']['users']} users) | Recall@{k} | NDCG@{k} | warm Recall@{k} | warm NDCG@{k} | cold Recall@{k} | cold NDCG@{k} |"
    )
    print("|---|---|---|---|---|---|---|")
    for order in ORDERS:
        m, groups_m = results[order], results[order]["by_group"]
        cells = [
            m[f"recall@{k}"],
            m[f"ndcg@{k}"],
            *(groups_m[g][name] for g in ("warm", "cold") for name in (f"recall@{k}", f"ndcg@{k}")),
        ]
        print(f"| {order} | " + " | ".join(f"{value:.4f}" for value in cells) + " |")


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    """Rows of 0-based item columns as a binary CSR matrix."""
    indptr = np.cumsum([0, *map(len, rows)])
    indices = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=int(indptr[-1]))
    return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(len(rows), n_items))


if __name__ == "__main__":
    main()
