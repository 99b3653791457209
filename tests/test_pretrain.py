"""Pre-training end to end: run folders, final JSON line, evaluation from a checkpoint, entry points,
user errors (exit code 2, one line), non-finite losses, and two processes against one."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_config

from minigpt4.cli import main
from minigpt4.config import load_config
from minigpt4.data.contract import load_rating_dataset
from minigpt4.recommenders import load_recommender
from minigpt4.training.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["mf", "lightgcn", "sasrec", "din"])
def test_pretrain_writes_run_folder(arch, tiny_dataset, tmp_path, capsys):
    config = write_config(tmp_path, tiny_dataset, arch)
    assert main(["pretrain", "--cfg-path", str(config)]) == 0
    metrics = last_json_line(capsys.readouterr().out)
    run_dir = Path(metrics["run_dir"])
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.yaml",
        "log.txt",
        "metrics.json",
        "checkpoints",
        "tensorboard",
    }
    assert sorted(p.name for p in (run_dir / "checkpoints" / "best").iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert {k: v for k, v in saved.items() if k != "curve"} == metrics
    assert [point["epoch"] for point in saved["curve"]] == list(range(1, metrics["epochs_run"] + 1))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["arch"] == arch
    for split in ("valid", "test", "test_warm", "test_cold"):
        assert set(metrics[split]) >= {"auc", "uauc", "gauc", "n"}
    assert metrics["test"]["n"] == metrics["test_warm"]["n"] + metrics["test_cold"]["n"]
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] <= 3
    assert "best epoch" in (run_dir / "log.txt").read_text()


def test_evaluate_reproduces_the_best_checkpoint(tiny_dataset, tmp_path, capsys):
    config = write_config(tmp_path, tiny_dataset, "din", {"max_history": 4})
    main(["pretrain", "--cfg-path", str(config)])
    trained = last_json_line(capsys.readouterr().out)
    assert main(["evaluate", "--cfg-path", str(config), "--options", f"run.ckpt={trained['checkpoint']}"]) == 0
    evaluated = last_json_line(capsys.readouterr().out)
    for split in ("valid", "test", "test_warm", "test_cold"):
        assert evaluated[split] == trained[split]
    # `latest` keeps naming the training run, not the evaluation's folder.
    latest = Path(evaluated["run_dir"]).parent / "latest"
    assert latest.resolve() == Path(trained["run_dir"]).resolve() != Path(evaluated["run_dir"]).resolve()


def test_entry_point_scripts(tiny_dataset, tmp_path):
    config = write_config(tmp_path, tiny_dataset, "mf", run={"max_epochs": 1})
    done = subprocess.run(
        [sys.executable, "baseline_train_mf_ood.py", f"--cfg-path={config}"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "auc" in last_json_line(done.stdout)["test"]
    joint = subprocess.run(
        [sys.executable, "train_collm_mf_din.py", f"--cfg-path={config}"], cwd=ROOT, capture_output=True, text=True
    )
    assert joint.returncode == 2
    assert "model.arch mf is a collaborative model; train it with diffrec pretrain" in joint.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "--cfg-path", "missing.yaml"], "diffrec: error: config file not found: missing.yaml"),
        (["pretrain"], "diffrec pretrain: error: the following arguments are required: --cfg-path"),
        (["data", "import-collm", "nowhere"], "diffrec: error: pickle file not found: nowhere/train_ood2.pkl"),
        (["data", "prepare", "ml-1m", "--raw", "nowhere"], "diffrec: error: nowhere/ratings.dat: file not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message):
    done = subprocess.run([sys.executable, "-m", "minigpt4.cli", *argv], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == message or done.stderr.strip().startswith(message)
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_bad_key_and_missing_checkpoint(tiny_dataset, tmp_path, capsys):
    config = write_config(tmp_path, tiny_dataset, "mf", {"embeding_size": 4})
    assert main(["pretrain", "--cfg-path", str(config)]) == 2
    assert "unknown key 'model.embeding_size'; did you mean 'model.embedding_size'?" in capsys.readouterr().err
    config = write_config(tmp_path, tiny_dataset, "mf")
    assert main(["evaluate", "--cfg-path", str(config)]) == 2
    assert "run.evaluate is true but run.ckpt is not set" in capsys.readouterr().err
    assert main(["evaluate", "--cfg-path", str(config), "--options", "run.ckpt=nope"]) == 2
    assert "checkpoint file missing" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_best_checkpoint(tiny_dataset, tmp_path, capsys, monkeypatch):
    """A loss that turns NaN in epoch 2 stops the run with one line naming the kept checkpoint: epoch 1's best,
    which loads and scores as the model did at the end of epoch 1."""
    from minigpt4.recommenders.mf import MatrixFactorization

    config = write_config(tmp_path, tiny_dataset, "mf")
    batches_per_epoch = -(-len(load_rating_dataset(tiny_dataset).splits["train"]) // 64)
    calls, real_forward, epoch_one = [0], MatrixFactorization.forward, {}

    def poisoned(self, batch):
        calls[0] += 1
        if calls[0] == batches_per_epoch + 1:  # epoch 2's first step, before its update: the end of epoch 1
            epoch_one.update({name: value.detach().clone() for name, value in self.state_dict().items()})
        if calls[0] == batches_per_epoch + 2:  # its second step
            return real_forward(self, batch) * float("nan")
        return real_forward(self, batch)

    monkeypatch.setattr(MatrixFactorization, "forward", poisoned)
    assert main(["pretrain", "--cfg-path", str(config)]) == 2
    errors = re.findall(r"diffrec: error: .*", capsys.readouterr().err)  # after the progress bar, on its line
    assert len(errors) == 1 and f"loss became nan at epoch 2, step {batches_per_epoch + 1};" in errors[0]
    best = Path(errors[0].split("is kept at ")[1])
    assert best.name == "best" and best.is_dir()
    kept = load_recommender(best).state_dict()
    assert epoch_one.keys() == kept.keys() and all(torch.equal(kept[name], epoch_one[name]) for name in kept)


def test_two_processes_report_the_same_test_auc(tiny_dataset, tmp_path, capsys):
    """Two CPU processes gather predictions before computing the metrics.

    ``accelerate launch --cpu`` starts a single process unless MPI is installed, so the two CPU
    processes are started the torchrun way (``--multi_gpu``) with ``run.cpu: true`` in the config.
    """
    config = write_config(tmp_path, tiny_dataset, "sasrec", {"max_history": 4}, {"eval_batch_size": 7})
    main(["pretrain", "--cfg-path", str(config)])
    checkpoint = last_json_line(capsys.readouterr().out)["checkpoint"]
    single = subprocess.run(
        [sys.executable, "-m", "minigpt4.cli", "evaluate", "--cfg-path", str(config), "--options", f"run.ckpt={checkpoint}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run(
        [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "minigpt4.cli", "evaluate",
         "--cfg-path", str(config), "--options", f"run.ckpt={checkpoint}"],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr
    one, two = last_json_line(single.stdout), last_json_line(double.stdout)
    assert "2 process(es)" in double.stderr
    for split in ("valid", "test", "test_warm", "test_cold"):
        assert two[split]["n"] == one[split]["n"]
        assert two[split]["auc"] == pytest.approx(one[split]["auc"], abs=1e-9)
        assert two[split]["uauc"] == pytest.approx(one[split]["uauc"], abs=1e-9)


@pytest.mark.parametrize("arch", ["mf", "sasrec"])
def test_resume_from_latest_equals_the_uninterrupted_run(arch, tiny_dataset, tmp_path):
    """Two epochs, stopped, then resumed to four: the same curve, best epoch and figures as four straight
    (SASRec's dropout draws from the restored random streams)."""
    path = write_config(tmp_path, tiny_dataset, arch, {"max_history": 4} if arch == "sasrec" else {}, {"max_epochs": 4})
    straight = pretrain(load_config(path, [f"run.output_dir={tmp_path / 'straight'}"]))
    pretrain(load_config(path, [f"run.output_dir={tmp_path / 'stopped'}", "run.max_epochs=2"]))
    resumed = pretrain(load_config(path, [f"run.output_dir={tmp_path / 'stopped'}", "run.resume_from=latest"]))
    untimed = lambda curve: [{k: v for k, v in point.items() if k != "seconds"} for point in curve]  # noqa: E731
    assert resumed["epochs_run"] == 4 and untimed(resumed["curve"]) == untimed(straight["curve"])
    assert resumed["best_epoch"] == straight["best_epoch"]
    for split in ("valid", "test", "test_warm", "test_cold"):
        assert resumed[split] == straight[split]
