"""backend="triton": the host side of a step (what the GPU-only risks depend on), checked on the CPU.

- CUDA-graph lifetimes: a captured step replays raw device pointers, so every cached table and
  workspace tensor it used must stay owned by the optimizer (``device_tables.capturing`` is patched
  to say "capturing"; the interpreter then runs the same code as a capture would). As in a real
  capture, the gradients are fixed ``.grad`` buffers written in place between steps (a graph
  replays their addresses), so every launch table of the captured step is cached by the eager
  step before it; a table made during the capture is an error, on the CPU too (``_capturing``).
- Steps skipped on the device are reported by one RuntimeWarning at the next host read.
- A float lr changed every step (an LR scheduler) makes no new cached device tensor.
"""

from __future__ import annotations

import contextlib
import gc
import math
import warnings
import weakref

import pytest
import torch
from conftest import (
    GRANULARITIES,
    TRITON_DEVICE,
    Problem,
    all_params,
    assert_snapshot_equal,
    needs_first,
    randn,
    skip_module_unless_triton_runs,
    snapshot,
)

from rose_kernels import RoseAdamW, ops

skip_module_unless_triton_runs()

from rose_kernels.backends import device_tables  # noqa: E402
from rose_kernels.backends.triton import tables  # noqa: E402

DEV = TRITON_DEVICE
BLOCK = tables.block_size("update", 0)
SHAPES = [(5,), (BLOCK + 1,), (3,)]

# numpy (the interpreter) warns where the GPU quietly makes inf/NaN (the x * 0 finiteness probe).
pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:.*encountered in multiply:RuntimeWarning")]


def _setup(seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    params = [randn(s, torch.float32, gen).to(DEV) for s in SHAPES]
    groups = [{"params": params[:2]}, {"params": params[2:], "rose": False}]
    opt = RoseAdamW(groups, backend="triton", nonfinite="skip", **{"lr": 1e-2, **kw})
    return opt, params, gen


def _step(opt, params, gen, *, bad: float | None = None, static: bool = False):
    """One step on new gradients. ``static``: the new values are copied into the ``.grad`` buffers
    already there (made once), as a CUDA-graph user does: a replay reads the captured addresses."""

    def new_grads():
        for p in params:
            g = randn(p.shape, torch.float32, gen).to(DEV)
            if static and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = g

    new_grads()
    if needs_first(opt.rose.mode):
        opt.record_first_order()
        new_grads()
    if bad is not None:
        params[0].grad.view(-1)[-1] = bad
    opt.step()


@contextlib.contextmanager
def _capturing(monkeypatch):
    """What a captured step sees: ``device_tables.capturing`` says so, and a device table that is
    not cached yet is an error. The GPU's ``to_device`` raises then; on the CPU it returns before
    it looks, so here it always raises (else a test passing interpreted could fail on a GPU)."""

    def missing(values, dtype, device):
        raise RuntimeError("rose_kernels: a launch table is missing while a CUDA graph is being captured "
                           f"(emulated: {len(values)} {dtype} values for {device})")

    with monkeypatch.context() as patch:
        patch.setattr(device_tables, "capturing", lambda device: True)
        patch.setattr(device_tables, "to_device", missing)
        patch.setattr(tables, "to_device", missing)  # tables.py calls its own imported name
        yield patch


@contextlib.contextmanager
def _no_rose_warning():
    """No warning from RoseAdamW inside (the interpreter's numpy warnings are let through)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield
    ours = [str(w.message) for w in record if "RoseAdamW" in str(w.message)]
    assert not ours, ours


def _clear_caches():
    for cache in (tables._blocks, tables._addresses, device_tables._constants):
        cache.clear()


class _Spy:
    """Every device tensor the launch tables hand out while active."""

    def __init__(self, monkeypatch):
        self.tensors: list[torch.Tensor] = []
        for name in ("constant", "addresses", "block_table"):
            monkeypatch.setattr(tables, name, self._wrap(getattr(tables, name)))

    def _wrap(self, fn):
        def spied(*args, **kwargs):
            out = fn(*args, **kwargs)
            if isinstance(out, tables.BlockTable):
                self.tensors += [out.block_tensor, out.block_start, out.first_block]
            else:
                self.tensors.append(out)
            return out

        return spied


# ------------------------------------------------------------------------------------------------
# CUDA-graph lifetimes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", ["second", "ensemble"])
def test_captured_step_owns_every_table_it_read(seed, mode, granularity, monkeypatch):
    opt, params, gen = _setup(seed, mode=mode, granularity=granularity, lower=10.0, upper=70.0)
    _step(opt, params, gen, static=True)  # eager: builds the tables (a capture may not)
    assert opt._graph_keepalive == [], "an eager step kept something alive"
    grads = [p.grad for p in params]

    with _capturing(monkeypatch) as patch:
        spy = _Spy(patch)
        _step(opt, params, gen, static=True)
    assert all(p.grad is g for p, g in zip(params, grads, strict=True)), "the gradient buffers were replaced"
    used = spy.tensors + [opt._kept.values, opt._workspace["lr"].on_device]
    used += [opt._workspace[k] for k in ("first", "second") if k in opt._workspace]
    assert used and all(isinstance(t, torch.Tensor) for t in used)
    held = opt._graph_keepalive
    missing = [tuple(t.shape) for t in used if not any(t is h for h in held)]
    assert not missing, f"seed={seed}: tensors read by the captured step but not owned: {missing}"
    assert len({id(h) for h in held}) == len(held), "a tensor was kept twice"

    refs = [weakref.ref(t) for t in used]
    del used, spy
    # Eager steps with other hyper-parameters, then caches flooded and cleared: nothing read by the
    # capture may be freed (its memory could be handed to other tensors before a replay).
    for t in range(2):
        for group in opt.param_groups:
            group["lr"] *= 0.5
            group["eps"] = 1e-7 * (t + 2)
        _step(opt, params, gen, static=True)
    for i in range(300):
        tables.constant((float(i), -1.0), torch.float64, DEV)
    _clear_caches()
    opt._workspace.clear()
    gc.collect()
    dead = sum(r() is None for r in refs)
    assert dead == 0, f"seed={seed}: {dead} of {len(refs)} captured tensors were freed"

    # Eager steps after the capture add nothing.
    count = len(opt._graph_keepalive)
    _step(opt, params, gen, static=True)
    assert len(opt._graph_keepalive) == count


@pytest.mark.parametrize("mode", ["second", "first"])
def test_eager_steps_keep_nothing_alive(seed, mode, monkeypatch):
    """The control of the test above: without a capture, cleared caches free their tables."""
    opt, params, gen = _setup(seed, mode=mode, granularity="element")
    _step(opt, params, gen)
    with monkeypatch.context() as patch:
        spy = _Spy(patch)
        _step(opt, params, gen)
    refs = [weakref.ref(t) for t in spy.tensors]
    del spy
    _clear_caches()
    gc.collect()
    assert refs and all(r() is None for r in refs), f"seed={seed}: an eager step's tables outlived the caches"
    assert opt._graph_keepalive == []


def test_captured_skip_keeps_fractions_in_one_buffer(seed, monkeypatch):
    """The kept fractions live in one buffer written in place (a replayed skipped step reads the
    fractions of the step before it from there, not from a tensor the next eager step drops)."""
    opt, params, gen = _setup(seed, granularity="element")
    _step(opt, params, gen, static=True)
    buffer = opt._kept.values
    stats = opt.mask_stats()
    with _capturing(monkeypatch), _no_rose_warning():
        _step(opt, params, gen, bad=math.nan, static=True)
    assert opt._kept.values is buffer and any(buffer is h for h in opt._graph_keepalive)
    with pytest.warns(RuntimeWarning, match="1 step was skipped"):
        assert opt.mask_stats() == stats, seed
    _step(opt, params, gen, static=True)
    assert opt._kept.values is buffer


def test_float_lr_changed_during_capture_raises(seed, monkeypatch):
    opt, params, gen = _setup(seed)
    _step(opt, params, gen, static=True)
    opt.param_groups[0]["lr"] = 3e-3
    with _capturing(monkeypatch), pytest.raises(RuntimeError, match="float lr changed"):
        _step(opt, params, gen, static=True)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_capture_with_new_gradient_tensors_raises(seed, granularity, monkeypatch):
    """The control of the capture tests: gradients in new tensors (new addresses) need new launch
    tables, which a capture cannot copy to the device; it raises, on the GPU and emulated here."""
    opt, params, gen = _setup(seed, granularity=granularity)
    _step(opt, params, gen)
    with _capturing(monkeypatch), pytest.raises(RuntimeError, match="launch table is missing"):
        _step(opt, params, gen)


# ------------------------------------------------------------------------------------------------
# Steps skipped on the device are reported
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", ["off", "second", "first"])
def test_device_skip_warns_once_at_check(seed, mode, granularity):
    opt, params, gen = _setup(seed, mode=mode, granularity=granularity)
    _step(opt, params, gen)
    with _no_rose_warning():  # the step itself does not read the device
        assert opt.check() == 0
        before = snapshot(opt)
        _step(opt, params, gen, bad=math.nan)
        after = snapshot(opt)
    before["skipped"] += 1
    assert_snapshot_equal(before, after, f"seed={seed}")
    with pytest.warns(RuntimeWarning, match=r"1 step was skipped on the device .*non-finite") as record:
        assert opt.check() == 1
    assert len(record) == 1
    with _no_rose_warning():
        assert opt.check() == 1
        opt.mask_stats()
        opt.state_dict()


@pytest.mark.parametrize("reader", ["mask_stats", "state_dict", "check"])
def test_each_host_read_reports_new_skips_once(seed, reader):
    opt, params, gen = _setup(seed, granularity="element")
    _step(opt, params, gen)
    _step(opt, params, gen, bad=math.inf)
    _step(opt, params, gen, bad=math.nan)
    with pytest.warns(RuntimeWarning, match="2 steps were skipped") as record:
        getattr(opt, reader)()
    assert len(record) == 1
    assert opt.skipped_steps == 2
    _step(opt, params, gen, bad=math.nan)
    with pytest.warns(RuntimeWarning, match="1 step was skipped"):
        assert opt.check() == 3
    with _no_rose_warning():
        for read in (opt.mask_stats, opt.state_dict, opt.check):
            read()


def _moment_case(backend, seed, granularity, where):
    gen = torch.Generator().manual_seed(seed)
    device = DEV if backend == "triton" else torch.device("cpu")
    params = [randn(s, torch.float32, gen).to(device) for s in SHAPES]
    groups = [{"params": params[:1]}, {"params": params[1:2], "warmup_steps": 5},
              {"params": params[2:], "rose": False}]
    opt = RoseAdamW(groups, lr=1e-2, backend=backend, nonfinite="skip", granularity=granularity)
    for p in params:
        p.grad = randn(p.shape, torch.float32, gen).to(device)
    opt.step()
    target = {"pooled": 0, "warmup": 1, "not rose": 2}[where]
    opt.state[params[target]]["exp_avg"].view(-1)[0] = math.nan
    for p in params:
        p.grad = randn(p.shape, torch.float32, gen).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
        return opt.check()


@pytest.mark.parametrize("where", ["pooled", "warmup", "not rose"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nonfinite_moments_are_checked_like_the_cpu_backend(seed, granularity, where):
    """Element second-order scores divide by exp_avg: the CPU backend skips a step whose pooled
    moments are not finite; the Triton one must skip the same steps."""
    skipped = _moment_case("triton", seed, granularity, where)
    assert skipped == int(granularity == "element" and where == "pooled"), (seed, skipped)
    if ops.available():
        assert _moment_case("cpu", seed, granularity, where) == skipped


# ------------------------------------------------------------------------------------------------
# A scheduled float lr: no new cached device tensor per step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", ["second", "off"])
def test_scheduled_float_lr_makes_no_cache_entries(seed, mode, granularity):
    groups = [{"shapes": [(5,), (BLOCK + 1,)], "lr": 2e-2}, {"shapes": [(3,), (7,)], "rose": False}]
    prob = Problem(groups, torch.float64, seed, backends=("triton", "reference"), lr=1e-2, mode=mode,
                   granularity=granularity, lower=10.0, upper=70.0)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.93**t) for opt in prob.opts]
    _clear_caches()
    keys = None
    for t in range(20):
        prob.step()
        prob.check(f"t={t}")
        if keys is None:
            keys = set(device_tables._constants)
            lr_buffer = prob.opts[0]._workspace.get("lr")
        assert set(device_tables._constants) == keys, f"seed={seed} t={t}: new cached constants"
        assert prob.opts[0]._workspace.get("lr") is lr_buffer, "the lr buffer was replaced"
        for scheduler in schedulers:
            scheduler.step()
    assert prob.opts[0].param_groups[0]["lr"] == pytest.approx(2e-2 * 0.93**20)


def test_tensor_and_scheduled_float_lrs_together(seed):
    groups = [{"shapes": [(5,), (BLOCK + 1,)]}, {"shapes": [(3,)], "lr": 2e-2}]
    prob = Problem(groups, torch.float64, seed, backends=("triton", "reference"), granularity="element")
    # One tensor lr per optimizer, on its parameters' device (the Triton ones are on the GPU where
    # there is one; a CPU tensor lr with GPU parameters is refused: tests/test_devices.py).
    lrs = [torch.tensor(5e-3, dtype=torch.float64, device=all_params(opt)[0].device) for opt in prob.opts]
    for opt, lr in zip(prob.opts, lrs, strict=True):
        opt.param_groups[0]["lr"] = lr
    for t in range(4):
        prob.step()
        prob.check(f"t={t}")
        for opt, lr in zip(prob.opts, lrs, strict=True):
            lr.mul_(0.5)
            opt.param_groups[1]["lr"] *= 0.7
    assert all(p.device == DEV for p in all_params(prob.opts[0]))
    assert all(opt.param_groups[0]["lr"] is lr for opt, lr in zip(prob.opts, lrs, strict=True))
