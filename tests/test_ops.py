"""The CPU custom ops one by one: schemas and fakes (opcheck), argument checks, sumsq accuracy,
first_order_mask_ bits, masked_adamw_'s `found` skip, and the CPU capability switch.

element_thresholds' exactness is tested in test_select.py; here it only appears in opcheck, in the
argument checks (scales, pooled, guesses included), in the guesses / scales contracts and in the
capability comparison.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch.library import opcheck
from torch.testing._internal.optests.aot_autograd import aot_autograd_check

from rose_kernels import ops, reference
from rose_kernels.dtypes import opmath_dtype

pytestmark = pytest.mark.skipif(not ops.available(), reason=f"extension not built: {ops.EXTENSION_ERROR}")

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
INF = math.inf
NAN = math.nan


def make_tables(n: int, **values: float) -> tuple[torch.Tensor, torch.Tensor]:
    """masked_adamw_'s float64 tables: ``hyper`` [n, 11] (ops.HYPER_COLUMNS) and ``masks`` [n, 4]
    (ops.MASK_COLUMNS), every row alike."""
    row = {
        "lr": 1e-3,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.01,
        "correct_bias": 1.0,
        "warmup_steps": 0.0,
        "weight_first": 0.0,
        "mask_first": 1.0,
        "weight_second": 1.0,
        "mask_second": 1.0,
        "element_second": 0.0,
        "lower": 0.0,
        "upper": INF,
        "scale": 0.1,
    }
    unknown = set(values) - set(row)
    assert not unknown, unknown
    row.update(values)
    assert len(ops.HYPER_COLUMNS) == 11 and len(ops.MASK_COLUMNS) == 4
    assert not set(ops.HYPER_COLUMNS) & set(ops.MASK_COLUMNS)
    assert set(ops.HYPER_COLUMNS) | set(ops.MASK_COLUMNS) == set(row)
    hyper = torch.tensor([[row[c] for c in ops.HYPER_COLUMNS]] * n, dtype=torch.float64).reshape(n, 11)
    masks = torch.tensor([[row[c] for c in ops.MASK_COLUMNS]] * n, dtype=torch.float64).reshape(n, 4)
    return hyper, masks


def found_flag(value: int = 0) -> torch.Tensor:
    """masked_adamw_'s ``found``: int32 [1]; non-zero makes the call a no-op."""
    return torch.tensor([value], dtype=torch.int32)


def update_args(n: int, *, found: int = 0, element: bool | None = None, first_masks=None, **values: float):
    """(hyper, masks, found, element): the arguments of masked_adamw_ after first_masks. `element`
    (the hint that some tensor may have a per-element mask) defaults to whether one has: an inline
    second-order mask (element_second) or a 1-bit first-order mask in `first_masks`."""
    hyper, masks = make_tables(n, **values)
    if element is None:
        element = values.get("element_second", 0.0) != 0 or any(m is not None for m in first_masks or ())
    return hyper, masks, found_flag(found), element


# Positions of masked_adamw_'s arguments.
P, G, M, V, S, FM, H, MK, FOUND, EL = range(10)


def adamw_inputs(dtypes, sizes, gen: torch.Generator, *, masks=None, steps=None):
    """Fresh (params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks) for masked_adamw_."""
    params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks = [], [], [], [], [], []
    for i, (dtype, n) in enumerate(zip(dtypes, sizes, strict=True)):
        om = opmath_dtype(dtype)
        params.append(torch.randn(n, dtype=torch.float64, generator=gen).to(dtype))
        grads.append(torch.randn(n, dtype=torch.float64, generator=gen).to(dtype))
        exp_avgs.append(torch.randn(n, dtype=torch.float64, generator=gen).to(om) * 0.1)
        exp_avg_sqs.append(torch.rand(n, dtype=torch.float64, generator=gen).to(om) * 0.01)
        state_steps.append(torch.tensor(float(steps[i] if steps else 0), dtype=torch.float32))
        if masks is not None and masks[i]:
            first_masks.append(torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=gen))
        else:
            first_masks.append(None)
    return params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks


def unpack_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    """LSB-first bits: bit j of byte j // 8 is element j."""
    return torch.from_numpy(np.unpackbits(mask.numpy(), bitorder="little")[:n].astype(bool))


@pytest.fixture
def restore_capability():
    yield
    ops.cpu_capability("auto")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake tensors, AOT dispatch
# ------------------------------------------------------------------------------------------------


def _opcheck(op, args, *, nan_outputs: bool = False):
    """torch.library.opcheck with its default test utils. Its AOTDispatcher check compares outputs
    with torch.testing.assert_close, for which NaN != NaN: for a call whose result holds NaN by
    design (an empty or unpooled threshold row, the kept column of a skipped update) that one check
    runs here, as opcheck runs it, with NaN == NaN."""
    if not nan_outputs:
        result = opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result
        return
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    result = opcheck(op, args, test_utils=utils)
    assert set(result) == set(utils) and all(v == "SUCCESS" for v in result.values()), result
    clone = functools.partial(torch.utils._pytree.tree_map_only, torch.Tensor, torch.clone)
    assert op(*clone(args)).isnan().any(), "nan_outputs=True for a call without NaN: use the plain opcheck"
    aot_autograd_check(
        lambda *a: op(*clone(a)), args, {}, dynamic=True, check_gradients="auto",
        assert_equals_fn=functools.partial(torch.testing.assert_close, equal_nan=True),
    )


@pytest.mark.parametrize(
    "dtypes,sizes",
    [
        ((torch.float32,), (7,)),
        ((torch.float64, torch.float32), (1025, 3)),
        ((torch.bfloat16, torch.float16, torch.float32), (65537, 5, 0)),
    ],
)
def test_opcheck_sumsq(seed, dtypes, sizes):
    gen = torch.Generator().manual_seed(seed)
    xs = [
        torch.randn(n, dtype=torch.float64, generator=gen).to(d) for d, n in zip(dtypes, sizes, strict=True)
    ]
    _opcheck(torch.ops.rose_kernels.sumsq.default, (xs,))


@pytest.mark.parametrize("with_guesses", [False, True], ids=["no_guesses", "guesses"])
@pytest.mark.parametrize("with_b", [False, True])
@pytest.mark.parametrize("global_pool", [False, True])
@pytest.mark.parametrize(
    "dtypes,sizes,pooled,strategy",
    [
        ((torch.float32,), (100,), (True,), ops.SELECT_AUTO),
        ((torch.float64, torch.float64), (33, 40000), (True, True), ops.SELECT_RADIX),
        ((torch.bfloat16, torch.float32, torch.float16), (40000, 7, 1), (True, False, True), ops.SELECT_AUTO),
        ((torch.float32, torch.float32), (5, 40000), (False, False), ops.SELECT_RADIX),
    ],
)
def test_opcheck_element_thresholds(seed, dtypes, sizes, pooled, strategy, global_pool, with_b, with_guesses):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(n, dtype=torch.float64, generator=gen).to(d) for d, n in zip(dtypes, sizes, strict=True)]
    b = [
        torch.randn(n, dtype=torch.float64, generator=gen).to(opmath_dtype(d))
        for d, n in zip(dtypes, sizes, strict=True)
    ]
    scales = torch.full((len(a),), 0.1, dtype=torch.float64)
    if not with_b:
        b, scales = [], torch.ones(len(a), dtype=torch.float64)
    pools = 1 if global_pool else len(a)
    guesses = torch.zeros(pools, ops.GUESS_RANKS, dtype=torch.int64) if with_guesses else None
    pooled_t = torch.tensor(pooled, dtype=torch.bool)
    args = (a, b, scales, pooled_t, 0.25, 0.75, global_pool, guesses, strategy)
    empty_pool = not any(pooled) if global_pool else not all(pooled)
    _opcheck(torch.ops.rose_kernels.element_thresholds.default, args, nan_outputs=empty_pool)


@pytest.mark.parametrize(
    "dtypes,sizes",
    [
        ((torch.float32,), (100,)),
        ((torch.float64, torch.bfloat16), (13, 65537)),
        ((torch.float16, torch.float32, torch.float32), (8, 1, 0)),
    ],
)
def test_opcheck_first_order_mask(seed, dtypes, sizes):
    gen = torch.Generator().manual_seed(seed)
    grads = [
        torch.randn(n, dtype=torch.float64, generator=gen).to(d) for d, n in zip(dtypes, sizes, strict=True)
    ]
    thresholds = torch.tensor([[0.2, 1.5]] * len(grads), dtype=torch.float64)
    masks = [torch.zeros((n + 7) // 8, dtype=torch.uint8) for n in sizes]
    _opcheck(torch.ops.rose_kernels.first_order_mask_.default, (grads, thresholds, masks))


@pytest.mark.parametrize("found", [0, 1], ids=["step", "skipped"])
@pytest.mark.parametrize(
    "dtypes,sizes,masks,table",
    [
        ((torch.float32,), (100,), (False,), {}),
        (
            (torch.float32, torch.bfloat16),
            (65537, 20),
            (True, False),
            {"weight_first": 0.5, "weight_second": 0.5},
        ),
        (
            (torch.float64, torch.float64),
            (9, 1),
            (True, True),
            {"element_second": 1.0, "lower": 0.1, "upper": 2.0},
        ),
        (
            (torch.bfloat16, torch.float16),
            (33, 64),
            (False, True),
            {"weight_first": 1.0, "weight_second": 0.0},
        ),
    ],
)
def test_opcheck_masked_adamw(seed, dtypes, sizes, masks, table, found):
    gen = torch.Generator().manual_seed(seed)
    args = adamw_inputs(dtypes, sizes, gen, masks=masks, steps=[3] * len(sizes))
    tail = update_args(len(sizes), found=found, first_masks=args[5], **table)
    _opcheck(torch.ops.rose_kernels.masked_adamw_.default, (*args, *tail), nan_outputs=found != 0)


def test_masked_adamw_increments_steps_and_returns_shape(seed):
    gen = torch.Generator().manual_seed(seed)
    args = adamw_inputs((torch.float32, torch.bfloat16), (10, 3), gen, steps=[0, 5])
    out = ops.masked_adamw_(*args, *update_args(2))
    assert out.shape == (2, 2) and out.dtype == torch.float64
    assert [s.item() for s in args[4]] == [1.0, 6.0], seed
    assert out[:, 0].tolist() == [10.0, 3.0], seed  # uniform mask 1: sum of mask values = numel


def test_masked_adamw_exp_avg_sumsq_is_as_accurate_as_sumsq(seed, restore_capability):
    """The update's second output, sum(new exp_avg ** 2), is the next step's ||m|| (tensor
    granularity): on 1e8 float32 elements, rows of 384 at 1e-3 scale with one row in ~170 a
    thousand times larger, it must match the float64 sum as sumsq does (the tolerance is sumsq's).
    fp32 lanes over whole 64 Ki chunks (the old kernel) absorbed the small squares after a large
    row: relative error 1.2e-5 (16 lanes) to 2.5e-5 (8 lanes); fp32 blocks added in float64 give
    5e-9 to 1.3e-8 (sumsq: 1.7e-8 to 4.3e-8)."""
    n, row = 10**8, 384
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, generator=gen).mul_(1e-3)
    rows = grads[: n // row * row].view(-1, row)
    rows[torch.rand(rows.shape[0], generator=gen) < 1 / 170] *= 1000.0
    params, exp_avgs, exp_avg_sqs = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    step = torch.tensor(0.0)
    tail = update_args(1, beta1=0.0)  # the new exp_avg is the gradient, bit for bit
    rtol = _sumsq_rtol(torch.float32)
    for name in _supported_capabilities():
        ops.cpu_capability(name.lower())
        out = ops.masked_adamw_([params], [grads], [exp_avgs], [exp_avg_sqs], [step], [None], *tail)
        got = out[0, 1].item()
        want = math.fsum(c.double().pow(2).sum().item() for c in exp_avgs.split(1 << 22))
        error = abs(got - want) / want
        assert error <= rtol, f"seed={seed} {name}: cached sum {got!r}, float64 sum {want!r}, rel error {error:.2e}"


@pytest.mark.parametrize("value", [3e19, 1e-25, 0.0])
@pytest.mark.parametrize("path", ["uniform", "frozen", "element"])
def test_masked_adamw_exp_avg_sumsq_keeps_float64_range(value, path, restore_capability):
    """As sumsq (test_sumsq_keeps_float64_range_for_finite_inputs): squares of a finite float32
    exp_avg beyond float32's range are neither inf nor 0 in the cached sum; all-zero blocks give 0.
    Every path leaves the new exp_avg equal to the gradient: beta1 = 0, or frozen with m = g."""
    n = 3 * 1024 + 5  # whole blocks of zeros, then blocks of `value`, then a partial block
    x = torch.full((n,), value)
    x[:1024] = 0.0
    tail = {
        "uniform": update_args(1, beta1=0.0),
        "frozen": update_args(1, mask_second=0.0),
        "element": update_args(1, beta1=0.0, element_second=1.0, lower=0.0, upper=INF),
    }[path]
    want = x.double().pow(2).sum().item()
    for name in _supported_capabilities():
        ops.cpu_capability(name.lower())
        m, v, p = x.clone(), torch.zeros(n), torch.zeros(n)
        out = ops.masked_adamw_([p], [x], [m], [v], [torch.tensor(0.0)], [None], *tail)
        assert torch.equal(m, x), f"{name} {path} {value}"
        assert math.isclose(out[0, 1].item(), want, rel_tol=1e-6, abs_tol=0.0), (
            f"{name} {path} [{value}] * {n - 1024}: got {out[0, 1].item()}, want {want}"
        )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor (NaN-safe exact comparison)."""
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("element", [False, True], ids=["uniform", "element"])
@pytest.mark.parametrize("found", [1, -1, 1 << 30])
def test_masked_adamw_found_flag_makes_the_call_a_no_op(seed, found, element):
    """found != 0 (a non-finite input was seen upstream): params, moments and step counters stay
    bit for bit, whatever the tables say; each row is (NaN, sum of squares of the unchanged
    exp_avg), the same float64 sum ops.sumsq gives. The same call with found = 0 does step."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = (torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32)
    sizes = (65537, 20, 9, 0, 1)
    first = (True, False, True, False, True)
    args = adamw_inputs(dtypes, sizes, gen, masks=first, steps=[0, 3, 7, 2, 1])
    args[G][0][5] = NAN  # the kind of input that sets found: it must not reach the state either
    args[G][1][3] = INF
    tail = update_args(
        len(sizes), found=found, element=element, first_masks=args[FM], weight_first=0.5, weight_second=0.5,
        element_second=float(element), lower=0.1, upper=2.0, warmup_steps=2.0,
    )
    control = [[t.clone() if t is not None else None for t in x] for x in args]
    before = [[t.clone() if t is not None else None for t in x] for x in args]
    tables = [t.clone() for t in tail[:3]]
    out = ops.masked_adamw_(*args, *tail)
    msg = f"seed={seed} found={found} element={element}"
    for pos, name in ((P, "params"), (G, "grads"), (M, "exp_avgs"), (V, "exp_avg_sqs"), (S, "state_steps"),
                      (FM, "first_masks")):
        for j, (a, b) in enumerate(zip(before[pos], args[pos], strict=True)):
            if a is None:
                assert b is None, f"{msg}: {name}[{j}]"
                continue
            assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), f"{msg}: {name}[{j}] changed"
    for a, b in zip(tables, tail[:3], strict=True):
        assert torch.equal(_bits(a), _bits(b)), f"{msg}: a table changed"
    assert out.shape == (len(sizes), 2) and out.dtype == torch.float64, msg
    assert out[:, 0].isnan().all(), f"{msg}: kept column {out[:, 0].tolist()}"
    sums = ops.sumsq(args[M])
    assert torch.equal(out[:, 1], sums), f"{msg}: {out[:, 1].tolist()} vs sumsq {sums.tolist()}"
    for i, m in enumerate(args[M]):
        want = math.fsum(m.double().pow(2).tolist())
        assert math.isclose(out[i, 1].item(), want, rel_tol=_sumsq_rtol(m.dtype), abs_tol=0.0), (
            f"{msg}: tensor {i}: {out[i, 1].item()} vs {want}"
        )
    # The control: found = 0 on the same inputs (finite grads) changes the state and counts the step.
    control[G][0][5], control[G][1][3] = 0.5, -0.5
    done = ops.masked_adamw_(*control, *update_args(
        len(sizes), found=0, element=element, first_masks=control[FM], weight_first=0.5, weight_second=0.5,
        element_second=float(element), lower=0.1, upper=2.0, warmup_steps=2.0,
    ))
    assert [s.item() for s in control[S]] == [s.item() + 1 for s in before[S]], msg
    assert not done[:, 0].isnan().any(), msg
    for j in (0, 1, 4):  # in warmup (mask 1), or mu1 = 1 with weight 0.5 (bf16 params may round back)
        assert not torch.equal(control[M][j], before[M][j]), f"{msg}: exp_avgs[{j}] did not move with found = 0"


# ------------------------------------------------------------------------------------------------
# Bad inputs: RuntimeError with a message that says what is wrong
# ------------------------------------------------------------------------------------------------


def _f(n=10, dtype=torch.float32):
    return torch.randn(n, dtype=torch.float64).to(dtype)


def _noncontig(n=10, dtype=torch.float32):
    x = torch.randn(n, 2, dtype=torch.float64).to(dtype)[:, 0]
    assert not x.is_contiguous()
    return x


BAD_SUMSQ = {
    "int": (
        lambda: [torch.arange(10, dtype=torch.int32)],
        r"sumsq: tensors\[0\] must be float32, float64.*got Int",
    ),
    "int64 second": (lambda: [_f(), torch.arange(3)], r"tensors\[1\] must be float32.*got Long"),
    "complex": (
        lambda: [torch.randn(4, dtype=torch.complex64)],
        r"tensors\[0\] must be float32.*ComplexFloat",
    ),
    "bool": (lambda: [torch.ones(4, dtype=torch.bool)], r"tensors\[0\] must be float32.*got Bool"),
    "noncontiguous": (lambda: [_f(), _noncontig()], r"sumsq: tensors\[1\] must be contiguous"),
    "sparse": (lambda: [_f().to_sparse()], r"SparseCPU"),
}


@pytest.mark.parametrize("case", sorted(BAD_SUMSQ))
def test_sumsq_bad_inputs(case):
    make, match = BAD_SUMSQ[case]
    with pytest.raises(RuntimeError, match=match):
        ops.sumsq(make())


def _f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def _et(a=None, b=None, scales=None, pooled=None, q_lo=0.25, q_hi=0.75, global_pool=False, guesses=None,
        strategy=ops.SELECT_AUTO):
    """A call of element_thresholds; scales (float64 [n], 0.1 each by default) and pooled (bool [n],
    all set by default) may be given as Python lists, converted here."""
    a = [_f(10)] if a is None else a
    b = [] if b is None else b
    scales = torch.full((len(a),), 0.1, dtype=torch.float64) if scales is None else scales
    scales = _f64(*scales) if isinstance(scales, list) else scales
    pooled = torch.ones(len(a), dtype=torch.bool) if pooled is None else pooled
    pooled = torch.tensor(pooled, dtype=torch.bool) if isinstance(pooled, list) else pooled
    return lambda: ops.element_thresholds(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses, strategy)


def _guesses(rows, cols=ops.GUESS_RANKS, dtype=torch.int64):
    return torch.zeros(rows, cols, dtype=dtype)


BAD_THRESHOLDS = {
    "int a": (
        _et(a=[torch.arange(10, dtype=torch.int32)]),
        r"element_thresholds: a\[0\] must be float32.*got Int",
    ),
    "complex a": (
        _et(a=[_f(), torch.randn(3, dtype=torch.complex128)]),
        r"a\[1\] must be float32.*ComplexDouble",
    ),
    "noncontiguous a": (_et(a=[_noncontig()]), r"a\[0\] must be contiguous"),
    "noncontiguous b": (_et(a=[_f(10)], b=[_noncontig(10)]), r"b\[0\] must be contiguous"),
    "float64 b for float32 a": (
        _et(a=[_f(10)], b=[_f(10, torch.float64)]),
        r"b\[0\] must be Float.*got Double",
    ),
    "bf16 b for bf16 a": (
        _et(a=[_f(10, torch.bfloat16)], b=[_f(10, torch.bfloat16)]),
        r"b\[0\] must be Float \(the opmath type of a\[0\]\), got BFloat16",
    ),
    "float32 b for float64 a": (
        _et(a=[_f(10, torch.float64)], b=[_f(10)]),
        r"b\[0\] must be Double.*got Float",
    ),
    "int b": (_et(a=[_f(10)], b=[torch.ones(10, dtype=torch.int32)]), r"b\[0\] must be Float.*got Int"),
    "numel mismatch": (_et(a=[_f(10)], b=[_f(9)]), r"b\[0\] has 9 elements, a\[0\] has 10"),
    "numel mismatch of an unpooled tensor": (
        _et(a=[_f(10), _f(4)], b=[_f(10), _f(5)], pooled=[True, False]),
        r"b\[1\] has 5 elements, a\[1\] has 4",
    ),
    "b list length": (
        _et(a=[_f(10), _f(4)], b=[_f(10)]),
        r"b must be empty or have one tensor per a \(2\), got 1",
    ),
    "scales length": (
        _et(a=[_f(10), _f(4)], b=[_f(10), _f(4)], scales=[0.1]),
        r"element_thresholds: scales must have shape \[2\], got \[1\]",
    ),
    "scales empty without b": (
        _et(a=[_f(10)], b=[], scales=torch.empty(0, dtype=torch.float64)),
        r"scales must have shape \[1\], got \[0\]",
    ),
    "scales 2-d": (_et(scales=torch.ones(1, 1, dtype=torch.float64)), r"scales must have shape \[1\], got \[1, 1\]"),
    "scales float32": (
        _et(scales=torch.full((1,), 0.1)),
        r"scales must be a contiguous Double tensor on cpu, got Float on cpu",
    ),
    "scales noncontiguous": (
        _et(a=[_f(10), _f(4)], scales=torch.ones(2, 2, dtype=torch.float64)[:, 0]),
        r"scales must be a contiguous Double tensor on cpu",
    ),
    "scales list": (
        lambda: ops.element_thresholds([_f(10)], [], [1.0], torch.ones(1, dtype=torch.bool), 0.25, 0.75, False),
        r"Expected a value of type 'Tensor' for argument 'scales'",
    ),
    "nonfinite scale": (_et(a=[_f(10)], b=[_f(10)], scales=[INF]), r"scales must be finite, got inf"),
    "nan scale": (_et(a=[_f(10)], b=[_f(10)], scales=[NAN]), r"scales must be finite"),
    "nan scale of a pooled tensor next to an unpooled one": (
        _et(a=[_f(10), _f(4)], b=[_f(10), _f(4)], scales=[0.1, NAN], pooled=[False, True]),
        r"scales must be finite, got nan",
    ),
    "pooled float32": (
        _et(pooled=torch.ones(1)),
        r"pooled must be a contiguous Bool tensor on cpu, got Float on cpu",
    ),
    "pooled uint8": (_et(pooled=torch.ones(1, dtype=torch.uint8)), r"pooled must be a contiguous Bool.*got Byte"),
    "pooled length": (
        _et(a=[_f(10), _f(4)], pooled=torch.ones(3, dtype=torch.bool)),
        r"pooled must have shape \[2\], got \[3\]",
    ),
    "pooled noncontiguous": (
        _et(a=[_f(10), _f(4)], pooled=torch.ones(2, 2, dtype=torch.bool)[:, 0]),
        r"pooled must be a contiguous Bool tensor on cpu",
    ),
    "pooled list": (
        lambda: ops.element_thresholds([_f(10)], [], _f64(1.0), [True], 0.25, 0.75, False),
        r"Expected a value of type 'Tensor' for argument 'pooled'",
    ),
    "guesses int32": (
        _et(guesses=_guesses(1, dtype=torch.int32)),
        r"guesses must be a contiguous Long tensor on cpu, got Int on cpu",
    ),
    "guesses float64": (_et(guesses=_guesses(1, dtype=torch.float64)), r"guesses must be a contiguous Long.*Double"),
    "guesses 3 columns": (_et(guesses=_guesses(1, 3)), r"guesses must have shape \[1, 4\], got \[1, 3\]"),
    "guesses 1-d": (_et(guesses=torch.zeros(4, dtype=torch.int64)), r"guesses must have shape \[1, 4\], got \[4\]"),
    "guesses per tensor in a global pool": (
        _et(a=[_f(10), _f(4)], global_pool=True, guesses=_guesses(2)),
        r"guesses must have shape \[1, 4\], got \[2, 4\]",
    ),
    "guesses of one pool for two tensors": (
        _et(a=[_f(10), _f(4)], global_pool=False, guesses=_guesses(1)),
        r"guesses must have shape \[2, 4\], got \[1, 4\]",
    ),
    "guesses noncontiguous": (
        _et(guesses=torch.zeros(1, 8, dtype=torch.int64)[:, ::2]),
        r"guesses must be a contiguous Long tensor on cpu",
    ),
    "q_lo > q_hi": (_et(q_lo=0.6, q_hi=0.3), r"q_lo \(0.6\) must not exceed q_hi \(0.3\)"),
    "q_lo < 0": (_et(q_lo=-0.1), r"q_lo must be a quantile in \[0, 1\], got -0.1"),
    "q_hi > 1": (_et(q_hi=1.5), r"q_hi must be a quantile in \[0, 1\], got 1.5"),
    "q_lo nan": (_et(q_lo=NAN), r"q_lo must be a quantile in \[0, 1\]"),
    "q_hi inf": (_et(q_hi=INF), r"q_hi must be a quantile in \[0, 1\]"),
    "strategy 2": (_et(strategy=2), r"unknown strategy 2"),
    "strategy -1": (_et(strategy=-1), r"unknown strategy -1"),
    "global mix of float64 and float32": (
        _et(a=[_f(10), _f(5, torch.float64)], global_pool=True),
        r"a global pool cannot mix float64 with lower-precision tensors",
    ),
    "global mix of bf16 and float64": (
        _et(a=[_f(10, torch.float64), _f(5, torch.bfloat16)], global_pool=True),
        r"a global pool cannot mix float64",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_THRESHOLDS))
def test_element_thresholds_bad_inputs(case):
    call, match = BAD_THRESHOLDS[case]
    with pytest.raises(RuntimeError, match=match):
        call()


def test_element_thresholds_scales_checked_only_where_used(seed):
    """Scales are finite-checked only for pooled tensors, and only when b is given (first-order
    calls pass ones): a non-finite scale elsewhere is accepted and changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(n, dtype=torch.float64, generator=gen).float() for n in (50, 40)]
    b = [torch.randn(n, dtype=torch.float64, generator=gen).float() for n in (50, 40)]
    pooled = torch.tensor([True, False])
    for glob in (False, True):
        want = ops.element_thresholds(a, b, _f64(0.1, 0.1), pooled, 0.3, 0.6, glob)
        got = ops.element_thresholds(a, b, _f64(0.1, INF), pooled, 0.3, 0.6, glob)
        assert torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0)), f"seed={seed}: {got} vs {want}"
        want = ops.element_thresholds(a, [], _f64(1.0, 1.0), torch.ones(2, dtype=torch.bool), 0.3, 0.6, glob)
        got = ops.element_thresholds(a, [], _f64(NAN, -INF), torch.ones(2, dtype=torch.bool), 0.3, 0.6, glob)
        assert torch.equal(got, want), f"seed={seed}: scales used without b: {got} vs {want}"


@pytest.mark.parametrize("global_pool", [False, True], ids=["per_tensor", "global"])
@pytest.mark.parametrize("strategy", [ops.SELECT_AUTO, ops.SELECT_RADIX], ids=["auto", "radix"])
def test_element_thresholds_accepts_guesses_and_leaves_them(seed, global_pool, strategy):
    """guesses of the right shape are accepted and never change a result: whatever they hold, the
    thresholds are those of a call without guesses. The CPU writes the next call's windows into the
    rows of the pools it computed by a window route (the 40,000-score pool; a 100-score pool is
    gathered whole and needs none), leaves the other rows (a tensor outside every pool), and under
    SELECT_RADIX, which takes no hints, neither reads nor writes them."""
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(n, dtype=torch.float64, generator=gen).float() for n in (100, 40_000, 3)]
    b = [torch.randn(x.numel(), generator=gen) for x in a]
    scales = _f64(0.1, 0.2, 0.3)
    pooled = torch.tensor([True, True, False])
    pools = 1 if global_pool else len(a)
    want = ops.element_thresholds(a, b, scales, pooled, 0.3, 0.6, global_pool, None, strategy)
    windowed = [0] if global_pool else [1]
    for guesses in (
        torch.zeros(pools, ops.GUESS_RANKS, dtype=torch.int64),
        torch.randint(-(2**40), 2**40, (pools, ops.GUESS_RANKS), dtype=torch.int64, generator=gen),
        torch.full((pools, ops.GUESS_RANKS), -1, dtype=torch.int64),
    ):
        before = guesses.clone()
        got = ops.element_thresholds(a, b, scales, pooled, 0.3, 0.6, global_pool, guesses, strategy)
        # Columns 0-3 are the result; column 4 (full reads) reports the route taken.
        assert torch.equal(got[:, :4].nan_to_num(-1.0), want[:, :4].nan_to_num(-1.0)), (
            f"seed={seed} guesses={before.tolist()}: {got.tolist()} vs {want.tolist()}"
        )
        if strategy == ops.SELECT_RADIX:
            assert torch.equal(guesses, before), f"seed={seed}: radix wrote guesses: {guesses.tolist()}"
            continue
        if not global_pool:
            assert torch.equal(guesses[2], before[2]), f"seed={seed}: the unpooled row changed: {guesses.tolist()}"
        for row in windowed:
            assert not torch.equal(guesses[row], before[row]), f"seed={seed}: no window written: {guesses.tolist()}"
        again = ops.element_thresholds(a, b, scales, pooled, 0.3, 0.6, global_pool, guesses, strategy)
        assert torch.equal(again[:, :4].nan_to_num(-1.0), want[:, :4].nan_to_num(-1.0)), f"seed={seed}: own windows"
        assert (again[windowed, 4] == 1.0).all(), f"seed={seed}: own windows did not hold: {again[:, 4].tolist()}"


def _fm(grads=None, bounds=None, masks=None):
    grads = [_f(10), _f(3, torch.bfloat16)] if grads is None else grads
    if bounds is None:
        bounds = torch.tensor([[0.1, 1.0]] * len(grads), dtype=torch.float64)
    masks = [torch.zeros((g.numel() + 7) // 8, dtype=torch.uint8) for g in grads] if masks is None else masks
    return lambda: (ops.first_order_mask_(grads, bounds, masks), masks)


_TWO_MASKS = [torch.zeros(2, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8)]
BAD_FIRST_ORDER = {
    "int grads": (
        _fm(grads=[torch.arange(10, dtype=torch.int64)]),
        r"first_order_mask_: grads\[0\] must be float32",
    ),
    "complex grads": (
        _fm(grads=[torch.randn(10, dtype=torch.complex64)]),
        r"grads\[0\] must be float32.*Complex",
    ),
    "noncontiguous grads": (_fm(grads=[_f(10), _noncontig(3)]), r"grads\[1\] must be contiguous"),
    "fewer masks": (_fm(masks=[torch.zeros(2, dtype=torch.uint8)]), r"got 2 grads but 1 masks"),
    "more masks": (_fm(masks=[*_TWO_MASKS, torch.zeros(1, dtype=torch.uint8)]), r"got 2 grads but 3 masks"),
    "bounds rows": (
        _fm(bounds=torch.zeros(1, 2, dtype=torch.float64)),
        r"first_order_mask_: bounds must have shape \[2, 2\], got \[1, 2\]",
    ),
    "bounds cols": (
        _fm(bounds=torch.zeros(2, 3, dtype=torch.float64)),
        r"bounds must have shape \[2, 2\], got \[2, 3\]",
    ),
    "bounds 1-d": (
        _fm(bounds=torch.zeros(4, dtype=torch.float64)),
        r"bounds must have shape \[2, 2\], got \[4\]",
    ),
    "bounds float32": (
        _fm(bounds=torch.zeros(2, 2)),
        r"bounds must be a contiguous Double tensor on cpu, got Float on cpu",
    ),
    "bounds noncontiguous": (
        _fm(bounds=torch.zeros(2, 2, dtype=torch.float64).t()),
        r"bounds must be a contiguous Double tensor on cpu",
    ),
    "mask bytes too many": (
        _fm(masks=[torch.zeros(3, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8)]),
        r"masks\[0\] must be a uint8 tensor of 2 bytes \(1 bit per element\), got Byte with 3 elements",
    ),
    "mask bytes too few": (
        _fm(grads=[_f(9)], masks=[torch.zeros(1, dtype=torch.uint8)]),
        r"masks\[0\] must be a uint8 tensor of 2 bytes .*with 1 elements",
    ),
    "mask one byte per element": (
        _fm(grads=[_f(10)], masks=[torch.zeros(10, dtype=torch.uint8)]),
        r"masks\[0\] must be a uint8 tensor of 2 bytes .*with 10 elements",
    ),
    "mask bool": (
        _fm(masks=[torch.zeros(2, dtype=torch.bool), _TWO_MASKS[1]]),
        r"masks\[0\] must be a uint8 tensor of 2 bytes \(1 bit per element\), got Bool",
    ),
    "mask int8": (
        _fm(masks=[_TWO_MASKS[0], torch.zeros(1, dtype=torch.int8)]),
        r"masks\[1\] must be a uint8 tensor of 1 bytes \(1 bit per element\), got Char",
    ),
    "mask noncontiguous": (
        _fm(grads=[_f(10)], masks=[torch.zeros(2, 2, dtype=torch.uint8)[:, 0]]),
        r"masks\[0\] must be contiguous",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FIRST_ORDER))
def test_first_order_mask_bad_inputs(case):
    call, match = BAD_FIRST_ORDER[case]
    with pytest.raises(RuntimeError, match=match):
        call()


def _adamw_case(edit):
    """A valid masked_adamw_ call on (float32[10], bfloat16[9]) edited by `edit(args)`."""

    def call(gen, found):
        args = list(adamw_inputs((torch.float32, torch.bfloat16), (10, 9), gen, masks=(True, False)))
        args.extend(update_args(2, found=found, first_masks=args[FM], weight_first=0.5, weight_second=0.5))
        edit(args)
        return args

    return call


def _set(pos, i, value):
    def edit(args):
        if i is None:
            args[pos] = value
        else:
            args[pos][i] = value(args[pos][i]) if callable(value) else value

    return edit


BAD_ADAMW = {
    "one grad missing": (
        _adamw_case(lambda a: a[G].pop()),
        r"must have one entry per parameter; got 2, 1, 2, 2, 2, 2",
    ),
    "extra exp_avg": (
        _adamw_case(lambda a: a[M].append(_f(10))),
        r"one entry per parameter; got 2, 2, 3, 2, 2, 2",
    ),
    "one state_step missing": (_adamw_case(lambda a: a[S].pop()), r"one entry per parameter"),
    "one first_mask missing": (_adamw_case(lambda a: a[FM].pop()), r"one entry per parameter"),
    "hyper rows": (
        _adamw_case(_set(H, None, make_tables(3)[0])),
        r"masked_adamw_: hyper must have shape \[2, 11\], got \[3, 11\]",
    ),
    "hyper cols (the old 15-column table)": (
        _adamw_case(_set(H, None, torch.zeros(2, 15, dtype=torch.float64))),
        r"hyper must have shape \[2, 11\], got \[2, 15\]",
    ),
    "hyper float32": (
        _adamw_case(_set(H, None, make_tables(2)[0].float())),
        r"hyper must be a contiguous Double tensor on cpu, got Float on cpu",
    ),
    "hyper noncontiguous": (
        _adamw_case(_set(H, None, torch.zeros(11, 2, dtype=torch.float64).t())),
        r"hyper must be a contiguous Double tensor on cpu",
    ),
    "masks rows": (
        _adamw_case(_set(MK, None, make_tables(3)[1])),
        r"masked_adamw_: masks must have shape \[2, 4\], got \[3, 4\]",
    ),
    "masks cols": (
        _adamw_case(_set(MK, None, torch.zeros(2, 2, dtype=torch.float64))),
        r"masks must have shape \[2, 4\], got \[2, 2\]",
    ),
    "masks float32": (
        _adamw_case(_set(MK, None, make_tables(2)[1].float())),
        r"masks must be a contiguous Double tensor on cpu, got Float on cpu",
    ),
    "masks noncontiguous": (
        _adamw_case(_set(MK, None, torch.zeros(4, 2, dtype=torch.float64).t())),
        r"masks must be a contiguous Double tensor on cpu",
    ),
    "found int64": (
        _adamw_case(_set(FOUND, None, torch.zeros(1, dtype=torch.int64))),
        r"found must be a contiguous Int tensor on cpu, got Long on cpu",
    ),
    "found bool": (
        _adamw_case(_set(FOUND, None, torch.ones(1, dtype=torch.bool))),
        r"found must be a contiguous Int tensor on cpu, got Bool",
    ),
    "found float32": (
        _adamw_case(_set(FOUND, None, torch.ones(1))),
        r"found must be a contiguous Int tensor on cpu, got Float",
    ),
    "found two elements": (
        _adamw_case(_set(FOUND, None, torch.zeros(2, dtype=torch.int32))),
        r"found must have shape \[1\], got \[2\]",
    ),
    "found 0-d": (
        _adamw_case(_set(FOUND, None, torch.tensor(1, dtype=torch.int32))),
        r"found must have shape \[1\], got \[\]",
    ),
    "int params": (
        _adamw_case(_set(P, 0, torch.zeros(10, dtype=torch.int32))),
        r"params\[0\] must be float32",
    ),
    "complex params": (
        _adamw_case(_set(P, 1, torch.zeros(9, dtype=torch.complex64))),
        r"params\[1\] must be float32.*ComplexFloat",
    ),
    "grad dtype": (
        _adamw_case(_set(G, 0, lambda g: g.double())),
        r"grads\[0\] is Double but params\[0\] is Float",
    ),
    "bf16 exp_avg for bf16 params": (
        _adamw_case(_set(M, 1, lambda m: m.bfloat16())),
        r"exp_avgs\[1\] and exp_avg_sqs\[1\] must be Float for BFloat16 params",
    ),
    "bf16 exp_avg_sq for bf16 params": (
        _adamw_case(_set(V, 1, lambda m: m.bfloat16())),
        r"exp_avg_sqs\[1\] must be Float for BFloat16 params",
    ),
    "float64 exp_avg for float32 params": (
        _adamw_case(_set(M, 0, lambda m: m.double())),
        r"must be Float for Float params",
    ),
    "numel mismatch grads": (
        _adamw_case(_set(G, 0, _f(11))),
        r"params\[0\] has 10 elements but grads/exp_avgs/exp_avg_sqs have 11/10/10",
    ),
    "numel mismatch exp_avg_sq": (
        _adamw_case(_set(V, 1, torch.zeros(8))),
        r"params\[1\] has 9 elements but grads/exp_avgs/exp_avg_sqs have 9/9/8",
    ),
    "int state_step": (
        _adamw_case(_set(S, 0, torch.tensor(0, dtype=torch.int64))),
        r"state_steps\[0\] must be a one-element floating-point tensor on cpu",
    ),
    "two-element state_step": (
        _adamw_case(_set(S, 1, torch.zeros(2))),
        r"state_steps\[1\] must be a one-element",
    ),
    "first mask byte count": (
        _adamw_case(_set(FM, 0, torch.zeros(1, dtype=torch.uint8))),
        r"first_masks\[0\] must be a uint8 tensor of 2 bytes",
    ),
    "first mask dtype": (
        _adamw_case(_set(FM, 1, torch.zeros(2, dtype=torch.bool))),
        r"first_masks\[1\] must be a uint8 tensor of 2 bytes",
    ),
    "first mask noncontiguous": (
        _adamw_case(_set(FM, 0, torch.zeros(2, 2, dtype=torch.uint8)[:, 0])),
        r"first_masks\[0\] must be contiguous",
    ),
    "noncontiguous params": (_adamw_case(_set(P, 0, _noncontig(10))), r"params\[0\] must be contiguous"),
    "noncontiguous grads": (
        _adamw_case(_set(G, 1, _noncontig(9, torch.bfloat16))),
        r"grads\[1\] must be contiguous",
    ),
    "noncontiguous exp_avg": (_adamw_case(_set(M, 0, _noncontig(10))), r"exp_avgs\[0\] must be contiguous"),
    "noncontiguous exp_avg_sq": (
        _adamw_case(_set(V, 1, _noncontig(9))),
        r"exp_avg_sqs\[1\] must be contiguous",
    ),
}


@pytest.mark.parametrize("found", [0, 1], ids=["found0", "found1"])
@pytest.mark.parametrize("case", sorted(BAD_ADAMW))
def test_masked_adamw_bad_inputs_leave_state_untouched(seed, case, found):
    """Every check runs before anything is written, and before a set `found` skips the step."""
    make, match = BAD_ADAMW[case]
    args = make(torch.Generator().manual_seed(seed), found)
    before = [[t.clone() if isinstance(t, torch.Tensor) else t for t in x] for x in args[:6]]
    with pytest.raises(RuntimeError, match=match):
        ops.masked_adamw_(*args)
    # Checks run before anything is written: params, moments and step counters are unchanged.
    for pos in (P, M, V, S):
        for j, (a, b) in enumerate(zip(before[pos], args[pos], strict=False)):
            if a.dtype == b.dtype and a.shape == b.shape:
                assert torch.equal(a, b), f"seed={seed} {case}: input {pos}[{j}] changed"


# ------------------------------------------------------------------------------------------------
# sumsq
# ------------------------------------------------------------------------------------------------

SUMSQ_SIZES = (0, 1, 7, 1023, 1024, 1025, 65535, 65536, 65537, 200003)


def _sumsq_rtol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-6


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("size", SUMSQ_SIZES)
def test_sumsq_matches_float64_sum(seed, dtype, size):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(size, dtype=torch.float64, generator=gen) * 3 + 1).to(dtype)
    got = ops.sumsq([x])
    assert got.shape == (1,) and got.dtype == torch.float64
    want = x.to(torch.float64).pow(2).sum().item()
    assert math.isclose(got.item(), want, rel_tol=_sumsq_rtol(dtype), abs_tol=0.0), (seed, got.item(), want)


def test_sumsq_many_tensors_one_call(seed):
    """Tensors of every size and dtype in one call: chunks never leak into a neighbour's sum."""
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for size in SUMSQ_SIZES:
        for dtype in FLOATS:
            scale = 10.0 ** torch.randint(-3, 4, (), generator=gen).item()
            xs.append((torch.randn(size, dtype=torch.float64, generator=gen) * scale).to(dtype))
    got = ops.sumsq(xs).tolist()
    for i, x in enumerate(xs):
        want = x.to(torch.float64).pow(2).sum().item()
        assert math.isclose(got[i], want, rel_tol=_sumsq_rtol(x.dtype), abs_tol=0.0), (
            f"seed={seed} tensor {i} ({x.dtype}, {x.numel()}): {got[i]} vs {want}"
        )


def test_sumsq_multidimensional_and_exact_small_integers():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    assert ops.sumsq([x]).item() == sum(i * i for i in range(24))
    assert ops.sumsq([x.bfloat16()[:, :2].contiguous()]).item() == float(x[:, :2].double().pow(2).sum())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("size", [1, 9, 65536, 65537 + 8])
@pytest.mark.parametrize(
    "bad,want", [(INF, INF), (-INF, INF), (NAN, NAN), ("inf+nan", NAN), ("inf-inf", INF)]
)
def test_sumsq_nonfinite_propagates(seed, dtype, size, bad, want):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, dtype=torch.float64, generator=gen).to(dtype)
    pos = torch.randint(0, size, (2,), generator=gen).tolist()
    if bad == "inf+nan":
        x[pos[0]], x[pos[1]] = INF, NAN
        if pos[0] == pos[1]:
            x[pos[0]] = NAN
    elif bad == "inf-inf":
        x[pos[0]], x[pos[1]] = INF, -INF
    else:
        x[pos[0]] = bad
    finite = torch.randn(17, dtype=torch.float64, generator=gen).to(dtype)
    got = ops.sumsq([finite, x, finite]).tolist()
    msg = f"seed={seed} positions={pos}"
    if math.isnan(want):
        assert math.isnan(got[1]), msg
    else:
        assert got[1] == want, msg
    assert math.isfinite(got[0]) and got[0] == got[2], msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [3e19, 1e-25])
def test_sumsq_keeps_float64_range_for_finite_inputs(dtype, value):
    """The oracle sums squares in float64 (reference.second_order_tensor_score): a finite float32
    gradient whose square leaves float32's range must neither become inf (the CPU backend then
    treats the step as non-finite) nor 0 (a tensor norm of 0 makes the second-order score undefined)."""
    x = torch.full((33,), value, dtype=dtype)
    want = x.to(torch.float64).pow(2).sum().item()
    got = ops.sumsq([x]).item()
    assert math.isclose(got, want, rel_tol=1e-6, abs_tol=0.0), (
        f"{dtype} [{value}] * 33: got {got}, want {want}"
    )


def test_sumsq_independent_of_thread_count(seed, restore_threads):
    gen = torch.Generator().manual_seed(seed)
    xs = [
        torch.randn(n, dtype=torch.float64, generator=gen).to(d) for n in (300001, 70000, 5) for d in FLOATS
    ]
    torch.set_num_threads(1)
    one = ops.sumsq(xs)
    torch.set_num_threads(2)
    two = ops.sumsq(xs)
    assert torch.equal(one, two), f"seed={seed}: {one} vs {two}"


# ------------------------------------------------------------------------------------------------
# first_order_mask_
# ------------------------------------------------------------------------------------------------

MASK_SIZES = (0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 65535, 65536, 65537, 131072 + 3)


def _check_masks(grads, thresholds, masks, kept, msg):
    assert kept.shape == (len(grads),) and kept.dtype == torch.float64, msg
    for i, (g, mask) in enumerate(zip(grads, masks, strict=True)):
        lo, hi = thresholds[i].tolist()
        n = g.numel()
        got = unpack_bits(mask, n)
        want = reference.in_interval(g.to(opmath_dtype(g.dtype)).abs(), lo, hi)
        if not torch.equal(got, want):
            bad = (got != want).nonzero().flatten()[:5].tolist()
            raise AssertionError(
                f"{msg}: tensor {i} ({g.dtype}, n={n}, lo={lo!r}, hi={hi!r}): bits differ at {bad}: "
                f"|g|={[abs(g[j].item()) for j in bad]}, got {got[bad].tolist()}, want {want[bad].tolist()}"
            )
        assert kept[i].item() == int(want.sum()), (
            f"{msg}: tensor {i}: kept {kept[i].item()} vs {int(want.sum())}"
        )
        pad = np.unpackbits(mask.numpy(), bitorder="little")[n:]
        assert not pad.any(), f"{msg}: tensor {i}: padding bits past element {n} are set"


def _random_bounds(g: torch.Tensor, gen: torch.Generator) -> tuple[float, float]:
    """Thresholds: random doubles between scores, or exact score values (inclusive ends)."""
    s = g.to(opmath_dtype(g.dtype)).abs().to(torch.float64)
    kind = torch.randint(0, 4, (), generator=gen).item()
    if s.numel() == 0 or kind == 0:
        lo, hi = sorted(torch.rand(2, dtype=torch.float64, generator=gen).mul(2).tolist())
    elif kind == 1:  # exact score values: both ends inclusive
        lo, hi = sorted(s[torch.randint(0, s.numel(), (2,), generator=gen)].tolist())
    elif kind == 2:  # a score value +- a little less than half a float32 ulp (between floats)
        v = s[torch.randint(0, s.numel(), (2,), generator=gen)].tolist()
        lo, hi = sorted(v)
        lo, hi = lo * (1 - 2.0**-26), hi * (1 + 2.0**-26)
    else:
        lo, hi = 0.0, float(s.quantile(0.5)) if s.numel() < 2**24 else 1.0
    return lo, hi


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("size", MASK_SIZES)
def test_first_order_mask_bits_match_reference(seed, dtype, size):
    gen = torch.Generator().manual_seed(seed)
    grads, rows = [], []
    for _ in range(3):
        g = torch.randn(size, dtype=torch.float64, generator=gen).to(dtype)
        grads.append(g)
        rows.append(_random_bounds(g, gen))
    thresholds = torch.tensor(rows, dtype=torch.float64)
    masks = [torch.full(((size + 7) // 8,), 0xFF, dtype=torch.uint8) for _ in grads]  # all stale bits set
    kept = ops.first_order_mask_(grads, thresholds, masks)
    _check_masks(grads, thresholds, masks, kept, f"seed={seed} rows={rows}")


def test_first_order_mask_mixed_dtypes_and_sizes_one_call(seed):
    gen = torch.Generator().manual_seed(seed)
    grads, rows = [], []
    for size in MASK_SIZES:
        for dtype in FLOATS:
            g = (torch.randn(size, dtype=torch.float64, generator=gen) * 1e-3).to(dtype)
            g[torch.rand(size, generator=gen) < 0.1] = 0.0
            grads.append(g)
            rows.append(_random_bounds(g, gen))
    thresholds = torch.tensor(rows, dtype=torch.float64)
    masks = [torch.full(((g.numel() + 7) // 8,), 0xA5, dtype=torch.uint8) for g in grads]
    kept = ops.first_order_mask_(grads, thresholds, masks)
    _check_masks(grads, thresholds, masks, kept, f"seed={seed}")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(
    "lo,hi",
    [
        (0.0, INF),
        (INF, INF),
        (0.5, 2.0),
        (0.0, 0.0),
        (NAN, NAN),  # empty pool: nothing qualifies
        (2.0, 0.5),  # lo > hi: nothing qualifies
        (-INF, INF),
        (1e300, INF),  # finite lo beyond float32's range, hi = inf
        (3.5e38, INF),  # just beyond float32's largest finite value
        (1e300, 1e300),
        (3.4028234663852886e38, INF),  # float32's largest finite value
    ],
)
def test_first_order_mask_nonfinite_gradients(dtype, lo, hi):
    """+inf scores (|+-inf|) qualify only when lo == hi == +inf; NaN scores never do."""
    big = torch.finfo(dtype).max
    g = torch.tensor([INF, -INF, NAN, 0.0, 1.0, -1.0, 0.5, 2.0, big, -big, 3.0], dtype=torch.float64).to(
        dtype
    )
    g = g.repeat(7)  # 77 elements: whole bytes, one partial byte, both sides of a 64-bit word
    thresholds = torch.tensor([[lo, hi]], dtype=torch.float64)
    masks = [torch.full(((g.numel() + 7) // 8,), 0xFF, dtype=torch.uint8)]
    kept = ops.first_order_mask_([g], thresholds, masks)
    _check_masks([g], thresholds, masks, kept, f"lo={lo} hi={hi}")
    bits = unpack_bits(masks[0], g.numel())
    inf_kept = bits[0::11].any() or bits[1::11].any()
    assert inf_kept == (lo == INF and hi == INF), f"lo={lo} hi={hi}: +inf gradient kept={inf_kept}"
    assert not bits[2::11].any(), "a NaN gradient was kept"


# ------------------------------------------------------------------------------------------------
# CPU capabilities
# ------------------------------------------------------------------------------------------------


def _supported_capabilities() -> list[str]:
    names = []
    try:
        for want in ("default", "avx2", "avx512"):
            try:
                names.append(ops.cpu_capability(want))
            except RuntimeError as error:
                assert "does not support" in str(error) or "unknown CPU capability" in str(error), error
    finally:
        ops.cpu_capability("auto")
    return names


def test_cpu_capability_names_and_switching(restore_capability):
    start = ops.cpu_capability()
    assert start in CAPABILITIES
    assert ops.cpu_capability("default") == "DEFAULT"
    assert ops.cpu_capability() == "DEFAULT"
    assert ops.cpu_capability("auto") == start
    assert ops.cpu_capability() == start
    supported = _supported_capabilities()
    assert "DEFAULT" in supported and start in supported
    assert set(supported) <= set(CAPABILITIES)
    assert ops.cpu_capability() == start


@pytest.mark.parametrize("name", ["sse", "AVX2x", ""])
def test_cpu_capability_unknown_name(name, restore_capability):
    start = ops.cpu_capability()
    with pytest.raises(RuntimeError, match="unknown CPU capability"):
        ops.cpu_capability(name)
    assert ops.cpu_capability() == start


def _capability_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    a = [
        torch.randn(200003, dtype=torch.float64, generator=gen).to(torch.float32),
        torch.randn(40001, dtype=torch.float64, generator=gen).to(torch.bfloat16),
        torch.randn(1023, dtype=torch.float64, generator=gen).to(torch.float16),
        torch.randn(33, dtype=torch.float64, generator=gen).to(torch.float32),
    ]
    b = [torch.randn(x.numel(), generator=gen) for x in a]
    for m in b:
        m[torch.rand(m.numel(), generator=gen) < 0.2] = 0.0
    a64 = [torch.randn(n, dtype=torch.float64, generator=gen) for n in (100003, 999)]
    b64 = [torch.randn(n, dtype=torch.float64, generator=gen) for n in (100003, 999)]
    # Small pools: there the interpolation x_k + f * (x_k+1 - x_k) is far from x_k, so any change in
    # how it is rounded shows.
    # (float64 separately: a per-tensor call mixing float64 and float32 is tested in test_select.py)
    small = [
        [torch.rand(n, dtype=torch.float64, generator=gen).to(d) for n in (2, 3, 5, 11) for d in dtypes]
        for dtypes in ((torch.float32, torch.bfloat16, torch.float16), (torch.float64,))
    ]
    qs = [torch.rand(2, dtype=torch.float64, generator=gen).sort().values.tolist() for _ in range(4)]
    return a, b, a64, b64, small, qs


def _capability_results(a, b, a64, b64, small, qs):
    out = {}

    def thresholds(xs, ys, scale, q, glob, strategy, pooled=None):
        scales = torch.full((len(xs),), scale if ys else 1.0, dtype=torch.float64)
        pooled = torch.ones(len(xs), dtype=torch.bool) if pooled is None else torch.tensor(pooled)
        return ops.element_thresholds(xs, ys, scales, pooled, *q, glob, None, strategy)

    for strategy in (ops.SELECT_AUTO, ops.SELECT_RADIX):
        for glob in (False, True):
            q = qs[0]
            out[f"thr a s{strategy} g{glob}"] = thresholds(a, [], 1.0, q, glob, strategy)
            out[f"thr ab s{strategy} g{glob}"] = thresholds(a, b, 0.1, q, glob, strategy)
            out[f"thr ab pooled s{strategy} g{glob}"] = thresholds(
                a, b, 0.1, q, glob, strategy, pooled=[True, False, True, False]
            )
            out[f"thr64 s{strategy} g{glob}"] = thresholds(a64, b64, 0.5, q, glob, strategy)
        for i, q in enumerate(qs):
            for j, pools in enumerate(small):
                out[f"thr small{j} q{i} s{strategy}"] = thresholds(pools, [], 1.0, q, False, strategy)
    thr = out["thr a s0 gFalse"][:, :2].contiguous()
    masks = [torch.empty((x.numel() + 7) // 8, dtype=torch.uint8) for x in a]
    out["mask kept"] = ops.first_order_mask_(a, thr, masks)
    out["mask bits"] = torch.cat(masks)
    return out


def _equal_nan(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (the rows of empty or unpooled threshold pools)."""
    return x.shape == y.shape and x.dtype == y.dtype and bool(((x == y) | (x.isnan() & y.isnan())).all())


def test_capabilities_agree_on_thresholds_and_masks(seed, restore_capability):
    """Selection is exact, so every capability must return the same bits."""
    inputs = _capability_inputs(seed)
    results = {}
    for name in _supported_capabilities():
        ops.cpu_capability(name.lower())
        results[name] = _capability_results(*inputs)
    ops.cpu_capability("auto")
    base_name = "DEFAULT"
    differ = []
    for name, res in results.items():
        for key, value in res.items():
            base = results[base_name][key]
            if not torch.equal(value, base) and not _equal_nan(value, base):
                rows = (value != base).any(dim=-1).nonzero().flatten().tolist() if value.dim() == 2 else []
                got, want = value[rows].tolist(), base[rows].tolist()
                differ.append(f"{key}: {name} vs {base_name} rows {rows}: {got} vs {want}")
    assert not differ, f"seed={seed}: capabilities disagree:\n" + "\n".join(differ[:10])


def test_capabilities_sumsq_accuracy(seed, restore_capability):
    """sumsq sums in vector lanes whose width depends on the capability (and fmadd is fused only on
    AVX2/AVX-512), so the capabilities may differ in the last bits: each must be as accurate as the
    float64 sum, and each must be deterministic."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, dtype=torch.float64, generator=gen).to(d) for n in SUMSQ_SIZES for d in FLOATS]
    want = [x.to(torch.float64).pow(2).sum().item() for x in xs]
    for name in _supported_capabilities():
        ops.cpu_capability(name.lower())
        got = ops.sumsq(xs)
        assert torch.equal(got, ops.sumsq(xs)), f"seed={seed} {name}: sumsq not deterministic"
        for i, x in enumerate(xs):
            assert math.isclose(got[i].item(), want[i], rel_tol=_sumsq_rtol(x.dtype), abs_tol=0.0), (
                f"seed={seed} {name}: tensor {i} ({x.dtype}, n={x.numel()}): {got[i].item()} vs {want[i]}"
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_float64_bounds_between_two_floats(seed, dtype):
    """Thresholds a quarter of a float32 ulp inside two scores (an interpolated quantile is rarely a
    float32 value): the score just below lo and the one just above hi are out. The kernels compare
    in float32, so each bound must move inward to the next float32 (rose_math.h inward_bounds);
    rounded to the nearest one instead, both edge scores would be kept."""
    gen = torch.Generator().manual_seed(seed)
    g = (torch.rand(4096, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    s = g.double().abs()
    values = torch.unique(s)
    i = int(torch.randint(0, len(values) // 2, (1,), generator=gen))
    below, above = float(values[i]), float(values[-1 - i])

    def ulp32(x: float) -> float:
        x32 = torch.tensor(x, dtype=torch.float32)
        return float(torch.nextafter(x32, torch.tensor(float("inf"))) - x32)

    lo, hi = below + 0.25 * ulp32(below), above - 0.25 * ulp32(above)
    masks = [torch.zeros((g.numel() + 7) // 8, dtype=torch.uint8)]
    ops.first_order_mask_([g], torch.tensor([[lo, hi]], dtype=torch.float64), masks)
    bits = torch.tensor([(int(masks[0][j // 8]) >> (j % 8)) & 1 for j in range(g.numel())], dtype=torch.bool)
    want = (s >= lo) & (s <= hi)
    assert torch.equal(bits, want), (f"seed={seed}: bounds ({lo!r}, {hi!r}); wrong at "
                                     f"{s[bits != want][:5].tolist()}")
    assert want.any() and not want[s == below].any() and not want[s == above].any(), f"seed={seed}"
