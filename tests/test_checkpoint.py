"""state_dict / load_state_dict: exact resumption, and checkpoints moving to and from torch.optim.AdamW."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import all_params, assert_bitwise_equal, needs_first, randn

from rose_kernels import RoseAdamW, rose_param_groups

SHAPES = [(5,), (7, 3), (40000,), (1,), (9,)]
OTHER = [(4,), (2, 2)]


def _make_params(seed: int, dtype: torch.dtype, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [randn(s, dtype, gen) for s in shapes]


def _groups(params, n_eligible=None, wd=0.01):
    n_eligible = len(SHAPES) if n_eligible is None else n_eligible
    return [
        {"params": params[:n_eligible], "weight_decay": wd},
        {"params": params[n_eligible:], "rose": False, "weight_decay": 0.0},
    ]


def _train(opt, seed: int, start: int, stop: int, mode: str, zero_frac: float = 0.05) -> None:
    """Steps start..stop-1 with gradients that depend only on (seed, step index)."""
    params = all_params(opt)
    for t in range(start, stop):
        gen = torch.Generator().manual_seed(seed * 1000 + t)
        if needs_first(mode):
            for p in params:
                p.grad = randn(p.shape, p.dtype, gen)
            opt.record_first_order()
        for p in params:
            p.grad = randn(p.shape, p.dtype, gen, zero_frac=zero_frac)
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same_training_state(opt_a, opt_b, msg):
    for i, (a, b) in enumerate(zip(all_params(opt_a), all_params(opt_b), strict=True)):
        assert_bitwise_equal(a.detach(), b.detach(), f"{msg} param {i}")
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(opt_a.state[a][k], opt_b.state[b][k], f"{msg} param {i} {k}")
    assert opt_a.mask_stats() == opt_b.mask_stats(), msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("mode", ["second", "ensemble"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_resume_is_exact(seed, backend, mode, granularity, dtype):
    cfg = dict(
        lr=1e-2, mode=mode, granularity=granularity, lower=10.0, upper=70.0, gamma=0.3, backend=backend
    )
    init = _make_params(seed, dtype, SHAPES + OTHER)
    straight = RoseAdamW(_groups([p.clone() for p in init]), **cfg)
    _train(straight, seed, 0, 5, mode)

    first = RoseAdamW(_groups([p.clone() for p in init]), **cfg)
    _train(first, seed, 0, 2, mode)
    saved = _roundtrip(first.state_dict())
    resumed = RoseAdamW(_groups([p.detach().clone() for p in all_params(first)]), **cfg)
    resumed.load_state_dict(saved)
    for p in all_params(resumed):
        assert resumed.state[p]["exp_avg"].dtype == (torch.float32 if dtype != torch.float64 else dtype)
        assert float(resumed.state[p]["step"]) == 2
    _train(resumed, seed, 2, 5, mode)
    _assert_same_training_state(straight, resumed, f"seed={seed} {cfg} {dtype}")


def test_state_keys_are_adamw_keys(seed):
    opt = RoseAdamW(_groups(_make_params(seed, torch.float32, SHAPES + OTHER)), mode="second")
    _train(opt, seed, 0, 2, "second")
    sd = opt.state_dict()
    assert len(sd["state"]) == len(SHAPES) + len(OTHER)
    for s in sd["state"].values():
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"}
        assert s["step"].dtype == torch.float32 and s["step"].dim() == 0 and float(s["step"]) == 2
    assert [g["rose"] for g in sd["param_groups"]] == [True, False]


def _adamw_and_rose(seed, dtype=torch.float64, **rose_kw):
    params = _make_params(seed, dtype, SHAPES[:2] + OTHER)
    torch_params = [p.clone() for p in params]
    rose_params = [p.clone() for p in params]
    adamw = torch.optim.AdamW(
        [{"params": torch_params[:2]}, {"params": torch_params[2:]}],
        lr=1e-2,
        betas=(0.9, 0.99),
        eps=0.0,
        weight_decay=0.0,
    )
    rose = RoseAdamW(_groups(rose_params, 2), lr=0.5, betas=(0.5, 0.5), eps=1e-3, weight_decay=0.3, **rose_kw)
    return adamw, rose


def test_adamw_checkpoint_loads_and_training_continues(seed):
    """torch AdamW -> RoseAdamW. With eps = 0 and no decay, mode "off" is the same math as torch's AdamW,
    so both continue identically (to rounding)."""
    adamw, rose = _adamw_and_rose(seed, mode="off", warmup_steps=1, second_order_scale=0.2, correct_bias=True)
    rose_groups_before = [
        {k: g[k] for k in ("rose", "warmup_steps", "second_order_scale")} for g in rose.param_groups
    ]
    _train(adamw, seed, 0, 3, "off", zero_frac=0.0)
    with torch.no_grad():
        for a, b in zip(all_params(adamw), all_params(rose), strict=True):
            b.copy_(a)
    rose.load_state_dict(_roundtrip(adamw.state_dict()))
    # hyper-parameters come from the checkpoint; the ROSE group keys keep this optimizer's values
    for g, before in zip(rose.param_groups, rose_groups_before, strict=True):
        assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-2, (0.9, 0.99), 0.0, 0.0)
        assert {k: g[k] for k in before} == before
    for p in all_params(rose):
        assert set(rose.state[p]) >= {"step", "exp_avg", "exp_avg_sq"} and float(rose.state[p]["step"]) == 3
    _train(adamw, seed, 3, 6, "off", zero_frac=0.0)
    _train(rose, seed, 3, 6, "off", zero_frac=0.0)
    for i, (a, b) in enumerate(zip(all_params(adamw), all_params(rose), strict=True)):
        msg = f"seed={seed} param {i}"
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13, msg=lambda m, msg=msg: f"{msg}: {m}")
        torch.testing.assert_close(
            rose.state[b]["exp_avg"], adamw.state[a]["exp_avg"], rtol=1e-12, atol=1e-14
        )
        torch.testing.assert_close(
            rose.state[b]["exp_avg_sq"], adamw.state[a]["exp_avg_sq"], rtol=1e-12, atol=1e-14
        )
        assert float(rose.state[b]["step"]) == 6


@pytest.mark.parametrize("mode", ["second", "ensemble"])
def test_adamw_checkpoint_then_rose_masking(seed, mode):
    adamw, rose = _adamw_and_rose(seed, mode=mode, granularity="element", upper=50.0)
    _train(adamw, seed, 0, 2, "off", zero_frac=0.0)
    rose.load_state_dict(adamw.state_dict())
    before = [p.clone() for p in all_params(rose)]
    _train(rose, seed, 2, 4, mode, zero_frac=0.0)
    stats = rose.mask_stats()
    assert set(stats) == {"0.0", "0.1"} and all(v < 1.0 for v in stats.values()), stats
    for p, b in zip(all_params(rose), before, strict=True):
        assert float(rose.state[p]["step"]) == 4 and not torch.equal(p, b)


def test_rose_checkpoint_loads_into_adamw(seed):
    """RoseAdamW -> torch AdamW: AdamW's step continues from the moments exactly as RoseAdamW "off" would."""
    params = _make_params(seed, torch.float64, SHAPES[:2] + OTHER)
    # no decay: torch's AdamW decays before the Adam move, RoseAdamW after it
    rose = RoseAdamW(
        _groups([p.clone() for p in params], 2, wd=0.0),
        lr=1e-2,
        betas=(0.9, 0.99),
        eps=0.0,
        mode="second",
        granularity="element",
        upper=50.0,
    )
    _train(rose, seed, 0, 3, "second", zero_frac=0.0)
    sd = rose.state_dict()
    current = [p.detach().clone() for p in all_params(rose)]
    adamw = torch.optim.AdamW(
        [{"params": [p.clone() for p in current[:2]]}, {"params": [p.clone() for p in current[2:]]}]
    )
    # separate copies: torch's load_state_dict keeps the saved `step` tensors themselves
    adamw.load_state_dict(_roundtrip(sd))
    assert all(g["decoupled_weight_decay"] for g in adamw.param_groups)
    off = RoseAdamW(_groups([p.clone() for p in current], 2), mode="off")
    off.load_state_dict(_roundtrip(sd))
    _train(adamw, seed, 3, 5, "off", zero_frac=0.0)
    _train(off, seed, 3, 5, "off", zero_frac=0.0)
    for i, (a, b) in enumerate(zip(all_params(adamw), all_params(off), strict=True)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(
            a, b, rtol=1e-12, atol=1e-13, msg=lambda m, i=i: f"seed={seed} param {i}: {m}"
        )
        assert float(adamw.state[a]["step"]) == 5


def test_bf16_params_keep_float32_moments(seed):
    params = _make_params(seed, torch.bfloat16, SHAPES[:2] + OTHER)
    # from a RoseAdamW checkpoint
    rose = RoseAdamW(_groups([p.clone() for p in params], 2), mode="second")
    _train(rose, seed, 0, 2, "second")
    fresh = RoseAdamW(_groups([p.clone() for p in params], 2), mode="second")
    fresh.load_state_dict(_roundtrip(rose.state_dict()))
    for a, b in zip(all_params(rose), all_params(fresh), strict=True):
        for k in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[b][k].dtype == torch.float32
            assert_bitwise_equal(fresh.state[b][k], rose.state[a][k], k)
    # from a torch AdamW checkpoint, whose moments are bf16
    adamw = torch.optim.AdamW([p.clone() for p in params])
    _train(adamw, seed, 0, 2, "off")
    assert all(adamw.state[p]["exp_avg"].dtype == torch.bfloat16 for p in all_params(adamw))
    from_adamw = RoseAdamW([p.clone() for p in params], mode="second")
    from_adamw.load_state_dict(adamw.state_dict())
    for a, b in zip(all_params(adamw), all_params(from_adamw), strict=True):
        for k in ("exp_avg", "exp_avg_sq"):
            assert from_adamw.state[b][k].dtype == torch.float32
            assert torch.equal(from_adamw.state[b][k], adamw.state[a][k].float())
    _train(from_adamw, seed, 2, 4, "second")
    for p in all_params(from_adamw):
        assert p.dtype == torch.bfloat16 and from_adamw.state[p]["exp_avg"].dtype == torch.float32
        assert float(from_adamw.state[p]["step"]) == 4


def test_rose_false_survives_adamw_checkpoint(seed):
    params = _make_params(seed, torch.float32, SHAPES[:2] + OTHER)
    adamw = torch.optim.AdamW(
        [{"params": [p.clone() for p in params[:2]]}, {"params": [p.clone() for p in params[2:]]}]
    )
    _train(adamw, seed, 0, 1, "off")
    rose = RoseAdamW(
        [
            {"params": params[:2]},
            {"params": params[2:], "rose": False, "warmup_steps": 3, "correct_bias": False},
        ],
        mode="second",
        second_order_scale=0.1,
    )
    rose.load_state_dict(adamw.state_dict())
    assert [g["rose"] for g in rose.param_groups] == [True, False]
    assert [g["warmup_steps"] for g in rose.param_groups] == [0, 3]
    assert [g["correct_bias"] for g in rose.param_groups] == [True, False]
    assert [g["second_order_scale"] for g in rose.param_groups] == [0.1, 0.1]
    _train(rose, seed, 1, 3, "second")
    assert set(rose.mask_stats()) == {"0.0", "0.1"}


def _assert_same_dict(a, b, path="sd"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_dict(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_dict(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert_bitwise_equal(a, b, path)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("mode", ["second", "ensemble", "off"])
def test_load_then_save_is_identity(seed, mode):
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({"layer": torch.nn.Linear(3, 4), "head": torch.nn.Linear(4, 1)})
    opt = RoseAdamW(rose_param_groups(model), mode=mode, granularity="element", lr=1e-2)
    x = torch.randn(5, 3)

    def step():
        opt.zero_grad()
        if needs_first(mode):
            model["head"](model["layer"](x)).sum().backward(retain_graph=True)
            opt.record_first_order()
            opt.zero_grad()
        model["head"](torch.tanh(model["layer"](x))).pow(2).mean().backward()
        opt.step()

    step()
    step()
    sd = opt.state_dict()
    assert any("param_names" in g for g in sd["param_groups"])
    model2 = copy.deepcopy(model)
    opt2 = RoseAdamW(rose_param_groups(model2), mode=mode, granularity="element", lr=0.5)
    opt2.load_state_dict(_roundtrip(sd))
    _assert_same_dict(sd, opt2.state_dict())
    opt3 = RoseAdamW(rose_param_groups(copy.deepcopy(model)), mode=mode, granularity="element")
    opt3.load_state_dict(copy.deepcopy(opt2.state_dict()))
    _assert_same_dict(sd, opt3.state_dict())
