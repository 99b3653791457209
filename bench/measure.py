"""Timing and peak-memory helpers shared by the benchmarks.

Peak memory is the growth over the resident size before each measurement (CUDA:
max_memory_allocated; CPU: the process's peak RSS, reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


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


def peak_growth_mb(device: torch.device, baseline: int) -> float:
    """Peak usage since ``start_peak`` above its baseline, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return (_status_bytes("VmHWM") - baseline) / 2**20


def timed(device: torch.device, work) -> tuple[float, float]:
    """Seconds and peak memory growth of ``work()`` (after one untimed warm-up call)."""
    work()
    baseline = start_peak(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, peak_growth_mb(device, baseline)
