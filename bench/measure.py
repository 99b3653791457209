"""Timing, peak-memory and output helpers shared by the benchmarks.

Every figure is one JSON line that names the hardware it was measured on (CPU model and capability,
whether bf16 is native, torch threads) and the dtype it ran in: a bf16 figure from a CPU with AVX-512
BF16 says nothing about a CPU without it.

Peak memory is given twice: the peak during the measured work (CUDA: max_memory_allocated; CPU: the
process's peak RSS, reset through /proc/self/clear_refs), and its growth over the usage just before.
On the CPU the growth is often near zero after the warm-up call, because the allocator keeps and
reuses the memory it freed; the absolute peak is then the informative figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import torch

from minigpt4.hardware import configure_threads, describe

configure_threads()  # the threads the diffrec command would use (OMP_NUM_THREADS wins)


def _status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def start_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the current usage to measure growth from."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def peak_bytes(device: torch.device) -> int:
    """Peak usage since the last ``start_peak``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


class Timing(NamedTuple):
    """Wall seconds of a measured call, its peak memory and that peak's growth over the usage before, in MiB."""

    seconds: float
    peak_mb: float
    peak_growth_mb: float


def timed(device: torch.device, work) -> Timing:
    """Time ``work()`` and its peak memory (after one untimed warm-up call)."""
    work()
    baseline = start_peak(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_bytes(device)
    return Timing(seconds, peak / 2**20, (peak - baseline) / 2**20)


def precision_label(precision: dict) -> str:
    """A run's resolved precision (metrics.json ``hardware.precision``) on one line; float32 when it has none."""
    dtypes = [
        f"{key.rsplit('.', 2)[-2]} {value['resolved']}" for key, value in precision.items() if key.endswith(".dtype")
    ]
    mixed = precision.get("run.mixed_precision", {}).get("resolved", "no")
    return ", ".join(dtypes + ([f"{mixed} autocast"] if mixed != "no" else [])) or "float32"


def emit(dtype: str, device: torch.device | str = "cpu", **figure) -> None:
    """One JSON line: how every benchmark reports a figure, with the hardware and the ``dtype`` it ran in."""
    hardware = describe(device)
    hardware["threads"] = torch.get_num_threads()  # a benchmark may have changed them since
    print(json.dumps({**figure, "dtype": dtype, **hardware}), flush=True)
