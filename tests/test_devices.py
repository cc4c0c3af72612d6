"""Devices: a tensor lr must live with its group's parameters, one device per group, and the Triton
launches go to the tensors' GPU (not the current one).

Runnable without a GPU: the checks are made with "meta" tensors (RoseAdamW accepts meta parameters
as far as its checks go), and the device guard is made without initialising CUDA. The tests that
need one GPU (or two) are skipped elsewhere.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import conftest
import pytest
import torch
from conftest import (
    DEVICE_BACKENDS,
    Problem,
    all_params,
    assert_snapshot_equal,
    needs_first,
    randn,
    snapshot,
)

from rose_kernels import RoseAdamW, ops
from rose_kernels.backends import device_tables
from rose_kernels.validation import check_devices, check_group

META = torch.device("meta")
CPU = torch.device("cpu")


def _meta(*shape):
    return torch.zeros(*shape, device=META)


def _triton_runs() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from rose_kernels.backends.triton import tables

    return torch.cuda.is_available() or tables.on_host()


# numpy (the Triton interpreter) warns where the GPU quietly makes inf/NaN.
pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:.*encountered in multiply:RuntimeWarning")]
needs_triton = pytest.mark.skipif(not _triton_runs(), reason="Triton is not installed or has nowhere to run")
STEP_BACKENDS = ["reference"] + (["cpu"] if ops.available() else []) + (["triton"] if _triton_runs() else [])


# ------------------------------------------------------------------------------------------------
# A tensor lr on another device than its parameters: refused when the group is added
# ------------------------------------------------------------------------------------------------


def test_meta_parameters_are_accepted_with_a_float_lr():
    opt = RoseAdamW([_meta(3), _meta(2, 2)], lr=1e-3)
    assert all(p.device == META for p in all_params(opt))


@pytest.mark.parametrize("where", ["constructor", "group"])
def test_lr_tensor_on_another_device_is_refused_at_construction(where):
    lr = torch.tensor(1e-3)
    message = r"lr is a tensor on cpu but this group's parameters are on meta; pass a float, or a tensor on meta"
    with pytest.raises(ValueError, match=message):
        if where == "constructor":
            RoseAdamW([_meta(3)], lr=lr)
        else:
            RoseAdamW([{"params": [_meta(3)], "lr": lr}])


def test_lr_tensor_on_another_device_is_refused_by_add_param_group():
    cpu = torch.randn(4)
    opt = RoseAdamW([cpu], lr=torch.tensor(1e-3))  # the default lr: a CPU tensor
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="lr is a tensor on cpu but this group's parameters are on meta"):
        opt.add_param_group({"params": [_meta(3)]})  # inherits the CPU tensor default
    with pytest.raises(ValueError, match="lr is a tensor on cpu but this group's parameters are on meta"):
        opt.add_param_group({"params": [("w", _meta(3))], "lr": torch.tensor(2e-3)})  # a (name, tensor) pair
    assert [dict(g) for g in opt.param_groups] == before and not opt.state
    opt.add_param_group({"params": [_meta(3)], "lr": 1e-3})  # a float lr is fine anywhere
    assert len(opt.param_groups) == 2


def test_parameters_of_one_group_on_several_devices_are_refused():
    with pytest.raises(ValueError, match=r"one param group must be on one device.*cpu, meta"):
        RoseAdamW([torch.randn(3), _meta(3)])
    opt = RoseAdamW([torch.randn(3)])
    with pytest.raises(ValueError, match=r"one device.*meta, cpu"):
        opt.add_param_group({"params": [_meta(2), torch.randn(2)]})
    assert len(opt.param_groups) == 1


def test_other_tensor_hyper_parameters_are_read_as_floats():
    """eps, weight_decay, betas and second_order_scale tensors are read on the host (any device)."""
    one = torch.tensor(0.1)
    RoseAdamW([_meta(3)], eps=one, weight_decay=one, betas=(one, torch.tensor(0.99)), second_order_scale=one)


def test_check_devices_directly():
    group = {"lr": torch.tensor(1e-3, device=META)}
    check_devices(group, [_meta(2), _meta(3)])
    check_devices(group, None)  # no parameters known: nothing to compare
    check_devices(group, {_meta(2)})  # a set: torch's own TypeError comes later
    check_devices({"lr": 1e-3}, [torch.randn(2), _meta(2)], at_step=True)  # at a step: a tensor lr only
    with pytest.raises(ValueError, match="lr is a tensor on meta but this group's parameters are on cpu"):
        check_devices(group, [torch.randn(2)], at_step=True)
    with pytest.raises(ValueError, match="lr is a tensor on meta but this group's parameters are on cpu"):
        check_group({**RoseAdamW([torch.randn(1)]).defaults, **group, "params": [torch.randn(2)]}, at_step=True)


# ------------------------------------------------------------------------------------------------
# ... and at step time, when group["lr"] was replaced later: before anything changes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("mode", ["second", "ensemble"])
def test_lr_tensor_replaced_later_on_another_device_raises_at_step(seed, backend, mode):
    gen = torch.Generator().manual_seed(seed)
    params = [randn(s, torch.float32, gen) for s in [(5,), (7,), (3,)]]
    opt = RoseAdamW([{"params": params[:2]}, {"params": params[2:], "rose": False}], lr=1e-2, backend=backend,
                    mode=mode, granularity="element")

    def grads():
        for p in params:
            p.grad = randn(p.shape, torch.float32, gen)

    grads()
    if needs_first(mode):
        opt.record_first_order()
        grads()
    opt.step()
    opt.param_groups[1]["lr"] = torch.tensor(1e-3, device=META)  # the second group: the first must not move
    if needs_first(mode):
        grads()
        opt.record_first_order()
    grads()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="lr is a tensor on meta but this group's parameters are on cpu; pass a "
                                         "float, or a tensor on cpu"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt), f"seed={seed}")
    opt.param_groups[1]["lr"] = torch.tensor(1e-3)  # on the parameters' device: the step goes on
    opt.step()
    assert float(opt.state[params[2]]["step"]) == 2


@needs_triton
@pytest.mark.parametrize("per_parameter", [False, True])
def test_functional_core_refuses_a_tensor_lr_on_another_device(seed, per_parameter):
    """rose_adamw() without the optimizer: a device-resident backend reads a tensor lr where its
    parameter is, so one elsewhere is refused before anything changes."""
    from rose_kernels.functional import rose_adamw

    gen = torch.Generator().manual_seed(seed)
    params = [randn(s, torch.float32, gen) for s in [(5,), (3, 4)]]
    grads = [randn(p.shape, torch.float32, gen) for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    far = torch.tensor(1e-3, device=META)
    lr = [torch.tensor(1e-3), far] if per_parameter else far
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs + steps]
    with pytest.raises(ValueError, match=r"lr of params\[1\] is a tensor on meta but the parameter is on cpu"
                       if per_parameter else r"lr of params\[0\] is a tensor on meta"):
        rose_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, mode="second", granularity="element",
                   backend="triton")
    for a, b in zip(before, params + exp_avgs + exp_avg_sqs + steps, strict=True):
        assert torch.equal(a, b), f"seed={seed}"
    rose_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr=torch.tensor(1e-3), mode="second",
               granularity="element", backend="triton")
    assert float(steps[0]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_cpu_lr_with_gpu_parameters_is_refused(backend, seed):
    """On a GPU: the case that used to fail inside the step (torch.stack of a CPU lr with device ones)."""
    gen = torch.Generator().manual_seed(seed)
    params = [randn(s, torch.float32, gen).cuda() for s in [(5,), (3,)]]
    device = params[0].device
    with pytest.raises(ValueError, match=f"lr is a tensor on cpu but this group's parameters are on {device}"):
        RoseAdamW(params, lr=torch.tensor(1e-3), backend=backend)
    opt = RoseAdamW(params, lr=1e-3, backend=backend)
    for p in params:
        p.grad = randn(p.shape, torch.float32, gen).cuda()
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=f"lr is a tensor on cpu but this group's parameters are on {device}"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt), f"seed={seed}")
    opt.param_groups[0]["lr"] = torch.tensor(1e-3, device=device)
    opt.step()


# ------------------------------------------------------------------------------------------------
# Triton launches on the tensors' device
# ------------------------------------------------------------------------------------------------


def test_device_guard_for_another_gpu_without_initialising_cuda():
    initialised = torch.cuda.is_initialized()
    guard = device_tables.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert torch.cuda.is_initialized() == initialised, "making the guard initialised CUDA"
    assert isinstance(device_tables.device_guard(CPU), nullcontext)
    assert isinstance(device_tables.device_guard(META), nullcontext)
    assert not device_tables.capturing(CPU)


class _GuardSpy:
    """Each call of tables.device_guard: (the function that asked, the device)."""

    def __init__(self, monkeypatch, tables):
        self.calls: list[tuple[str, torch.device]] = []
        real = tables.device_guard

        def spied(device):
            self.calls.append((sys._getframe(1).f_code.co_name, device))
            return real(device)

        monkeypatch.setattr(tables, "device_guard", spied)

    def take(self) -> list[tuple[str, torch.device]]:
        calls, self.calls = self.calls, []
        return calls


def _op_calls(gen):
    """One call of each Triton op on CPU tensors (interpreted), by op name."""
    from rose_kernels.ops import HYPER_COLUMNS

    shapes = [(5,), (1500,), (3,)]
    a = [randn(s, torch.float32, gen) for s in shapes]
    b = [randn(s, torch.float32, gen) for s in shapes]
    n = len(a)
    row = [1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.1]
    assert len(row) == len(HYPER_COLUMNS)
    nan = float("nan")
    return {
        "sumsq": lambda t: t.sumsq(a),
        "element_thresholds": lambda t: t.element_thresholds(a, b, torch.full((n,), 0.1, dtype=torch.float64),
                                                             torch.ones(n, dtype=torch.bool), 0.1, 0.6, False),
        "first_order_mask_": lambda t: t.first_order_mask_(
            a, torch.tensor([[0.0, 1.0]] * n, dtype=torch.float64),
            [torch.zeros((x.numel() + 7) // 8, dtype=torch.uint8) for x in a]),
        "masked_adamw_": lambda t: t.masked_adamw_(
            [x.clone() for x in a], b, [torch.zeros_like(x) for x in a], [torch.zeros_like(x) for x in a],
            [torch.zeros((), dtype=torch.float32) for _ in a], [None] * n,
            torch.tensor([row] * n, dtype=torch.float64), torch.tensor([[1.0, 1.0, nan, nan]] * n, dtype=torch.float64),
            torch.zeros(1, dtype=torch.int32), False),
    }


@needs_triton
def test_every_triton_op_guards_its_device_once(seed, monkeypatch):
    from rose_kernels.backends.triton import TRITON_OPS, tables

    if torch.cuda.is_available() and not tables.on_host():
        pytest.skip("spies on interpreted launches on CPU tensors; with a GPU the guard is checked by "
                    "test_parameters_on_another_gpu_match_the_reference (two GPUs)")
    spy = _GuardSpy(monkeypatch, tables)
    calls = _op_calls(torch.Generator().manual_seed(seed))
    assert set(calls) == set(vars(TRITON_OPS)), "an op of TRITON_OPS has no case here"
    for name, call in calls.items():
        call(TRITON_OPS)
        assert spy.take() == [(name, CPU)], f"{name}: one guard per op call, on the tensors' device"


@needs_triton
@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_an_interpreted_step_guards_every_launch(seed, granularity, monkeypatch):
    from rose_kernels.backends.triton import tables

    if torch.cuda.is_available() and not tables.on_host():
        pytest.skip("spies on interpreted launches on CPU tensors; with a GPU the guard is checked by "
                    "test_parameters_on_another_gpu_match_the_reference (two GPUs)")
    gen = torch.Generator().manual_seed(seed)
    params = [randn(s, torch.float32, gen) for s in [(5,), (1500,), (3,)]]
    opt = RoseAdamW([{"params": params[:2]}, {"params": params[2:], "rose": False}], backend="triton",
                    mode="ensemble", granularity=granularity, nonfinite="skip")
    spy = _GuardSpy(monkeypatch, tables)
    for p in params:
        p.grad = randn(p.shape, torch.float32, gen)
    opt.record_first_order()
    for p in params:
        p.grad = randn(p.shape, torch.float32, gen)
    opt.step()
    calls = spy.take()
    assert {device for _, device in calls} == {CPU}
    ops_used = {"sumsq"} if granularity == "tensor" else {"element_thresholds", "first_order_mask_"}
    assert {name for name, _ in calls} == {"record_first_order", "step", "masked_adamw_", *ops_used}, calls


def _another_gpu_is_there() -> bool:
    return torch.cuda.device_count() >= 2


@pytest.mark.skipif(not _another_gpu_is_there(), reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mode, granularity", [("second", "tensor"), ("second", "element"), ("ensemble", "element"),
                                               ("first", "tensor")])
def test_parameters_on_another_gpu_match_the_reference(seed, backend, mode, granularity, monkeypatch):
    """Parameters on cuda:1 while the current device is cuda:0: every launch must go to cuda:1 (a
    launch on cuda:0 with cuda:1's addresses faults or reads garbage), and nothing lands on cuda:0."""
    other = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    monkeypatch.setitem(conftest.BACKEND_DEVICES, backend, other)
    groups = [{"shapes": [(5,), (2049,), (4, 3)]}, {"shapes": [(3,), (7,)], "rose": False, "lr": 2e-2}]
    prob = Problem(groups, torch.float32, seed, backends=(backend, "reference"), lr=1e-2, mode=mode,
                   granularity=granularity, lower=10.0, upper=70.0, nonfinite="skip")
    assert all(p.device == other for p in all_params(prob.opts[0]))
    lrs = [torch.tensor(5e-3, device=all_params(opt)[0].device) for opt in prob.opts]  # a tensor lr, on cuda:1
    for opt, lr in zip(prob.opts, lrs, strict=True):
        opt.param_groups[0]["lr"] = lr
    torch.cuda.synchronize(0)
    on_current = torch.cuda.memory_allocated(0)
    for t in range(4):
        prob.step()
        assert torch.cuda.current_device() == 0
        prob.check(f"t={t}")
        for lr in lrs:
            lr.mul_(0.7)
    torch.cuda.synchronize(other)
    assert prob.opts[0].check() == 0
    assert torch.cuda.memory_allocated(0) == on_current, "the step allocated memory on the current device"
