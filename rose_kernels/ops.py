"""Python side of the op family: fake (meta) implementations, typed wrappers, table layouts.

The schemas live in ``csrc/ops.cpp`` (``TORCH_LIBRARY(rose_kernels, ...)``), with the argument
checks every implementation shares and the CPU (and, in a CUDA build, CUDA) kernels. The Triton
kernels register the same schemas under ``rose_triton`` (rose_kernels/backends/triton). The fakes
here tell ``torch.compile`` / ``opcheck`` the output shapes.
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

# Columns of masked_adamw_'s ``hyper`` and ``masks`` tables and of element_thresholds' result
# (csrc/common.h: HyperColumn, MaskColumn, ThresholdColumn).
HYPER_COLUMNS = ("lr", "beta1", "beta2", "eps", "weight_decay", "correct_bias", "warmup_steps",
                 "weight_first", "weight_second", "element_second", "scale")
MASK_COLUMNS = ("mask_first", "mask_second", "lower", "upper")
THRESHOLD_COLUMNS = ("lower", "upper", "count", "nonfinite", "full_reads")
GUESS_RANKS = 4  # columns of element_thresholds' guesses: x_k and x_{k+1} of each threshold

# The ops of the family, by name: the same names (and schemas) in every implementation.
OP_NAMES = ("sumsq", "element_thresholds", "first_order_mask_", "masked_adamw_")


def available() -> bool:
    """Whether the compiled extension (schemas + CPU kernels) is loaded."""
    return EXTENSION_ERROR is None


def built_with_cuda() -> bool:
    """Whether the loaded extension has the CUDA kernels."""
    return available() and torch.ops.rose_kernels.built_with_cuda()


def schema_of(name: str) -> str | None:
    """The op's C++ schema without its name, ``(args) -> returns``: the Triton ops register under
    exactly this one. None without the extension (they infer theirs from annotations then)."""
    if not available():
        return None
    text = str(getattr(torch.ops.rose_kernels, name).default._schema)
    return text[text.index("("):]


if available():

    @torch.library.register_fake("rose_kernels::sumsq")
    def _sumsq_fake(tensors):
        return tensors[0].new_empty((len(tensors),), dtype=torch.float64)

    @torch.library.register_fake("rose_kernels::element_thresholds")
    def _element_thresholds_fake(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses=None, strategy=SELECT_AUTO):
        pools = 1 if global_pool else len(a)
        return scales.new_empty((pools, len(THRESHOLD_COLUMNS)), dtype=torch.float64)

    @torch.library.register_fake("rose_kernels::first_order_mask_")
    def _first_order_mask_fake(grads, bounds, masks):
        return bounds.new_empty((len(grads),), dtype=torch.float64)

    @torch.library.register_fake("rose_kernels::masked_adamw_")
    def _masked_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, hyper, masks, found,
                           element):
        return hyper.new_empty((len(params), 2), dtype=torch.float64)


def sumsq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor sums of squares, float64 (non-finite values propagate)."""
    return torch.ops.rose_kernels.sumsq.default(tensors)


def element_thresholds(
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    scales: torch.Tensor,
    pooled: torch.Tensor,
    q_lo: float,
    q_hi: float,
    global_pool: bool,
    guesses: torch.Tensor | None = None,
    strategy: int = SELECT_AUTO,
) -> torch.Tensor:
    """Exact quantile thresholds of element scores; ``[pools, 5]`` (THRESHOLD_COLUMNS)."""
    return torch.ops.rose_kernels.element_thresholds.default(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses,
                                                             strategy)


def first_order_mask_(grads: list[torch.Tensor], bounds: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Writes 1-bit masks ``lo <= |g| <= hi`` (bounds: float64 ``[n, 2]``); returns the kept count per tensor."""
    return torch.ops.rose_kernels.first_order_mask_.default(grads, bounds, masks)


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, hyper, masks, found,
                  element: bool) -> torch.Tensor:
    """The masked AdamW update; returns ``[n, 2]``: sum of mask values, sum of squares of new exp_avg."""
    return torch.ops.rose_kernels.masked_adamw_.default(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, hyper, masks, found, element
    )


def cpu_capability(set_to: str | None = None) -> str:
    """The CPU kernel variant in use (DEFAULT, AVX2, AVX512); pass a name or "auto" to switch."""
    return torch.ops.rose_kernels.cpu_capability(set_to)
