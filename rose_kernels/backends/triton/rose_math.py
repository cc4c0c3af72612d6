"""The per-element math of the Triton kernels: the Python mirror of ``csrc/rose_math.h``.

The formulas of docs/semantics.md that the kernels apply to every element (the element score of
section 2, the interval test of section 3, the IEEE division and square root of the update of
section 5), written once as ``@triton.jit`` helpers and inlined by score.py, select.py and
update.py. Like rose_math.h they touch no memory. Division and square root are the IEEE ones in
float32 too (the GPU's default float32 division may be approximate), so a Triton step rounds as
the C++ kernels do.

A module global read inside a jit function must be a ``tl.constexpr`` (the compiler rejects any
other; the interpreter accepts it, so only ``tests/test_triton_aot.py`` would notice).
"""

from __future__ import annotations

import triton
import triton.language as tl

_INF = tl.constexpr(float("inf"))


@triton.jit
def precise_div(a, b, OPMATH: tl.constexpr):
    """IEEE division (the default float32 division on the GPU may be approximate)."""
    if OPMATH == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def precise_sqrt(a, OPMATH: tl.constexpr):
    """IEEE square root (as precise_div)."""
    if OPMATH == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def element_score(g, m, c, SECOND: tl.constexpr, OPMATH: tl.constexpr):
    """The element score in the opmath type (semantics.md section 2) and where it is defined."""
    if SECOND:
        return tl.abs(precise_div(c * g, m, OPMATH) - 1.0), m != 0.0
    else:
        return tl.abs(g), g == g


@triton.jit
def in_bounds(s, lo, hi):
    """``lo <= s <= hi`` for float64 scores (semantics.md section 3): +inf only if ``lo`` is +inf.

    (``tl.where`` rather than ``|`` of a scalar and a block: the interpreter cannot or those.)"""
    return (s >= lo) & (s <= hi) & tl.where(lo == _INF, True, s < _INF)
