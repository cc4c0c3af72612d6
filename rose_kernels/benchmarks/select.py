"""SELECT against what a user could write: two exact quantile thresholds of n float32 scores.

Methods, timed round-robin per size: rose_kernels' selection (the CPU op, or the Triton op on a
GPU), ``torch.quantile`` (both quantiles in one call; it refuses more than 2**24 elements), two
``torch.kthvalue`` calls (one order statistic per threshold: no interpolation, so it does less than
the others), ``torch.sort`` then indexing, and ``numpy.partition`` with the four order statistics
the interpolation needs. A method that raises is reported as failing, with the error; one whose
working memory would not fit is skipped, with the estimate.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rose_kernels.benchmarks.common import available_memory_bytes, round_robin, summary

Q_LO, Q_HI = 0.3, 0.6
# Working memory per element beyond the input (bytes), for the skip decision.
_EXTRA_BYTES = {"torch.quantile": 12, "2 x torch.kthvalue": 12, "torch.sort": 12, "numpy.partition": 8,
                "rose_kernels": 1}


def _ranks(n: int, q: float) -> tuple[int, int]:
    k = min(math.floor(q * (n - 1)), n - 1)
    return k, min(k + 1, n - 1)


def methods(scores: torch.Tensor, device: torch.device) -> dict:
    n = scores.numel()
    (k1, k1b), (k2, k2b) = _ranks(n, Q_LO), _ranks(n, Q_HI)
    qs = torch.tensor([Q_LO, Q_HI], device=device)
    if device.type == "cuda":
        from rose_kernels.backends.triton.select import element_thresholds

        ones = torch.ones(1, dtype=torch.float64, device=device)
        pooled = torch.ones(1, dtype=torch.bool, device=device)

        def ours():
            return element_thresholds([scores], [], ones, pooled, Q_LO, Q_HI, False)
    else:
        from rose_kernels import ops

        ones = torch.ones(1, dtype=torch.float64)
        pooled = torch.ones(1, dtype=torch.bool)

        def ours():
            return ops.element_thresholds([scores], [], ones, pooled, Q_LO, Q_HI, False)

    runs = {
        "rose_kernels": ours,
        "torch.quantile": lambda: torch.quantile(scores, qs),
        "2 x torch.kthvalue": lambda: (torch.kthvalue(scores, k1 + 1), torch.kthvalue(scores, k2 + 1)),
        "torch.sort": lambda: torch.sort(scores).values[[k1, k1b, k2, k2b]],
    }
    if device.type == "cpu":
        array = scores.numpy()
        runs["numpy.partition"] = lambda: np.partition(array, [k1, k1b, k2, k2b])
    return runs


def bench_select(sizes: list[int], rounds: int, device: torch.device, seed: int = 0) -> dict:
    """Per size: every method's times (or why it has none), and each one's ratio to rose_kernels."""
    results = []
    for n in sizes:
        memory = available_memory_bytes() if device.type == "cpu" else torch.cuda.mem_get_info(device)[0]
        if 4 * n * 1.2 > memory:
            results.append({"n": n, "skipped": f"the scores alone need {4 * n / 2**30:.1f} GiB"})
            continue
        gen = torch.Generator(device=device).manual_seed(seed)
        scores = torch.randn(n, generator=gen, device=device).abs_()
        runs = methods(scores, device)
        skipped = {}
        for name in list(runs):
            need = _EXTRA_BYTES[name] * n
            if need > 0.8 * (memory - 4 * n):
                skipped[name] = f"skipped: needs ~{need / 2**30:.1f} GiB more"
                del runs[name]
        # One warm-up each; the slow baselines get fewer rounds at large sizes to bound the run time.
        times = round_robin(runs, rounds if n <= 10**8 else max(1, rounds // 2), device)
        times.update(skipped)
        rows = {name: summary(t) for name, t in times.items()}
        ours = rows["rose_kernels"].get("median")
        for row in rows.values():
            if "median" in row and ours:
                row["vs_rose_kernels"] = row["median"] / ours
        results.append({"n": n, "methods": rows})
        del scores, runs
    return {"q": [Q_LO, Q_HI], "device": str(device), "sizes": results}


def to_markdown(report: dict) -> str:
    names = ["rose_kernels", "torch.quantile", "2 x torch.kthvalue", "torch.sort", "numpy.partition"]
    lines = [f"Two thresholds (q = {report['q'][0]}, {report['q'][1]}) of n float32 scores on {report['device']}: "
             "median ms, and time relative to rose_kernels.", "",
             "| n | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for entry in report["sizes"]:
        if "skipped" in entry:
            lines.append(f"| {entry['n']:.0e} | {entry['skipped']} |")
            continue
        cells = []
        for name in names:
            row = entry["methods"].get(name)
            if row is None:
                cells.append("-")
            elif "median" in row:
                ratio = "" if name == "rose_kernels" else f" ({row['vs_rose_kernels']:.1f}x)"
                cells.append(f"{row['median'] * 1e3:.1f}{ratio}")
            else:
                cells.append(row["status"])
        lines.append(f"| {entry['n']:.0e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
