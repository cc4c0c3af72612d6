"""Shared by the benchmarks: round-robin timing, summaries, where results go."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(runs: dict[str, Callable[[], object]], rounds: int, device: torch.device, *, warmup: int = 1
                ) -> dict[str, list[float] | str]:
    """Times each callable ``rounds`` times, A B C ... A B C ..., after ``warmup`` untimed calls.

    A callable that raises is reported as ``"fails: <error>"`` and dropped from later rounds."""
    times: dict[str, list[float] | str] = {name: [] for name in runs}
    for name, run in runs.items():
        try:
            for _ in range(warmup):
                run()
        except (RuntimeError, MemoryError, ValueError, IndexError) as error:
            times[name] = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    for _ in range(rounds):
        for name, run in runs.items():
            if isinstance(times[name], str):
                continue
            synchronize(device)
            started = time.perf_counter()
            try:
                run()
                synchronize(device)
            except (RuntimeError, MemoryError, ValueError, IndexError) as error:
                times[name] = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
                continue
            times[name].append(time.perf_counter() - started)
    return times


def summary(times: list[float] | str) -> dict:
    if isinstance(times, str):
        return {"status": times}
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "rounds": len(times)}


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            info = dict(line.split(":", 1) for line in handle)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 << 30
