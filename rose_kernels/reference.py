"""The pure-torch oracle of ROSE: ``docs/semantics.md`` written out plainly.

Everything here is per tensor, loops in Python, sorts to find quantiles and allocates freely: it is
slow on purpose, so that it can be read against the semantics line by line. Every backend is tested
against it (float64 to ~1e-12, float32 to ~1e-6); ``rose_kernels.backends.reference`` drives it
as the ``backend="reference"`` fallback that runs anywhere torch runs.

Conventions shared with the kernels (so that masks agree bit for bit):

- Scores are computed in the parameter's *opmath* type: float64 for float64 parameters, float32
  for float32/bfloat16/float16 ones (the state, ``exp_avg``, is kept in that type too).
- Quantile positions ``r = q * (n - 1)`` and the interpolation are evaluated in float64.
- A unit enters a pool only when its score is defined and its parameter is past ``warmup_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rose_kernels.dtypes import opmath_dtype
from rose_kernels.types import RoseConfig

__all__ = [
    "quantile",
    "in_interval",
    "opmath_dtype",
    "second_order_score",
    "second_order_tensor_score",
    "second_order_element_scores",
    "first_order_tensor_score",
    "first_order_element_scores",
    "masked_adamw_update",
    "Unit",
    "pool_thresholds",
    "select",
    "combined_mask",
]




def quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile of a 1-D pool (semantics.md section 3), as a Python float.

    ``x_k + (r - k) * (x_{k+1} - x_k)`` with ``r = q * (n - 1)``, ``k = floor(r)``; when
    ``r`` is integral or the two order statistics are equal the result is ``x_k`` itself (so
    that a pool holding ``+inf`` never produces ``0 * inf``). NaN for an empty pool.
    """
    n = values.numel()
    if n == 0:
        return math.nan
    ordered = torch.sort(values.reshape(-1).to(torch.float64)).values
    r = q * (n - 1)
    k = min(math.floor(r), n - 1)
    frac = r - k
    lo = ordered[k].item()
    if frac == 0.0 or k + 1 >= n:
        return lo
    hi = ordered[k + 1].item()
    if lo == hi:
        return lo
    return lo + frac * (hi - lo)


def in_interval(scores: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``lo <= s <= hi`` (inclusive); +inf scores qualify only when both thresholds are +inf."""
    s = scores.to(torch.float64)
    inside = (s >= lo) & (s <= hi)
    if lo != math.inf:
        inside &= torch.isfinite(s)
    return inside


def second_order_score(g_norm: float, m_norm: float, scale: float) -> float | None:
    """``| c * ||g|| / ||m|| - 1 |`` from the two norms; None when ``||m|| == 0`` (no defined score)."""
    if m_norm == 0.0:
        return None
    return abs(scale * g_norm / m_norm - 1.0)


def second_order_tensor_score(grad: torch.Tensor, exp_avg: torch.Tensor, scale: float) -> float | None:
    """The tensor-granularity second-order score, norms in float64."""
    g_norm = grad.to(torch.float64).pow(2).sum().sqrt().item()
    m_norm = exp_avg.to(torch.float64).pow(2).sum().sqrt().item()
    return second_order_score(g_norm, m_norm, scale)


def second_order_element_scores(
    grad: torch.Tensor, exp_avg: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``| c * g_j / m_j - 1 |`` in the opmath type, and where it is defined (``m_j != 0``)."""
    dtype = opmath_dtype(grad.dtype)
    g = grad.to(dtype)
    m = exp_avg.to(dtype)
    c = torch.tensor(scale, dtype=dtype)
    defined = m != 0
    scores = (c * g / m - 1).abs()
    return scores, defined


def scored_on_host(state_steps: list[torch.Tensor | None], warmup_steps: list[int]) -> list[bool]:
    """Whether each parameter is past warm-up at its coming step (counter + 1 > warmup_steps)."""
    return [(0.0 if s is None else float(s)) + 1 > w for s, w in zip(state_steps, warmup_steps, strict=True)]


def first_order_tensor_score(kl_grad: torch.Tensor) -> float:
    """``||g_kl||`` in float64."""
    return kl_grad.to(torch.float64).pow(2).sum().sqrt().item()


def first_order_element_scores(kl_grad: torch.Tensor) -> torch.Tensor:
    """``|g_kl_j|`` in the opmath type."""
    return kl_grad.to(opmath_dtype(kl_grad.dtype)).abs()


def masked_adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: float,
    mu: float | torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
) -> None:
    """The masked AdamW update of semantics.md section 5, in place, at the (incremented) ``step``.

    Elements (or the whole tensor) with ``mu == 0`` keep ``param`` and ``exp_avg`` exactly;
    ``exp_avg_sq`` still moves toward ``exp_avg ** 2``.
    """
    dtype = opmath_dtype(param.dtype)
    p = param.to(dtype)
    g = grad.to(dtype)
    m = exp_avg
    v = exp_avg_sq
    mu_t = mu.to(dtype) if isinstance(mu, torch.Tensor) else torch.tensor(mu, dtype=dtype)
    g_masked = mu_t * g + (1 - mu_t) * m
    m_new = beta1 * m + (1 - beta1) * g_masked
    v_new = beta2 * v + (1 - beta2) * g_masked * g_masked
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step) if correct_bias else lr
    p_new = p - step_size * (mu_t * m_new) / (v_new.sqrt() + eps)
    p_new = p_new - (lr * weight_decay) * mu_t * p_new
    frozen = mu_t == 0
    exp_avg.copy_(torch.where(frozen, m, m_new))
    exp_avg_sq.copy_(v_new)
    param.copy_(torch.where(frozen, p, p_new))


@dataclass
class Unit:
    """One parameter's place in a selection: its position, and its element scores (with where they
    are defined) or its tensor score (None: undefined, not pooled)."""

    index: int  # position in the step's parameter list
    scores: torch.Tensor | None  # element scores (element granularity)
    defined: torch.Tensor | None
    score: float | None  # tensor score (tensor granularity)


def pool_thresholds(values: list[torch.Tensor], cfg: RoseConfig) -> tuple[float, float]:
    """The ``lower`` and ``upper`` quantiles of one pool made of ``values`` (semantics.md section 3)."""
    pool = torch.cat([v.reshape(-1).to(torch.float64) for v in values]) if values else torch.empty(0)
    return quantile(pool, cfg.lower / 100), quantile(pool, cfg.upper / 100)


def select(units: list[Unit], cfg: RoseConfig) -> dict[int, float | torch.Tensor]:
    """Mask values (1/0 floats, or bool element tensors) for scored units; absent = undefined."""
    masks: dict[int, float | torch.Tensor] = {}
    if not cfg.element:
        scored = [u for u in units if u.score is not None]
        lo, hi = pool_thresholds([torch.tensor([u.score], dtype=torch.float64) for u in scored], cfg)
        for u in scored:
            masks[u.index] = float(in_interval(torch.tensor(u.score, dtype=torch.float64), lo, hi).item())
        return masks
    if cfg.scope == "global":
        lo, hi = pool_thresholds([u.scores[u.defined] for u in units], cfg)
        thresholds = {u.index: (lo, hi) for u in units}
    else:
        thresholds = {u.index: pool_thresholds([u.scores[u.defined]], cfg) for u in units}
    for u in units:
        lo, hi = thresholds[u.index]
        masks[u.index] = torch.where(u.defined, in_interval(u.scores, lo, hi), True)
    return masks


def combined_mask(cfg: RoseConfig, mu1, mu2, like: torch.Tensor) -> float | torch.Tensor:
    """The mask of one pooled parameter from its first- and second-order masks (None: undefined,
    kept): the mode's own, or the ensemble's ``(1 - gamma) * M2 + gamma * M1`` (section 4)."""
    mu1 = 1.0 if mu1 is None else mu1
    mu2 = 1.0 if mu2 is None else mu2
    if cfg.mode == "second":
        mu = mu2
    elif cfg.mode == "first":
        mu = mu1
    else:
        mu = _as_float(mu2, like) * (1 - cfg.gamma) + cfg.gamma * _as_float(mu1, like)
    return _as_float(mu, like) if isinstance(mu, torch.Tensor) else float(mu)


def _as_float(mask: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    if isinstance(mask, torch.Tensor):
        return mask.to(opmath_dtype(like.dtype))
    return float(mask)
