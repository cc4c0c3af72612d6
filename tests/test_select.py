"""SELECT: ops.element_thresholds against the oracle (semantics.md section 3).

The thresholds are linear-interpolated quantiles x_k + (r - k) * (x_k+1 - x_k), r = q * (n - 1) in
float64, of a pool of element scores: |a| (b empty) or |scale * a / b - 1| in the opmath type over
the elements with b != 0. The kernels find the order statistics by selection, so the result must
equal reference.quantile (which sorts) bit for bit, for every pool size, strategy and scope.

Only the tensors whose `pooled` flag is set join a pool; every row of the result also carries the
call's non-finite flag (1.0 if any a, or any b of a pooled tensor, holds inf / NaN) and the number
of passes that read the pool's inputs in full (ops.THRESHOLD_COLUMNS).

Every random input comes from a seed that is part of the assertion message (the `seed` fixture of
conftest.py, or a seed drawn by hypothesis).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rose_kernels import ops, reference
from rose_kernels.dtypes import opmath_dtype

pytestmark = pytest.mark.skipif(not ops.available(), reason=f"extension not built: {ops.EXTENSION_ERROR}")

STRATEGIES = {"auto": ops.SELECT_AUTO, "radix": ops.SELECT_RADIX}
DIRECT_POOL = 1 << 15  # pools up to this many elements are gathered whole (csrc/cpu/kernels.h)
LARGE_POOL = 1 << 21  # pools from this size are selected with every thread
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
Q_PAIRS = ((0.0, 1.0), (0.3, 0.6), (0.6, 0.6), (0.0, 0.0), (1.0, 1.0), (0.25, 0.75), (0.0, 0.3), (0.6, 1.0))
INF = math.inf
NAN = math.nan
LOWER, UPPER, COUNT, FLAG, READS = range(5)
assert ops.THRESHOLD_COLUMNS == ("lower", "upper", "count", "nonfinite", "full_reads")
# Passes over a pool's inputs: count + gather (a pool of <= DIRECT_POOL elements), count (the
# sampled bracket held every wanted rank), count + the 16-bit radix passes (the radix route).
RADIX_READS = {torch.float32: 1 + 2, torch.float64: 1 + 4}


# ------------------------------------------------------------------------------------------------
# Helpers: input generation, the expected pools, exact comparison with a useful message
# ------------------------------------------------------------------------------------------------


def draw(n: int, dtype: torch.dtype, gen: torch.Generator, *, zero_frac: float = 0.0, scale: float = 1.0):
    """Normal values drawn in float64 then cast, with a fraction of exact zeros."""
    x = torch.randn(n, dtype=torch.float64, generator=gen) * scale
    if zero_frac > 0:
        x[torch.rand(n, generator=gen) < zero_frac] = 0.0
    return x.to(dtype)


def f64(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64)


def thresholds(a, b, scales, q_lo, q_hi, global_pool, strategy=ops.SELECT_AUTO, *, pooled=None, guesses=None):
    """ops.element_thresholds with its tables built from Python lists: scales (float64 [n]; ones
    when given empty, as first-order calls pass them) and pooled (bool [n]; every tensor when None)."""
    if not isinstance(scales, torch.Tensor):
        scales = f64(scales) if len(scales) else torch.ones(len(a), dtype=torch.float64)
    if not isinstance(pooled, torch.Tensor):
        pooled = torch.ones(len(a), dtype=torch.bool) if pooled is None else torch.tensor(pooled, dtype=torch.bool)
    return ops.element_thresholds(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses, strategy)


def pool_parts(a, b, scales) -> list[torch.Tensor]:
    """The defined scores of each tensor as float64, built by the oracle's score functions."""
    parts = []
    for i, x in enumerate(a):
        if b:
            scores, defined = reference.second_order_element_scores(x, b[i], scales[i])
            parts.append(scores[defined].reshape(-1).to(torch.float64))
        else:
            parts.append(reference.first_order_element_scores(x).reshape(-1).to(torch.float64))
    return parts


def expected_pools(a, b, scales, global_pool, pooled=None) -> list[torch.Tensor]:
    """The scores of each pool; an unpooled tensor's own pool (per-tensor scope) is empty."""
    pooled = [True] * len(a) if pooled is None else list(pooled)
    parts = pool_parts(a, b, scales)
    empty = torch.empty(0, dtype=torch.float64)
    if global_pool:
        joined = [part for part, p in zip(parts, pooled, strict=True) if p]
        return [torch.cat(joined) if joined else empty]
    return [part if p else empty for part, p in zip(parts, pooled, strict=True)]


def expected_reads(a, global_pool, strategy, pooled=None, guessed=False) -> list[set[float]]:
    """The possible full-reads values of each pool: 0 for an unpooled tensor's row (or a global pool
    of no tensor), 2 for a pool of
    at most DIRECT_POOL elements (b == 0 ones included), else the radix route's count (1 + 2 passes
    for float32 opmath, 1 + 4 for float64) or, with SELECT_AUTO, 1 when the sampled bracket held.
    ``guessed`` (SELECT_AUTO with guesses): also one more pass, the window that missed."""
    pooled = [True] * len(a) if pooled is None else list(pooled)

    def reads(xs) -> set[float]:
        if not xs:
            return {0.0}  # nothing pooled: nothing read
        total = sum(x.numel() for x in xs)
        if total <= DIRECT_POOL:
            return {2.0}
        radix = float(RADIX_READS[opmath_dtype(xs[0].dtype)])
        if strategy == ops.SELECT_RADIX:
            return {radix}
        return {1.0, 2.0, radix, radix + 1} if guessed else {1.0, radix}

    if global_pool:
        return [reads([x for x, p in zip(a, pooled, strict=True) if p])]
    return [reads([x]) if p else {0.0} for x, p in zip(a, pooled, strict=True)]


def lerp_from_sorted(xs: np.ndarray, q: float, *, fused: bool = False) -> float:
    """x_k + (r - k) * (x_k+1 - x_k) from ascending float64 values; `fused`: one rounding (an FMA)."""
    n = len(xs)
    if n == 0:
        return NAN
    r = q * (n - 1)
    k = min(math.floor(r), n - 1)
    frac = r - k
    lo = float(xs[k])
    if frac == 0.0 or k + 1 >= n:
        return lo
    hi = float(xs[k + 1])
    if lo == hi:
        return lo
    if fused and math.isfinite(lo) and math.isfinite(hi):
        return float(Fraction(lo) + Fraction(frac) * Fraction(hi - lo))
    return lo + frac * (hi - lo)


def same(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))


def explain(pool: torch.Tensor, q: float, got: float, want: float) -> str:
    """Why a threshold differs: the order statistics involved, and whether `got` is the FMA value."""
    xs = np.sort(pool.numpy())
    n = len(xs)
    if n == 0:
        return f"q={q!r}: empty pool, got {got!r}, want {want!r}"
    r = q * (n - 1)
    k = min(math.floor(r), n - 1)
    window = xs[k : k + 2].tolist()
    text = f"q={q!r} n={n} r={r!r} k={k} x_k,x_k+1={window}: got {got!r}, want {want!r}"
    fused = lerp_from_sorted(xs, q, fused=True)
    if same(got, fused) and not same(got, want):
        text += " (got is x_k + f*(x_k+1 - x_k) rounded once: an FMA contraction of the interpolation)"
    elif n > 0 and not (xs[0] <= got <= xs[-1]):
        text += f" (got is outside the pool's range [{xs[0]!r}, {xs[-1]!r}])"
    return text


_ORACLE_LIMIT = 300_000  # larger pools: the same formula on one np.sort (reference.quantile sorts per call)


def expected_quantile(xs: np.ndarray, q: float) -> float:
    """reference.quantile of the pool (given sorted: the oracle sorts again, faster on sorted input)."""
    if len(xs) <= _ORACLE_LIMIT:
        return reference.quantile(torch.from_numpy(xs), q)
    return lerp_from_sorted(xs, q)


def check_calls(a, b, scales, q_pairs, global_pool, strategy, msg, *, nonfinite=False, with_numpy=True, pooled=None,
                guesses=None):
    """For each (q_lo, q_hi): row i of the op's result must be
    [quantile(pool_i, q_lo), quantile(pool_i, q_hi), |pool_i|, flag, reads], the flag (1.0 or 0.0)
    the same in every row, reads as expected_reads says. Returns the results."""
    pools = expected_pools(a, b, scales, global_pool, pooled)
    reads = expected_reads(a, global_pool, strategy, pooled, guessed=guesses is not None)
    sorted_pools = [np.sort(p.numpy()) for p in pools]
    for pool, xs in zip(pools, sorted_pools, strict=True):
        if pool.numel() > _ORACLE_LIMIT:  # the shortcut must agree with the oracle
            q = q_pairs[0][0]
            assert same(reference.quantile(pool, q), lerp_from_sorted(xs, q)), msg
    errors = []
    outs = []
    flag = 1.0 if nonfinite else 0.0
    for q_lo, q_hi in q_pairs:
        out = thresholds(a, b, scales, q_lo, q_hi, global_pool, strategy, pooled=pooled, guesses=guesses)
        outs.append(out)
        want_shape = (len(pools), len(ops.THRESHOLD_COLUMNS))
        assert out.dtype == torch.float64 and tuple(out.shape) == want_shape, f"{msg}: shape {out.shape}"
        for i, (pool, xs, row) in enumerate(zip(pools, sorted_pools, out.tolist(), strict=True)):
            where = f"q=({q_lo}, {q_hi}) pool {i}"
            for col, q in ((LOWER, q_lo), (UPPER, q_hi)):
                want = expected_quantile(xs, q)
                if not same(row[col], want):
                    errors.append(f"{where} col {col}: {explain(pool, q, row[col], want)}")
                elif with_numpy and 0 < len(xs) <= _ORACLE_LIMIT and np.isfinite(xs[-1]):
                    np_q = float(np.quantile(xs, q, method="linear"))
                    if not math.isclose(row[col], np_q, rel_tol=1e-15, abs_tol=0.0):
                        errors.append(f"{where} col {col}: got {row[col]!r}, numpy {np_q!r}")
            if row[COUNT] != len(xs):
                errors.append(f"{where}: count {row[COUNT]} vs {len(xs)} defined scores")
            if row[FLAG] != flag:
                errors.append(f"{where}: non-finite flag {row[FLAG]}, want {flag} (in every row)")
            if row[READS] not in reads[i]:
                errors.append(f"{where}: full reads {row[READS]}, want one of {sorted(reads[i])}")
    assert not errors, (
        f"{msg} (strategy={strategy}, global={global_pool}, pooled={pooled}): {len(errors)} wrong values:\n"
        + "\n".join(errors[:8])
    )
    return outs


# ------------------------------------------------------------------------------------------------
# Exactness against reference.quantile and numpy
# ------------------------------------------------------------------------------------------------

PER_TENSOR_SIZES = (1, 2, 3, 10, 1000, DIRECT_POOL, DIRECT_POOL + 1, 100_003)


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("with_b", [False, True], ids=["abs", "second_order"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_per_tensor_pools_match_reference(seed, dtype, with_b, strategy):
    gen = torch.Generator().manual_seed(seed)
    a = [draw(n, dtype, gen, zero_frac=0.05) for n in PER_TENSOR_SIZES]
    b = [draw(n, opmath_dtype(dtype), gen, zero_frac=0.2, scale=0.1) for n in PER_TENSOR_SIZES] if with_b else []
    scales = [0.1 * (i + 1) for i in range(len(a))] if with_b else []
    q_pairs = [*Q_PAIRS, tuple(sorted(torch.rand(2, dtype=torch.float64, generator=gen).tolist()))]
    check_calls(a, b, scales, q_pairs, False, strategy, f"seed={seed}")


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("with_b", [False, True], ids=["abs", "second_order"])
@pytest.mark.parametrize(
    "dtypes,sizes",
    [
        (
            (torch.float32, torch.bfloat16, torch.float16, torch.float32),
            (7, 0, 1000, 3),
        ),  # under the direct path
        ((torch.float32, torch.bfloat16, torch.float16, torch.float32), (20000, 0, 13000, 5)),  # just over it
        ((torch.bfloat16, torch.float32), (150_001, 60_000)),
        ((torch.float64,), (100_003,)),
        ((torch.float64, torch.float64, torch.float64), (1, 40_000, 2)),
    ],
    ids=["small", "over_direct", "mixed_large", "f64", "f64_three"],
)
def test_global_pool_matches_reference(seed, dtypes, sizes, with_b, strategy):
    gen = torch.Generator().manual_seed(seed)
    a = [draw(n, d, gen, zero_frac=0.05) for d, n in zip(dtypes, sizes, strict=True)]
    b = [draw(n, opmath_dtype(d), gen, zero_frac=0.3) for d, n in zip(dtypes, sizes, strict=True)] if with_b else []
    scales = [0.1] * len(a) if with_b else []
    q_pairs = [*Q_PAIRS, tuple(sorted(torch.rand(2, dtype=torch.float64, generator=gen).tolist()))]
    check_calls(a, b, scales, q_pairs, True, strategy, f"seed={seed}")


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("global_pool", [False, True], ids=["per_tensor", "global"])
def test_pools_selected_with_every_thread(seed, strategy, global_pool):
    """Pools of >= 2**21 scores take the parallel path; a mix of large and small pools per call."""
    gen = torch.Generator().manual_seed(seed)
    sizes = (LARGE_POOL + 7, 5000, 3 * LARGE_POOL // 4)
    a = [draw(n, torch.float32, gen, zero_frac=0.1) for n in sizes]
    b = [draw(n, torch.float32, gen, zero_frac=0.1) for n in sizes]
    q_pairs = [
        (0.3, 0.6),
        (0.0, 1.0),
        tuple(sorted(torch.rand(2, dtype=torch.float64, generator=gen).tolist())),
    ]
    check_calls(a, [], [], q_pairs, global_pool, strategy, f"seed={seed} abs")
    check_calls(a, b, [0.1] * 3, q_pairs, global_pool, strategy, f"seed={seed} b")


def test_interpolation_is_rounded_like_the_reference(seed):
    """x_k + f * (x_k+1 - x_k) with three roundings, as reference.quantile (and the contract) does it;
    small pools make the interpolated part large, so a fused multiply-add would show in the last bit."""
    gen = torch.Generator().manual_seed(seed)
    bad = []
    for trial in range(300):
        x = torch.rand(5, generator=gen)
        q = torch.rand((), dtype=torch.float64, generator=gen).item()
        got = thresholds([x], [], [], q, q, False, ops.SELECT_AUTO)[0, LOWER].item()
        want = reference.quantile(x, q)
        if got != want:
            bad.append(f"trial {trial} x={x.tolist()} q={q!r}: {explain(x.double(), q, got, want)}")
    assert not bad, (
        f"seed={seed}: {len(bad)} of 300 differ (capability {ops.cpu_capability()}):\n" + "\n".join(bad[:3])
    )


def test_per_tensor_pools_may_mix_float64_and_float32(seed):
    """One pool per tensor never mixes types inside a pool; only a global pool has to refuse the mix."""
    gen = torch.Generator().manual_seed(seed)
    for dtypes in ((torch.float32, torch.float64), (torch.float64, torch.bfloat16, torch.float32)):
        for n in (100, 50_000):
            a = [draw(n + i, d, gen) for i, d in enumerate(dtypes)]
            b = [draw(n + i, opmath_dtype(d), gen, zero_frac=0.1) for i, d in enumerate(dtypes)]
            for strategy in STRATEGIES.values():
                msg = f"seed={seed} dtypes={dtypes} n={n}"
                check_calls(a, [], [], [(0.3, 0.6)], False, strategy, msg)
                check_calls(a, b, [0.1] * len(a), [(0.3, 0.6)], False, strategy, msg)


# ------------------------------------------------------------------------------------------------
# Pooled flags, guesses and the full-reads column
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("with_b", [False, True], ids=["abs", "second_order"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_unpooled_tensors_stay_out_of_every_pool(seed, dtype, with_b, strategy):
    """pooled[i] false: in per-tensor scope tensor i's row is (NaN, NaN, 0, flag, 0); in a global
    pool it is left out, so the thresholds are the oracle's over the pooled tensors only. The
    unpooled tensors are 1000x larger, so that including any of their scores would show."""
    gen = torch.Generator().manual_seed(seed)
    sizes = (1000, 7, DIRECT_POOL + 1, 100_003, 0, 20_000)
    pooled = [True, False, True, False, True, False]
    a = [draw(n, dtype, gen, zero_frac=0.05, scale=1.0 if p else 1000.0) for n, p in zip(sizes, pooled, strict=True)]
    b = [draw(n, opmath_dtype(dtype), gen, zero_frac=0.2, scale=0.1) for n in sizes] if with_b else []
    scales = [0.1 * (i + 1) for i in range(len(a))] if with_b else []
    q_pairs = [(0.3, 0.6), (0.0, 1.0), tuple(sorted(torch.rand(2, dtype=torch.float64, generator=gen).tolist()))]
    for glob in (False, True):
        msg = f"seed={seed} global={glob}"
        for out in check_calls(a, b, scales, q_pairs, glob, strategy, msg, pooled=pooled):
            if not glob:
                rows = out[[i for i, p in enumerate(pooled) if not p]]
                assert rows[:, :2].isnan().all() and (rows[:, COUNT:] == 0).all(), f"{msg}: {out.tolist()}"
        # Pooling only one tensor, or none: the global pool is that tensor's, or empty.
        check_calls(a, b, scales, q_pairs, glob, strategy, msg + " one", pooled=[False, False, True] + [False] * 3)
        check_calls(a, b, scales, q_pairs, glob, strategy, msg + " none", pooled=[False] * len(a))


@pytest.mark.parametrize("global_pool", [False, True], ids=["per_tensor", "global"])
def test_guesses_do_not_change_the_thresholds(seed, global_pool):
    """guesses are speed hints: any value of the right shape gives the oracle's thresholds. The CPU
    rewrites only the rows of pools it selected with SELECT_AUTO past DIRECT_POOL (the others:
    unpooled, gathered whole, or radix-selected, keep theirs)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = (3, 50_000, DIRECT_POOL + 9, 2000)
    a = [draw(n, torch.float32, gen, zero_frac=0.05) for n in sizes]
    b = [draw(n, torch.float32, gen, zero_frac=0.2, scale=0.1) for n in sizes]
    pools = 1 if global_pool else len(a)
    for guesses in (
        torch.zeros(pools, ops.GUESS_RANKS, dtype=torch.int64),
        torch.randint(0, 50_000, (pools, ops.GUESS_RANKS), dtype=torch.int64, generator=gen),
        torch.full((pools, ops.GUESS_RANKS), 2**62, dtype=torch.int64),
    ):
        before = guesses.clone()
        for strategy in STRATEGIES.values():
            check_calls(a, b, [0.1] * len(a), [(0.3, 0.6), (0.0, 1.0)], global_pool, strategy,
                        f"seed={seed} guesses={before.tolist()}", pooled=[True, True, False, True], guesses=guesses)
        kept_rows = [] if global_pool else [0, 2, 3]  # the global pool (52_003 scores) is rewritten
        assert torch.equal(guesses[kept_rows], before[kept_rows]), (
            f"seed={seed}: guesses {before.tolist()} -> {guesses.tolist()}")


@pytest.mark.parametrize("global_pool", [False, True], ids=["per_tensor", "global"])
def test_full_reads_column(seed, global_pool):
    """Passes over a pool's inputs: 2 for a pool of <= DIRECT_POOL elements (counted, then gathered
    whole), 1 + 2 radix passes for float32 / bfloat16 / float16 (float32 keys) and 1 + 4 for float64
    with SELECT_RADIX past that size, 1 with SELECT_AUTO when the sampled bracket holds the ranks
    (continuous scores: it does), 0 in an unpooled tensor's row."""
    gen = torch.Generator().manual_seed(seed)
    ones = torch.ones(1, dtype=torch.float64)
    yes = torch.ones(1, dtype=torch.bool)

    def reads(a, strategy, q=(0.3, 0.6), b=()):
        """The full-reads column of one pool holding a (a list: the tensors of a global pool)."""
        if global_pool:
            n = len(a)
            scales, pooled = torch.full((n,), 0.1, dtype=torch.float64), torch.ones(n, dtype=torch.bool)
            out = ops.element_thresholds(a, list(b), scales, pooled, *q, True, None, strategy)
        else:
            x = torch.cat(a) if len(a) > 1 else a[0]
            y = [torch.cat(b)] if b else []
            out = ops.element_thresholds([x], y, ones * 0.1, yes, *q, False, None, strategy)
        assert out.shape == (1, 5) and out[0, FLAG] == 0, f"seed={seed}: {out.tolist()}"
        return out[0, READS].item()

    for strategy in STRATEGIES.values():
        for dtype in FLOATS:
            for sizes in ((1,), (10,), (DIRECT_POOL,), (DIRECT_POOL - 5, 5)):
                a = [draw(n, dtype, gen) for n in sizes]
                assert reads(a, strategy) == 2, f"seed={seed} {dtype} sizes={sizes} strategy={strategy}"
            b = [draw(DIRECT_POOL, opmath_dtype(dtype), gen, zero_frac=0.5)]
            assert reads([draw(DIRECT_POOL, dtype, gen)], strategy, b=b) == 2, f"seed={seed} {dtype} with b"
    for dtype in FLOATS:
        want = RADIX_READS[opmath_dtype(dtype)]
        assert want == (5 if dtype == torch.float64 else 3)
        for sizes in ((DIRECT_POOL + 1,), (100_003,), (DIRECT_POOL, 1)):
            a = [draw(n, dtype, gen) for n in sizes]
            for q in ((0.3, 0.6), (0.0, 1.0), (0.5, 0.5)):
                msg = f"seed={seed} {dtype} sizes={sizes} q={q}"
                assert reads(a, ops.SELECT_RADIX, q) == want, f"{msg} radix"
                assert reads(a, ops.SELECT_AUTO, q) == 1, f"{msg} auto"
        # Past DIRECT_POOL by its element count, with b == 0 (undefined scores) almost everywhere.
        n = DIRECT_POOL + 100
        a, b = [draw(n, dtype, gen)], [draw(n, opmath_dtype(dtype), gen, zero_frac=0.999)]
        assert reads(a, ops.SELECT_RADIX, b=b) == want, f"seed={seed} {dtype} sparse b"
    # Unpooled: a row of its own (per-tensor scope) that nothing read.
    a = [draw(n, torch.float32, gen) for n in (100_003, 10)]
    out = ops.element_thresholds(a, [], torch.ones(2, dtype=torch.float64), torch.tensor([False, True]), 0.3, 0.6,
                                 global_pool, None, ops.SELECT_RADIX)
    assert out[:, READS].tolist() == ([2.0] if global_pool else [0.0, 2.0]), f"seed={seed}: {out.tolist()}"


# ------------------------------------------------------------------------------------------------
# Guessed windows: the previous call's windows, as an optimizer step hands them to the next
# ------------------------------------------------------------------------------------------------

GUESS_SIZES = (DIRECT_POOL + 1, 100_003, 3, 70_000)


def _key_of(x: float, dtype: torch.dtype) -> int:
    """The order-preserving key (bit pattern) of a non-negative score, as the CPU windows store it."""
    if dtype == torch.float64:
        return int(torch.tensor([x], dtype=torch.float64).view(torch.int64).item())
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32).item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_b", [False, True], ids=["abs", "second"])
@pytest.mark.parametrize("global_pool", [False, True], ids=["per_tensor", "global"])
def test_guessed_windows_follow_drifting_scores(seed, dtype, with_b, global_pool):
    """Eight calls on scores that change as an optimizer's do from one step to the next (a fresh
    gradient each call; the momentum moves 10% toward it; the scale shrinks by 2%), sharing one
    guesses tensor: every result is the oracle's, and the previous call's windows hold the ranks
    (one read) in most calls."""
    gen = torch.Generator().manual_seed(seed)
    om = opmath_dtype(dtype)
    a = [draw(n, dtype, gen, zero_frac=0.02) for n in GUESS_SIZES]
    b = [draw(n, om, gen, zero_frac=0.05, scale=0.1) for n in GUESS_SIZES] if with_b else []
    scales = [0.1] * len(a) if with_b else []
    guesses = torch.full((1 if global_pool else len(a), ops.GUESS_RANKS), -8, dtype=torch.int64)
    hits = calls = 0
    for call in range(8):
        q_pairs = [(0.0, 0.6)] if call % 3 else [(0.3, 0.6)]
        msg = f"seed={seed} {dtype} call {call}"
        outs = check_calls(a, b, scales, q_pairs, global_pool, ops.SELECT_AUTO, msg, guesses=guesses,
                           with_numpy=False)
        if call >= 2 and call % 3:  # the windows of a call with the same quantiles
            big = [0] if global_pool else [0, 1, 3]
            hits += sum(outs[0][i, READS].item() == 1.0 for i in big)
            calls += len(big)
        shrink = 0.98 ** (call + 1)
        fresh = [draw(x.numel(), dtype, gen, zero_frac=0.02, scale=shrink) for x in a]
        if with_b:
            for x, g in zip(b, fresh, strict=True):
                x.mul_(0.9).add_(g.to(om), alpha=0.1 * 0.1)
        a = fresh
    # Measured over 150 seeds (bfloat16, the noisiest): median 11 of 12, lowest 9 of 12.
    assert hits >= 0.5 * calls, f"seed={seed}: the windows held in {hits} of {calls} pools"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("global_pool", [False, True], ids=["per_tensor", "global"])
def test_guessed_windows_that_miss(seed, dtype, global_pool):
    """Windows that cannot hold the ranks (at 0, at +inf, below or above every score, around the
    wrong quantile, inverted, of the other float width) give the oracle's thresholds; a usable
    window that misses costs one read more than the sampled route, an unusable one nothing."""
    gen = torch.Generator().manual_seed(seed)
    a = [draw(n, dtype, gen) for n in (100_003, 60_000)]
    pools = 1 if global_pool else len(a)
    tiny, huge = _key_of(1e-30, dtype), _key_of(1e30, dtype)
    inf = _key_of(math.inf, dtype)
    lo_q = float(torch.cat(a).abs().double().quantile(0.05))
    wrong = (_key_of(lo_q * 0.99, dtype), _key_of(lo_q * 1.01, dtype))
    other_width = _key_of(1.0, torch.float64 if dtype == torch.float32 else torch.float32)
    windows = {
        "at 0": ((0, 0), True), "at inf": ((inf, inf), True), "below": ((0, tiny), True),
        "above": ((huge, inf), True), "wrong quantile": (wrong, True), "inverted": ((huge, tiny), False),
        "other width": ((other_width, other_width), dtype == torch.float64),
    }
    for name, ((lo, hi), usable) in windows.items():
        guesses = torch.tensor([[-8, -8, lo, hi]] * pools, dtype=torch.int64)  # q_hi's window
        (out,) = check_calls(a, [], [], [(0.0, 0.6)], global_pool, ops.SELECT_AUTO, f"seed={seed} {name}",
                             guesses=guesses, with_numpy=False)
        want = 2.0 if usable else 1.0
        assert out[:, READS].tolist() == [want] * pools, f"seed={seed} {name} {dtype}: {out.tolist()}"
        # The call left windows that hold (the same scores again: one read).
        (again,) = check_calls(a, [], [], [(0.0, 0.6)], global_pool, ops.SELECT_AUTO, f"seed={seed} {name} again",
                               guesses=guesses, with_numpy=False)
        assert again[:, READS].tolist() == [1.0] * pools, f"seed={seed} {name}: {again.tolist()}"


@pytest.mark.parametrize("kind", ["ties", "inf", "empty", "few"])
def test_guessed_windows_on_special_pools(seed, kind):
    """Ties at the quantile, +inf scores (finite inputs, b tiny), an empty pool (b == 0 everywhere)
    and a pool of three defined scores, each called four times with its windows, at several q."""
    gen = torch.Generator().manual_seed(seed)
    n = 150_001
    a = draw(n, torch.float32, gen)
    b = draw(n, torch.float32, gen, scale=0.1)
    if kind == "ties":
        b[torch.rand(n, generator=gen) < 0.5] = a[torch.rand(n, generator=gen) < 0.5][0] * 10  # c a / b - 1 == 0
        a[torch.rand(n, generator=gen) < 0.4] = 0.0  # scores of exactly 1
    elif kind == "inf":
        b[torch.rand(n, generator=gen) < 0.45] = 1e-45  # c a / b overflows: +inf scores
    elif kind == "empty":
        b.zero_()
    else:
        keep = torch.randperm(n, generator=gen)[:3]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[keep] = True
        b[~mask] = 0.0
    guesses = torch.full((1, ops.GUESS_RANKS), -8, dtype=torch.int64)
    for call in range(4):
        check_calls([a], [b], [0.1], [(0.0, 0.6), (0.3, 0.6), (0.6, 1.0), (0.5, 0.5)], False, ops.SELECT_AUTO,
                    f"seed={seed} {kind} call {call}", guesses=guesses, with_numpy=False)


# ------------------------------------------------------------------------------------------------
# Special pools: empty, single element, ties, +inf
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_empty_pools(seed, dtype, strategy):
    gen = torch.Generator().manual_seed(seed)
    sizes = (0, 1, 9, DIRECT_POOL + 5, 100_000)
    a = [draw(n, dtype, gen) for n in sizes]
    b = [torch.zeros(n, dtype=opmath_dtype(dtype)) for n in sizes]  # every score undefined
    for glob in (False, True):
        for out in check_calls(a, b, [0.1] * len(a), Q_PAIRS, glob, strategy, f"seed={seed}"):
            assert out[:, :2].isnan().all() and (out[:, COUNT:READS] == 0).all(), f"seed={seed}: {out.tolist()}"
    for out in check_calls([a[0]], [], [], Q_PAIRS, False, strategy, f"seed={seed} numel 0"):
        assert out[0, :2].isnan().all() and out[0, 2] == 0
    # Defined scores in one tensor only: the empty ones still get a NaN row of their own.
    b[3] = draw(sizes[3], opmath_dtype(dtype), gen)
    for glob in (False, True):
        check_calls(
            a, b, [0.1] * len(a), [(0.3, 0.6), (0.0, 1.0)], glob, strategy, f"seed={seed} one defined"
        )


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("total", [1, 7, 100_001])
def test_single_defined_score(seed, dtype, strategy, total):
    """A pool with one defined score, hidden among `total` elements whose b is 0."""
    gen = torch.Generator().manual_seed(seed)
    a = draw(total, dtype, gen)
    b = torch.zeros(total, dtype=opmath_dtype(dtype))
    j = int(torch.randint(0, total, (), generator=gen))
    b[j] = 0.37
    value = float(reference.second_order_element_scores(a[j : j + 1], b[j : j + 1], 0.1)[0])
    for out in check_calls([a], [b], [0.1], Q_PAIRS, False, strategy, f"seed={seed} j={j}"):
        assert out[0, :READS].tolist() == [value, value, 1.0, 0.0], f"seed={seed}"
    single = draw(1, dtype, gen)
    out = thresholds([single, single], [], [], 0.3, 0.6, False, strategy)
    assert out[:, :2].eq(float(single.to(opmath_dtype(dtype)).abs())).all(), f"seed={seed}: {out.tolist()}"


def _tie_qs(n: int, t: int, gen) -> list[float]:
    """Quantiles whose ranks land on, inside and just around a block of t tied scores at the bottom."""
    qs = [0.0, 1.0, 0.3, 0.6]
    if n > 1:
        for rank in (t - 1, t - 0.5, t, max(t - 2, 0) + 0.25):
            qs.append(min(1.0, max(0.0, rank / (n - 1))))
    qs += torch.rand(3, dtype=torch.float64, generator=gen).tolist()
    return qs


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("n", [1000, DIRECT_POOL + 1, 200_003])  # parallel-path ties: the 2**24 test
@pytest.mark.parametrize("kind", ["a0_score1", "zeros", "few_values", "all_equal", "ties_in_middle"])
def test_heavy_ties(seed, strategy, n, kind):
    gen = torch.Generator().manual_seed(seed)
    b, scales = [], []
    ties = 0
    if kind == "a0_score1":  # a == 0: score |0 - 1| = 1.0 exactly, 60% of the pool
        a = draw(n, torch.float32, gen)
        a[torch.rand(n, generator=gen) < 0.6] = 0.0
        b, scales = [draw(n, torch.float32, gen, zero_frac=0.05)], [0.1]
        ties = int((a == 0).sum())
    elif kind == "zeros":  # |a| == 0 for 70%: the bottom of the pool is one tie
        a = draw(n, torch.bfloat16, gen, zero_frac=0.7)
        ties = int((a == 0).sum())
    elif kind == "few_values":
        a = torch.randint(-3, 4, (n,), generator=gen).to(torch.float32) * 0.5
        ties = int((a == 0).sum())
    elif kind == "all_equal":
        a = torch.full((n,), -2.5, dtype=torch.float64)
        ties = n
    else:  # a 40% tie at the median of a continuous distribution
        a = draw(n, torch.float32, gen).abs()
        median = float(a.median())
        a[torch.rand(n, generator=gen) < 0.4] = median
        ties = int((a < median).sum())
    qs = _tie_qs(n, ties, gen)
    q_pairs = [(q, q) for q in qs] + [(0.0, qs[-1]), (qs[-2], 1.0)]
    check_calls([a], b, scales, q_pairs, False, strategy, f"seed={seed} {kind} ties={ties}")


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("n", [50, 100_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_inf_scores_from_finite_inputs(seed, dtype, strategy, n):
    """scale * a / b overflows: +inf scores from finite inputs; the flag stays 0."""
    gen = torch.Generator().manual_seed(seed)
    big = torch.finfo(dtype).max / 4
    a = draw(n, dtype, gen)
    b = draw(n, opmath_dtype(dtype), gen)
    hit = torch.rand(n, generator=gen) < 0.1
    hit[-1] = True
    a[hit] = big
    b[hit] = torch.finfo(opmath_dtype(dtype)).tiny
    pool = pool_parts([a], [b], [0.5])[0]
    n_inf = int(torch.isinf(pool).sum())
    assert n_inf >= 1
    top = (pool.numel() - n_inf) / (pool.numel() - 1)  # rank of the first +inf score
    below_top = top - 0.5 / (pool.numel() - 1)  # interpolates between the largest finite score and +inf
    q_pairs = [*Q_PAIRS, (0.5, top), (top, top), (0.9, 0.95), (0.99, 1.0), (min(0.5, below_top), below_top)]
    outs = check_calls([a], [b], [0.5], q_pairs, False, strategy, f"seed={seed} n_inf={n_inf}")
    for (_, q_hi), out in zip(q_pairs, outs, strict=True):
        if q_hi == 1.0:
            assert out[0, 1] == INF


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("n", [50, 100_003])
def test_inf_inputs_give_inf_scores_and_set_the_flag(seed, strategy, n):
    """a = +-inf: score +inf; the flag is set, and the thresholds are still those of the pool."""
    gen = torch.Generator().manual_seed(seed)
    a = draw(n, torch.float32, gen)
    idx = torch.randperm(n, generator=gen)[: max(1, n // 20)]
    a[idx] = torch.where(torch.rand(idx.numel(), generator=gen) < 0.5, INF, -INF)
    outs = check_calls([a], [], [], Q_PAIRS, False, strategy, f"seed={seed}", nonfinite=True)
    for (_, q_hi), out in zip(Q_PAIRS, outs, strict=True):
        if q_hi == 1.0:
            assert out[0, 1] == INF


# ------------------------------------------------------------------------------------------------
# Non-finite inputs: the flag (column 3). A NaN score (NaN in a or b, or inf / inf) can make the
# kernels read past the scores they gathered and crash, so every case runs in a child process: a
# crash fails that case, not the whole session.
# ------------------------------------------------------------------------------------------------

_NONFINITE_CHILD = r"""
import json, math, os, signal, sys, time
import torch
from rose_kernels import ops, reference

def build(c):
    dtype = getattr(torch, c["dtype"])
    om = reference.opmath_dtype(dtype)
    gen = torch.Generator().manual_seed(c["seed"])
    n = c["n"]
    a = torch.randn(n, dtype=torch.float64, generator=gen).to(dtype)
    b = torch.randn(n, dtype=torch.float64, generator=gen).to(om)
    m = min(n, 5000)  # the clean companion pool
    clean_a = torch.randn(m, dtype=torch.float64, generator=gen).to(dtype)
    clean_b = torch.randn(m, dtype=torch.float64, generator=gen).to(om)
    k = {"one": 1, "quarter": max(1, n // 4), "half": max(1, n // 2), "last": 1}[c["count"]]
    idx = torch.randperm(n, generator=gen)[:k]
    if c["count"] == "last":
        idx = torch.tensor([n - 1])
    what = c["what"]
    if what == "a_nan":
        a[idx] = math.nan
    elif what == "a_inf":
        a[idx] = math.inf * torch.where(torch.rand(k, generator=gen) < 0.5, 1.0, -1.0).to(dtype)
    elif what == "b_nan":
        b[idx] = math.nan
    elif what == "b_inf":
        b[idx] = math.inf * torch.where(torch.rand(k, generator=gen) < 0.5, 1.0, -1.0).to(om)
    elif what == "a_inf_b_inf":
        a[idx] = math.inf
        b[idx] = math.inf
    elif what == "a_nan_where_b_0":
        a[idx] = math.nan
        b[idx] = 0.0
    else:
        raise ValueError(what)
    uses_b = what.startswith("b") or "_b_" in what
    if uses_b:
        return [clean_a, a], [clean_b, b], [0.1, 0.1]
    return [clean_a, a], [], []

def run(c):
    a, b, scales = build(c)
    scales = torch.tensor(scales or [1.0, 1.0], dtype=torch.float64)
    pooled = torch.tensor([True, c["pooled"]])  # the bad tensor is a[1]
    out = ops.element_thresholds(a, b, scales, pooled, c["q_lo"], c["q_hi"], c["global_pool"], None, c["strategy"])
    clean = reference.second_order_element_scores(a[0], b[0], 0.1) if b else None
    pool = clean[0][clean[1]] if b else a[0].to(reference.opmath_dtype(a[0].dtype)).abs()
    want = [reference.quantile(pool, c["q_lo"]), reference.quantile(pool, c["q_hi"])]
    want += [float(pool.numel())]
    return {"rows": out.tolist(), "clean_want": want}

# The parent never runs an op (so no OpenMP pool exists when it forks); each case runs in a fork.
for c in json.loads(sys.stdin.read()):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.alarm(120)  # a hung case dies of SIGALRM
        try:
            res = run(c)
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        res = {"crash": f"killed by signal {sig} ({signal.Signals(sig).name})"}
    elif os.WEXITSTATUS(status) != 0 or not data:
        res = {"crash": f"exit status {os.WEXITSTATUS(status)}"}
    else:
        res = json.loads(data)
    print(c["id"], json.dumps(res), flush=True)
"""

_NONFINITE_WHATS = ("a_nan", "a_inf", "b_nan", "b_inf", "a_inf_b_inf", "a_nan_where_b_0")
_NONFINITE_SIZES = (16, 1000, DIRECT_POOL + 7, LARGE_POOL + 1)
_NONFINITE_QS = ((0.3, 0.6), (0.5, 1.0), (0.0, 1.0), (0.0, 0.0), (1.0, 1.0))
_NONFINITE_DTYPES = ("float32", "bfloat16", "float64", "float16")


def _nonfinite_cases(seed: int) -> list[dict]:
    """Cases with the non-finite values in a pooled tensor (per-tensor scope: its pool is selected
    next to a clean one), and in an unpooled tensor (only checked; per-tensor or global scope)."""
    cases = []
    for n in _NONFINITE_SIZES:
        for what in _NONFINITE_WHATS:
            for count in ("one", "quarter", "half", "last"):
                if n >= LARGE_POOL and count in ("quarter", "last"):
                    continue  # ~0.2 s per case at this size
                for pooled in (True, False):
                    for strategy_name, strategy in STRATEGIES.items():
                        if not pooled and (count in ("quarter", "last") or strategy != ops.SELECT_AUTO):
                            continue  # an unpooled tensor is only checked, whatever the strategy
                        i = len(cases)
                        q_lo, q_hi = _NONFINITE_QS[i % len(_NONFINITE_QS)]
                        dtype = _NONFINITE_DTYPES[(i // 2) % len(_NONFINITE_DTYPES)]
                        if n >= LARGE_POOL and dtype in ("float64", "float16"):
                            dtype = "float32"
                        global_pool = not pooled and i % 2 == 1
                        scope = "" if pooled else ("-unpooled-global" if global_pool else "-unpooled")
                        cid = f"n{n}-{what}-{count}-{strategy_name}{scope}"
                        cases.append(
                            dict(
                                id=cid,
                                seed=seed + i,
                                n=n,
                                what=what,
                                count=count,
                                strategy=strategy,
                                q_lo=q_lo,
                                q_hi=q_hi,
                                dtype=dtype,
                                pooled=pooled,
                                global_pool=global_pool,
                            )
                        )
    return cases


_NONFINITE_SEED = int.from_bytes(os.urandom(4), "little") % (1 << 30)
_NONFINITE_CASES = {c["id"]: c for c in _nonfinite_cases(_NONFINITE_SEED)}


@pytest.fixture(scope="module")
def nonfinite_results():
    """Runs every case in two child processes side by side (one per core)."""
    cases = list(_NONFINITE_CASES.values())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _NONFINITE_CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(json.dumps(cases[i::2]), timeout=600) for i, p in enumerate(procs)]
    results = {}
    for stdout, _ in outputs:
        for line in stdout.splitlines():
            cid, _, payload = line.partition(" ")
            if cid in _NONFINITE_CASES:
                results[cid] = json.loads(payload)
    if not results:
        errors = "\n".join(stderr[-2000:] for _, stderr in outputs)
        pytest.fail(
            f"the child processes produced nothing (status {[p.returncode for p in procs]}):\n{errors}"
        )
    return results


@pytest.mark.parametrize("case_id", list(_NONFINITE_CASES))
def test_nonfinite_inputs_set_the_flag(nonfinite_results, case_id):
    """The flag is one per call, in every row: set by a non-finite a of any tensor (pooled or not)
    and by a non-finite b of a pooled tensor; b of an unpooled tensor is never read. The clean
    pool's thresholds are untouched either way, and an unpooled tensor's row stays empty."""
    case = _NONFINITE_CASES[case_id]
    msg = f"seed={case['seed']} case={case}"
    res = nonfinite_results.get(case_id)
    assert res is not None, f"{msg}: no result (the child process died before this case)"
    assert "crash" not in res, f"{msg}: the process crashed: {res['crash']}"
    assert "error" not in res, f"{msg}: raised instead of reporting the non-finite input: {res['error']}"
    rows = res["rows"]
    assert len(rows) == (1 if case["global_pool"] else 2), f"{msg}: {rows}"
    flagged = case["pooled"] or case["what"] not in ("b_nan", "b_inf")
    flag = 1.0 if flagged else 0.0
    assert all(row[FLAG] == flag for row in rows), f"{msg}: flag column {[r[FLAG] for r in rows]}, want {flag}"
    clean = rows[0]
    # (exactness is tested above; here only that the bad tensor does not leak into the clean pool)
    assert all(
        same(x, y) or math.isclose(x, y, rel_tol=1e-15)
        for x, y in zip(clean[:FLAG], res["clean_want"], strict=True)
    ), f"{msg}: the clean pool's row {clean} != {res['clean_want']}"
    if not case["pooled"] and not case["global_pool"]:
        bad = rows[1]
        assert math.isnan(bad[LOWER]) and math.isnan(bad[UPPER]) and bad[COUNT] == 0 and bad[READS] == 0, (
            f"{msg}: the unpooled tensor's row {bad}"
        )


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("n", [16, 100_003])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_finite_inputs_do_not_set_the_flag(seed, dtype, strategy, n):
    gen = torch.Generator().manual_seed(seed)
    big = torch.finfo(dtype).max
    a = draw(n, dtype, gen)
    a[0], a[-1] = big, -big  # largest finite values are not "non-finite"
    b = draw(n, opmath_dtype(dtype), gen, zero_frac=0.3)
    b[1] = torch.finfo(opmath_dtype(dtype)).max
    for args in (([a], [], []), ([a], [b], [0.1])):
        out = thresholds(*args, 0.3, 0.6, False, strategy)
        assert out[0, FLAG] == 0, f"seed={seed}: {out.tolist()}"


@pytest.mark.parametrize("global_pool", [False, True], ids=["per_tensor", "global"])
@pytest.mark.parametrize("n", [16, 100_003])
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    ids=str,
)
def test_finite_unpooled_inputs_do_not_set_the_flag(seed, dtype, n, global_pool):
    """An unpooled tensor is only checked for non-finite values: its largest finite values (and any
    b) must not set the flag, as they do not in a pooled tensor."""
    gen = torch.Generator().manual_seed(seed)
    big = torch.finfo(dtype).max
    a = draw(n, dtype, gen)
    a[0], a[-1] = big, -big
    clean = draw(n, dtype, gen)
    b = [draw(n, opmath_dtype(dtype), gen), draw(n, opmath_dtype(dtype), gen, zero_frac=0.3)]
    b[1][1] = torch.finfo(opmath_dtype(dtype)).max
    for args in (([clean, a], [], []), ([clean, a], b, [0.1, 0.1])):
        for strategy in STRATEGIES.values():
            out = thresholds(*args, 0.3, 0.6, global_pool, strategy, pooled=[True, False])
            assert (out[:, FLAG] == 0).all(), f"seed={seed}: {out.tolist()}"
            pooled_out = thresholds(*args, 0.3, 0.6, global_pool, strategy, pooled=[True, True])
            assert (pooled_out[:, FLAG] == 0).all(), f"seed={seed} (pooled): {pooled_out.tolist()}"


# ------------------------------------------------------------------------------------------------
# Property tests: random pools against order statistics of np.sort
# ------------------------------------------------------------------------------------------------


def _values(rng: np.random.Generator, n: int, dist: str, dtype: torch.dtype) -> np.ndarray:
    decades = {torch.float64: 300, torch.float32: 37, torch.bfloat16: 37, torch.float16: 4}[dtype]
    if dist == "normal":
        x = rng.standard_normal(n)
    elif dist == "lognormal":  # magnitudes spanning many decades
        x = 10.0 ** rng.uniform(-decades, decades, n) * rng.choice([-1.0, 1.0], n)
    elif dist == "duplicates":
        x = rng.choice(rng.standard_normal(int(rng.integers(1, 40))), n)
    elif dist == "zeros":
        x = np.where(rng.random(n) < rng.random(), 0.0, rng.standard_normal(n))
    else:  # "integers"
        x = rng.integers(-4, 5, n).astype(np.float64)
    return x


def _tensor(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(x).to(dtype)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.one_of(st.integers(0, 40), st.integers(41, 40_000), st.integers(40_001, 200_000)),
    pieces=st.integers(1, 3),
    dist=st.sampled_from(["normal", "lognormal", "duplicates", "zeros", "integers"]),
    dtype=st.sampled_from(FLOATS),
    second_order=st.booleans(),
    global_pool=st.booleans(),
    q=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
    strategy=st.sampled_from(list(STRATEGIES.values())),
    unpooled=st.booleans(),
    guess=st.sampled_from(["none", "fresh", "random", "previous"]),
)
def test_property_matches_sorted_order_statistics(
    seed, n, pieces, dist, dtype, second_order, global_pool, q, strategy, unpooled, guess
):
    """Any pool, any quantiles, any route: no guesses, fresh ones, random keys, or the windows a
    call on other quantiles of the same pool left."""
    rng = np.random.default_rng(seed)
    q_lo, q_hi = sorted(q)
    cuts = sorted(rng.integers(0, n + 1, pieces - 1).tolist()) if n else [0] * (pieces - 1)
    sizes = np.diff([0, *cuts, n]).tolist()
    a = [_tensor(_values(rng, s, dist, dtype), dtype) for s in sizes]
    b, scales = [], []
    if second_order:
        om = opmath_dtype(dtype)
        b = [_tensor(_values(rng, s, rng.choice(["normal", "duplicates", "zeros"]), om), om) for s in sizes]
        scales = rng.choice([0.1, 1.0, 0.37], len(a)).tolist()
    # `unpooled`: a random subset of the tensors (possibly none, possibly all) stays out of the pools.
    pooled = (rng.random(len(a)) < 0.6).tolist() if unpooled else [True] * len(a)
    n_pools = 1 if global_pool else len(a)
    guesses = None
    if guess != "none":
        guesses = torch.full((n_pools, ops.GUESS_RANKS), -8, dtype=torch.int64)
    if guess == "random":
        guesses = torch.from_numpy(rng.integers(-8, 2**31, (n_pools, ops.GUESS_RANKS)))
    args = (a, b, f64(scales) if b else torch.ones(len(a), dtype=torch.float64), torch.tensor(pooled))
    if guess == "previous":
        ops.element_thresholds(*args, *sorted(rng.random(2).tolist()), global_pool, guesses, strategy)
    out = ops.element_thresholds(*args, q_lo, q_hi, global_pool, guesses, strategy)
    pools = expected_pools(a, b, scales, global_pool, pooled)
    reads = expected_reads(a, global_pool, strategy, pooled, guessed=guesses is not None)
    assert out.shape == (len(pools), len(ops.THRESHOLD_COLUMNS))
    for i, pool in enumerate(pools):
        xs = np.sort(pool.numpy())
        row = out[i].tolist()
        msg = f"seed={seed} pool {i} of {len(pools)} (n={len(xs)}, sizes={sizes}, pooled={pooled}, {dtype}, {dist})"
        for col, qq in ((LOWER, q_lo), (UPPER, q_hi)):
            want = lerp_from_sorted(xs, qq)
            assert same(row[col], want), f"{msg}: {explain(pool, qq, row[col], want)}"
        assert row[COUNT] == len(xs), f"{msg}: count {row[COUNT]}"
        assert row[FLAG] == 0, f"{msg}: flag {row[FLAG]}"
        assert row[READS] in reads[i], f"{msg}: full reads {row[READS]}, want one of {sorted(reads[i])}"


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(DIRECT_POOL + 1, 300_000),
    tie_frac=st.floats(0.0, 0.95),
    q=st.floats(0.0, 1.0),
    strategy=st.sampled_from(list(STRATEGIES.values())),
)
def test_property_ties_around_the_quantile(seed, n, tie_frac, q, strategy):
    """A block of equal scores placed at the wanted quantile: the sampled bracket collapses onto it."""
    rng = np.random.default_rng(seed)
    x = rng.lognormal(0.0, 2.0, n).astype(np.float32)
    tie_value = np.float32(np.quantile(x, q))
    x[rng.random(n) < tie_frac] = tie_value
    a = torch.from_numpy(x)
    out = thresholds([a], [], [], q, q, False, strategy)
    xs = np.sort(x.astype(np.float64))
    want = lerp_from_sorted(xs, q)
    assert same(out[0, 0].item(), want), (
        f"seed={seed}: {explain(torch.from_numpy(xs), q, out[0, 0].item(), want)}"
    )
    assert out[0, 0].item() == out[0, 1].item()


# ------------------------------------------------------------------------------------------------
# Large pools: beyond torch.quantile's 2**24 limit, and beyond 2**31 elements
# ------------------------------------------------------------------------------------------------


def _wanted(n: int, qs) -> list[int]:
    ranks = set()
    for q in qs:
        r = q * (n - 1)
        k = min(math.floor(r), n - 1)
        ranks.add(k)
        if k + 1 < n:
            ranks.add(k + 1)
    return sorted(ranks)


def _lerp_from_ranks(n: int, q: float, value_at) -> float:
    r = q * (n - 1)
    k = min(math.floor(r), n - 1)
    frac = r - k
    lo = value_at(k)
    if frac == 0.0 or k + 1 >= n:
        return lo
    hi = value_at(k + 1)
    if lo == hi:
        return lo
    return lo + frac * (hi - lo)


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_pool_beyond_torch_quantile_limit(seed, strategy, kind):
    """2**24 + 3 float32 scores in one pool (split over three tensors for the global scope)."""
    gen = torch.Generator().manual_seed(seed)
    n = 2**24 + 3
    a = torch.randn(n, generator=gen)
    if kind == "ties":
        a[torch.rand(n, generator=gen) < 0.45] = 0.5
        a[torch.rand(n, generator=gen) < 0.2] = 0.0
    scores = a.abs().numpy().astype(np.float64)
    qs = [0.0, 1.0, 0.3, 0.6, *torch.rand(2, dtype=torch.float64, generator=gen).tolist()]
    ranks = _wanted(n, qs)
    part = np.partition(scores, ranks)
    value = {r: float(part[r]) for r in ranks}
    cut = [0, n // 3, n // 3 + 5, n]
    pieces = [a[cut[i] : cut[i + 1]] for i in range(3)]
    radix = float(RADIX_READS[torch.float32])
    for q_lo, q_hi in ((qs[2], qs[3]), (qs[0], qs[1]), tuple(sorted(qs[4:]))):
        want = [_lerp_from_ranks(n, q, value.__getitem__) for q in (q_lo, q_hi)]
        for inputs, glob in (([a], False), (pieces, True)):
            # Without guesses, then twice with one guesses tensor: the first call writes the windows
            # the second reads (one pass when they hold, as they do for the same scores).
            guesses = torch.full((1, ops.GUESS_RANKS), -8, dtype=torch.int64)
            for call, hint in enumerate((None, guesses, guesses)):
                got = thresholds(inputs, [], [], q_lo, q_hi, glob, strategy, guesses=hint)[0].tolist()
                reads = {radix} | ({1.0} if strategy == ops.SELECT_AUTO else set())
                if call == 2 and strategy == ops.SELECT_AUTO and kind == "normal":
                    reads = {1.0}
                assert got[:READS] == [*want, float(n), 0.0] and got[READS] in reads, (
                    f"seed={seed} q=({q_lo}, {q_hi}) global={glob} call {call}: {got} vs {want}"
                )


def _available_memory_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return math.inf


@pytest.mark.skipif(_available_memory_gb() < 8, reason="needs ~6 GB of free memory")
def test_pool_beyond_int32_indexing():
    """One bfloat16 tensor of 2**31 + 5 elements (4.3 GB) with a known answer: a repeating pattern
    of 127 magnitudes (k / 4, alternating signs) whose counts are known, a unique 0 at index 2**31
    (the minimum) and a unique 100 at the last index (the maximum). Ranks, counts and element
    indices all exceed int32."""
    n = 2**31 + 5
    pattern = [(j + 1) / 4 * (-1) ** j for j in range(127)]  # exact in bfloat16
    period = len(pattern)
    t0 = time.perf_counter()
    block = torch.tensor(pattern, dtype=torch.bfloat16).repeat(1 << 16)
    assert block.float().tolist() == pattern * (1 << 16)
    a = torch.empty(n, dtype=torch.bfloat16)
    whole = n // block.numel()
    a[: whole * block.numel()].view(whole, -1).copy_(block.expand(whole, -1))
    a[whole * block.numel() :] = block[: n - whole * block.numel()]
    zero_at, big_at = 2**31, n - 1
    a[zero_at], a[big_at] = 0.0, 100.0
    build_s = time.perf_counter() - t0

    # Value counts of |a|: the pattern's counts, minus the two overwritten elements, plus 0 and 100.
    counts: dict[float, int] = {}
    full, rest = divmod(n, period)
    for j, v in enumerate(pattern):
        counts[abs(v)] = counts.get(abs(v), 0) + full + (1 if j < rest else 0)
    for idx in (zero_at, big_at):
        counts[abs(pattern[idx % period])] -= 1
    counts[0.0], counts[100.0] = 1, 1
    values = sorted(counts)
    ends = np.cumsum([counts[v] for v in values])  # ends[i]: first rank past value i
    assert ends[-1] == n

    def value_at(rank: int) -> float:
        return values[int(np.searchsorted(ends, rank, side="right"))]

    # q_mid: half-way between the last 16.25 and the first 16.5 (ranks ~1.1e9, interpolated);
    # q_top: between the last 31.75 (rank n - 2 > 2**31) and the unique 100 (rank n - 1).
    boundary = int(ends[values.index(16.25)]) - 1
    q_mid = (boundary + 0.5) / (n - 1)
    q_top = 1.0 - 0.25 / (n - 1)
    assert _lerp_from_ranks(n, q_mid, value_at) not in values
    assert _lerp_from_ranks(n, q_top, value_at) not in values
    calls = [
        (ops.SELECT_AUTO, 0.0, 1.0),
        (ops.SELECT_AUTO, q_mid, q_top),
        (ops.SELECT_AUTO, 0.3, 0.6),
        (ops.SELECT_RADIX, q_mid, q_top),  # ~20 s on 2 cores: two 16-bit histogram passes
    ]
    calls.insert(2, (ops.SELECT_AUTO, q_mid, q_top))  # again, from the windows of the call before
    guesses = torch.full((1, ops.GUESS_RANKS), -8, dtype=torch.int64)
    timings = []
    for strategy, q_lo, q_hi in calls:
        t = time.perf_counter()
        got = thresholds([a], [], [], q_lo, q_hi, False, strategy, guesses=guesses)[0].tolist()[:READS]
        timings.append(round(time.perf_counter() - t, 2))
        want = [_lerp_from_ranks(n, q, value_at) for q in (q_lo, q_hi)] + [float(n), 0.0]
        assert got == want, f"strategy={strategy} q=({q_lo!r}, {q_hi!r}): {got} vs {want}"
    # The other ops index the same tensor: sumsq (exact here: multiples of 1/16 in short fp32 blocks)
    # and the 1-bit mask.
    want_sumsq = sum(v * v * c for v, c in counts.items())
    assert ops.sumsq([a]).item() == want_sumsq
    mask = torch.empty((n + 7) // 8, dtype=torch.uint8)
    kept = ops.first_order_mask_([a], torch.tensor([[50.0, INF]], dtype=torch.float64), [mask])
    assert kept.item() == 1 and mask[-1].item() == 1 << ((n - 1) % 8) and int(mask[:-1].count_nonzero()) == 0
    kept = ops.first_order_mask_([a], torch.tensor([[0.0, 0.0]], dtype=torch.float64), [mask])
    assert kept.item() == 1 and mask[zero_at // 8].item() == 1 << (zero_at % 8)
    print(f"build {build_s:.1f} s, element_thresholds calls {timings} s")


def test_global_pool_beyond_int32_from_one_repeated_tensor(seed):
    """Always runs (64 MB): one float32 tensor of 2**24 elements passed 129 times in a global pool,
    2**31 + 2**24 scores. The pool is the tensor's multiset repeated, so the value at rank r is
    sorted(|a|)[r // 129]: exact expected quantiles, interpolated across ranks past 2**31. Pool
    counts and ranks exceed int32 (what test_pool_beyond_int32_indexing also covers for element
    indices in one tensor, when the machine has the memory)."""
    m, repeats = 2**24, 129
    n = m * repeats
    assert n > 2**31
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, generator=gen)
    base = np.sort(np.abs(a.numpy()).astype(np.float64))

    def value_at(rank: int) -> float:
        return float(base[rank // repeats])

    def q_between(j: int, step: int) -> float:
        """A quantile half-way between ranks j * repeats - 1 and j * repeats, the last copy of one
        value and the first of the next; j moves by `step` until those two values differ."""
        while base[j - 1] == base[j]:
            j += step
        return (j * repeats - 1 + 0.5) / (n - 1)

    q_past = q_between(2**31 // repeats + 1, 1)  # ranks just past 2**31
    q_top = q_between(m - 1, -1)  # ranks n - repeats - 1 and n - repeats
    assert math.floor(q_past * (n - 1)) >= 2**31
    calls = [
        (ops.SELECT_AUTO, 0.0, 1.0),
        (ops.SELECT_AUTO, q_past, q_top),
        (ops.SELECT_AUTO, 0.3, 0.6),
        (ops.SELECT_RADIX, q_past, q_top),
    ]
    guesses = torch.full((1, ops.GUESS_RANKS), -8, dtype=torch.int64)
    calls.insert(2, (ops.SELECT_AUTO, q_past, q_top))  # again, from the windows of the call before
    for call, (strategy, q_lo, q_hi) in enumerate(calls):
        want = [_lerp_from_ranks(n, q, value_at) for q in (q_lo, q_hi)] + [float(n), 0.0]
        out = ops.element_thresholds([a] * repeats, [], torch.ones(repeats, dtype=torch.float64),
                                     torch.ones(repeats, dtype=torch.bool), q_lo, q_hi, True, guesses, strategy)
        got = out[0].tolist()[:READS]
        reads = {1.0, 2.0, 3.0, 4.0} if strategy == ops.SELECT_AUTO else {3.0}
        if call == 2:
            reads = {1.0}
        assert out[0, READS].item() in reads, f"seed={seed} call {call}: {out}"
        assert got == want, f"seed={seed} strategy={strategy} q=({q_lo!r}, {q_hi!r}): {got} vs {want}"
    for q in (q_past, q_top):  # interpolated, strictly between two distinct pool values
        k = math.floor(q * (n - 1))
        assert value_at(k) < _lerp_from_ranks(n, q, value_at) < value_at(k + 1), f"seed={seed} q={q!r}"


@pytest.mark.parametrize("strategy", [ops.SELECT_AUTO, ops.SELECT_RADIX])
@pytest.mark.parametrize("q_lo, q_hi", [(0.3, 0.6), (0.0, 0.5), (0.5, 1.0), (0.0, 1.0)])
def test_few_defined_scores_in_a_large_pool(seed, strategy, q_lo, q_hi):
    # Past the direct-path size but with only a handful of defined scores (b == 0 elsewhere): the
    # wanted ranks include 0 and n - 1 while only interior quantiles are bracketed.
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(40_000, generator=gen)
    b = torch.zeros(40_000)
    where = torch.randperm(40_000, generator=gen)[:3]
    b[where] = torch.randn(3, generator=gen)
    out = ops.element_thresholds([a], [b], f64([0.1]), torch.tensor([True]), q_lo, q_hi, False, None, strategy)
    scores, defined = reference.second_order_element_scores(a, b, 0.1)
    pool = scores[defined]
    assert out[0, 2].item() == 3, f"seed={seed}"
    assert out[0, 0].item() == reference.quantile(pool, q_lo), f"seed={seed}"
    assert out[0, 1].item() == reference.quantile(pool, q_hi), f"seed={seed}"
    assert out[0, FLAG].item() == 0.0, f"seed={seed}"
    # The pool's size is its element count (b == 0 included): past DIRECT_POOL, so not gathered whole.
    assert out[0, READS].item() in expected_reads([a], False, strategy)[0], f"seed={seed}: {out.tolist()}"
