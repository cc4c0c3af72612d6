"""The quantile math the fused backends share, on device tensors and without host syncs.

semantics.md section 3 (and ``rose_kernels.reference.quantile``, the oracle): a threshold is the
linear-interpolated quantile ``x_k + (r - k) (x_{k+1} - x_k)`` of a pool's defined scores, at
``r = q (n - 1)`` and ``k = floor(r)``, and a score is kept when it lies in the closed interval of
the two thresholds (+inf only when the lower one is +inf). ``backends/fused.py`` (the step),
``backends/sharded.py`` (quantiles over FSDP2 shards) and ``backends/triton/select.py`` (the
Triton SELECT) all compute thresholds from the order statistics with these functions, so that
every route rounds alike; ``new_guesses`` makes the speed hints of the ``element_thresholds`` op.
"""

from __future__ import annotations

import torch

from rose_kernels.ops import GUESS_RANKS

NO_GUESS = -8  # a bucket no score has: a first call finds nothing where it looks, and searches

INF = float("inf")


def new_guesses(pools: int, device: torch.device) -> torch.Tensor:
    """Fresh ``guesses`` for element_thresholds (speed hints only; results never depend on them)."""
    return torch.full((pools, GUESS_RANKS), NO_GUESS, dtype=torch.int64, device=device)


def interpolate(x_k: torch.Tensor, x_k1: torch.Tensor, r: torch.Tensor, k: torch.Tensor, n: torch.Tensor):
    """semantics.md section 3 (and ``reference.quantile``) from the two order statistics, float64."""
    frac = r - k.to(torch.float64)
    plain = (frac == 0) | (k + 1 >= n) | (x_k == x_k1)
    value = torch.where(plain, x_k, x_k + frac * (x_k1 - x_k))
    return torch.where(n > 0, value, torch.full_like(value, float("nan")))


def quantile_ranks(n: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position ``r = q (n - 1)``, ``k = min(floor(r), n - 1)`` and ``k + 1`` capped, for counts ``n``."""
    r = q * (n.to(torch.float64) - 1)
    k = torch.minimum(torch.floor(r).to(torch.int64), n - 1).clamp(min=0)
    return r, k, torch.minimum(k + 1, n - 1).clamp(min=0)


def in_interval(scores: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``reference.in_interval`` with device thresholds: inclusive; +inf only when ``lo`` is +inf."""
    return (scores >= lo) & (scores <= hi) & ((lo == INF) | torch.isfinite(scores))


def small_pool_quantiles(scores: torch.Tensor, defined: torch.Tensor, q_lo: float, q_hi: float) -> torch.Tensor:
    """``[2]`` float64 thresholds of the defined scores of a small pool (a sort; no host sync)."""
    ordered = torch.sort(torch.where(defined, scores, torch.full_like(scores, float("nan")))).values
    n = defined.sum().reshape(1)
    out = []
    for q in (q_lo, q_hi):
        r, k, k1 = quantile_ranks(n, q)
        out.append(interpolate(ordered.gather(0, k), ordered.gather(0, k1), r, k, n))
    return torch.cat(out)
