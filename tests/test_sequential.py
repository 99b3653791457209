"""The sequence shape: DiffuRec's importer, sequences derived from a rating dataset, the leave-one-out
popularity floor on DiffuRec's Beauty (the evaluator itself is tested by hand in test_ranking.py), SASRec
and DiffuRec as next-item models, the CLI, and a CoRA model on a tiny DiffuRec."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SHARED_DATA, assert_cora_reads_the_user_vector
from test_llm import build, first_rows, llm_config, one_step

from minigpt4.cli import main
from minigpt4.config import DiffuRecConfig, SASRecConfig
from minigpt4.data.sequences import (
    derive_sequences,
    import_diffurec_pickle,
    left_padded,
    load_sequence_dataset,
    save_sequence_dataset,
)
from minigpt4.data.tensors import RatingBatch
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.ranking import leave_one_out_metrics
from minigpt4.recommenders import build_recommender, load_recommender
from minigpt4.recommenders.diffurec import respaced_timesteps, truncated_linear_betas

TINY_DIFFUREC = {
    "embedding_size": 16,
    "num_blocks": 2,
    "num_heads": 2,
    "max_history": 6,
    "diffusion_steps": 8,
    "reverse_steps": 8,
}


def synthetic_sequences(n_users: int = 30, n_items: int = 12, length: int = 9, seed: int = 0) -> dict:
    """DiffuRec's ``dataset.pkl`` layout: each user walks the item ring by +1 or +2 from a random start, so the
    next item is predictable from the last one."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(n_users):
        walk = [int(rng.integers(n_items))]
        for _ in range(length - 1):
            walk.append((walk[-1] + int(rng.integers(1, 3))) % n_items)
        sequences.append([item + 1 for item in walk])
    return {
        "train": {u: seq[:-2] for u, seq in enumerate(sequences)}, "val": {u: [seq[-2]] for u, seq in enumerate(sequences)},
        "test": {u: [seq[-1]] for u, seq in enumerate(sequences)}, "umap": {u + 1: u for u in range(n_users)}, "smap": {i: i for i in range(1, n_items + 1)},
    }  # fmt: skip


@pytest.fixture(scope="module")
def sequence_root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("diffurec")
    (folder / "dataset.pkl").write_bytes(pickle.dumps(synthetic_sequences()))
    frame, meta = import_diffurec_pickle(folder / "dataset.pkl")
    return save_sequence_dataset(folder / "walks", frame, meta)


def write_sequence_config(
    folder: Path, root: Path, arch: str, model: dict | None = None, run: dict | None = None
) -> Path:
    config = {
        "model": {"arch": arch, **(model or {})},
        "datasets": {"name": "walks", "path": str(root), "shape": "sequence"},
        "run": {"cpu": True, "batch_size": 32, "eval_batch_size": 16, "lr": 0.01, "max_epochs": 3, "patience": 5, "ranking_ks": [1, 5, 10],
                "select_metric": "ndcg@5", "output_dir": str(folder / "runs" / arch), **(run or {})},
    }  # fmt: skip
    path = folder / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- data -----------------------------------------------------------------------------------------------


def test_importer_keeps_ids_and_builds_prefixes_and_eval_inputs(sequence_root):
    raw = synthetic_sequences()
    data = load_sequence_dataset(sequence_root)
    assert (data.n_users, data.n_items) == (30, 12)
    assert data.uid.tolist() == list(range(1, 31))
    assert data.items[data.starts[3] : data.ends[3]].tolist() == raw["train"][3]
    starts, targets = data.training_prefixes()
    assert len(targets) == sum(len(seq) - 1 for seq in raw["train"].values())
    histories = left_padded(data.items, starts, targets, 4)
    # user 0's third prefix: the first three items, left-padded to 4, then the fourth item as the target
    assert histories[2].tolist() == [0] + raw["train"][0][:3] and data.items[targets[2]] == raw["train"][0][3]
    test_histories, test_targets, seen = data.evaluation_inputs("test", 10)
    assert test_histories[5].tolist() == [0] * 2 + raw["train"][5] + raw["val"][5]
    assert test_targets[5] == raw["test"][5][0]
    assert set(seen[5].indices) == set(raw["train"][5] + raw["val"][5])


def test_importer_refuses_a_foreign_pickle_and_bad_targets(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"train": {0: [1, 2]}, "val": Payload()}))
    with pytest.raises(DiffRecError, match="refusing to unpickle 'builtins.print'"):
        import_diffurec_pickle(tmp_path / "evil.pkl")
    raw = synthetic_sequences()
    raw["val"][4] = []
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(raw))
    with pytest.raises(DiffRecError, match="'val' must hold exactly one item per user; user 4"):
        import_diffurec_pickle(tmp_path / "bad.pkl")


def test_loading_names_a_bad_item_id(sequence_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(sequence_root, root)
    frame = __import__("pandas").read_parquet(root / "sequences" / "sequences.parquet")
    frame.loc[7, "test"] = 99
    frame.to_parquet(root / "sequences" / "sequences.parquet")
    with pytest.raises(DiffRecError, match=r"column 'test', row 7: item id out of range 1..12"):
        load_sequence_dataset(root)


def test_derived_sequences_follow_time_and_keep_ids(tiny_dataset, tmp_path):
    from minigpt4.data.contract import load_rating_dataset

    root = tmp_path / "tiny"
    shutil.copytree(tiny_dataset, root)
    meta = derive_sequences(root)
    data = load_sequence_dataset(root)
    ratings = load_rating_dataset(tiny_dataset)
    rows = (
        __import__("pandas")
        .concat(ratings.splits.values())
        .query("label == 1")
        .sort_values(["uid", "timestamp"], kind="stable")
    )
    user = int(data.uid[0])
    expected = rows.loc[rows.uid == user, "iid"].tolist()
    assert data.items[data.starts[0] : data.ends[0]].tolist() + [data.valid[0], data.test[0]] == expected
    assert meta["users"] == len(data.uid) and (data.n_users, data.n_items) == (ratings.n_users, ratings.n_items)


# --- evaluator --------------------------------------------------------------------------------------------


BEAUTY = SHARED_DATA / "diffurec-amazon_beauty" / "dataset.pkl"


@pytest.mark.skipif(not BEAUTY.is_file(), reason="DiffuRec's Beauty split is not available")
def test_popularity_floor_on_diffurec_beauty(tmp_path):
    frame, meta = import_diffurec_pickle(BEAUTY)
    data = load_sequence_dataset(save_sequence_dataset(tmp_path / "beauty", frame, meta))
    counts = torch.as_tensor(np.bincount(data.items, minlength=data.n_items + 1), dtype=torch.float32)
    histories, targets, seen = data.evaluation_inputs("test", 1)

    def score(batch):
        return counts.expand(len(batch), -1)

    unmasked = leave_one_out_metrics(
        score, histories, targets, None, (5, 10, 20), batch_size=len(targets), score_padding=True
    )
    assert round(unmasked["hr@10"], 3) == 1.145
    published = leave_one_out_metrics(
        score, histories, targets, None, (5, 10, 20), batch_size=512, score_padding=True, per_batch_mean=True
    )
    assert round(published["hr@10"], 3) == 1.136  # DiffuRec's mean of per-batch means over batches of 512
    masked = leave_one_out_metrics(score, histories, targets, seen, (5, 10, 20), batch_size=2048)
    assert round(masked["hr@10"], 3) == 1.154


# --- models -----------------------------------------------------------------------------------------------


def walks_batches(seed: int = 0, batch: int = 64, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    data = synthetic_sequences(n_users=batch, length=length + 1, seed=seed)
    sequences = torch.tensor([data["train"][u] + data["val"][u] + data["test"][u] for u in range(batch)])
    history = sequences[:, :-1].clone()
    history[: batch // 2, :2] = 0  # half the rows left-padded
    return history, sequences[:, -1]


@pytest.mark.parametrize(
    "config",
    [
        DiffuRecConfig(**TINY_DIFFUREC),
        DiffuRecConfig(**TINY_DIFFUREC, faithful=True),
        SASRecConfig(embedding_size=16, max_history=6),
    ],
    ids=["diffurec", "diffurec-faithful", "sasrec"],
)
def test_next_item_loss_falls(config):
    torch.manual_seed(0)
    model = build_recommender(config, 64, 12)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    history, target = walks_batches()
    losses = []
    for _ in range(40):
        loss = model.next_item_loss(history, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    model.eval()
    scores = model.next_item_scores(history, torch.Generator().manual_seed(0))
    assert scores.shape == (64, 13)


def approximator_output(model, history: torch.Tensor, padding_value: float) -> torch.Tensor:
    """x0 predicted at step 3 with the padded positions' states set to ``padding_value``."""
    states, bias = model.encode(history)
    states = torch.where((history == 0)[:, :, None], torch.full_like(states, padding_value), states)
    x_t = torch.randn(len(history), states.shape[-1], generator=torch.Generator().manual_seed(1))
    return model.approximator(states, bias, x_t, torch.full((len(history),), 3.0), torch.Generator().manual_seed(2))


def test_key_padding_mask_makes_outputs_independent_of_padding():
    history, _ = walks_batches(batch=8)
    for faithful, independent in ((False, True), (True, False)):
        torch.manual_seed(0)
        model = build_recommender(DiffuRecConfig(**TINY_DIFFUREC, faithful=faithful), 8, 12).eval()
        with torch.no_grad():
            a, b = approximator_output(model, history, 0.0), approximator_output(model, history, 5.0)
        padded = (history == 0).any(1)
        assert torch.allclose(a[padded], b[padded], atol=1e-5) is independent
        assert torch.allclose(a[~padded], b[~padded], atol=1e-5)  # rows without padding never differ


def test_padding_is_never_recommended_in_fixed_mode(sequence_root):
    torch.manual_seed(0)
    history, _ = walks_batches(batch=16)
    for faithful in (False, True):
        model = build_recommender(DiffuRecConfig(**TINY_DIFFUREC, faithful=faithful), 16, 12).eval()
        with torch.no_grad():
            x0 = model.reverse_chain(history, generator=torch.Generator().manual_seed(0))
            model.item_embedding.weight[0] = 100 * x0.mean(0) / x0.mean(0).norm()  # make the padding row the best match
            top = model.next_item_scores(history, torch.Generator().manual_seed(0)).topk(5).indices
        assert (top == 0).any().item() is faithful


def test_reverse_chain_is_reproducible_under_a_seed_at_every_step_count():
    torch.manual_seed(0)
    model = build_recommender(DiffuRecConfig(**TINY_DIFFUREC), 8, 12).eval()
    history, _ = walks_batches(batch=8)
    for steps in (1, 4, 8):
        first = model.reverse_chain(history, steps, torch.Generator().manual_seed(7))
        again = model.reverse_chain(history, steps, torch.Generator().manual_seed(7))
        other = model.reverse_chain(history, steps, torch.Generator().manual_seed(8))
        assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="reverse steps must be 1..8"):
        model.reverse_chain(history, 9)
    batch = RatingBatch(
        rows=torch.arange(8),
        uid=torch.arange(1, 9),
        iid=torch.ones(8, dtype=torch.long),
        label=torch.ones(8),
        his=history,
    )
    assert torch.equal(model.user_embeddings(batch), model.user_embeddings(batch)) and model.user_embeddings(
        batch
    ).shape == (8, 16)


def test_schedule_matches_the_published_truncated_linear_betas():
    betas = truncated_linear_betas(32)
    assert betas[0] == pytest.approx(1000 / 32 * 1e-4 + 0.01) and betas[-1] == pytest.approx(1000 / 32 * 0.02 + 0.01)
    assert respaced_timesteps(32, 32).tolist() == list(range(32))
    assert respaced_timesteps(32, 4).tolist() == [0, 10, 21, 31] and respaced_timesteps(32, 1).tolist() == [0]


def test_item_table_starts_as_published_unless_init_std_is_set():
    torch.manual_seed(0)
    published = build_recommender(DiffuRecConfig(**TINY_DIFFUREC), 8, 500).item_embedding.weight
    small = build_recommender(DiffuRecConfig(**TINY_DIFFUREC, init_std=0.02), 8, 500).item_embedding.weight
    assert published.std().item() == pytest.approx(1.0, rel=0.05) and small.std().item() == pytest.approx(
        0.02, rel=0.05
    )


# --- CLI and the LLM side ---------------------------------------------------------------------------------


def test_cli_trains_selects_on_validation_and_reevaluates_the_checkpoint(sequence_root, tmp_path, capsys):
    path = write_sequence_config(tmp_path, sequence_root, "diffurec", TINY_DIFFUREC, {"max_epochs": 4, "eval_every": 2})
    assert main(["pretrain", "--cfg-path", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["protocol"].startswith("leave-one-out: history items masked, padding id excluded")
    assert metrics["selected"]["epoch"] in (2, 4) and metrics["epochs_run"] == 4
    curve = json.loads((Path(metrics["run_dir"]) / "metrics.json").read_text())["curve"]
    assert [row["epoch"] for row in curve] == [2, 4]
    chosen = next(row for row in curve if row["epoch"] == metrics["selected"]["epoch"])
    assert chosen["valid_ndcg@5"] == pytest.approx(metrics["selected"]["valid"]["ndcg@5"])
    assert (
        main(
            ["evaluate", "--cfg-path", str(path), "--options", "run.evaluate=true", f"run.ckpt={metrics['checkpoint']}"]
        )
        == 0
    )
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["test"] == pytest.approx(
        metrics["selected"]["test"]
    )  # the chain is seeded: same weights, same figures


def test_cli_most_popular_and_sasrec_on_sequences(sequence_root, tmp_path, capsys):
    pop = write_sequence_config(tmp_path, sequence_root, "mostpop", run={"paper_parity": True})
    assert main(["pretrain", "--cfg-path", str(pop)]) == 0
    parity = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert parity["protocol"].startswith("paper_parity") and parity["epochs_run"] == 0
    assert main(["pretrain", "--cfg-path", str(pop), "--options", "run.paper_parity=false"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sasrec = write_sequence_config(
        tmp_path, sequence_root, "sasrec", {"embedding_size": 16, "max_history": 6}, {"max_epochs": 15, "eval_every": 5}
    )
    assert main(["pretrain", "--cfg-path", str(sasrec)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the walks are predictable from the last item: SASRec clears the popularity floor by far
    assert trained["selected"]["test"]["hr@1"] > metrics["selected"]["test"]["hr@1"] + 20


def test_bf16_training_learns_and_keeps_fp32_weights(sequence_root, tmp_path, capsys):
    path = write_sequence_config(
        tmp_path,
        sequence_root,
        "sasrec",
        {"embedding_size": 16, "max_history": 6},
        {"max_epochs": 15, "eval_every": 5, "mixed_precision": "bf16"},
    )
    assert main(["pretrain", "--cfg-path", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["mixed_precision"] == "bf16"
    # the next item is one of two (best hr@1 about 50), most-popular sits near 100/12: bf16 autocast still learns the walks
    assert metrics["selected"]["test"]["hr@1"] > 35
    model = load_recommender(Path(metrics["checkpoint"]))
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    fp16 = write_sequence_config(tmp_path, sequence_root, "sasrec", {"embedding_size": 16}, {"mixed_precision": "fp16"})
    assert main(["pretrain", "--cfg-path", str(fp16)]) == 2
    assert "run.mixed_precision fp16 needs a loss scaler" in capsys.readouterr().err


def test_resumed_training_matches_one_uninterrupted_run(sequence_root, tmp_path, capsys):
    schedule = {
        "max_epochs": 4,
        "eval_every": 2,
        "lr_step_epochs": 1,
        "lr_step_gamma": 0.5,
    }  # the lr schedule must carry over too
    path = write_sequence_config(tmp_path, sequence_root, "diffurec", TINY_DIFFUREC, schedule)
    assert main(["pretrain", "--cfg-path", str(path)]) == 0
    straight = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["pretrain", "--cfg-path", str(path), "--options", "run.max_epochs=2"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = Path(first["run_dir"]) / "checkpoints" / "last"
    assert json.loads((last / "trainer_state.json").read_text())["epoch"] == 2
    assert main(["pretrain", "--cfg-path", str(path), "--options", "run.resume_from=latest"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the batch order, the dropout and diffusion noise, Adam and the lr schedule all continue: same curve, same weights
    curves = [
        [
            {k: v for k, v in row.items() if k != "seconds"}
            for row in json.loads((Path(run["run_dir"]) / "metrics.json").read_text())["curve"]
        ]
        for run in (straight, resumed)
    ]
    assert curves[0] == curves[1] and [row["epoch"] for row in curves[1]] == [2, 4] and resumed["epochs_run"] == 4
    assert resumed["selected"] == straight["selected"]
    for name, value in load_recommender(Path(straight["run_dir"]) / "checkpoints" / "last").state_dict().items():
        assert torch.equal(
            value, load_recommender(Path(resumed["run_dir"]) / "checkpoints" / "last").state_dict()[name]
        ), name
    assert (
        main(["pretrain", "--cfg-path", str(path), "--options", f"run.resume_from={last}", "run.paper_parity=true"])
        == 2
    )
    assert "resume under the same protocol" in capsys.readouterr().err
    assert main(["pretrain", "--cfg-path", str(path), "--options", f"run.resume_from={last}", "run.max_epochs=2"]) == 2
    assert "leaves nothing to train" in capsys.readouterr().err


def test_trimmed_length_grouped_evaluation_matches_the_full_width(sequence_root):
    from minigpt4.config import load_config
    from minigpt4.training.sequential import evaluate_sequences

    torch.manual_seed(0)
    data = load_sequence_dataset(sequence_root)
    config = load_config(
        write_sequence_config(sequence_root.parent, sequence_root, "sasrec", {"embedding_size": 16, "max_history": 12})
    )
    model = build_recommender(config.model, data.n_users, data.n_items).eval()
    grouped = evaluate_sequences(model, data, "test", config, torch.device("cpu"))
    model.padding_invariant = False  # the plain path: full-width windows in the stored order
    assert evaluate_sequences(model, data, "test", config, torch.device("cpu")) == pytest.approx(grouped)


def test_config_errors_name_the_shape_and_metric(sequence_root, tmp_path, capsys):
    path = write_sequence_config(tmp_path, sequence_root, "diffurec", TINY_DIFFUREC)
    data = yaml.safe_load(path.read_text())
    data["datasets"]["shape"] = "implicit"
    path.write_text(yaml.safe_dump(data))
    assert main(["pretrain", "--cfg-path", str(path)]) == 2
    assert "model.arch diffurec trains on datasets.shape sequence, not implicit" in capsys.readouterr().err
    bad_metric = write_sequence_config(
        tmp_path, sequence_root, "sasrec", {"embedding_size": 16}, {"select_metric": "recall@5"}
    )
    assert main(["pretrain", "--cfg-path", str(bad_metric)]) == 2
    assert "must be hr|ndcg@K" in capsys.readouterr().err
    steps = write_sequence_config(tmp_path, sequence_root, "diffurec", {**TINY_DIFFUREC, "reverse_steps": 9})
    assert main(["pretrain", "--cfg-path", str(steps)]) == 2
    assert "reverse_steps 9 exceeds diffusion_steps 8" in capsys.readouterr().err


def test_cora_runs_on_a_tiny_diffurec(tiny_dataset, tiny_llm, tmp_path, capsys):
    root = tmp_path / "tiny"
    shutil.copytree(tiny_dataset, root)
    derive_sequences(root)
    path = write_sequence_config(tmp_path, root, "diffurec", TINY_DIFFUREC, {"max_epochs": 1})
    assert main(["pretrain", "--cfg-path", str(path)]) == 0
    checkpoint = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"]
    assert type(load_recommender(Path(checkpoint))).__name__ == "DiffuRec"
    config, model, rows = build(llm_config(tmp_path, root, tiny_llm, "cora", checkpoint))
    batch = first_rows(rows["train"])
    one_step(model, batch)
    assert any(b.abs().sum() > 0 for b in model.cora.lora_b.values())
    assert_cora_reads_the_user_vector(model, batch)
