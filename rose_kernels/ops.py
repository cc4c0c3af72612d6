"""Python side of the custom ops: fake (meta) implementations and thin typed wrappers.

The schemas live in ``csrc/ops.cpp`` (``TORCH_LIBRARY(rose_kernels, ...)``); the CPU kernels are
registered there too. The fakes here tell ``torch.compile`` / ``opcheck`` the output shapes.
"""

from __future__ import annotations

import torch

try:
    from rose_kernels import _C  # noqa: F401  (loading it runs the op registrations)

    EXTENSION_ERROR: str | None = None
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    EXTENSION_ERROR = str(error)

# Strategies of element_thresholds (csrc/common.h, SelectStrategy).
SELECT_AUTO = 0
SELECT_RADIX = 1

# Columns of masked_adamw_'s table (csrc/common.h, UpdateColumn).
UPDATE_COLUMNS = (
    "lr",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "correct_bias",
    "warmup_steps",
    "weight_first",
    "mask_first",
    "weight_second",
    "mask_second",
    "element_second",
    "lower",
    "upper",
    "scale",
)


def available() -> bool:
    """Whether the compiled extension (schema + CPU kernels) is loaded."""
    return EXTENSION_ERROR is None


if available():

    @torch.library.register_fake("rose_kernels::sumsq")
    def _sumsq_fake(tensors):
        return tensors[0].new_empty((len(tensors),), dtype=torch.float64)

    @torch.library.register_fake("rose_kernels::element_thresholds")
    def _element_thresholds_fake(a, b, scales, q_lo, q_hi, global_pool, strategy=SELECT_AUTO):
        pools = 1 if global_pool else len(a)
        return a[0].new_empty((pools, 4), dtype=torch.float64)

    @torch.library.register_fake("rose_kernels::first_order_mask_")
    def _first_order_mask_fake(grads, thresholds, masks):
        return grads[0].new_empty((len(grads),), dtype=torch.float64)

    @torch.library.register_fake("rose_kernels::masked_adamw_")
    def _masked_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, table):
        return params[0].new_empty((len(params), 2), dtype=torch.float64)


def sumsq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor sums of squares, float64 (non-finite values propagate)."""
    return torch.ops.rose_kernels.sumsq.default(tensors)


def element_thresholds(
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    scales: list[float],
    q_lo: float,
    q_hi: float,
    global_pool: bool,
    strategy: int = SELECT_AUTO,
) -> torch.Tensor:
    """Exact quantile thresholds of element scores; ``[pools, 4]``: lower, upper, count, non-finite."""
    return torch.ops.rose_kernels.element_thresholds.default(a, b, scales, q_lo, q_hi, global_pool, strategy)


def first_order_mask_(grads: list[torch.Tensor], thresholds: torch.Tensor, masks: list[torch.Tensor]):
    """Writes 1-bit masks ``lo <= |g| <= hi``; returns the kept count per tensor."""
    return torch.ops.rose_kernels.first_order_mask_.default(grads, thresholds, masks)


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, table) -> torch.Tensor:
    """The masked AdamW update; returns ``[n, 2]``: sum of mask values, sum of squares of new exp_avg."""
    return torch.ops.rose_kernels.masked_adamw_.default(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, table
    )


def cpu_capability(set_to: str | None = None) -> str:
    """The CPU kernel variant in use (DEFAULT, AVX2, AVX512); pass a name or "auto" to switch."""
    return torch.ops.rose_kernels.cpu_capability(set_to)
