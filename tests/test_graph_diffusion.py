"""Full-ranking models on tiny synthetic data: vectorised negative sampling, the DiffMM denoiser and graph
regeneration, losses that fall, the implicit trainer's two protocols, checkpoints that re-score the same,
the implicit shape derived from a rating dataset (MiniLM text) and a CoRA model on a tiny DiffMM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml
from conftest import SHARED_DATA, assert_cora_reads_the_user_vector
from test_llm import build, first_rows, llm_config, one_step

from minigpt4.cli import main
from minigpt4.config import DiffMMConfig, GenRecConfig, LightGCNConfig, MDMNSConfig, MFConfig
from minigpt4.data.implicit import derive_implicit, load_implicit_dataset, save_implicit_dataset
from minigpt4.recommenders import build_recommender, load_recommender
from minigpt4.recommenders.base import EpochContext
from minigpt4.recommenders.diffmm import Denoiser, GaussianDiffusion
from minigpt4.recommenders.genrec import FlipDenoiser, FlipDiffusion, bernoulli_kl
from minigpt4.recommenders.graph import all_pairs_info_nce, dense_rows, info_nce, sample_negatives
from minigpt4.recommenders.mdmns import guidance_scores
from minigpt4.training.implicit import _edges

N_USERS, N_ITEMS = 24, 20


def synthetic_implicit(seed: int = 0) -> tuple[dict, dict, dict]:
    """Two taste clusters over 24 users x 20 items, 8 interactions per user split 6/1/1, image and audio features."""
    rng = np.random.default_rng(seed)
    splits = {"train": [], "valid": [], "test": []}
    for user in range(N_USERS):
        pool = np.arange(10) if user % 2 else np.arange(10, 20)
        items = rng.choice(pool, size=8, replace=False)
        for split, chosen in (("train", items[:6]), ("valid", items[6:7]), ("test", items[7:])):
            splits[split] += [(user + 1, item + 1) for item in chosen]
    frames = {name: pd.DataFrame(rows, columns=["uid", "iid"]) for name, rows in splits.items()}
    cluster = (np.arange(N_ITEMS) >= 10).astype(np.float32)[:, None]
    features = {
        "image": np.hstack([cluster, rng.normal(size=(N_ITEMS, 7))]).astype(np.float32),
        "audio": rng.normal(size=(N_ITEMS, 5)).astype(np.float32),
    }
    meta = {
        "source": "synthetic",
        "n_users": N_USERS,
        "n_items": N_ITEMS,
        "modalities": ["audio", "image"],
        **{f"{k}_pairs": len(v) for k, v in frames.items()},
    }
    return frames, features, meta


@pytest.fixture(scope="module")
def implicit_root(tmp_path_factory):
    return save_implicit_dataset(tmp_path_factory.mktemp("implicit") / "synthetic", *synthetic_implicit())


def tiny_diffmm_config(**overrides) -> DiffMMConfig:
    return DiffMMConfig(embedding_size=8, denoiser_dims=[16], rebuild_k=2, **overrides)


def tiny_mdmns_config(**overrides) -> MDMNSConfig:
    return MDMNSConfig(
        embedding_size=8,
        denoiser_dims=[16],
        rebuild_k=2,
        guide_hidden_size=6,
        contrast="main",
        info_nce_chunk=7,
        **overrides,
    )


def tiny_genrec_config(**overrides) -> GenRecConfig:
    return GenRecConfig(**TINY_MODELS["genrec"], **overrides)


TINY_MODELS = {
    "diffmm": dict(embedding_size=8, denoiser_dims=[16], rebuild_k=2),
    "mdmns": dict(embedding_size=8, denoiser_dims=[16], rebuild_k=2, guide_hidden_size=6, contrast="main"),
    "genrec": dict(
        embedding_size=8,
        denoiser_width=16,
        denoiser_heads=2,
        denoiser_layers=1,
        knn_k=3,
        gen_topk=4,
        rebuild_k=2,
        interest_clusters={"image": 2, "audio": 3},
    ),
}


def build_model(config, root):
    dataset = load_implicit_dataset(root)
    features = {name: torch.as_tensor(values) for name, values in dataset.features.items()}
    return build_recommender(config, dataset.n_users, dataset.n_items, _edges(dataset), features), dataset


def context(model, dataset, batch_size: int = 8) -> EpochContext:
    optimizers = {
        name: torch.optim.Adam(params, lr=0.01) for name, params in model.optimizer_groups().items() if params
    }
    return EpochContext(
        dataset.matrices["train"], batch_size, torch.Generator().manual_seed(0), optimizers, torch.device("cpu")
    )


def write_implicit_config(folder, root, arch: str, model: dict | None = None, run: dict | None = None):
    config = {
        "model": {"arch": arch, **(model or {})},
        "datasets": {"name": "synthetic", "path": str(root), "shape": "implicit"},
        "run": {
            "cpu": True,
            "batch_size": 32,
            "lr": 0.01,
            "max_epochs": 3,
            "patience": 5,
            "ranking_ks": [5, 10],
            "select_metric": "recall@10",
            "output_dir": str(folder / "runs"),
            **(run or {}),
        },
    }
    path = folder / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- building blocks ---------------------------------------------------------------------------------


def test_negative_sampling_avoids_training_items_and_is_uniform_over_the_rest():
    rng = np.random.default_rng(0)
    train = sp.csr_matrix(rng.random((5, 12)) < 0.5)
    users = np.repeat(np.arange(5), 6000)
    negatives = sample_negatives(train, users, torch.Generator().manual_seed(1))
    assert not train.toarray()[users, negatives].any()
    for user in range(5):
        allowed = np.setdiff1d(np.arange(12), train[user].indices)
        counts = np.bincount(negatives[users == user], minlength=12)[allowed]
        assert counts.min() > 0 and counts.max() / counts.min() < 1.3, counts  # every free item, about evenly
    full = sp.csr_matrix(np.ones((1, 4)))
    with pytest.raises(ValueError, match="every item"):
        sample_negatives(full, np.zeros(1, dtype=np.int64), torch.Generator())


def test_denoiser_and_reverse_chain_keep_the_row_shape():
    denoiser = Denoiser(N_ITEMS, [16, 12], time_size=10, dropout=0.5, normalize=False)
    diffusion = GaussianDiffusion(0.1, 1e-4, 0.02, steps=5)
    rows = (torch.rand(4, N_ITEMS) < 0.3).float()
    assert denoiser(rows, torch.tensor([0, 1, 2, 4])).shape == (4, N_ITEMS)
    assert diffusion.p_sample(
        lambda x, t: denoiser(x, t, dropout=False), rows, sampling_steps=0, sampling_noise=False
    ).shape == (4, N_ITEMS)
    diffusion_loss, consistency = diffusion.training_losses(
        denoiser, rows, torch.randn(N_ITEMS, 8), torch.randn(N_ITEMS, 8)
    )
    assert diffusion_loss.shape == consistency.shape == (4,)


@pytest.mark.parametrize("faithful", [False, True], ids=["fixed", "faithful"])
def test_genrec_focal_loss_when_every_item_is_predicted_a_one(faithful):
    """The published negative class weight rewards predicting negatives as 1s: its clamp holds the faithful loss
    at a floor without gradient; the fixed loss stays positive and pushes the negatives down. Every term stays
    finite with saturated logits (the published KL's clamp rounds to 1 in fp32)."""
    rows = torch.zeros(4, N_ITEMS)
    rows[torch.arange(4), torch.tensor([0, 5, 10, 15])] = 1  # 19 zeros per one: the published weight 1 - 0.25 x 19 < 0
    diffusion = FlipDiffusion(steps=5, temperature=10.0, faithful=faithful)
    focal = {}
    for logit in (20.0, 40.0):
        logits = torch.full((4, N_ITEMS), logit, requires_grad=True)
        losses = diffusion.training_losses(
            lambda x, t, logits=logits: logits, rows, [], gamma=2.0, alpha=0.25, temperature=0.2
        )
        assert all(torch.isfinite(torch.as_tensor(value)) for value in losses.values()), losses
        focal[logit] = losses["focal"]
        focal[logit].backward()
    if faithful:
        assert focal[40.0] < 0 and focal[40.0] == focal[20.0] and logits.grad.abs().max() == 0
    else:
        assert focal[40.0] > focal[20.0] > 0 and (logits.grad[rows == 0] > 0).all()


def test_genrec_fixed_denoiser_learns_from_its_input_row_on_sparse_rows():
    """At 0.5% density a KL averaged over every entry is all zeros' and trains the denoiser to the items' marginal,
    the same output for every row; with ones and zeros weighed equally it raises the row's own items."""
    torch.manual_seed(0)
    users, items = 64, 1000
    rows = torch.zeros(users, items)
    rows[torch.arange(users)[:, None], torch.stack([torch.randperm(items)[:5] for _ in range(users)])] = 1
    denoiser = FlipDenoiser(items, width=32, heads=2, layers=2, dropout=0.0, time_size=10)
    diffusion = FlipDiffusion(steps=5, temperature=1.0, faithful=False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-3)  # the published learning rate
    for _ in range(60):
        loss = sum(diffusion.training_losses(denoiser, rows, [], gamma=2.0, alpha=0.25, temperature=0.2).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = denoiser(rows, torch.zeros(users, dtype=torch.long))
    probs = torch.sigmoid(logits)
    own, other = (probs * rows).sum() / rows.sum(), (probs * (1 - rows)).sum() / (1 - rows).sum()
    assert own > other + 0.1 and logits.std(0).mean() > 0.05, (own, other, logits.std(0).mean())


def test_bernoulli_kl_equals_the_textbook_formula_and_stays_finite():
    target, logits = torch.rand(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64) * 4
    probs = torch.sigmoid(logits)
    textbook = target * (target / probs).log() + (1 - target) * ((1 - target) / (1 - probs)).log()
    torch.testing.assert_close(bernoulli_kl(target, logits), textbook)
    edge = bernoulli_kl(torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([-30.0, 30.0, 60.0, 60.0]))
    assert torch.isfinite(edge).all() and edge[:3].max() < 1e-12 and torch.isclose(edge[3], torch.tensor(60.0))


@pytest.mark.parametrize("others_grad", [True, False], ids=["both-trained", "others-detached"])
def test_all_pairs_info_nce_in_chunks_equals_the_full_matrix(others_grad):
    torch.manual_seed(0)
    a, b = torch.randn(37, 6, requires_grad=True), torch.randn(37, 6, requires_grad=others_grad)
    scale = torch.randn(())  # a non-unit upstream gradient
    chunked = all_pairs_info_nce(a, b, 0.5, chunk=8)
    full = torch.nn.functional.cross_entropy(
        torch.nn.functional.normalize(a) @ torch.nn.functional.normalize(b).T / 0.5, torch.arange(37)
    )
    torch.testing.assert_close(chunked, full)
    inputs = (a, b) if others_grad else (a,)
    grads = torch.autograd.grad(scale * chunked, inputs)
    expected = torch.autograd.grad(scale * full, inputs)
    for ours, reference in zip(grads, expected):
        torch.testing.assert_close(ours, reference)
    with torch.no_grad():
        torch.testing.assert_close(all_pairs_info_nce(a, b, 0.5, chunk=37), full.detach())


def test_info_nce_equals_the_published_contrast_loss():
    torch.manual_seed(0)
    a, b, nodes = torch.randn(30, 6), torch.randn(30, 6), torch.randint(0, 30, (12,))
    an, other = torch.nn.functional.normalize(a)[nodes], torch.nn.functional.normalize(b)
    published = -torch.log(torch.exp((an * other[nodes]).sum(-1) / 0.5) / torch.exp(an @ other.T / 0.5).sum(-1)).mean()
    torch.testing.assert_close(info_nce(a, b, nodes, 0.5), published)


def test_guidance_blocks_equal_the_dense_normalised_adjacency():
    torch.manual_seed(0)
    rows, users, items = torch.rand(5, 9), torch.randn(5, 4), torch.randn(9, 4)
    layer = torch.nn.Linear(4, 4)
    adjacency = torch.zeros(14, 14)
    adjacency[:5, 5:], adjacency[5:, :5] = rows, rows.T
    adjacency = adjacency + torch.eye(14)
    scale = adjacency.sum(1).clamp(min=1e-8).pow(-0.5)
    output = layer((scale[:, None] * adjacency * scale[None]) @ torch.cat([users, items]))
    dense = output[:5] @ output[5:].T  # the published GCNRecommender's computation
    torch.testing.assert_close(guidance_scores(rows, users, items, layer, min_degree=1e-8), dense)


@pytest.mark.parametrize("make", [tiny_diffmm_config, tiny_mdmns_config], ids=["diffmm", "mdmns"])
@pytest.mark.parametrize("faithful", [False, True])
def test_regeneration_excludes_seen_items_unless_faithful(make, faithful, implicit_root):
    torch.manual_seed(0)
    model, dataset = build_model(make(faithful=faithful), implicit_root)
    model.denoise = lambda modality, x, t, training: x  # a denoiser returning its input ranks the seen items first
    model.regenerate_graphs(context(model, dataset))
    train = dataset.matrices["train"]
    for modality in model.modalities:
        indices = getattr(model, f"graph_{modality}_indices")
        users, items = indices[0], indices[1] - N_USERS
        links = (users < N_USERS) & (items >= 0)  # user -> item entries, not self-loops or the mirrored half
        seen = train.toarray()[users[links].numpy(), items[links].numpy()]
        if faithful:
            assert seen.all()  # the published code re-adds the training edges
        else:
            assert links.sum() > 0 and not seen.any()
            assert torch.equal(
                torch.bincount(users[links], minlength=N_USERS), torch.full((N_USERS,), 2)
            )  # rebuild_k per user


@pytest.mark.parametrize("faithful", [False, True])
def test_genrec_generated_graph_excludes_seen_items_unless_faithful(faithful, implicit_root):
    torch.manual_seed(0)
    model, dataset = build_model(tiny_genrec_config(faithful=faithful, debias=False), implicit_root)
    preference = torch.randn(N_ITEMS) * 10  # every user's chain lands on the same few items
    model.denoiser.forward = lambda x, t: preference.expand(len(x), -1)
    model.regenerate_graph(context(model, dataset))
    users, items = model.generated_indices[0], model.generated_indices[1] - N_USERS
    links = (users < N_USERS) & (items >= 0)
    seen = dataset.matrices["train"].toarray()[users[links].numpy(), items[links].numpy()]
    assert links.sum() > 0
    assert seen.any() if faithful else not seen.any()


def test_genrec_generates_new_items_from_a_denoiser_that_restores_the_row(implicit_root):
    """A denoiser that ranks a user's own items first still yields each user's own new interests (fixed mode picks
    the ``gen_topk`` candidates among unseen items; ranking all items would leave no new ones)."""
    torch.manual_seed(0)
    model, dataset = build_model(tiny_genrec_config(debias=False), implicit_root)
    train = torch.as_tensor(dataset.matrices["train"].toarray(), dtype=torch.float32)
    wanted = torch.stack(
        [row[train[user, row] == 0][:4] for user, row in enumerate(torch.rand(N_USERS, N_ITEMS).argsort(1))]
    )  # 4 unseen each
    preference = torch.full((N_USERS, N_ITEMS), -15.0).scatter_(1, wanted, 15.0)
    model.denoiser.forward = lambda x, t: 40 * train + preference  # restores the row, whatever the chain's state
    model.regenerate_graph(context(model, dataset, batch_size=N_USERS))
    users, items = model.generated_indices[0], model.generated_indices[1] - N_USERS
    links = (users < N_USERS) & (items >= 0)
    assert torch.equal(torch.bincount(users[links], minlength=N_USERS), torch.full((N_USERS,), 2))  # rebuild_k each
    assert all(item in wanted[user] for user, item in zip(users[links].tolist(), items[links].tolist()))


def test_debiasing_keeps_flips_the_user_clusters_support(implicit_root):
    model, _ = build_model(tiny_genrec_config(), implicit_root)
    labels = torch.tensor([0] * 7 + [1] * 7 + [2] * 6)
    model.clusters_image, model.clusters_audio = labels, labels.clone()
    rows = torch.zeros(1, N_ITEMS)
    rows[0, [0, 1, 2, 7]] = 1  # three items of cluster 0, one of cluster 1, none of cluster 2
    generated = rows.clone()
    generated[0, [5, 15]] = 1  # new interests: in a liked cluster (kept) and in an unseen one (dropped)
    generated[0, [1, 7]] = 0  # dropped interests: from a frequent cluster (restored) and a rare one (stays dropped)
    out = model.debias(rows, generated)[0]
    assert out[[5, 15, 1, 7]].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.equal(out[[0, 2]], rows[0, [0, 2]])


@pytest.mark.parametrize(
    "config",
    [
        MFConfig(embedding_size=8),
        LightGCNConfig(embedding_size=8, n_layers=2),
        tiny_diffmm_config(),
        tiny_mdmns_config(),
        tiny_mdmns_config(faithful=True),
        tiny_genrec_config(),
        tiny_genrec_config(faithful=True),
    ],
    ids=lambda c: c.arch + ("-faithful" if getattr(c, "faithful", False) else ""),
)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_bpr_loss_falls(config, bf16, implicit_root):
    torch.manual_seed(0)
    model, dataset = build_model(config, implicit_root)
    coo = dataset.matrices["train"].tocoo()
    users, positives = torch.as_tensor(coo.row).long(), torch.as_tensor(coo.col).long()
    negatives = torch.as_tensor(sample_negatives(dataset.matrices["train"], coo.row, torch.Generator().manual_seed(0)))
    first = []  # the untrained loss in fp32 and as trained, from the same random draws
    for autocast in (False, bf16):
        torch.manual_seed(1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            first.append(model.pair_loss(users, positives, negatives, 1e-4)["loss"].item())
    assert first[1] == pytest.approx(first[0], rel=0.01)
    optimizer = torch.optim.Adam(model.optimizer_groups()["model"], lr=0.01)
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the trainer's run.mixed_precision=bf16
            loss = model.pair_loss(users, positives, negatives, 1e-4)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(
        p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in model.parameters()
    )


@pytest.mark.parametrize(
    "make", [tiny_diffmm_config, tiny_mdmns_config, tiny_genrec_config], ids=["diffmm", "mdmns", "genrec"]
)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_denoising_loss_falls(make, bf16, implicit_root):
    torch.manual_seed(0)
    model, dataset = build_model(make(denoiser_dropout=0.0), implicit_root)
    optimizer = torch.optim.Adam(model.optimizer_groups()[model.denoiser_group], lr=0.01)
    rows = dense_rows(dataset.matrices["train"], np.arange(N_USERS))
    first = []  # the untrained loss in fp32 and as trained, from the same random draws
    for autocast in (False, bf16):
        torch.manual_seed(1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            first.append(sum(model.denoising_losses(rows).values()).item())
    assert first[1] == pytest.approx(first[0], rel=0.02)
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the trainer's run.mixed_precision=bf16
            loss = sum(model.denoising_losses(rows).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses


# --- the trainer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mostpop", "mf", "lightgcn", "diffmm", "mdmns", "genrec"])
def test_pretrain_reports_both_protocols_and_the_checkpoint_scores_the_same(arch, implicit_root, tmp_path, capsys):
    model = TINY_MODELS.get(arch, {"embedding_size": 8} if arch != "mostpop" else {})
    path = write_implicit_config(tmp_path, implicit_root, arch, model)
    assert main(["pretrain", "--cfg-path", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["protocol"].startswith("validation")
    selected = metrics["valid_selection"]
    assert metrics["selected"] == selected and set(selected) == {"epoch", "valid", "test"}
    assert metrics["paper_parity_selection"]["test"]["recall@10"] >= selected["test"]["recall@10"]
    curve = json.loads((Path(metrics["run_dir"]) / "metrics.json").read_text())["curve"]
    assert metrics["epochs_run"] == (0 if arch == "mostpop" else 3) and len(curve) == metrics["epochs_run"]
    assert main(["evaluate", "--cfg-path", str(path), "--options", f"run.ckpt={metrics['checkpoint']}"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for split in ("valid", "test"):
        assert again[split] == pytest.approx(selected[split]), split


@pytest.mark.parametrize("arch", ["diffmm", "mdmns", "genrec"])
def test_resumed_training_matches_one_uninterrupted_run(arch, implicit_root, tmp_path, capsys):
    path = write_implicit_config(tmp_path, implicit_root, arch, TINY_MODELS[arch], {"max_epochs": 4, "eval_every": 2})
    runs = []
    for options in ([], ["run.max_epochs=2"], ["run.resume_from=latest"]):
        assert main(["pretrain", "--cfg-path", str(path), "--options", *options]) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    straight, _, resumed = runs
    # each epoch's own phase (denoisers, regenerated graphs), the negatives and every optimizer continue as if never stopped
    curves = [
        [
            {k: v for k, v in row.items() if k != "seconds"}
            for row in json.loads((Path(run["run_dir"]) / "metrics.json").read_text())["curve"]
        ]
        for run in (straight, resumed)
    ]
    assert curves[0] == curves[1] and len(curves[1]) == 2 and resumed["epochs_run"] == 4
    assert resumed["valid_selection"] == straight["valid_selection"]


def test_bf16_training_is_recorded_and_fp16_refused(implicit_root, tmp_path, capsys):
    path = write_implicit_config(tmp_path, implicit_root, "mdmns", TINY_MODELS["mdmns"], {"mixed_precision": "bf16"})
    assert main(["pretrain", "--cfg-path", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["mixed_precision"] == "bf16" and metrics["epochs_run"] == 3
    assert main(["pretrain", "--cfg-path", str(path), "--options", "run.mixed_precision=fp16"]) == 2
    assert (
        "run.mixed_precision fp16 needs a loss scaler that implicit-shape training does not have"
        in capsys.readouterr().err
    )


def test_paper_parity_is_labelled_and_selects_on_test(implicit_root, tmp_path, capsys):
    path = write_implicit_config(
        tmp_path, implicit_root, "mf", {"embedding_size": 8}, {"paper_parity": True, "max_epochs": 4}
    )
    assert main(["pretrain", "--cfg-path", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["protocol"].startswith("paper_parity")
    assert metrics["selected"] == metrics["paper_parity_selection"]
    curve = json.loads((Path(metrics["run_dir"]) / "metrics.json").read_text())["curve"]
    best = max(curve, key=lambda row: row["test_recall@10"])
    assert metrics["selected"]["epoch"] == best["epoch"]


def test_config_errors_name_the_problem(implicit_root, tmp_path, capsys):
    wrong_shape = write_implicit_config(tmp_path, implicit_root, "diffmm")
    data = yaml.safe_load(wrong_shape.read_text())
    data["datasets"]["shape"] = "ratings"
    wrong_shape.write_text(yaml.safe_dump(data))
    assert main(["pretrain", "--cfg-path", str(wrong_shape)]) == 2
    assert "trains on datasets.shape implicit, not ratings" in capsys.readouterr().err
    bad_metric = write_implicit_config(tmp_path, implicit_root, "mf", run={"select_metric": "recall@20"})
    assert main(["pretrain", "--cfg-path", str(bad_metric)]) == 2
    assert "run.ranking_ks" in capsys.readouterr().err
    missing = write_implicit_config(tmp_path, implicit_root, "diffmm", run={"max_epochs": 1})
    data = yaml.safe_load(missing.read_text())
    data["datasets"]["modalities"] = ["text"]
    missing.write_text(yaml.safe_dump(data))
    assert main(["pretrain", "--cfg-path", str(missing)]) == 2
    assert "feature file missing for modality 'text'" in capsys.readouterr().err


def test_nan_loss_stops_with_the_kept_checkpoint(implicit_root, tmp_path, capsys, monkeypatch):
    from minigpt4.recommenders.mf import MatrixFactorization

    calls = {"n": 0}
    original = MatrixFactorization.pair_loss

    def poisoned(self, *args):
        calls["n"] += 1
        losses = original(self, *args)
        return losses | {"loss": losses["loss"] * float("nan")} if calls["n"] > 1 else losses

    monkeypatch.setattr(MatrixFactorization, "pair_loss", poisoned)
    path = write_implicit_config(tmp_path, implicit_root, "mf", {"embedding_size": 8}, {"batch_size": 512})
    assert main(["pretrain", "--cfg-path", str(path)]) == 2
    err = capsys.readouterr().err
    assert "loss became nan at epoch 2" in err and "checkpoints/best" in err
    assert load_recommender(next(tmp_path.glob("runs/*/checkpoints/best"))) is not None


# --- rating datasets and the LLM side ------------------------------------------------------------------


@pytest.fixture(scope="module")
def derived_tiny(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("derived") / "tiny"
    shutil.copytree(tiny_dataset, root)
    derive_implicit(root)
    return root


def test_derived_implicit_shape_keeps_ids_and_positives_with_minilm_text(derived_tiny, tiny_dataset):
    from minigpt4.data.contract import load_rating_dataset

    ratings = load_rating_dataset(tiny_dataset)
    implicit = load_implicit_dataset(derived_tiny)
    assert (implicit.n_users, implicit.n_items) == (ratings.n_users, ratings.n_items)
    for split in ("train", "valid", "test"):
        positives = ratings.splits[split].query("label == 1")
        expected = set(zip(positives.uid - 1, positives.iid - 1))
        coo = implicit.matrices[split].tocoo()
        assert set(zip(coo.row, coo.col)) == expected
    text = implicit.features["text"]
    assert text.shape == (ratings.n_items, 384)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    assert implicit.meta["text_encoder"].startswith("all-MiniLM-L6-v2")


def test_users_without_training_items_are_reported_apart(derived_tiny, tmp_path, capsys):
    root = tmp_path / "cold"
    shutil.copytree(derived_tiny, root)
    train = pd.read_parquet(root / "implicit" / "train.parquet")
    tested = pd.read_parquet(root / "implicit" / "test.parquet").uid.unique()[:2]
    train[~train.uid.isin(tested)].to_parquet(root / "implicit" / "train.parquet")  # two test users lose their history
    data = load_implicit_dataset(root)
    warm = np.diff(data.matrices["train"].indptr) > 0
    cold_targets = int((~warm & (np.diff(data.matrices["test"].indptr) > 0)).sum())
    assert cold_targets >= 2
    path = write_implicit_config(tmp_path, root, "mostpop", run={"ranking_ks": [5], "select_metric": "recall@5"})
    assert main(["pretrain", "--cfg-path", str(path)]) == 0
    test = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["selected"]["test"]
    groups = test["by_group"]
    assert groups["cold"]["users"] == cold_targets and groups["warm"]["users"] + cold_targets == test["users"]
    weighted = sum(group["recall@5"] * group["users"] for group in groups.values()) / test["users"]
    assert weighted == pytest.approx(test["recall@5"])


def test_cora_runs_on_a_tiny_diffmm(derived_tiny, tiny_llm, tmp_path, capsys):
    path = write_implicit_config(tmp_path, derived_tiny, "diffmm", TINY_MODELS["diffmm"], {"max_epochs": 1})
    assert main(["pretrain", "--cfg-path", str(path)]) == 0
    checkpoint = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"]
    config, model, rows = build(llm_config(tmp_path, derived_tiny, tiny_llm, "cora", checkpoint))
    assert type(model.collab).__name__ == "DiffMM"
    batch = first_rows(rows["train"])
    one_step(model, batch)
    assert any(b.abs().sum() > 0 for b in model.cora.lora_b.values())
    assert_cora_reads_the_user_vector(model, batch)


TIKTOK = SHARED_DATA / "diffmm-tiktok"


@pytest.mark.skipif(not TIKTOK.is_dir(), reason="DiffMM's TikTok data is not in ../shared/data")
def test_most_popular_through_the_trainer_reproduces_the_tiktok_floor(tmp_path, capsys):
    assert main(["data", "import-diffmm", str(TIKTOK), "--out", str(tmp_path / "tiktok")]) == 0
    capsys.readouterr()
    path = write_implicit_config(
        tmp_path, tmp_path / "tiktok", "mostpop", run={"ranking_ks": [20], "select_metric": "recall@20"}
    )
    assert main(["pretrain", "--cfg-path", str(path)]) == 0
    test = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["selected"]["test"]
    assert (round(test["recall@20"], 4), round(test["ndcg@20"], 4), round(test["precision@20"], 4)) == (
        0.0597,
        0.0255,
        0.0030,
    )
    assert test["by_group"]["cold"]["users"] == 5  # five of TikTok's test users have no training items
