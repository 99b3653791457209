"""What the machine can do fast: whether bf16 is native, the dtype ``auto`` stands for, and CPU threads.

A bf16 matmul on a CPU without AVX-512 BF16 or AMX is emulated and runs tens of times slower than fp32
(measured: 2.8 against 109 GFLOP/s, one core, 256x576 @ 576x1536), so ``auto`` picks bf16 on a CPU only
where it is native, bf16 on GPUs that support it, and fp32 everywhere else.
"""

from __future__ import annotations

import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch
from accelerate import PartialState

from minigpt4.errors import DiffRecError

NATIVE_BF16_ENV = "DIFFREC_NATIVE_BF16"  # 1 or 0: overrides the detection (a CPU it misjudges; runs that must match)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# oneDNN runs matmuls; these caps (ONEDNN_MAX_CPU_ISA) leave out its bf16 kernels even on a CPU that has them.
ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_capability() -> str:
    """The vector instruction set PyTorch's CPU kernels use (``AVX2``, ``AVX512``, ``DEFAULT``, ...)."""
    return torch.backends.cpu.get_cpu_capability()


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name, as the kernel reports it (the platform's processor string elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls in hardware (AVX-512 BF16 or AMX) and nothing caps the kernels
    below them; ``DIFFREC_NATIVE_BF16=0|1`` overrides the answer."""
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise DiffRecError(f"{NATIVE_BF16_ENV} must be 0 or 1, got {forced!r}")
        return forced == "1"
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            return False
        cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
        return cap not in ONEDNN_WITHOUT_BF16 and cpu_capability() not in ("DEFAULT", "AVX2")
    return _bf16_matmul_is_fast()


@lru_cache(maxsize=1)
def _bf16_matmul_is_fast() -> bool:
    """A one-off probe where no CPU flag tells (ARM and others): is a bf16 matmul at least as fast as fp32?"""
    a, b = torch.randn(256, 512), torch.randn(512, 512)

    def seconds(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        start = time.perf_counter()
        for _ in range(5):
            x @ y
        return time.perf_counter() - start

    return seconds(torch.bfloat16) <= seconds(torch.float32)


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 is fast on ``device``: a GPU that supports it, or a CPU with native bf16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_dtype_name(name: str, device: torch.device | str) -> str:
    """``auto`` as bfloat16 where bf16 is native on ``device`` and float32 otherwise; any other name unchanged."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype a config's ``dtype`` names (``auto`` resolved for ``device``)."""
    return DTYPES[resolve_dtype_name(name, device)]


def resolve_mixed_precision(name: str, device: torch.device | str) -> str:
    """Accelerate's ``mixed_precision`` for a config value: ``auto`` is ``bf16`` where bf16 is native, else ``no``."""
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "no"


def placed_devices(placement: object | None, cpu: bool, state: PartialState) -> tuple[torch.device, torch.device]:
    """The LLM's and the image models' devices: ``run.devices`` (``.llm``, ``.image``) in one process, else the
    process's own device twice."""
    if placement is None:
        return state.device, state.device
    if state.num_processes > 1:
        raise DiffRecError(
            "run.devices places the two halves inside one process; with several processes leave it out "
            "(each process takes its own device)"
        )
    if cpu and {placement.llm, placement.image} != {"cpu"}:
        raise DiffRecError(f"run.cpu is true but run.devices names {placement.llm} and {placement.image}")
    return torch.device(placement.llm), torch.device(placement.image)


def configure_threads() -> dict:
    """Set torch's intra-op threads to this process's share of the cores it may run on; returns the choice.

    An explicit ``OMP_NUM_THREADS`` (which ``accelerate launch`` also sets) wins; otherwise the cores in this
    process's affinity mask are divided among the processes of a launch on this machine (``LOCAL_WORLD_SIZE``),
    so several processes never oversubscribe the CPU.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if os.environ.get("OMP_NUM_THREADS"):
        return {
            "threads": torch.get_num_threads(),
            "cores": cores,
            "local_processes": local_processes,
            "set_by": "OMP_NUM_THREADS",
        }
    threads = max(1, cores // local_processes)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return {"threads": threads, "cores": cores, "local_processes": local_processes, "set_by": "cores / local processes"}


def describe(device: torch.device | str = "cpu") -> dict:
    """The hardware a figure was measured on: device, CPU model and capability, native bf16, torch threads."""
    device = torch.device(device)
    record = {
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_capability": cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        record.update(gpu=torch.cuda.get_device_name(device), gpu_bf16=torch.cuda.is_bf16_supported())
    return record
