"""backend="cuda": the CUDA C++ kernels (csrc/cuda) against the CPU kernels, the tested oracle.

What is CUDA-specific; the whole-step tests against the reference run for this backend in
tests/test_triton.py (its `backend` fixture). Here:

- each op on CUDA tensors equals the same op on CPU copies: sumsq to rounding (float64 sums in
  another order), element_thresholds exactly (same order statistics, same float64 interpolation),
  first_order_mask_ bit for bit, masked_adamw_ to an ulp (same formulas, no contraction on either
  side), with sizes that cross the kernels' chunk boundaries and misaligned tensors (scalar path);
- a global pool of more than 2**31 scores;
- a few optimizer steps under compute-sanitizer's memcheck, when it is installed.

The module is skipped unless there is a CUDA GPU and the extension was built with the CUDA kernels
(``rose_kernels.ops.built_with_cuda()``). Every random input comes from the `seed` fixture.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    MODES,
    assert_bitwise_equal,
    assert_params_close,
    assert_state_close,
    cuda_backend_runs,
    randn,
)

if not cuda_backend_runs():
    pytest.skip("backend='cuda' needs a CUDA GPU and rose_kernels built with its CUDA kernels "
                "(rose_kernels.ops.built_with_cuda() is False or there is no GPU)", allow_module_level=True)

import rose_kernels  # noqa: E402
from rose_kernels.backends.fused import native_ops  # noqa: E402
from rose_kernels.backends.quantiles import new_guesses  # noqa: E402
from rose_kernels.dtypes import opmath_dtype  # noqa: E402
from rose_kernels.ops import HYPER_COLUMNS, SELECT_AUTO, SELECT_RADIX  # noqa: E402

OPS = native_ops()  # torch.ops.rose_kernels.<op>.default: the CUDA kernels for CUDA tensors, the oracle on CPU ones
CUDA = torch.device("cuda")
INF, NAN = math.inf, math.nan
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", "mixed": "mixed"}
# Around the kernels' chunks (4096 elements per block; 16384 per SELECT histogram block) and past
# a million elements; the ~300 small tensors below span several launch tables.
SIZES = (0, 1, 4095, 4097, 16385, 65537, (1 << 20) + 3)
N_SMALL = 300


def _dtypes(spec, count: int, rng: random.Random) -> list[torch.dtype]:
    """One dtype per tensor: the given one, or for "mixed" any of the three float32-opmath types."""
    if spec == "mixed":
        return [rng.choice([torch.float32, torch.bfloat16, torch.float16]) for _ in range(count)]
    return [spec] * count


def _sizes(rng: random.Random, *, small: int = N_SMALL) -> list[int]:
    sizes = list(SIZES) + [rng.choice([0, 1, 2, 3, 7, 8, 9, 15, 17, 31, 33, 63, 65, 129, 1000]) for _ in range(small)]
    rng.shuffle(sizes)
    return sizes


def _cuda(x: torch.Tensor | None, misalign: bool = False) -> torch.Tensor | None:
    """A CUDA copy of x; misaligned: a view one element into a larger buffer (not 16-byte aligned)."""
    if x is None:
        return None
    if not misalign or x.numel() == 0:
        return x.to(CUDA, copy=True)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=CUDA)
    view = buf[1:].view(x.shape)
    view.copy_(x)
    return view


def _wide(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Magnitudes over many decades (within the dtype's range), random signs."""
    decades = {torch.float64: 100.0, torch.float32: 30.0, torch.bfloat16: 30.0, torch.float16: 4.0}[dtype]
    exponent = (torch.rand(n, dtype=torch.float64, generator=gen) * 2 - 1) * decades
    sign = torch.where(torch.rand(n, dtype=torch.float64, generator=gen) < 0.5, -1.0, 1.0)
    return (sign * 10.0**exponent).to(dtype)


def _ties(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A handful of distinct values (with zeros): heavy ties among the scores."""
    values = torch.tensor([0.0, 0.25, -0.25, 0.5, 1.5, -3.0], dtype=torch.float64)
    return values[torch.randint(0, len(values), (n,), generator=gen)].to(dtype)


def _input(n: int, dtype: torch.dtype, gen: torch.Generator, style: str) -> torch.Tensor:
    if style == "normal":
        return randn((n,), dtype, gen, zero_frac=0.1)
    if style == "wide":
        return _wide(n, dtype, gen)
    if style == "ties":
        return _ties(n, dtype, gen)
    return torch.zeros(n, dtype=dtype)  # "zeros"


def _assert_rows_equal(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    """Columns 0-3 of element_thresholds (lower, upper, count, nonfinite) bit for bit; NaN == NaN."""
    assert got.shape == want.shape, f"{msg}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    g, w = got[:, :4].cpu(), want[:, :4]
    same = (g == w) | (g.isnan() & w.isnan())
    bad = (~same).any(dim=1).nonzero().flatten().tolist()
    assert not bad, f"{msg}: {len(bad)} of {len(g)} rows differ; first rows {bad[:5]}: {g[bad[:5]].tolist()} " \
                    f"vs CPU {w[bad[:5]].tolist()}"


# ------------------------------------------------------------------------------------------------
# sumsq
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, "mixed"],
                         ids=DTYPE_IDS.get)
def test_sumsq_matches_cpu(seed, dtype):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = _sizes(rng)
    dtypes = _dtypes(dtype, len(sizes), rng)
    xs = [_input(n, dt, gen, rng.choice(["normal", "normal", "wide", "ties", "zeros"])) for n, dt in
          zip(sizes, dtypes, strict=True)]
    misaligned = [rng.random() < 0.3 for _ in xs]
    got = OPS.sumsq([_cuda(x, mis) for x, mis in zip(xs, misaligned, strict=True)])
    assert got.device.type == "cuda" and got.dtype == torch.float64
    want = OPS.sumsq(xs)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0,
                               msg=lambda m: f"seed={seed} {DTYPE_IDS[dtype]}: {m}")
    # A non-finite element makes its tensor's sum non-finite (inf, or NaN for a NaN), as on the CPU.
    big = [i for i, x in enumerate(xs) if x.numel() > 0]
    i, j = rng.sample(big, 2)
    xs[i].view(-1)[rng.randrange(xs[i].numel())] = INF
    xs[j].view(-1)[rng.randrange(xs[j].numel())] = NAN
    got = OPS.sumsq([_cuda(x) for x in xs]).cpu()
    want = OPS.sumsq(xs)
    assert math.isinf(got[i]) and math.isnan(got[j]), f"seed={seed}: {got[i]} {got[j]}"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True, msg=lambda m: f"seed={seed}: {m}")


# ------------------------------------------------------------------------------------------------
# element_thresholds: exactly the CPU's order statistics and interpolation
# ------------------------------------------------------------------------------------------------


def _threshold_inputs(seed: int, dtype, second_order: bool, *, small: int = N_SMALL):
    """a, b, scales, pooled (CPU tensors) with ties, zeros, wide ranges and, for second-order
    scores, +inf scores from finite inputs (c g / m overflows) and undefined scores (m == 0)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = _sizes(rng, small=small)
    dtypes = _dtypes(dtype, len(sizes), rng)
    a, b = [], []
    for n, dt in zip(sizes, dtypes, strict=True):
        x = _input(n, dt, gen, rng.choice(["normal", "normal", "wide", "ties", "zeros"]))
        if second_order:
            om = opmath_dtype(dt)
            m = _input(n, om, gen, rng.choice(["normal", "wide", "ties"]))
            m[torch.rand(n, generator=gen) < 0.15] = 0.0  # undefined scores
            if n > 0 and rng.random() < 0.3:  # +inf scores: huge g over tiny m
                where = torch.rand(n, generator=gen) < 0.05
                # float64: g^2 stays finite (the CPU checks unpooled tensors by their sum of squares)
                x[where] = 1e150 if dt == torch.float64 else torch.finfo(dt).max / 2
                m[where] = 1e-200 if om == torch.float64 else torch.finfo(om).tiny * 4
            b.append(m)
        a.append(x)
    scales = torch.tensor([rng.choice([1.0, 0.1, 0.37, 3.0]) for _ in sizes], dtype=torch.float64)
    pooled = torch.tensor([rng.random() < 0.8 for _ in sizes])
    return a, b, scales, pooled


def _quantile_pairs(rng: random.Random) -> list[tuple[float, float]]:
    q = sorted((rng.random(), rng.random()))
    mid = rng.random()
    return [(0.0, 1.0), (q[0], q[1]), (mid, mid), (rng.choice([0.0, 0.1, 0.25]), rng.choice([0.5, 0.9, 1.0]))]


@pytest.mark.parametrize("global_pool", [False, True], ids=["per_tensor", "global"])
@pytest.mark.parametrize("second_order", [False, True], ids=["first", "second"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, "mixed"],
                         ids=DTYPE_IDS.get)
def test_element_thresholds_match_cpu(seed, dtype, second_order, global_pool):
    rng = random.Random(seed + 1)
    a, b, scales, pooled = _threshold_inputs(seed, dtype, second_order)
    misaligned = [rng.random() < 0.3 for _ in a]
    a_d = [_cuda(x, mis) for x, mis in zip(a, misaligned, strict=True)]
    b_d = [_cuda(x, mis) for x, mis in zip(b, misaligned, strict=False)]  # b is empty for first-order scores
    scales_d, pooled_d = scales.to(CUDA), pooled.to(CUDA)
    pools = 1 if global_pool else len(a)
    for k, (q_lo, q_hi) in enumerate(_quantile_pairs(rng)):
        strategy = SELECT_RADIX if k % 2 else SELECT_AUTO
        guesses = new_guesses(pools, CUDA) if k >= 2 else None  # speed hints only
        got = OPS.element_thresholds(a_d, b_d, scales_d, pooled_d, q_lo, q_hi, global_pool, guesses, strategy)
        want = OPS.element_thresholds(a, b, scales, pooled, q_lo, q_hi, global_pool)
        assert got.device.type == "cuda" and got.dtype == torch.float64
        assert (want[:, 3] == 0).all(), f"seed={seed}: the inputs should be finite"
        _assert_rows_equal(got, want, f"seed={seed} {DTYPE_IDS[dtype]} second={second_order} "
                                      f"global={global_pool} q=({q_lo!r}, {q_hi!r}) strategy={strategy}")


@pytest.mark.parametrize("second_order", [False, True], ids=["first", "second"])
def test_element_thresholds_deterministic_and_single_tensor_pools(seed, second_order):
    """The same call twice (a deterministic result) and a pool of one tensor of every size alone."""
    rng = random.Random(seed)
    a, b, scales, pooled = _threshold_inputs(seed, torch.float32, second_order, small=3)
    q_lo, q_hi = sorted((rng.random(), rng.random()))
    a_d, b_d = [_cuda(x) for x in a], [_cuda(x) for x in b]
    first = OPS.element_thresholds(a_d, b_d, scales.to(CUDA), pooled.to(CUDA), q_lo, q_hi, True)
    again = OPS.element_thresholds(a_d, b_d, scales.to(CUDA), pooled.to(CUDA), q_lo, q_hi, True)
    assert_bitwise_equal(first[:, :4], again[:, :4], f"seed={seed}: repeated call")
    for i in range(len(a)):
        bi = [b[i]] if second_order else []
        got = OPS.element_thresholds([a_d[i]], [_cuda(x) for x in bi], scales[i:i + 1].to(CUDA),
                                     torch.tensor([True], device=CUDA), q_lo, q_hi, False)
        want = OPS.element_thresholds([a[i]], bi, scales[i:i + 1], torch.tensor([True]), q_lo, q_hi, False)
        _assert_rows_equal(got, want, f"seed={seed} tensor of {a[i].numel()} elements alone q=({q_lo!r}, {q_hi!r})")


@pytest.mark.parametrize("where", ["a_pooled", "a_unpooled", "b_pooled", "b_unpooled"])
@pytest.mark.parametrize("bad", [INF, NAN], ids=["inf", "nan"])
@pytest.mark.parametrize("global_pool", [False, True], ids=["per_tensor", "global"])
def test_element_thresholds_nonfinite_flag_matches_cpu(seed, where, bad, global_pool):
    """Column 3 (every row) flags a non-finite element of any a, or of b of a pooled tensor."""
    rng = random.Random(seed)
    a, b, scales, pooled = _threshold_inputs(seed, torch.float32, True, small=20)
    candidates = [i for i, x in enumerate(a) if x.numel() > 0 and bool(pooled[i]) == where.endswith("_pooled")]
    if not candidates:
        pooled[0] = where.endswith("_pooled")
        gen = torch.Generator().manual_seed(seed)
        a[0], b[0] = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
        candidates = [0]
    i = rng.choice(candidates)
    target = a[i] if where.startswith("a") else b[i]
    target[rng.randrange(target.numel())] = bad
    got = OPS.element_thresholds([_cuda(x) for x in a], [_cuda(x) for x in b], scales.to(CUDA), pooled.to(CUDA),
                                 0.2, 0.8, global_pool).cpu()
    want = OPS.element_thresholds(a, b, scales, pooled, 0.2, 0.8, global_pool)
    flagged = where != "b_unpooled"
    assert want[:, 3].tolist() == [float(flagged)] * len(want), f"seed={seed}: the CPU oracle's flag"
    assert got[:, 3].tolist() == want[:, 3].tolist(), f"seed={seed} {where} {bad} in tensor {i}: {got[:, 3].tolist()}"


# ------------------------------------------------------------------------------------------------
# first_order_mask_: bit for bit
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, "mixed"],
                         ids=DTYPE_IDS.get)
def test_first_order_mask_matches_cpu(seed, dtype):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = _sizes(rng, small=100)
    dtypes = _dtypes(dtype, len(sizes), rng)
    grads = [_input(n, dt, gen, rng.choice(["normal", "wide", "ties", "zeros"]))
             for n, dt in zip(sizes, dtypes, strict=True)]
    nonempty = [i for i, g in enumerate(grads) if g.numel() > 0]
    for i in rng.sample(nonempty, 3):  # +-inf and NaN gradients: kept only by an infinite lo / never
        grads[i].view(-1)[rng.randrange(grads[i].numel())] = rng.choice([INF, -INF, NAN])
    rows = []
    for g in grads:
        scores = g.abs().to(torch.float64)
        x, y = sorted(float(scores[rng.randrange(g.numel())]) if g.numel() else 0.5 for _ in range(2))
        rows.append(rng.choice([(x, y), (x, x), (0.0, INF), (INF, INF), (0.0, 0.0), (NAN, NAN),
                                (x * (1 + 1e-12), y), (0.3, 1.1)]))
    bounds = torch.tensor(rows, dtype=torch.float64)
    garbage = [torch.randint(0, 256, ((g.numel() + 7) // 8,), dtype=torch.uint8, generator=gen) for g in grads]
    masks = [m.clone() for m in garbage]
    masks_d = [m.to(CUDA) for m in garbage]
    kept_d = OPS.first_order_mask_([_cuda(g, rng.random() < 0.3) for g in grads], bounds.to(CUDA), masks_d)
    kept = OPS.first_order_mask_(grads, bounds, masks)
    for i, (got, want) in enumerate(zip(masks_d, masks, strict=True)):
        assert_bitwise_equal(got, want, f"seed={seed} {DTYPE_IDS[dtype]} mask {i} ({grads[i].numel()} elements, "
                                        f"bounds {rows[i]})")
    assert torch.equal(kept_d.cpu(), kept), f"seed={seed}: kept counts {kept_d.cpu().tolist()} vs {kept.tolist()}"


# ------------------------------------------------------------------------------------------------
# masked_adamw_: the update to an ulp, counters and kept sums exactly
# ------------------------------------------------------------------------------------------------


def _update_case(seed: int, dtype, element: bool):
    """Every argument of masked_adamw_ on the CPU: random hyper-parameters per tensor (warm-up rows,
    correct_bias 0/1, weights of the first- and second-order masks), uniform masks, inline element
    second-order masks with thresholds that tie with scores, 1-bit first-order masks."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = _sizes(rng, small=40)
    if dtype == "mixed":
        dtypes = [rng.choice([torch.float32, torch.bfloat16, torch.float16]) for _ in sizes]
    else:
        dtypes = [dtype] * len(sizes)
    params, grads, exp_avgs, exp_avg_sqs, steps, bits, hyper, masks = [], [], [], [], [], [], [], []
    for n, dt in zip(sizes, dtypes, strict=True):
        params.append(randn((n,), dt, gen))
        g = randn((n,), dt, gen, zero_frac=0.1, scale=rng.choice([1e-3, 1.0, 30.0]))
        grads.append(g)
        om = torch.float64 if dt == torch.float64 else torch.float32
        m = randn((n,), om, gen, zero_frac=0.15, scale=rng.choice([1e-3, 1.0, 30.0]))
        exp_avgs.append(m)
        exp_avg_sqs.append(randn((n,), om, gen).square() * rng.choice([1e-6, 1.0, 1e3]))
        step = float(rng.randrange(0, 7))
        steps.append(torch.tensor(step, dtype=torch.float32))
        warmup = rng.choice([0.0, 0.0, step + 1, step + 3, max(step - 1, 0.0)])  # step + 1 <= warmup: warm-up
        w1, w2 = rng.choice([(0.0, 1.0), (1.0, 0.0), (0.3, 0.7), (0.162, 0.838)])
        element_second = element and rng.random() < 0.5
        scale = rng.choice([1.0, 0.1, 0.37])
        hyper.append([10.0 ** rng.uniform(-4, -1), rng.uniform(0.8, 0.95), rng.uniform(0.9, 0.9999),
                      rng.choice([1e-8, 1e-6]), rng.choice([0.0, 0.01, 0.1]), float(rng.random() < 0.7), warmup,
                      w1, w2, float(element_second), scale])
        bits.append(torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=gen)
                    if element and rng.random() < 0.5 else None)
        # Bounds of the inline mask: random, all, none (an empty pool), and ties with an actual score
        # (the opmath score c g / m, rounded as the kernels round it).
        scores = ((torch.tensor(scale, dtype=om) * g.to(om)) / m - 1).abs()
        defined = scores[(m != 0) & torch.isfinite(scores)]
        pick = [float(defined[rng.randrange(defined.numel())]) for _ in range(2)] if defined.numel() else [0.5, 1.0]
        lo, hi = rng.choice([tuple(sorted(pick)), (pick[0], pick[0]), (0.0, INF), (NAN, NAN), (0.2, 3.0)])
        masks.append([rng.choice([0.0, 1.0, 1.0]), rng.choice([0.0, 1.0, 1.0]), lo, hi])
    hyper_t = torch.tensor(hyper, dtype=torch.float64)
    assert hyper_t.shape[1] == len(HYPER_COLUMNS)
    return dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=steps,
                first_masks=bits, hyper=hyper_t, masks=torch.tensor(masks, dtype=torch.float64))


def _call_update(case: dict, found: int, element: bool) -> torch.Tensor:
    device = case["params"][0].device
    return OPS.masked_adamw_(case["params"], case["grads"], case["exp_avgs"], case["exp_avg_sqs"],
                             case["state_steps"], case["first_masks"], case["hyper"], case["masks"],
                             torch.tensor([found], dtype=torch.int32, device=device), element)


def _to_cuda_case(case: dict, rng: random.Random) -> dict:
    out = {}
    for key, value in case.items():
        if isinstance(value, list):
            out[key] = [_cuda(x, key in ("params", "grads", "exp_avgs", "exp_avg_sqs") and rng.random() < 0.3)
                        for x in value]
        else:
            out[key] = value.to(CUDA)
    return out


@pytest.mark.parametrize("element", [True, False], ids=["element", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, "mixed"],
                         ids=DTYPE_IDS.get)
def test_masked_adamw_matches_cpu(seed, dtype, element):
    """Within an ulp: the kernels share rose_math.h with the CPU, but the bias correction's float64
    pow is CUDA's (up to 2 ulp) on the device and glibc's on the host."""
    case = _update_case(seed, dtype, element)
    dev = _to_cuda_case(case, random.Random(seed + 1))
    out_d = _call_update(dev, 0, element)
    out = _call_update(case, 0, element)
    msg = f"seed={seed} {DTYPE_IDS[dtype]} element={element}"
    assert out_d.device.type == "cuda" and out_d.shape == out.shape
    for i, p in enumerate(case["params"]):
        where = f"{msg} tensor {i} ({p.numel()} elements, {p.dtype}, hyper {case['hyper'][i].tolist()}, " \
                f"masks {case['masks'][i].tolist()}, bits {case['first_masks'][i] is not None})"
        assert_params_close(dev["params"][i], p, where + " param", ulps=1.0)
        om = case["exp_avgs"][i].dtype
        assert_state_close(dev["exp_avgs"][i], case["exp_avgs"][i], om, where + " exp_avg")
        assert_state_close(dev["exp_avg_sqs"][i], case["exp_avg_sqs"][i], om, where + " exp_avg_sq")
        assert float(dev["state_steps"][i]) == float(case["state_steps"][i]), where + " step"
        assert dev["state_steps"][i].dtype == torch.float32, where
    out_d = out_d.cpu()
    assert torch.equal(out_d[:, 0], out[:, 0]), f"{msg}: kept {out_d[:, 0].tolist()} vs CPU {out[:, 0].tolist()}"
    torch.testing.assert_close(out_d[:, 1], out[:, 1], rtol=1e-6, atol=0, msg=lambda m: f"{msg} ||m||^2: {m}")

    # A set `found` flag: a no-op on the device (counters included); kept NaN, ||m||^2 as it is.
    before = {k: [x.clone() for x in dev[k]] for k in ("params", "exp_avgs", "exp_avg_sqs", "state_steps")}
    out_d = _call_update(dev, 1, element).cpu()
    out = _call_update(case, 1, element)
    for k, tensors in before.items():
        for i, (x, y) in enumerate(zip(tensors, dev[k], strict=True)):
            assert_bitwise_equal(y, x, f"{msg}: found set, {k}[{i}] changed")
    assert out_d[:, 0].isnan().all(), f"{msg}: kept with found set {out_d[:, 0].tolist()}"
    torch.testing.assert_close(out_d[:, 1], out[:, 1], rtol=1e-6, atol=0, msg=lambda m: f"{msg} found ||m||^2: {m}")


# ------------------------------------------------------------------------------------------------
# A global pool of more than 2**31 scores
# ------------------------------------------------------------------------------------------------


def _host_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return math.inf


@pytest.mark.gpu_heavy
def test_global_pool_beyond_int32(seed):
    """Two float32 tensors of 2**30 + 1000 elements (8.6 GB) in one first-order pool: counts and
    ranks past 2**31. The extreme quantiles are checked against torch's min/max of |a| on the GPU,
    a pair of interpolated quantiles (the upper one at a rank past 2**31) against the CPU op on host
    copies of the same tensors."""
    n = 2**30 + 1000
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs ~24 GB of free GPU memory, {free / 2**30:.1f} GB free")
    if _host_available_gb() < 24:
        pytest.skip("the CPU oracle needs ~24 GB of free host memory")
    rng = random.Random(seed)
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    a = [torch.randn(n, device=CUDA, generator=gen) for _ in range(2)]
    a[0][rng.randrange(7)::7] = 0.5  # ties
    a[1][rng.randrange(11)::11] = 0.0
    total = 2 * n
    ones = torch.ones(2, dtype=torch.float64, device=CUDA)
    pooled = torch.ones(2, dtype=torch.bool, device=CUDA)

    got = OPS.element_thresholds(a, [], ones, pooled, 0.0, 1.0, True).cpu()[0].tolist()
    lo = min(float(x.abs().min()) for x in a)
    hi = max(float(x.abs().max()) for x in a)
    assert got[:4] == [lo, hi, float(total), 0.0], f"seed={seed}: (0, 1) gave {got[:4]}, want {[lo, hi, total]}"

    q_lo = rng.uniform(0.2, 0.8)
    q_hi = 1.0 - rng.uniform(1.5, 900.0) / (total - 1)  # rank ~ total - 1 - x > 2**31
    assert math.floor(q_hi * (total - 1)) > 2**31
    got_auto = OPS.element_thresholds(a, [], ones, pooled, q_lo, q_hi, True, None, SELECT_AUTO).cpu()
    got_radix = OPS.element_thresholds(a, [], ones, pooled, q_lo, q_hi, True, None, SELECT_RADIX).cpu()
    host = [x.cpu() for x in a]
    del a
    want = OPS.element_thresholds(host, [], ones.cpu(), pooled.cpu(), q_lo, q_hi, True)
    del host
    msg = f"seed={seed} q=({q_lo!r}, {q_hi!r})"
    assert want[0, 2].item() == total and want[0, 3].item() == 0, f"{msg}: CPU oracle {want.tolist()}"
    _assert_rows_equal(got_auto, want, msg + " auto")
    _assert_rows_equal(got_radix, want, msg + " radix")


# ------------------------------------------------------------------------------------------------
# compute-sanitizer memcheck over a few optimizer steps
# ------------------------------------------------------------------------------------------------

_SANITIZED_STEPS = r"""
import sys

import torch

from rose_kernels import RoseAdamW
from rose_kernels.types import uses_first_order

seed = int(sys.argv[1])
gen = torch.Generator().manual_seed(seed)
shapes = [(1,), (7,), (4097,), (33, 65), (16385,), (0,), (9,), (3, 5)]
dtypes = [torch.float32, torch.bfloat16]  # alternating: two dtype groups per launch
for mode in {modes!r}:
    for scope in ("tensor", "global"):
        params = [torch.randn(s, generator=gen).to(dtypes[i % 2]).cuda() for i, s in enumerate(shapes)]
        opt = RoseAdamW([{{"params": params[:-1]}}, {{"params": params[-1:], "rose": False}}], lr=1e-2,
                        mode=mode, granularity="element", scope=scope, lower=10.0, upper=70.0,
                        nonfinite="skip", backend="cuda")
        for t in range(3):
            if uses_first_order(mode):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).cuda()
                opt.record_first_order()
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).cuda()
            if t == 2:
                params[2].grad.view(-1)[-1] = float("nan")  # a skipped step: the found flag
            opt.step()
        opt.mask_stats()
torch.cuda.synchronize()
print("sanitized steps done")
"""


def _compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "compute-sanitizer"), os.X_OK):
            return os.path.join(home, "bin", "compute-sanitizer")
    return None


# Its own time limit (bench/device_check.sh sets it below the cap of the stage that runs this test).
SANITIZER_TIMEOUT = float(os.environ.get("ROSE_SANITIZER_TIMEOUT") or 100)


def _sanitizer_unsupported(output: str, passed: bool) -> str | None:
    """The lines where compute-sanitizer says it cannot check here (e.g. «Device not supported» under
    gVisor, then error 999 at the first allocation), or None. "device not supported" always means
    nothing was checked; another "not supported" / "unsupported" line of the sanitizer's own
    (========= prefix) only counts when the run did not pass."""
    lines = [line.strip() for line in output.splitlines()]
    device = [line for line in lines if "device not supported" in line.lower()]
    if device:
        return "; ".join(device[:3])
    if passed:
        return None
    own = [line for line in lines if line.startswith("=")
           and ("not supported" in line.lower() or "unsupported" in line.lower())]
    return "; ".join(own[:3]) or None


def _run_in_own_group(cmd: list[str], env: dict, cwd: Path, timeout: float):
    """(CompletedProcess, timed out): ``cmd`` in a process group of its own, the whole group killed
    when it runs past ``timeout`` or this test is interrupted (ROSE_TEST_TIMEOUT's limit, SIGTERM):
    killing compute-sanitizer alone would leave its target running on the GPU into the next stage."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()  # what it wrote so far (the pipes close with the group)
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    finally:
        _kill_group(proc)  # whatever of the group outlived its leader
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.mark.gpu_heavy
def test_steps_under_compute_sanitizer_memcheck(seed):
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed (not on the PATH nor in CUDA_HOME/bin)")
    root = Path(rose_kernels.__file__).resolve().parents[1]  # the package this process imported
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # one allocation per tensor: out-of-bounds accesses are caught
    env.pop("TRITON_INTERPRET", None)
    cmd = [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c",
           _SANITIZED_STEPS.format(modes=MODES), str(seed)]
    proc, timed_out = _run_in_own_group(cmd, env, root, SANITIZER_TIMEOUT)
    output = proc.stdout + proc.stderr
    passed = (not timed_out and proc.returncode == 0 and "sanitized steps done" in proc.stdout
              and "ERROR SUMMARY: 0 errors" in output)
    unsupported = _sanitizer_unsupported(output, passed)
    if unsupported:
        pytest.skip(f"compute-sanitizer cannot check on this machine: {unsupported[:500]}")
    if timed_out:
        pytest.fail(f"seed={seed}: compute-sanitizer ran past {SANITIZER_TIMEOUT:g} s (ROSE_SANITIZER_TIMEOUT)\n"
                    f"{output[-3000:]}")
    assert proc.returncode == 0 and "sanitized steps done" in proc.stdout, (
        f"seed={seed}: memcheck exit {proc.returncode}\n{output[-6000:]}"
    )
    assert "ERROR SUMMARY: 0 errors" in output, f"seed={seed}:\n{output[-6000:]}"
