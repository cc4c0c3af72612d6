"""Shared helpers for the RoseAdamW tests: seeded random problems, snapshots, dtype-aware comparisons."""

from __future__ import annotations

import math
import os
import random
import signal
import threading

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; this must be set before the
# kernels are defined (rose_kernels imports them on first use of backend="triton").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rose_kernels import RoseAdamW  # noqa: E402
from rose_kernels.dtypes import opmath_dtype  # noqa: E402
from rose_kernels.types import uses_first_order  # noqa: E402

# tests/test_optim.py imports ``opmath`` from here (the package's one definition).
opmath = opmath_dtype


def skip_module_unless_triton_runs() -> None:
    """Module-level skip for the Triton tests when the kernels have nowhere to run: Triton is not
    installed, or there is no GPU and TRITON_INTERPRET was set to 0 explicitly (without a GPU this
    file sets it to 1, so `make test` always runs them, interpreted)."""
    pytest.importorskip("triton")
    if TRITON_DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("TRITON_INTERPRET=0 and no CUDA GPU: the Triton kernels have nowhere to run",
                    allow_module_level=True)


# Every Triton kernel variant the interpreted tests launch (``tables.variant_key``), so that
# test_triton_aot.py can check that each one also compiles for the GPU targets.
INTERPRETED_LAUNCHES: set[str] = set()


@pytest.fixture(scope="session", autouse=True)
def _record_interpreted_launches():
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        yield
        return
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from rose_kernels.backends.triton.tables import variant_key
    except ImportError:
        yield
        return
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        INTERPRETED_LAUNCHES.add(variant_key(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield
    finally:
        InterpretedFunction.run = run


# ROSE_TEST_TIMEOUT=<seconds>: an opt-in time limit per test (bench/device_check.sh sets it: the GPU
# machine has no pytest-timeout). SIGALRM interrupts the test's call after that many seconds and
# fails it with "ran past N s"; the session goes on with the next test. While it is set, SIGTERM
# (what `timeout` sends at a stage's cap) ends the session as Ctrl-C does, so that pytest still
# prints the summary of the tests run so far. Main thread only; a no-op where the variable is unset
# or 0, or the platform has no SIGALRM. A test stuck inside one C call (a kernel launch, a device
# sync) is interrupted when that call returns, not before.


def _test_timeout() -> float:
    try:
        seconds = float(os.environ.get("ROSE_TEST_TIMEOUT") or 0)
    except ValueError:
        return 0.0
    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return 0.0
    return seconds


def _sigterm_interrupts(signum, frame):
    raise KeyboardInterrupt("SIGTERM (ROSE_TEST_TIMEOUT is set: the session ends as on Ctrl-C)")


if _test_timeout() and hasattr(signal, "SIGTERM"):
    signal.signal(signal.SIGTERM, _sigterm_interrupts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    seconds = _test_timeout()
    if not seconds:
        yield
        return

    def ran_past(signum, frame):
        pytest.fail(f"ran past {seconds:g} s (ROSE_TEST_TIMEOUT): {item.nodeid}")

    previous = signal.signal(signal.SIGALRM, ran_past)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


MODES = ("off", "first", "second", "ensemble")
GRANULARITIES = ("tensor", "element")
SCOPES = ("tensor", "global")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Where each backend's tensors live in the tests: Triton runs on the GPU, or interpreted on the CPU.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# backend="cuda" (the CUDA C++ kernels) runs only on a GPU, with an extension built against a CUDA torch.
BACKEND_DEVICES = {"triton": TRITON_DEVICE, "cuda": torch.device("cuda")}


def cuda_backend_runs() -> bool:
    """Whether backend="cuda" can run here: a CUDA GPU and an extension built with the CUDA kernels."""
    from rose_kernels import ops

    return torch.cuda.is_available() and ops.built_with_cuda()


# The fused backends whose tensors live on the GPU (Triton also interpreted on the CPU): the
# backends tests/test_triton.py runs each of its backend-generic tests for.
DEVICE_BACKENDS = ("triton", "cuda") if cuda_backend_runs() else ("triton",)

# Relative / absolute tolerances for the opmath state (exp_avg, exp_avg_sq) and for params.
STATE_TOL = {torch.float64: (1e-12, 1e-13), torch.float32: (1e-6, 1e-7)}
STATE_TOL[torch.bfloat16] = STATE_TOL[torch.float16] = STATE_TOL[torch.float32]


@pytest.fixture
def seed() -> int:
    """A fresh seed per test; put it in every assertion message so that failures replay."""
    return int.from_bytes(os.urandom(4), "little")


def needs_first(mode: str) -> bool:
    return uses_first_order(mode)


def randn(shape, dtype: torch.dtype, gen: torch.Generator, *, zero_frac: float = 0.0, scale: float = 1.0):
    """Normal values drawn in float64 then cast (the same draw for every dtype); some exact zeros."""
    x = torch.randn(shape, dtype=torch.float64, generator=gen) * scale
    if zero_frac > 0:
        x = torch.where(torch.rand(shape, dtype=torch.float64, generator=gen) < zero_frac, 0.0, x)
    return x.to(dtype)


def all_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def snapshot(opt: torch.optim.Optimizer) -> dict:
    """A full copy of everything a step may change: params, grads, per-param state, counters."""
    params = all_params(opt)
    return {
        "params": [p.detach().clone() for p in params],
        "state": [
            {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
            if p in opt.state
            else None
            for p in params
        ],
        "n_state": len(opt.state),
        "skipped": getattr(opt, "skipped_steps", None),
        "groups": [
            {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in opt.param_groups
        ],
    }


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.view(-1).view(_int_view(a.dtype)), b.view(-1).view(_int_view(b.dtype)))


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[dtype.itemsize]


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    assert _bitwise_equal(a, b), f"{msg}: tensors differ bitwise\n{a}\n{b}"


def assert_snapshot_equal(before: dict, after: dict, msg: str = "") -> None:
    """Bit-for-bit equality of two snapshots (NaN-safe, compares the bits)."""
    assert len(before["params"]) == len(after["params"])
    for i, (a, b) in enumerate(zip(before["params"], after["params"], strict=True)):
        assert_bitwise_equal(a, b, f"{msg}: param {i}")
    assert before["n_state"] == after["n_state"], (
        f"{msg}: number of states {before['n_state']} -> {after['n_state']}"
    )
    for i, (a, b) in enumerate(zip(before["state"], after["state"], strict=True)):
        assert (a is None) == (b is None), f"{msg}: state of param {i} appeared/disappeared"
        if a is None:
            continue
        assert a.keys() == b.keys(), f"{msg}: state keys of param {i}"
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert_bitwise_equal(a[k], b[k], f"{msg}: state[{k}] of param {i}")
            else:
                assert a[k] == b[k], f"{msg}: state[{k}] of param {i}"
    assert before["skipped"] == after["skipped"], f"{msg}: skipped_steps"
    assert repr(before["groups"]) == repr(after["groups"]), f"{msg}: param groups changed"


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of the floating-point numbers of x's dtype at |x| (in float64)."""
    finfo = torch.finfo(x.dtype)
    mant_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[x.dtype]
    ax = x.to(torch.float64).abs()
    _, exponent = torch.frexp(torch.clamp(ax, min=finfo.tiny))  # ax = m * 2**e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(ax), exponent - 1 - mant_bits)


def assert_params_close(
    actual: torch.Tensor, expected: torch.Tensor, msg: str = "", *, ulps: float = 1.0
) -> None:
    """float64 ~1e-12 / float32 ~1e-6 relative; bf16 / fp16: within `ulps` units in the last place.

    bf16 / fp16 params are updated in float32 and rounded once, so they agree to 1 ulp, except where
    the update cancels p almost exactly: there the float32 rounding of the O(1) operands (~1e-7)
    exceeds the ulp of the tiny result, hence the small absolute slack.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
    actual, expected = actual.cpu(), expected.cpu()
    if actual.dtype in (torch.bfloat16, torch.float16):
        a, e = actual.to(torch.float64), expected.to(torch.float64)
        spacing = torch.maximum(ulp(actual), ulp(expected))
        bad = (a - e).abs() > ulps * spacing + 1e-6
        assert not bad.any(), (
            f"{msg}: {int(bad.sum())} of {bad.numel()} elements differ by more than {ulps} ulp; "
            f"first: {a[bad][:5].tolist()} vs {e[bad][:5].tolist()}"
        )
        return
    rtol, atol = STATE_TOL[actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m, msg=msg: f"{msg}: {m}")


def assert_state_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = ""
) -> None:
    rtol, atol = STATE_TOL[dtype]
    actual, expected = actual.cpu(), expected.cpu()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m, msg=msg: f"{msg}: {m}")


def assert_optimizers_match(
    opt_a: RoseAdamW, opt_b: RoseAdamW, dtype: torch.dtype, msg: str = "", *, mask_tol: float | None = None
) -> None:
    """Same params (dtype tolerance), exp_avg / exp_avg_sq (opmath tolerance), steps and mask_stats."""
    pa, pb = all_params(opt_a), all_params(opt_b)
    assert len(pa) == len(pb)
    for i, (a, b) in enumerate(zip(pa, pb, strict=True)):
        where = f"{msg} [param {i}, shape {tuple(a.shape)}]"
        assert_params_close(a, b, where + " param")
        sa, sb = opt_a.state.get(a), opt_b.state.get(b)
        assert (sa is None) == (sb is None), f"{where}: state present in one optimizer only"
        if sa is None:
            continue
        assert float(sa["step"]) == float(sb["step"]), (
            f"{where}: step {float(sa['step'])} vs {float(sb['step'])}"
        )
        assert sa["exp_avg"].dtype == sb["exp_avg"].dtype == opmath_dtype(a.dtype), where
        assert_state_close(sa["exp_avg"], sb["exp_avg"], a.dtype, where + " exp_avg")
        assert_state_close(sa["exp_avg_sq"], sb["exp_avg_sq"], a.dtype, where + " exp_avg_sq")
    ka, kb = opt_a.mask_stats(), opt_b.mask_stats()
    assert ka.keys() == kb.keys(), f"{msg}: mask_stats keys {sorted(ka)} vs {sorted(kb)}"
    # Kept fractions of soft (ensemble) masks are summed in the opmath type by the kernels.
    tol = mask_tol if mask_tol is not None else (1e-12 if dtype == torch.float64 else 2e-5)
    for k in ka:
        assert math.isclose(ka[k], kb[k], rel_tol=0, abs_tol=tol), (
            f"{msg}: mask_stats[{k}] {ka[k]} vs {kb[k]}"
        )


def sync(src: RoseAdamW, dst: RoseAdamW) -> None:
    """Copies src's params and moments into dst.

    The backends agree to rounding (the C++ kernels may contract a * b + c into an FMA), and
    last-bit differences in exp_avg can legitimately flip the mask of a unit whose score ties
    with a threshold at the next step. Syncing after each compared step makes every step start
    from identical inputs, where the masks must agree exactly.
    """
    with torch.no_grad():
        for a, b in zip(all_params(src), all_params(dst), strict=True):
            b.copy_(a)
            if a in src.state and b in dst.state:
                for k in ("exp_avg", "exp_avg_sq"):
                    dst.state[b][k].copy_(src.state[a][k])


class Problem:
    """The same param groups for several optimizers (one per backend), driven by the same gradients.

    `groups` is a list of dicts holding "shapes" plus any param-group keys ("rose", "weight_decay", ...).
    """

    def __init__(
        self,
        groups: list[dict],
        dtype: torch.dtype,
        seed: int,
        backends=("cpu", "reference"),
        sync: bool = True,
        **kw,
    ):
        self.seed, self.dtype, self.sync = seed, dtype, sync
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self.kw = kw
        self.mode = kw.get("mode", "second")
        base = [[randn(s, dtype, self.gen) for s in spec["shapes"]] for spec in groups]
        self.opts: list[RoseAdamW] = []
        for backend in backends:
            param_groups = []
            for spec, tensors in zip(groups, base, strict=True):
                extra = {k: v for k, v in spec.items() if k != "shapes"}
                device = BACKEND_DEVICES.get(backend, torch.device("cpu"))
                param_groups.append({"params": [t.clone().to(device) for t in tensors], **extra})
            self.opts.append(RoseAdamW(param_groups, backend=backend, **kw))
        self.t = 0

    @property
    def shapes(self):
        return [p.shape for p in all_params(self.opts[0])]

    def draw(self, *, zero_frac: float = 0.1, zero_tensors: tuple[int, ...] = (), scale: float = 1.0):
        grads = [randn(s, self.dtype, self.gen, zero_frac=zero_frac, scale=scale) for s in self.shapes]
        for i in zero_tensors:
            grads[i] = torch.zeros_like(grads[i])
        return grads

    def step(self, grads=None, kl=None, *, present=None) -> None:
        """One training step on every optimizer; `present[i]` False leaves param i's grad None."""
        self.t += 1
        grads = grads if grads is not None else self.draw(zero_tensors=(0,) if self.t == 1 else ())
        if needs_first(self.mode) and kl is None:
            kl = self.draw(zero_frac=0.05)
        for opt in self.opts:
            params = all_params(opt)
            if needs_first(self.mode):
                for i, (p, g) in enumerate(zip(params, kl, strict=True)):
                    p.grad = g.clone().to(p.device) if present is None or present[i] else None
                opt.record_first_order()
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                p.grad = g.clone().to(p.device) if present is None or present[i] else None
            opt.step()

    def check(self, msg: str = "", **kw) -> None:
        ref = self.opts[-1]
        for opt in self.opts[:-1]:
            assert_optimizers_match(opt, ref, self.dtype, f"seed={self.seed} step={self.t} {msg}", **kw)
        if self.sync:
            sync(self.opts[0], ref)
