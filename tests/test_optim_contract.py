"""RoseAdamW keeps torch.optim's contract: what a user's torch.optim habits expect of an optimizer.

Param groups from generators and from ``named_parameters()``, copies and pickles, state-dict round
trips (named and unnamed, ``weights_only``), AdamW checkpoints both ways, hooks, closures, steps
without gradients, tensor learning rates under schedulers, printing, and the errors torch raises
for inputs it refuses. Every problem is drawn fresh from a seed that failing assertions report.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from rose_kernels import RoseAdamW
from rose_kernels.types import uses_first_order

MODES = ("off", "second", "first", "ensemble")


def _model(seed: int, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int, steps: int, mode: str = "second"):
    """``steps`` steps on fresh batches drawn from ``seed`` (KL gradients drawn too for first/ensemble)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64).to(dtype)
        if uses_first_order(mode):
            opt.zero_grad()
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            opt.record_first_order()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module, msg: str) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{msg}: parameter {name} differs"


# ---- the three defects --------------------------------------------------------------------------


def test_param_group_from_a_generator_keeps_its_parameters(seed):
    model, twin = _model(seed), _model(seed)
    from_generator = RoseAdamW([{"params": model.parameters(), "lr": 1e-2}])
    from_list = RoseAdamW([{"params": list(twin.parameters()), "lr": 1e-2}])
    assert len(from_generator.param_groups[0]["params"]) == 4, f"seed={seed}"
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, from_generator, seed, 3)
    _train(twin, from_list, seed, 3)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)), f"seed={seed}"
    _assert_same_params(model, twin, f"seed={seed}")


def test_generator_of_generators_and_a_single_tensor():
    model = _model(0)
    opt = RoseAdamW(p for p in model.parameters())  # a generator of tensors, not of groups
    assert len(opt.param_groups[0]["params"]) == 4
    opt.add_param_group({"params": torch.nn.Parameter(torch.zeros(3))})
    assert len(opt.param_groups[1]["params"]) == 1


@pytest.mark.parametrize("mode", MODES)
def test_named_parameters_are_accepted_and_name_mask_stats(seed, mode):
    model, twin = _model(seed), _model(seed)
    named = RoseAdamW(model.named_parameters(), lr=1e-2, mode=mode)
    plain = RoseAdamW(twin.parameters(), lr=1e-2, mode=mode)
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    _train(model, named, seed, 3, mode)
    _train(twin, plain, seed, 3, mode)
    _assert_same_params(model, twin, f"seed={seed} mode={mode}")
    stats = named.mask_stats()
    assert list(stats) == [n for n, _ in model.named_parameters()], f"seed={seed}"
    assert list(stats.values()) == list(plain.mask_stats().values()), f"seed={seed}"
    saved = named.state_dict()
    assert saved["param_groups"][0]["param_names"] == list(stats)


def test_named_groups_and_mixed_names():
    model = _model(0)
    named = list(model.named_parameters())
    opt = RoseAdamW([{"params": named[:2]}, {"params": named[2:], "rose": False}])
    assert opt.param_groups[1]["param_names"] == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="with/without names"):
        RoseAdamW([named[0], named[1][1]])
    with pytest.raises(ValueError, match="groups should be with/without names"):  # torch: all or none
        RoseAdamW([{"params": named[:2]}, {"params": [p for _, p in named[2:]]}])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_and_pickles_step_like_the_original(seed, mode, how):
    model = _model(seed)
    opt = RoseAdamW(model.parameters(), lr=1e-2, mode=mode, granularity="element", upper=70, nonfinite="skip")
    _train(model, opt, seed, 2, mode)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.rose == opt.rose and opt2.backend == opt.backend, f"seed={seed}"
    assert opt2.mask_stats() == opt.mask_stats(), f"seed={seed}"
    _train(model, opt, seed + 1, 2, mode)
    _train(model2, opt2, seed + 1, 2, mode)
    _assert_same_params(model, model2, f"seed={seed} mode={mode} {how}")
    assert opt2.mask_stats() == opt.mask_stats(), f"seed={seed}"


def test_a_copy_keeps_a_pending_first_order_record(seed):
    model = _model(seed)
    opt = RoseAdamW(model.parameters(), mode="first", granularity="element")
    _train(model, opt, seed, 1, "first")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.record_first_order()
    model2, opt2 = copy.deepcopy((model, opt))
    for opt_, model_ in ((opt, model), (opt2, model2)):
        opt_.zero_grad()
        for p in model_.parameters():
            p.grad = torch.ones_like(p)
        opt_.step()  # would raise "needs first-order scores" had the copy lost the record
    _assert_same_params(model, model2, f"seed={seed}")


def test_a_torch_pickled_optimizer_without_rose_attributes_loads():
    # An object pickled by torch's Optimizer.__getstate__ alone (defaults, state, param_groups).
    opt = RoseAdamW(_model(0).parameters())
    state = torch.optim.Optimizer.__getstate__(opt)
    restored = RoseAdamW.__new__(RoseAdamW)
    restored.__setstate__(dict(state))
    assert restored.rose.mode == "second" and restored.backend == "auto"


# ---- state dicts and checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("mode", ["second", "ensemble"])
def test_state_dict_round_trip_weights_only(seed, named, mode):
    """Save mid-run with torch.save, load with weights_only=True into a fresh optimizer: the rest of
    the run is the uninterrupted run's."""
    model, twin = _model(seed), _model(seed)
    params = (lambda m: m.named_parameters()) if named else (lambda m: m.parameters())
    kwargs = dict(lr=1e-2, mode=mode, granularity="element", upper=70, warmup_steps=1)
    opt = RoseAdamW(params(model), **kwargs)
    _train(model, opt, seed, 3, mode)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin.load_state_dict(saved["model"])
    resumed = RoseAdamW(params(twin), **kwargs)
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.state_dict()["param_groups"] == opt.state_dict()["param_groups"], f"seed={seed}"
    _train(model, opt, seed + 1, 3, mode)
    _train(twin, resumed, seed + 1, 3, mode)
    _assert_same_params(model, twin, f"seed={seed} named={named}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_checkpoints_load_both_ways(seed, dtype):
    model = _model(seed, dtype)
    adamw = torch.optim.AdamW(model.named_parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    _train(model, adamw, seed, 2)
    rose = RoseAdamW(model.named_parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                     mode="off", warmup_steps=5)
    rose.load_state_dict(adamw.state_dict())
    assert rose.param_groups[0]["warmup_steps"] == 5  # a key AdamW lacks keeps this optimizer's value
    for p in model.parameters():
        assert torch.equal(rose.state[p]["exp_avg"].to(dtype), adamw.state[p]["exp_avg"].to(dtype))
        assert rose.state[p]["exp_avg"].dtype == torch.float32  # float32 moments for bf16 params
    _train(model, rose, seed + 1, 2, "off")
    back = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    back.load_state_dict(rose.state_dict())
    for p in model.parameters():
        assert set(back.state[p]) >= {"step", "exp_avg", "exp_avg_sq"}
        assert float(back.state[p]["step"]) == 4.0, f"seed={seed}"
    _train(model, back, seed + 2, 1)


# ---- hooks, closures, steps without gradients, schedulers --------------------------------------


def test_step_and_state_dict_hooks_run():
    model = _model(0)
    opt = RoseAdamW(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    _train(model, opt, 0, 1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd-pre", "sd-post", "load-pre", "load-post"]


def test_closure_runs_with_grad_enabled_and_its_loss_is_returned(seed):
    model = _model(seed)
    opt = RoseAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    before = model(x).square().mean().item()
    losses = [opt.step(closure).item() for _ in range(5)]
    assert losses[0] == pytest.approx(before), f"seed={seed}"
    assert losses[-1] < losses[0], f"seed={seed}: {losses}"


def test_steps_without_gradients_change_nothing():
    model = _model(0)
    opt = RoseAdamW(model.parameters(), mode="second")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert not opt.state and all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    model[0].weight.grad = torch.ones_like(model[0].weight)  # one parameter with a gradient
    opt.step()
    assert list(opt.state) == [model[0].weight]
    assert torch.equal(before[1], model[0].bias)


@pytest.mark.parametrize("scheduler", ["step", "lambda", "onecycle"])
def test_tensor_lr_under_schedulers_matches_float_lr(seed, scheduler):
    make = {
        "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
        "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10),
    }[scheduler]
    runs = []
    for lr in (torch.tensor(0.02), 0.02):
        model = _model(seed)
        opt = RoseAdamW(model.parameters(), lr=lr, mode="second", granularity="element", upper=80)
        sched = make(opt)
        for step in range(6):
            _train(model, opt, seed + step, 1)
            sched.step()
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == isinstance(lr, torch.Tensor)
        runs.append((model, float(opt.param_groups[0]["lr"])))
    (tensor_model, tensor_lr), (float_model, float_lr) = runs
    assert tensor_lr == pytest.approx(float_lr, rel=1e-6), f"seed={seed}"
    for p, q in zip(tensor_model.parameters(), float_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"seed={seed}: {m}")


def test_printing_shows_groups_and_rose_settings():
    opt = RoseAdamW(_model(0).named_parameters(), lr=3e-4, mode="ensemble", granularity="element", upper=55)
    text = repr(opt)
    assert text.startswith("RoseAdamW (") and text.endswith(")")
    for piece in ("Parameter Group 0", "lr: 0.0003", "rose: True", "mode=ensemble", "granularity=element",
                  "[0, 55]"):
        assert piece in text, text


# ---- inputs torch refuses, refused the same way --------------------------------------------------


def test_inputs_torch_refuses():
    with pytest.raises(ValueError, match="complex"):
        RoseAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="contiguous"):
        RoseAdamW([torch.nn.Parameter(torch.zeros(4, 3).t())])
    with pytest.raises(ValueError, match="empty parameter list"):
        RoseAdamW([])
    with pytest.raises(TypeError, match="ordered collections"):
        RoseAdamW([{"params": set(_model(0).parameters())}])
    with pytest.raises(TypeError, match="tensors"):
        RoseAdamW([1.0])
    with pytest.raises(ValueError, match="non-leaf"):
        leaf = torch.zeros(3, requires_grad=True)
        RoseAdamW([leaf * 2])
    with pytest.raises(ValueError, match="lr"):
        RoseAdamW(_model(0).parameters(), lr=-1.0)
    model = _model(0)
    opt = RoseAdamW(model.parameters())
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [model[0].weight]})
    assert len(opt.param_groups) == 1
