"""Section 6: bad arguments, sparse and non-finite gradients, missing first-order scores, GradScaler."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from conftest import all_params, assert_bitwise_equal, assert_snapshot_equal, needs_first, randn, snapshot

from rose_kernels import RoseAdamW
from rose_kernels.types import FIRST_ORDER_MODES

nan, inf = math.nan, math.inf


def assert_raises_unchanged(opt, call, error, match, msg):
    """``call()`` raises ``error`` matching ``match``, and nothing in ``opt`` changed."""
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        call()
    assert_snapshot_equal(before, snapshot(opt), msg)


def _p(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_ARGS = [
    (dict(lower=60.0, upper=50.0), "lower"),
    (dict(lower=-1.0), "lower"),
    (dict(lower=100.5, upper=100.0), "lower"),
    (dict(upper=101.0), "upper"),
    (dict(upper=-0.1), "upper"),
    (dict(lower=nan), "lower"),
    (dict(upper=inf), "upper"),
    (dict(gamma=-0.1), "gamma"),
    (dict(gamma=1.5), "gamma"),
    (dict(gamma=nan), "gamma"),
    (dict(lr=-1e-3), "lr"),
    (dict(lr=nan), "lr"),
    (dict(lr=inf), "lr"),
    (dict(lr=torch.tensor(nan)), "lr"),
    (dict(lr="0.1"), "lr"),
    (dict(eps=-1e-8), "eps"),
    (dict(eps=nan), "eps"),
    (dict(eps=inf), "eps"),
    (dict(weight_decay=-0.01), "weight_decay"),
    (dict(weight_decay=nan), "weight_decay"),
    (dict(weight_decay=inf), "weight_decay"),
    (dict(betas=(1.0, 0.999)), "betas"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(-0.1, 0.999)), "betas"),
    (dict(betas=(0.9, -0.5)), "betas"),
    (dict(betas=(nan, 0.999)), "betas"),
    (dict(betas=(0.9, inf)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(mode="third"), "mode"),
    (dict(mode=None), "mode"),
    (dict(granularity="row"), "granularity"),
    (dict(scope="layer"), "scope"),
    (dict(backend="triton-that-does-not-exist"), "backend"),
    (dict(nonfinite="ignore"), "nonfinite"),
    (dict(thresholds="approximate"), "thresholds"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=1.5), "warmup_steps"),
    (dict(second_order_scale=nan), "second_order_scale"),
    (dict(correct_bias="yes"), "correct_bias"),
]


@pytest.mark.parametrize("kwargs, name", BAD_ARGS, ids=[f"{n}={list(k.values())}" for k, n in BAD_ARGS])
def test_bad_constructor_argument(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[")):
        RoseAdamW([_p(3)], **kwargs)


@pytest.mark.parametrize(
    "group, name",
    [
        ({"lr": -1.0}, "lr"),
        ({"eps": nan}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"rose": "yes"}, "rose"),
        ({"warmup_steps": -2}, "warmup_steps"),
    ],
)
def test_bad_group_argument(group, name):
    with pytest.raises(ValueError, match=name):
        RoseAdamW([{"params": [_p(3)]}, {"params": [_p(2)], **group}])


def test_good_edge_arguments_are_accepted():
    for kw in (
        dict(lower=0.0, upper=0.0),
        dict(lower=100.0, upper=100.0),
        dict(lower=0, upper=100),
        dict(gamma=0.0),
        dict(gamma=1.0),
        dict(lr=0.0),
        dict(eps=0.0),
        dict(weight_decay=0.0),
        dict(betas=(0.0, 0.0)),
        dict(lr=torch.tensor(1e-3)),
        dict(second_order_scale=0.1),
        dict(warmup_steps=3),
    ):
        RoseAdamW([_p(3)], **kw)


@pytest.mark.parametrize(
    "param, match",
    [
        (torch.randn(3, dtype=torch.complex64), "complex"),
        (torch.randn(4, 3).t(), "contiguous"),
        (torch.randn(8)[::2], "contiguous"),
        (torch.arange(3), "int64"),
        (torch.zeros(3, dtype=torch.int32), "int32"),
    ],
    ids=["complex", "transposed", "strided", "int64", "int32"],
)
def test_bad_params(param, match):
    with pytest.raises(ValueError, match=match):
        RoseAdamW([_p(2), param])
    with pytest.raises(ValueError, match=match):
        RoseAdamW([{"params": [_p(2)]}, {"params": [param], "rose": False}])


def test_bad_param_added_later():
    opt = RoseAdamW([_p(2)])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.randn(3, dtype=torch.complex128)]})
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------------------------------------------
# Errors raised inside step(): nothing may change
# ------------------------------------------------------------------------------------------------


def _setup(seed, mode="second", granularity="element", dtype=torch.float32, backend="cpu", shapes=None, **kw):
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or [(5,), (40000,), (3, 4), (2,)]
    params = [randn(s, dtype, gen) for s in shapes]
    opt = RoseAdamW(
        [{"params": params[:-1], "weight_decay": 0.01}, {"params": params[-1:], "rose": False}],
        lr=1e-2,
        mode=mode,
        granularity=granularity,
        lower=10.0,
        upper=70.0,
        backend=backend,
        **kw,
    )
    return opt, params, gen


def _grads(params, gen):
    return [randn(p.shape, p.dtype, gen) for p in params]


def _full_step(opt, params, gen, grads=None, kl=None):
    mode = opt.rose.mode
    if needs_first(mode):
        for p, g in zip(params, kl if kl is not None else _grads(params, gen), strict=True):
            p.grad = g
        opt.record_first_order()
    for p, g in zip(params, grads if grads is not None else _grads(params, gen), strict=True):
        p.grad = g
    opt.step()


@pytest.mark.parametrize("where", ["eligible", "other"])
@pytest.mark.parametrize("mode", ["second", "first"])
def test_sparse_gradient_raises_before_any_change(seed, mode, where):
    opt, params, gen = _setup(seed, mode=mode, granularity="tensor")
    _full_step(opt, params, gen)
    idx = 2 if where == "eligible" else 3
    if needs_first(mode):
        for p, g in zip(params, _grads(params, gen), strict=True):
            p.grad = g
        opt.record_first_order()
    for p, g in zip(params, _grads(params, gen), strict=True):
        p.grad = g
    params[idx].grad = params[idx].grad.to_sparse()
    assert_raises_unchanged(opt, opt.step, RuntimeError, "sparse", f"seed={seed}")


def test_sparse_kl_gradient_raises(seed):
    opt, params, gen = _setup(seed, mode="first", granularity="element")
    _full_step(opt, params, gen)
    for p, g in zip(params, _grads(params, gen), strict=True):
        p.grad = g
    params[0].grad = params[0].grad.to_sparse()
    assert_raises_unchanged(opt, opt.record_first_order, RuntimeError, "sparse", f"seed={seed}")


@pytest.mark.parametrize("bad", [nan, -1.0, inf])
def test_bad_lr_set_later_raises_at_step(seed, bad):
    opt, params, gen = _setup(seed)
    _full_step(opt, params, gen)
    opt.param_groups[1]["lr"] = bad  # the second group: the first one must not move either
    for p, g in zip(params, _grads(params, gen), strict=True):
        p.grad = g
    assert_raises_unchanged(opt, opt.step, ValueError, "lr", f"seed={seed}")


def test_scheduler_producing_nan_lr_raises(seed):
    opt, params, gen = _setup(seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 2 else nan)
    for _ in range(2):
        _full_step(opt, params, gen)
        sched.step()
    assert all(math.isnan(g["lr"]) for g in opt.param_groups)
    for p, g in zip(params, _grads(params, gen), strict=True):
        p.grad = g
    assert_raises_unchanged(opt, opt.step, ValueError, "lr", f"seed={seed}")


def test_bad_betas_set_later_raise_at_step(seed):
    opt, params, gen = _setup(seed)
    _full_step(opt, params, gen)
    opt.param_groups[0]["betas"] = (0.9, 1.0)
    for p, g in zip(params, _grads(params, gen), strict=True):
        p.grad = g
    assert_raises_unchanged(opt, opt.step, ValueError, "betas", f"seed={seed}")


# ------------------------------------------------------------------------------------------------
# Non-finite gradients
# ------------------------------------------------------------------------------------------------

CASES = [
    (backend, mode, granularity)
    for backend in ("cpu", "reference")
    for mode in ("off", "first", "second", "ensemble")
    for granularity in ("tensor", "element")
]


def _poison(params, grads, rng, where):
    """One non-finite value in an eligible tensor, the rose=False tensor, or several places."""
    value = rng.choice([nan, inf, -inf])
    idx = {"eligible": rng.randrange(len(params) - 1), "other": len(params) - 1}[where]
    flat = grads[idx].view(-1)
    flat[rng.randrange(flat.numel())] = value
    return f"{value} in tensor {idx}"


@pytest.mark.parametrize("where", ["eligible", "other"])
@pytest.mark.parametrize("backend, mode, granularity", CASES)
def test_nonfinite_grad_raise(seed, backend, mode, granularity, where):
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float64])
    warmup = rng.choice([0, 5])  # warming-up tensors are checked too (they are not scored)
    opt, params, gen = _setup(
        seed, mode, granularity, dtype, backend, scope=rng.choice(["tensor", "global"]), warmup_steps=warmup
    )
    for _ in range(2):
        _full_step(opt, params, gen)
    grads = _grads(params, gen)
    what = _poison(params, grads, rng, where)
    msg = f"seed={seed} {dtype} warmup={warmup} {what}"
    if needs_first(mode):
        for p, g in zip(params, _grads(params, gen), strict=True):
            p.grad = g
        opt.record_first_order()
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    assert_raises_unchanged(opt, opt.step, RuntimeError, "non-finite", msg)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("backend, mode, granularity", CASES)
def test_nonfinite_grad_skip(seed, backend, mode, granularity):
    """Skipped with a RuntimeWarning; nothing changes, and the next steps are those of a twin
    optimizer that never saw the bad step."""
    rng = random.Random(seed)
    cfg = dict(mode=mode, granularity=granularity, backend=backend, nonfinite="skip")
    opt, params, gen = _setup(seed, **cfg)
    twin, twin_params, _ = _setup(seed, **cfg)
    first_bad = rng.random() < 0.5  # also on the very first step: no state may be created
    steps = [rng.random() < 0.5 for _ in range(3)]
    for t, bad in enumerate([first_bad, *steps]):
        grads = _grads(params, gen)
        kl = _grads(params, gen)
        if bad:
            what = _poison(params, grads, rng, rng.choice(["eligible", "other"]))
            before = snapshot(opt)
            skipped = opt.skipped_steps
            with pytest.warns(RuntimeWarning, match="non-finite"):
                _full_step(opt, params, gen, grads, kl)
            after = snapshot(opt)
            assert opt.skipped_steps == skipped + 1
            before["skipped"] = after["skipped"]
            assert_snapshot_equal(before, after, f"seed={seed} t={t} {what}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _full_step(opt, params, gen, [g.clone() for g in grads], [g.clone() for g in kl])
            _full_step(twin, twin_params, gen, grads, kl)
        for i, (a, b) in enumerate(zip(params, twin_params, strict=True)):
            assert_bitwise_equal(a, b, f"seed={seed} t={t} param {i}")
            for k in ("step", "exp_avg", "exp_avg_sq"):
                assert_bitwise_equal(opt.state[a][k], twin.state[b][k], f"seed={seed} t={t} param {i} {k}")
        assert opt.mask_stats() == twin.mask_stats()


@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("mode", sorted(FIRST_ORDER_MODES))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_nonfinite_kl_grad_raise(seed, backend, mode, granularity):
    rng = random.Random(seed)
    opt, params, gen = _setup(seed, mode, granularity, backend=backend)
    _full_step(opt, params, gen)
    kl = _grads(params, gen)
    what = _poison(params, kl, rng, "eligible")
    for p, g in zip(params, kl, strict=True):
        p.grad = g
    assert_raises_unchanged(
        opt, opt.record_first_order, RuntimeError, "record_first_order|non-finite", f"seed={seed} {what}"
    )
    # the next batch works normally once its scores are recorded
    _full_step(opt, params, gen)
    assert all(float(opt.state[p]["step"]) == 2 for p in params)


@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("mode", sorted(FIRST_ORDER_MODES))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_nonfinite_kl_grad_skip(seed, backend, mode, granularity):
    rng = random.Random(seed)
    opt, params, gen = _setup(seed, mode, granularity, backend=backend, nonfinite="skip")
    _full_step(opt, params, gen)
    kl = _grads(params, gen)
    what = _poison(params, kl, rng, "eligible")
    before = snapshot(opt)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _full_step(opt, params, gen, kl=kl)
    after = snapshot(opt)
    assert opt.skipped_steps == 1
    before["skipped"] = 1
    assert_snapshot_equal(before, after, f"seed={seed} {what}")
    _full_step(opt, params, gen)
    assert all(float(opt.state[p]["step"]) == 2 for p in params)


def test_nonfinite_kl_in_ineligible_param_is_ignored(seed):
    """KL gradients of rose=False params are never read."""
    opt, params, gen = _setup(seed, mode="first")
    kl = _grads(params, gen)
    kl[-1][0] = nan
    _full_step(opt, params, gen, kl=kl)
    assert all(float(opt.state[p]["step"]) == 1 for p in params)


# ------------------------------------------------------------------------------------------------
# Missing / misplaced first-order scores
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(FIRST_ORDER_MODES))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_step_without_record_first_order(seed, backend, mode):
    opt, params, gen = _setup(seed, mode, backend=backend)
    for p, g in zip(params, _grads(params, gen), strict=True):
        p.grad = g
    assert_raises_unchanged(opt, opt.step, RuntimeError, "record_first_order", f"seed={seed}")
    _full_step(opt, params, gen)
    # the record is used up by one step
    with pytest.raises(RuntimeError, match="record_first_order"):
        opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in params)


@pytest.mark.parametrize("mode", ["second", "off"])
def test_record_first_order_in_wrong_mode(mode):
    p = _p(3)
    opt = RoseAdamW([p], mode=mode)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="record_first_order"):
        opt.record_first_order()


# ------------------------------------------------------------------------------------------------
# GradScaler
# ------------------------------------------------------------------------------------------------


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_grad_scaler(seed, granularity):
    model, twin = _model(seed), _model(seed)
    cfg = dict(lr=1e-2, mode="second", granularity=granularity, upper=50.0)
    opt = RoseAdamW(model.parameters(), **cfg)
    opt_twin = RoseAdamW(twin.parameters(), **cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    gen = torch.Generator().manual_seed(seed)
    for t in range(5):
        x = torch.randn(8, 6, generator=gen)
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if t == 2:
            # an overflow: GradScaler skips optimizer.step() and nothing changes
            model[0].weight.grad[0, 0] = inf
            before = snapshot(opt)
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            assert scaler.get_scale() < scale
            after = snapshot(opt)
            assert_snapshot_equal(before, after, f"seed={seed} skipped step")
            assert opt.skipped_steps == 0
            continue
        scaler.step(opt)
        scaler.update()
        opt_twin.zero_grad()
        twin(x).pow(2).mean().backward()
        opt_twin.step()
        for i, (a, b) in enumerate(zip(model.parameters(), twin.parameters(), strict=True)):
            assert_bitwise_equal(a.detach(), b.detach(), f"seed={seed} t={t} param {i}")
            for k in ("step", "exp_avg", "exp_avg_sq"):
                assert_bitwise_equal(
                    opt.state[a][k], opt_twin.state[b][k], f"seed={seed} t={t} param {i} {k}"
                )
        assert opt.mask_stats() == opt_twin.mask_stats()
    assert all(float(opt.state[p]["step"]) == 4 for p in all_params(opt))
