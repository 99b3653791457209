"""dtype ``auto`` and ``run.mixed_precision: auto`` follow the hardware (bf16 only where native), an explicit
dtype wins, the choice lands in metrics.json, and CPU threads are shared out among local processes."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_llm import llm_config

from minigpt4 import hardware
from minigpt4.config import LLMConfig, PipelineConfig, load_config, resolve_precision
from minigpt4.config.run import DevicePlacement
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.errors import DiffRecError
from minigpt4.llm.loading import load_causal_lm
from minigpt4.training.llm import train_llm


@pytest.fixture
def native(monkeypatch):
    """Set whether this 'CPU' has native bf16 (the suite runs with ``DIFFREC_NATIVE_BF16=0``)."""

    def set_native(value: bool) -> None:
        monkeypatch.setenv("DIFFREC_NATIVE_BF16", "1" if value else "0")

    return set_native


@pytest.mark.parametrize("is_native, dtype, mixed", [(True, torch.bfloat16, "bf16"), (False, torch.float32, "no")])
def test_auto_follows_native_bf16_for_llm_pipeline_and_mixed_precision(
    is_native, dtype, mixed, native, tiny_llm, tiny_models, tiny_dataset, tmp_path
):
    native(is_native)
    assert load_causal_lm(LLMConfig(path=tiny_llm)).dtype == dtype
    pipeline = load_sd3_pipeline(PipelineConfig(path=tiny_models / "sd3", use_t5=False))
    assert pipeline.transformer.dtype == dtype and pipeline.vae.dtype == torch.float32  # the VAE stays fp32
    config = load_config(llm_config(tmp_path, tiny_dataset, tiny_llm, mode="tallrec"))
    assert (config.model.llm.dtype, config.run.mixed_precision) == ("auto", "auto")
    chosen = resolve_precision(config, torch.device("cpu"))
    assert (config.model.llm.dtype, config.run.mixed_precision) == (str(dtype).removeprefix("torch."), mixed)
    assert chosen["run.mixed_precision"] == {"requested": "auto", "resolved": mixed}


def test_explicit_dtypes_are_kept(native, tiny_llm, tiny_dataset, tmp_path):
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, mode="tallrec")
    native(True)
    config = load_config(path, ["model.llm.dtype=float32", "run.mixed_precision=no"])
    resolve_precision(config, torch.device("cpu"))
    assert (config.model.llm.dtype, config.run.mixed_precision) == ("float32", "no")
    native(False)
    assert load_causal_lm(LLMConfig(path=tiny_llm, dtype="bfloat16")).dtype == torch.bfloat16
    config = load_config(path, ["model.llm.dtype=bfloat16", "run.mixed_precision=bf16"])
    resolve_precision(config, torch.device("cpu"))
    assert (config.model.llm.dtype, config.run.mixed_precision) == ("bfloat16", "bf16")


def test_rating_pretraining_stays_fp32_under_auto(native, tiny_dataset, tmp_path):
    from conftest import write_config

    native(True)
    config = load_config(write_config(tmp_path, tiny_dataset, "mf"))
    assert resolve_precision(config, torch.device("cpu"))["run.mixed_precision"] == {
        "requested": "auto",
        "resolved": "no",
    }
    with pytest.raises(DiffRecError, match="trains in fp32"):
        load_config(write_config(tmp_path, tiny_dataset, "mf", run={"mixed_precision": "bf16"}))


@pytest.mark.parametrize(
    "flags, isa, capability, expected",
    [
        ((True, False), None, "AVX512", True),  # AVX-512 BF16
        ((False, True), None, "AVX512", True),  # AMX
        ((False, False), None, "AVX512", False),  # AVX-512 without BF16
        ((True, False), "AVX2", "AVX512", False),  # oneDNN capped below its bf16 kernels
        ((True, False), "avx512_core", "AVX512", False),
        ((True, False), "AVX512_CORE_AMX", "AVX512", True),
        ((True, False), None, "AVX2", False),  # PyTorch's kernels capped at AVX2
    ],
)
def test_native_bf16_detection_on_x86(flags, isa, capability, expected, monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda: flags[0])
    monkeypatch.setattr("torch.cpu._is_amx_tile_supported", lambda: flags[1])
    monkeypatch.setattr("minigpt4.hardware.cpu_capability", lambda: capability)
    monkeypatch.delenv("DIFFREC_NATIVE_BF16")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert hardware.cpu_has_native_bf16() is expected


def test_native_bf16_override_must_be_0_or_1(monkeypatch):
    monkeypatch.setenv("DIFFREC_NATIVE_BF16", "yes")
    with pytest.raises(DiffRecError, match="DIFFREC_NATIVE_BF16 must be 0 or 1, got 'yes'"):
        hardware.resolve_dtype("auto", "cpu")


def test_mixed_precision_no_survives_yaml(tiny_llm, tiny_dataset, tmp_path):
    """A bare ``no`` is false to YAML, in a file and in --options alike."""
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, mode="tallrec")
    assert load_config(path, ["run.mixed_precision=no"]).run.mixed_precision == "no"
    path.write_text(path.read_text().replace("run:\n", "run:\n  mixed_precision: no\n"))
    assert load_config(path).run.mixed_precision == "no"


def test_metrics_json_and_run_folder_record_the_resolved_precision(native, tiny_llm, tiny_dataset, tmp_path):
    native(True)
    config = load_config(
        llm_config(tmp_path, tiny_dataset, tiny_llm, mode="tallrec", run={"max_steps": 2, "eval_every_steps": 2})
    )
    metrics = train_llm(config)
    run_dir = Path(metrics["run_dir"])
    saved = json.loads((run_dir / "metrics.json").read_text())["hardware"]
    assert saved["precision"]["model.llm.dtype"] == {"requested": "auto", "resolved": "bfloat16"}
    assert saved["precision"]["run.mixed_precision"] == {"requested": "auto", "resolved": "bf16"}
    assert saved["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and saved["native_bf16"] is True
    assert saved["threads"] == torch.get_num_threads() >= 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["llm"]["dtype"] == "bfloat16"
    log = (run_dir / "log.txt").read_text()
    assert "native bf16 True" in log and "model.llm.dtype bfloat16 (auto)" in log


def test_threads_are_shared_among_local_processes(monkeypatch):
    before = torch.get_num_threads()
    cores = 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
        assert hardware.configure_threads() == {
            "threads": 2,
            "cores": 8,
            "local_processes": 3,
            "set_by": "cores / local processes",
        }
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        assert hardware.configure_threads()["threads"] == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert hardware.configure_threads()["set_by"] == "OMP_NUM_THREADS" and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_placed_devices_follow_run_devices_in_one_process_only():
    """run.devices splits the halves in one process; it is refused with several processes or against run.cpu."""
    one = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    assert hardware.placed_devices(None, True, one) == (torch.device("cpu"), torch.device("cpu"))
    both_cpu = DevicePlacement(llm="cpu", image="cpu")
    assert hardware.placed_devices(both_cpu, True, one) == (torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(DiffRecError, match="run.cpu is true but run.devices names cuda:0 and cuda:1"):
        hardware.placed_devices(DevicePlacement(), True, one)
    two = SimpleNamespace(device=torch.device("cpu"), num_processes=2)
    with pytest.raises(DiffRecError, match="several processes"):
        hardware.placed_devices(both_cpu, True, two)
