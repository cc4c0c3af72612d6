"""``rose_kernels.functional`` gives exactly what ``RoseAdamW.step`` gives (the class is checks and
state around it), on the reference and the cpu backends, for every mode, granularity and scope."""

from __future__ import annotations

import pytest
import torch

from rose_kernels import RoseAdamW, functional, ops
from rose_kernels.dtypes import opmath_dtype
from rose_kernels.types import uses_first_order

BACKENDS = ["reference"] + (["cpu"] if ops.available() else [])
SHAPES = [(37, 5), (300,), (1,), (0,), (64, 33), (9,)]


def _tensors(seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def _groups(params):
    # Two groups with their own AdamW settings (pools span them), an ineligible one, warm-up.
    return [
        {"params": params[:3], "lr": 1e-2, "weight_decay": 0.01},
        {"params": params[3:5], "lr": 3e-3, "betas": (0.8, 0.95), "warmup_steps": 2, "second_order_scale": 0.1},
        {"params": params[5:], "rose": False, "lr": 5e-3},
    ]


def _per_parameter(opt: RoseAdamW) -> dict:
    columns = {k: [] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "warmup_steps",
                               "second_order_scale", "correct_bias", "eligible")}
    for g in opt.param_groups:
        for _ in g["params"]:
            for key, value in (("lr", g["lr"]), ("beta1", g["betas"][0]), ("beta2", g["betas"][1]),
                               ("eps", g["eps"]), ("weight_decay", g["weight_decay"]),
                               ("warmup_steps", g["warmup_steps"]),
                               ("second_order_scale", g["second_order_scale"]),
                               ("correct_bias", g["correct_bias"]), ("eligible", g["rose"])):
                columns[key].append(value)
    return columns


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,granularity,scope", [
    ("off", "tensor", "tensor"), ("second", "tensor", "tensor"), ("second", "element", "tensor"),
    ("second", "element", "global"), ("first", "tensor", "tensor"), ("first", "element", "global"),
    ("ensemble", "element", "tensor"), ("ensemble", "tensor", "tensor"),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_functional_equals_the_class(seed, backend, mode, granularity, scope, dtype):
    settings = dict(mode=mode, granularity=granularity, scope=scope, lower=10.0, upper=70.0, gamma=0.3)
    params = [torch.nn.Parameter(t) for t in _tensors(seed, dtype)]
    opt = RoseAdamW(_groups(params), backend=backend, **settings)
    columns = _per_parameter(opt)
    mine = [t.detach().clone() for t in params]
    exp_avgs = [torch.zeros_like(t, dtype=opmath_dtype(dtype)) for t in mine]
    exp_avg_sqs = [torch.zeros_like(m) for m in exp_avgs]
    steps = [torch.zeros((), dtype=torch.float32) for _ in mine]
    cached = [None] * len(mine)
    masks = None
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(4):
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype) for t in mine]
        kl = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype) for t in mine]
        record = None
        if uses_first_order(mode):
            for p, g in zip(params, kl, strict=True):
                p.grad = g.clone()
            opt.record_first_order()
            eligible = [i for i, e in enumerate(columns["eligible"]) if e]
            record = functional.record_first_order(
                [kl[i] for i in eligible], [steps[i] if step else None for i in eligible],
                warmup_steps=[columns["warmup_steps"][i] for i in eligible], granularity=granularity, scope=scope,
                lower=10.0, upper=70.0, backend=backend)
            masks = [None] * len(mine)
            for i, m in zip(eligible, record.masks, strict=True):
                masks[i] = m
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        result = functional.rose_adamw(mine, grads, exp_avgs, exp_avg_sqs, steps, **columns, **settings,
                                       first_order=masks, exp_avg_sumsq=cached, backend=backend)
        cached = result.exp_avg_sumsq if result.exp_avg_sumsq is not None else [None] * len(mine)
        msg = f"seed={seed} step={step}"
        for i, (p, q) in enumerate(zip(params, mine, strict=True)):
            assert torch.equal(p.detach(), q), f"{msg}: param {i}"
            state = opt.state[p]
            assert torch.equal(state["exp_avg"], exp_avgs[i]), f"{msg}: exp_avg {i}"
            assert torch.equal(state["exp_avg_sq"], exp_avg_sqs[i]), f"{msg}: exp_avg_sq {i}"
            assert float(state["step"]) == float(steps[i]) == step + 1, msg
        kept = [k for k, e in zip(result.kept, columns["eligible"], strict=True) if e]
        assert list(opt.mask_stats().values()) == kept, msg


def test_scalar_settings_apply_to_every_parameter(seed):
    tensors = _tensors(seed, torch.float32)
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    opt = RoseAdamW(params, lr=2e-3, betas=(0.9, 0.98), mode="second", granularity="element")
    mine = [t.clone() for t in tensors]
    m = [torch.zeros_like(t) for t in mine]
    v = [torch.zeros_like(t) for t in mine]
    steps = [torch.zeros(()) for _ in mine]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=gen) for t in mine]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        functional.rose_adamw(mine, grads, m, v, steps, lr=2e-3, beta1=0.9, beta2=0.98, granularity="element")
    for p, q in zip(params, mine, strict=True):
        assert torch.equal(p.detach(), q), f"seed={seed}"


def test_functional_checks_its_arguments_before_anything_changes():
    p = [torch.ones(3)]
    g = [torch.full((3,), float("nan"))]
    m, v, s = [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(())]
    with pytest.raises(ValueError, match="mode"):
        functional.rose_adamw(p, g, m, v, s, mode="fourth")
    with pytest.raises(ValueError, match="lr has 2 values for 1 parameters"):
        functional.rose_adamw(p, g, m, v, s, lr=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="2 grads for 1 params"):
        functional.rose_adamw(p, g * 2, m, v, s)
    with pytest.raises(RuntimeError, match="non-finite"):
        functional.rose_adamw(p, g, m, v, s, backend="reference")
    skipped = functional.rose_adamw(p, g, m, v, s, backend="reference", nonfinite="skip")
    assert skipped.nonfinite is True
    assert torch.equal(p[0], torch.ones(3)) and float(s[0]) == 0 and torch.equal(m[0], torch.zeros(3))
