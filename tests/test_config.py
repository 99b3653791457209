"""Config schema: unknown keys, overrides, bad values, path resolution."""

import re
from pathlib import Path

import pytest

from minigpt4.config import MFConfig, SASRecConfig, dump_config, load_config
from minigpt4.errors import DiffRecError

BASE = """
model:
  arch: mf
  embedding_size: 16
datasets:
  name: tiny
  path: data/tiny
run:
  lr: 0.01
  output_dir: runs/x
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_valid_config_resolves_paths_against_config_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFREC_DATA_ROOT", raising=False)
    config = load_config(write(tmp_path, BASE))
    assert isinstance(config.model, MFConfig) and config.model.embedding_size == 16
    assert config.datasets.path == (tmp_path / "data/tiny").resolve()
    assert config.run.output_dir == (tmp_path / "runs/x").resolve()


def test_data_root_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFREC_DATA_ROOT", str(tmp_path / "root"))
    config = load_config(write(tmp_path, BASE))
    assert config.datasets.path == (tmp_path / "root/data/tiny").resolve()
    assert config.run.output_dir == (tmp_path / "runs/x").resolve()


@pytest.mark.parametrize(
    "text, message",
    [
        (
            BASE.replace("embedding_size", "embeding_size"),
            "unknown key 'model.embeding_size'; did you mean 'model.embedding_size'?",
        ),
        (BASE.replace("  lr: 0.01", "  learning_rate: 0.01"), "unknown key 'run.learning_rate'"),
        (BASE + "extra: 1\n", "unknown key 'extra'"),
        (
            BASE.replace("arch: mf", "arch: mff"),
            "model.arch must be one of mf, lightgcn, sasrec, din, mostpop, diffmm, mdmns, genrec, diffurec, llmrec, sd3, diffrec, got 'mff'; did you mean 'mf'?",
        ),
        (
            BASE.replace("embedding_size: 16", "embedding_size: lots"),
            "key 'model.embedding_size': Input should be a valid integer",
        ),
        (BASE.replace("  lr: 0.01", "  lr: -1"), "key 'run.lr': Input should be greater than 0"),
        (
            BASE.replace("  lr: 0.01", "  lr: 0.01\n  mixed_precision: bf16"),
            "run.mixed_precision bf16: mf on datasets.shape ratings trains in fp32",
        ),
        ("model: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(DiffRecError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)
    assert "config.yaml" in str(err.value)


def test_sasrec_key_not_valid_for_mf(tmp_path):
    with pytest.raises(DiffRecError, match="unknown key 'model.max_history'"):
        load_config(write(tmp_path, BASE.replace("embedding_size: 16", "max_history: 5")))


def test_options_override_any_key(tmp_path):
    config = load_config(
        write(tmp_path, BASE),
        ["run.lr=0.5", "model.arch=sasrec", "model.max_history=7", "run.ckpt=ck/best", "run.evaluate=true"],
    )
    assert config.run.lr == 0.5 and config.run.evaluate is True
    assert isinstance(config.model, SASRecConfig) and config.model.max_history == 7
    assert config.run.ckpt == (tmp_path / "ck/best").resolve()


def test_options_unknown_key_and_bad_syntax(tmp_path):
    with pytest.raises(DiffRecError, match="unknown key 'run.seeed'; did you mean 'run.seed'"):
        load_config(write(tmp_path, BASE), ["run.seeed=3"])
    with pytest.raises(DiffRecError, match="--options expects key=value"):
        load_config(write(tmp_path, BASE), ["run.seed"])


def test_missing_config_file(tmp_path):
    with pytest.raises(DiffRecError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_shipped_config_validates(monkeypatch):
    monkeypatch.delenv("DIFFREC_DATA_ROOT", raising=False)
    configs = sorted(Path(__file__).resolve().parents[1].glob("train_configs/*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


LLM = """
model:
  arch: llmrec
  mode: cora
  llm: {path: models/vicuna-7b, dtype: bfloat16}
  prompt: {template: ../prompts/tallrec_movie.txt}
  collab: {ckpt: runs/mf/best}
datasets: {name: tiny, path: data/tiny}
"""


def test_llm_config_resolves_its_paths_and_checks_nested_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFREC_DATA_ROOT", raising=False)
    config = load_config(write(tmp_path, LLM))
    assert config.model.llm.path == (tmp_path / "models/vicuna-7b").resolve()
    assert config.model.collab.ckpt == (tmp_path / "runs/mf/best").resolve()
    assert config.model.prompt.template == (tmp_path.parent / "prompts/tallrec_movie.txt").resolve()
    assert (config.model.cora.rank, config.model.cora.alpha, config.model.prompt.max_history) == (16, 32, 10)
    with pytest.raises(DiffRecError, match=r"unknown key 'model.cora.rnak'; did you mean 'model.cora.rank'\?"):
        load_config(write(tmp_path, LLM), ["model.cora.rnak=8"])
    with pytest.raises(DiffRecError, match=r"unknown key 'model.collab.ckp'"):
        load_config(write(tmp_path, LLM.replace("ckpt:", "ckp:")))
    with pytest.raises(DiffRecError, match="mode cora needs model.collab.ckpt"):
        load_config(write(tmp_path, LLM.replace("  collab: {ckpt: runs/mf/best}\n", "")))
    with pytest.raises(DiffRecError, match="must be a multiple of model.cora.queries"):
        load_config(write(tmp_path, LLM), ["model.cora.rank=6"])


@pytest.mark.parametrize(
    "options, message",
    [
        (["run.max_steps=10"], "run.max_steps is not read by rating-shape pre-training (model.arch mf); remove it"),
        (["run.devices={llm: cpu, image: cpu}"], "run.devices is not read by rating-shape pre-training"),
        (["datasets.shape=implicit", "run.group_by_length=true"], "run.group_by_length is not read by full-ranking"),
        (["datasets.shape=implicit", "run.l2_reg=0.01", "run.train_rows=5"], "run.train_rows is not read by full"),
    ],
)
def test_a_run_key_the_trainer_does_not_read_is_an_error(tmp_path, options, message):
    with pytest.raises(DiffRecError, match=re.escape(f"config.yaml: {message}")):
        load_config(write(tmp_path, BASE), options)


def test_run_keys_are_checked_for_the_llm_image_and_joint_trainers():
    root = Path(__file__).resolve().parents[1] / "train_configs"
    for name, key in [
        ("cora_collm_ml1m.yaml", "run.devices={llm: cpu, image: cpu}"),
        ("cora_collm_ml1m.yaml", "run.paper_parity=true"),
        ("sd3_tiny_ml100k.yaml", "run.patience=3"),
        ("sd3_tiny_ml100k.yaml", "run.valid_rows=8"),
        ("demo_ml100k.yaml", "run.eval_every=2"),
    ]:
        with pytest.raises(DiffRecError, match=f"{key.split('=')[0]} is not read by"):
            load_config(root / name, [key])


def test_a_dumped_config_loads_again(tmp_path):
    """A run folder's config.yaml holds every key, the ignored ones at their defaults: it validates."""
    root = Path(__file__).resolve().parents[1] / "train_configs"
    for name in ("mf_collm_ml1m.yaml", "cora_collm_ml1m.yaml", "sd3_tiny_ml100k.yaml", "demo_ml100k.yaml"):
        path = tmp_path / name
        path.write_text(dump_config(load_config(root / name)))
        assert dump_config(load_config(path)) == path.read_text()
