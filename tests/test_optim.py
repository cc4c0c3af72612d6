"""RoseAdamW: backend "cpu" against backend "reference" on fresh random inputs, and the optimizer's API.

Every random test draws its seed from os.urandom (the `seed` fixture) and prints it on failure.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import (
    FLOAT_DTYPES,
    GRANULARITIES,
    MODES,
    SCOPES,
    Problem,
    all_params,
    assert_bitwise_equal,
    assert_optimizers_match,
    assert_params_close,
    assert_snapshot_equal,
    assert_state_close,
    needs_first,
    opmath,
    randn,
    snapshot,
    sync,
)

from rose_kernels import RoseAdamW, backends, is_eligible, rose_param_groups

# Eligible shapes cross the kernels' vector, 1024-block, 64 Ki-chunk and 32 Ki direct-selection sizes.
ELIGIBLE = [(1,), (7,), (1023,), (65537,), (37, 11), (130, 257)]
OTHER = [(3,), (1023,), (2, 5)]
SMALL = [(3,), (7,), (5, 4), (16,), (1,)]
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _groups(eligible=ELIGIBLE, other=OTHER, wd=0.01):
    return [{"shapes": eligible, "weight_decay": wd}, {"shapes": other, "rose": False, "weight_decay": 0.0}]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", MODES)
def test_cpu_matches_reference(seed, mode, granularity, scope, dtype):
    rng = random.Random(seed)
    lower = rng.choice([0.0, round(rng.uniform(0, 45), 3)])
    upper = rng.choice([100.0, round(rng.uniform(50, 100), 3)])
    gamma = round(rng.uniform(0.1, 0.9), 3)
    cfg = dict(mode=mode, granularity=granularity, scope=scope, lower=lower, upper=upper, gamma=gamma)
    prob = Problem(_groups(), dtype, seed, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, **cfg)
    for _ in range(3):
        prob.step()
        prob.check(str(cfg))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", ["first", "second", "ensemble"])
def test_empty_tensor_matches_reference(seed, mode, granularity):
    """A 0-element eligible tensor among others: same masks, same kept fractions in both backends."""
    prob = Problem(
        _groups([(0,), (3,), (5,), (4,), (0, 3)], [(0,), (2,)]),
        torch.float64,
        seed,
        mode=mode,
        granularity=granularity,
        lower=0.0,
        upper=50.0,
    )
    for _ in range(3):
        prob.step()
        prob.check(f"mode={mode} granularity={granularity}")


@pytest.mark.parametrize(
    "granularity, scope", [("tensor", "tensor"), ("element", "tensor"), ("element", "global")]
)
@pytest.mark.parametrize(
    "lower, upper", [(0.0, 100.0), (0.0, 0.0), (100.0, 100.0), (50.0, 50.0), (30.0, 30.0)]
)
@pytest.mark.parametrize("mode", ["second", "first"])
def test_percentile_edges(seed, mode, granularity, scope, lower, upper):
    cfg = dict(mode=mode, granularity=granularity, scope=scope, lower=lower, upper=upper)
    prob = Problem(_groups([*SMALL, (40000,)], [(3,)]), torch.float32, seed, **cfg)
    for _ in range(2):
        prob.step()
        prob.check(str(cfg))
        stats = prob.opts[0].mask_stats()
        if (lower, upper) == (0.0, 100.0):
            assert all(v == 1.0 for v in stats.values()), (seed, stats)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("gamma, same_as", [(0.0, "second"), (1.0, "first")])
def test_ensemble_gamma_extremes(seed, granularity, gamma, same_as):
    """gamma = 0 is the second-order mask alone, gamma = 1 the first-order mask alone."""
    kw = dict(granularity=granularity, lower=10.0, upper=70.0)
    ens = Problem(_groups(SMALL, [(3,)]), torch.float64, seed, mode="ensemble", gamma=gamma, **kw)
    alone = Problem(_groups(SMALL, [(3,)]), torch.float64, seed, mode=same_as, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(4):
        grads = [randn(s, torch.float64, gen, zero_frac=0.1) for s in ens.shapes]
        kl = [randn(s, torch.float64, gen) for s in ens.shapes]
        ens.step(grads, kl)
        alone.step(grads, kl)
        for a, b in zip(ens.opts, alone.opts, strict=True):
            assert_optimizers_match(a, b, torch.float64, f"seed={seed} t={t + 1} gamma={gamma}", mask_tol=0.0)


@pytest.mark.parametrize(
    "granularity, scope", [("tensor", "tensor"), ("element", "tensor"), ("element", "global")]
)
@pytest.mark.parametrize("mode", ["first", "second", "ensemble", "off"])
def test_warmup_masks_nothing(seed, mode, granularity, scope):
    cfg = dict(mode=mode, granularity=granularity, scope=scope, lower=25.0, upper=75.0, warmup_steps=2)
    prob = Problem(_groups(SMALL, [(3,)]), torch.float32, seed, **cfg)
    for t in range(1, 5):
        prob.step()
        prob.check(str(cfg))
        stats = prob.opts[0].mask_stats()
        assert len(stats) == len(SMALL)
        if t <= 2 or mode == "off":
            assert all(v == 1.0 for v in stats.values()), (seed, t, stats)
        else:
            assert any(v < 1.0 for v in stats.values()), (seed, t, stats)


def test_warmup_per_group(seed):
    """warmup_steps is a group key: a group still warming up is not masked and not in the pool."""
    groups = [{"shapes": SMALL[:3], "warmup_steps": 0}, {"shapes": SMALL[3:], "warmup_steps": 10}]
    prob = Problem(
        groups, torch.float64, seed, mode="second", granularity="element", scope="global", upper=50.0
    )
    for _ in range(3):
        prob.step()
        prob.check()
        stats = prob.opts[0].mask_stats()
        assert stats["1.0"] == stats["1.1"] == 1.0, (seed, stats)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_second_order_scale(seed, granularity):
    prob = Problem(
        _groups(SMALL, [(3,)]),
        torch.float64,
        seed,
        mode="second",
        granularity=granularity,
        betas=(0.8, 0.99),
        second_order_scale=0.1,
        lower=20.0,
        upper=60.0,
    )
    for _ in range(4):
        prob.step()
        prob.check("second_order_scale=0.1")


@pytest.mark.parametrize("mode", ["off", "second", "ensemble"])
def test_correct_bias_false(seed, mode):
    prob = Problem(
        _groups(SMALL, [(3,)]), torch.float32, seed, mode=mode, granularity="element", correct_bias=False
    )
    for _ in range(3):
        prob.step()
        prob.check("correct_bias=False")


@pytest.mark.parametrize("granularity, scope", [("tensor", "tensor"), ("element", "global")])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_grad_none_is_skipped_and_not_pooled(seed, backend, mode, granularity, scope):
    """A param without a grad keeps its state bit for bit and is left out of every pool: the others
    move exactly as in an optimizer that does not hold it at all."""
    gen = torch.Generator().manual_seed(seed)
    cfg = dict(mode=mode, granularity=granularity, scope=scope, lower=20.0, upper=60.0, backend=backend)
    base = [randn(s, torch.float64, gen) for s in SMALL]
    with_d = [t.clone() for t in base]
    without = [t.clone() for t in base[:-1]]
    opt_d, opt = RoseAdamW(with_d, **cfg), RoseAdamW(without, **cfg)
    d = with_d[-1]
    for t in range(1, 5):
        grads = [randn(s, torch.float64, gen, zero_frac=0.1) for s in SMALL]
        kl = [randn(s, torch.float64, gen) * 100 for s in SMALL]  # d's KL score would dominate the pool
        d_present = t == 1  # d has a grad (and so a state) at step 1 only
        before_d = snapshot(opt_d)["state"][-1]
        for o, ps in ((opt_d, with_d), (opt, without)):
            if needs_first(mode):
                for p, g in zip(ps, kl, strict=False):
                    p.grad = g.clone()
                if not d_present:
                    d.grad = None
                o.record_first_order()
            for p, g in zip(ps, grads, strict=False):
                p.grad = g.clone()
            if not d_present:
                d.grad = None
            o.step()
        if t == 1:
            # step 1: nothing is masked yet in mode second (no momentum); copy so both start equal
            d_after1 = d.clone()
            with torch.no_grad():
                for a, b in zip(with_d[:-1], without, strict=True):
                    b.copy_(a)
                for a, b in zip(with_d[:-1], without, strict=True):
                    for k in ("exp_avg", "exp_avg_sq", "step"):
                        opt.state[b][k].copy_(opt_d.state[a][k])
            continue
        msg = f"seed={seed} t={t} {cfg}"
        for i, (a, b) in enumerate(zip(with_d[:-1], without, strict=True)):
            assert_bitwise_equal(a, b, f"{msg} param {i}")
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert_bitwise_equal(opt_d.state[a][k], opt.state[b][k], f"{msg} param {i} {k}")
        assert_bitwise_equal(d, d_after1, f"{msg} d moved")
        for k, v in before_d.items():
            assert_bitwise_equal(opt_d.state[d][k], v, f"{msg} d state {k}")
        assert float(opt_d.state[d]["step"]) == 1.0
        stats_d, stats = opt_d.mask_stats(), opt.mask_stats()
        assert f"0.{len(SMALL) - 1}" not in stats_d, (msg, stats_d)
        assert stats_d == stats, msg


def test_param_without_grad_has_no_state(seed):
    prob = Problem(_groups(SMALL, [(3,)]), torch.float32, seed, mode="ensemble", granularity="element")
    present = [True, False, True, True, True, False]
    prob.step(present=present)
    prob.check("grad None at step 1")
    for opt in prob.opts:
        params = all_params(opt)
        assert [p in opt.state for p in params] == present
        assert sorted(opt.mask_stats()) == ["0.0", "0.2", "0.3", "0.4"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", MODES)
def test_grads_from_second_step_on(seed, mode, granularity):
    prob = Problem(
        _groups(ELIGIBLE[:3] + SMALL, OTHER),
        torch.float32,
        seed,
        mode=mode,
        granularity=granularity,
        scope="global",
        lower=10.0,
        upper=80.0,
    )
    n = len(prob.shapes)
    late = {1, 4, n - 1}
    for t in range(1, 5):
        prob.step(present=[i not in late for i in range(n)] if t == 1 else None)
        prob.check(f"late grads t={t}")
        for opt in prob.opts:
            for i, p in enumerate(all_params(opt)):
                want = t - 1 if i in late else t
                assert (float(opt.state[p]["step"]) if p in opt.state else 0.0) == want, (seed, t, i)


@pytest.mark.parametrize("mode", ["second", "ensemble"])
def test_weight_decay_and_lr_per_group(seed, mode):
    groups = [
        {"shapes": SMALL[:2], "weight_decay": 0.1, "lr": 0.05},
        {"shapes": SMALL[2:], "weight_decay": 0.0},
        {"shapes": [(4,), (2, 3)], "rose": False, "weight_decay": 0.3, "lr": 0.2},
    ]
    prob = Problem(groups, torch.float64, seed, mode=mode, granularity="element", lr=0.01, weight_decay=0.02)
    assert [g["weight_decay"] for g in prob.opts[0].param_groups] == [0.1, 0.0, 0.3]
    assert [g["lr"] for g in prob.opts[0].param_groups] == [0.05, 0.01, 0.2]
    for _ in range(3):
        prob.step()
        prob.check("per-group weight decay")


def _hf_step(p, g, m, v, t, lr, b1, b2, eps, wd):
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    p.addcdiv_(m, v.sqrt().add_(eps), value=-lr * math.sqrt(1 - b2**t) / (1 - b1**t))
    p.add_(p, alpha=-lr * wd)


def test_mode_off_weight_decay_per_group(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5,), (3, 2), (4,)]
    hyper = [(0.1, 0.0), (0.02, 0.5), (0.05, 0.1)]  # (lr, wd) per group, the last one rose=False
    params = [randn(s, torch.float64, gen) for s in shapes]
    mine = [p.clone() for p in params]
    opt = RoseAdamW(
        [
            {"params": [mine[i]], "lr": hyper[i][0], "weight_decay": hyper[i][1], "rose": i < 2}
            for i in range(3)
        ],
        mode="off",
        betas=(0.9, 0.99),
        eps=1e-8,
        backend="cpu",
    )
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for t in range(1, 4):
        grads = [randn(s, torch.float64, gen) for s in shapes]
        for i in range(3):
            _hf_step(params[i], grads[i], ms[i], vs[i], t, *hyper[i][:1], 0.9, 0.99, 1e-8, hyper[i][1])
            mine[i].grad = grads[i].clone()
        opt.step()
        for i in range(3):
            torch.testing.assert_close(
                mine[i], params[i], rtol=1e-13, atol=1e-14, msg=lambda m: f"seed={seed} {m}"
            )


def test_lambda_lr_scheduler(seed):
    prob = Problem(_groups(SMALL, [(3,)]), torch.float64, seed, mode="second", granularity="element", lr=0.1)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5**s) for o in prob.opts]
    for t in range(1, 5):
        prob.step()
        prob.check(f"LambdaLR t={t}")
        for s in scheds:
            s.step()
        for o in prob.opts:
            assert all(g["lr"] == 0.1 * 0.5**t for g in o.param_groups), [g["lr"] for g in o.param_groups]


def test_lambda_lr_scheduler_drives_update(seed):
    """The step uses the scheduled lr: mode off against the HF formula with lr_t = 0.1 * 0.5**(t-1)."""
    gen = torch.Generator().manual_seed(seed)
    p_ref = randn((6,), torch.float64, gen)
    p = p_ref.clone()
    opt = RoseAdamW([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, mode="off")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t in range(1, 5):
        g = randn((6,), torch.float64, gen)
        _hf_step(p_ref, g, m, v, t, 0.1 * 0.5 ** (t - 1), 0.9, 0.99, 1e-8, 0.1)
        p.grad = g.clone()
        opt.step()
        sched.step()
        torch.testing.assert_close(
            p, p_ref, rtol=1e-13, atol=1e-14, msg=lambda m, t=t: f"seed={seed} t={t} {m}"
        )


def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


@pytest.mark.parametrize("mode", ["second", "off"])
def test_closure(seed, mode):
    model_a, model_b = _tiny_model(seed), _tiny_model(seed)
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    opt_a = RoseAdamW(model_a.parameters(), lr=1e-2, mode=mode, upper=50.0)
    opt_b = RoseAdamW(model_b.parameters(), lr=1e-2, mode=mode, upper=50.0)
    for _ in range(3):

        def closure():
            opt_a.zero_grad()
            loss = model_a(x).pow(2).mean()
            loss.backward()
            return loss

        loss_a = opt_a.step(closure)
        opt_b.zero_grad()
        loss_b = model_b(x).pow(2).mean()
        loss_b.backward()
        assert opt_b.step() is None
        assert isinstance(loss_a, torch.Tensor) and loss_a.item() == loss_b.item()
        for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
            assert_bitwise_equal(a.detach(), b.detach(), f"seed={seed}")


def test_zero_grad_set_to_none(seed):
    prob = Problem(_groups(SMALL, [(3,)]), torch.float64, seed, mode="second", granularity="element")
    prob.step()
    prob.step()
    for opt in prob.opts:
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in all_params(opt))
        before = snapshot(opt)
        opt.step()
        assert_snapshot_equal(before, snapshot(opt), f"seed={seed} step with no grads")


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_grad_keep_zeros(seed, granularity):
    prob = Problem(
        _groups(SMALL, [(3,)]),
        torch.float64,
        seed,
        mode="second",
        granularity=granularity,
        lower=25.0,
        upper=75.0,
    )
    prob.step()
    prob.step()
    for opt in prob.opts:
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in all_params(opt))
        opt.step()
        assert all(float(opt.state[p]["step"]) == 3 for p in all_params(opt))
        # g = 0: every defined score is |0 - 1| = 1, the pool is all ties: everything is kept
        assert all(v == 1.0 for v in opt.mask_stats().values()), opt.mask_stats()
    prob.check("zero grads")


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(4, 4)
        self.LayerNorm = torch.nn.LayerNorm(4)


class _TinyEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = torch.nn.Embedding(10, 4)
        self.layer = torch.nn.ModuleList([_Block(), _Block()])
        self.Layerwise = torch.nn.Linear(4, 4)  # "Layer" != "layer": not eligible
        self.classifier = torch.nn.Linear(4, 2)
        self.layer_norm = torch.nn.LayerNorm(4)  # eligible gain, no decay
        self.frozen_layer = torch.nn.Linear(4, 4)
        self.frozen_layer.weight.requires_grad_(False)


def test_rose_param_groups_and_mask_stats(seed):
    torch.manual_seed(seed)
    model = _TinyEncoder()
    names = [n for n, _ in model.named_parameters()]
    groups = rose_param_groups(model, weight_decay=0.05)
    seen = {}
    for g in groups:
        for n in g["param_names"]:
            seen[n] = g
    assert "frozen_layer.weight" not in seen  # requires_grad=False is left out
    assert set(seen) == {n for n in names if n != "frozen_layer.weight"}
    for n, g in seen.items():
        assert g["rose"] == ("layer" in n and "weight" in n) == is_eligible(n), n
        no_decay = n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
    assert seen["layer.0.dense.weight"]["rose"] and seen["layer.1.LayerNorm.weight"]["rose"]
    assert not seen["layer.0.dense.bias"]["rose"] and not seen["Layerwise.weight"]["rose"]
    assert not seen["embeddings.weight"]["rose"] and not seen["classifier.weight"]["rose"]
    assert seen["layer_norm.weight"]["rose"] and seen["layer_norm.weight"]["weight_decay"] == 0.0

    opt = RoseAdamW(groups, lr=1e-2, mode="second", granularity="element", upper=50.0)
    x = torch.randint(0, 10, (3, 5))

    def run():
        opt.zero_grad()
        h = model.embeddings(x)
        for blk in model.layer:
            h = blk.LayerNorm(torch.tanh(blk.dense(h)))
        h = model.layer_norm(model.Layerwise(h) + model.frozen_layer(h))
        model.classifier(h).pow(2).mean().backward()
        opt.step()

    run()
    run()
    eligible = {n for n in seen if seen[n]["rose"]}
    stats = opt.mask_stats()
    assert set(stats) == eligible, (sorted(stats), sorted(eligible))
    assert all(0.0 <= v <= 1.0 for v in stats.values())
    assert any(v < 1.0 for v in stats.values()), stats


def test_is_eligible_rule():
    assert is_eligible("roberta.encoder.layer.3.attention.self.query.weight")
    assert is_eligible("roberta.encoder.layer.3.output.LayerNorm.weight")
    assert not is_eligible("roberta.encoder.layer.3.attention.self.query.bias")
    assert not is_eligible("roberta.embeddings.word_embeddings.weight")
    assert not is_eligible("classifier.dense.weight")
    assert not is_eligible("encoder.Layer.0.Weight")  # case-sensitive
    assert is_eligible("anything", "all") and not is_eligible("layer.weight", "none")
    with pytest.raises(ValueError, match="rule"):
        is_eligible("x", "bogus")


def test_backend_auto_picks_cpu(seed):
    assert backends.resolve("auto", torch.device("cpu")).name == "cpu"
    prob = Problem(
        _groups(SMALL, [(3,)]),
        torch.float32,
        seed,
        backends=("auto", "cpu"),
        mode="second",
        granularity="element",
        scope="global",
    )
    assert prob.opts[0].backend == "auto"
    assert prob.opts[0].backend_for(all_params(prob.opts[0])).name == "cpu"
    for _ in range(3):
        prob.step()
        for a, b in zip(all_params(prob.opts[0]), all_params(prob.opts[1]), strict=True):
            assert_bitwise_equal(a, b, f"seed={seed} auto vs cpu")


# ------------------------------------------------------------------------------------------------
# Frozen units keep p and exp_avg bit for bit; the element masks against an independent computation
# ------------------------------------------------------------------------------------------------


def _element_masks(grads, exp_avgs, scale, lower, upper):
    """Section 2-3 per tensor pool, written independently of the package (torch.quantile)."""
    masks = []
    for g, m in zip(grads, exp_avgs, strict=True):
        dt = opmath(g.dtype)
        s = (torch.tensor(scale, dtype=dt) * g.to(dt) / m - 1).abs()
        defined = m != 0
        pool = s[defined].to(torch.float64)
        if pool.numel() == 0:
            masks.append(torch.ones_like(defined))
            continue
        lo = torch.quantile(pool, lower / 100).item()
        hi = torch.quantile(pool, upper / 100).item()
        s64 = s.to(torch.float64)
        masks.append(~defined | ((s64 >= lo) & (s64 <= hi) & torch.isfinite(s64)))
    return masks


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get
)
def test_frozen_elements_bit_for_bit(seed, backend, dtype):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (33,), (40000,)]
    params = [randn(s, dtype, gen) for s in shapes]
    lower, upper = 20.0, 70.0
    opt = RoseAdamW(
        params, lr=1e-2, mode="second", granularity="element", lower=lower, upper=upper, backend=backend
    )
    for t in range(1, 4):
        grads = [randn(s, dtype, gen, zero_frac=0.2) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if t == 1:
            opt.step()
            continue
        p_before = [p.clone() for p in params]
        m_before = [opt.state[p]["exp_avg"].clone() for p in params]
        v_before = [opt.state[p]["exp_avg_sq"].clone() for p in params]
        masks = _element_masks(grads, m_before, 1 - 0.9, lower, upper)
        opt.step()
        stats = opt.mask_stats()
        for i, p in enumerate(params):
            msg = f"seed={seed} t={t} {backend} {dtype} tensor {i}"
            frozen = ~masks[i]
            if not (frozen.any() and masks[i].any()):
                # A 7- or 33-element pool can legitimately keep everything (ties at exactly 1.0
                # from zero gradients, undefined scores where m == 0); the large one cannot.
                assert p.numel() < 1000, msg
                continue
            assert_bitwise_equal(p[frozen], p_before[i][frozen], msg + " frozen p")
            m = opt.state[p]["exp_avg"]
            assert_bitwise_equal(m[frozen], m_before[i][frozen], msg + " frozen exp_avg")
            v_want = 0.999 * v_before[i][frozen] + (1 - 0.999) * m_before[i][frozen] ** 2
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"][frozen], v_want, rtol=1e-6, atol=1e-9)
            kept = masks[i]
            assert not torch.equal(m[kept], m_before[i][kept]), msg
            assert stats[f"0.{i}"] == pytest.approx(kept.double().mean().item(), abs=1e-12), msg


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mode", ["second", "first"])
def test_frozen_tensors_bit_for_bit(seed, backend, mode):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5,), (6, 3), (9,), (4,), (70000,)]
    params = [randn(s, torch.bfloat16, gen) for s in shapes]
    opt = RoseAdamW(params, lr=1e-2, mode=mode, lower=0.0, upper=40.0, backend=backend, weight_decay=0.1)
    frozen_seen = 0
    for t in range(1, 5):
        if mode == "first":
            for p in params:
                p.grad = randn(p.shape, torch.bfloat16, gen)
            opt.record_first_order()
        for p in params:
            p.grad = randn(p.shape, torch.bfloat16, gen)
        before = snapshot(opt)
        opt.step()
        for name, kept in opt.mask_stats().items():
            i = int(name.split(".")[1])
            p = params[i]
            assert kept in (0.0, 1.0), (seed, name, kept)
            if kept == 0.0:
                frozen_seen += 1
                msg = f"seed={seed} t={t} {backend} frozen tensor {name}"
                assert_bitwise_equal(p, before["params"][i], msg + " p")
                if before["state"][i] is not None:
                    assert_bitwise_equal(
                        opt.state[p]["exp_avg"], before["state"][i]["exp_avg"], msg + " exp_avg"
                    )
                assert float(opt.state[p]["step"]) == t
    assert frozen_seen > 0


# ------------------------------------------------------------------------------------------------
# Large pools with heavy ties, and +inf scores
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", ["first", "second"])
def test_large_pools_with_ties(seed, mode, scope):
    """Scores drawn from a handful of values over > 32 Ki elements (the sampled selection path)."""
    prob = Problem(
        _groups([(65537,), (40000,), (5,)], [(3,)]),
        torch.float32,
        seed,
        mode=mode,
        granularity="element",
        scope=scope,
        lower=30.0,
        upper=70.0,
    )
    gen = torch.Generator().manual_seed(seed + 7)

    def tied(shape):
        return torch.randint(-2, 3, shape, generator=gen).to(torch.float32) * 0.5

    for _ in range(3):
        prob.step([tied(s) for s in prob.shapes], [tied(s) for s in prob.shapes])
        prob.check(f"ties mode={mode} scope={scope}", mask_tol=0.0)


@pytest.mark.parametrize("scope", SCOPES)
def test_infinite_scores(seed, scope):
    """Tiny momenta make c * g / m overflow to +inf: such scores never pass a finite upper threshold."""
    prob = Problem(
        _groups([(40000,), (9,)], [(3,)]),
        torch.float32,
        seed,
        mode="second",
        granularity="element",
        scope=scope,
        lower=0.0,
        upper=100.0,
    )
    prob.step()
    for opt in prob.opts:
        for p in all_params(opt)[:2]:
            opt.state[p]["exp_avg"][::3] = 1e-44  # subnormal: 0.1 * g / m overflows
    grads = prob.draw(zero_frac=0.1)
    expected = {}
    for i, p in enumerate(all_params(prob.opts[0])[:2]):
        m = prob.opts[0].state[p]["exp_avg"]
        s = (torch.tensor(1 - 0.9, dtype=torch.float32) * grads[i] / m - 1).abs()
        n_inf = int((torch.isinf(s) & (m != 0)).sum())
        assert n_inf > 0
        expected[f"0.{i}"] = 1 - n_inf / p.numel()  # (0, 100): every finite score is kept
    prob.step(grads)
    prob.check(f"inf scores scope={scope}")
    for opt in prob.opts:
        stats = opt.mask_stats()
        for k, v in expected.items():
            assert stats[k] == pytest.approx(v, abs=1e-9), (seed, opt.backend, k, stats[k], v)


@pytest.mark.parametrize("mode", ["first", "second"])
def test_sample_defeating_layout(seed, mode):
    """Scores laid out with period 256 (the sampling stride of a 65537-element pool) so that the
    strided sample sees only the small ones: the selection must still be exact (radix fallback)."""
    prob = Problem(
        [{"shapes": [(65537,), (3,)]}],
        torch.float32,
        seed,
        mode=mode,
        granularity="element",
        lower=30.0,
        upper=80.0,
    )
    gen = torch.Generator().manual_seed(seed + 3)
    n = 65537
    lane = torch.arange(n) % 256 < 32

    def layout(small, large):
        x = torch.where(
            lane, small + 1e-3 * torch.rand(n, generator=gen), large + torch.rand(n, generator=gen)
        )
        return [x.float(), torch.randn(3, generator=gen)]

    if mode == "first":
        for _ in range(2):
            prob.step(prob.draw(), layout(0.0, 1.0))
            prob.check("first-order sample-defeating layout", mask_tol=0.0)
        return
    prob.step()
    for opt in prob.opts:
        for p in all_params(opt):
            opt.state[p]["exp_avg"].fill_(1.0)
    # s = |0.1 * g / 1 - 1|: g ~ 10 gives s ~ 0 on the sampled lanes, g in [0, 5] gives s in [0.5, 1]
    g = layout(10.0, 0.0)
    g[0] = torch.where(lane, g[0], g[0] * 5)
    prob.step(g)
    prob.check("second-order sample-defeating layout", mask_tol=0.0)


@pytest.mark.parametrize(
    "granularity, scope", [("tensor", "tensor"), ("element", "tensor"), ("element", "global")]
)
@pytest.mark.parametrize("mode", ["first", "second", "ensemble"])
def test_mixed_param_dtypes(seed, mode, granularity, scope):
    """float64, float32, bfloat16 and float16 params in one optimizer.

    Per-tensor pools must work whatever the dtypes; a global element pool mixing float64 with
    lower-precision tensors may be refused, but only with a clear error before anything changes.
    """
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float32]
    base = [randn((40,), d, gen) for d in dtypes]
    cfg = dict(mode=mode, granularity=granularity, scope=scope, lower=10.0, upper=60.0)
    opts = [RoseAdamW([b.clone() for b in base], backend=backend, **cfg) for backend in ("cpu", "reference")]
    for t in range(1, 4):
        kl = [randn((40,), d, gen) for d in dtypes]
        grads = [randn((40,), d, gen) for d in dtypes]
        for opt in opts:
            if needs_first(mode):
                for p, g in zip(all_params(opt), kl, strict=True):
                    p.grad = g.clone()
                before = snapshot(opt)
                try:
                    opt.record_first_order()
                except RuntimeError as error:
                    assert scope == "global" and "float64" in str(error), (seed, cfg, str(error))
                    assert_snapshot_equal(before, snapshot(opt), f"seed={seed}")
                    return
            for p, g in zip(all_params(opt), grads, strict=True):
                p.grad = g.clone()
            before = snapshot(opt)
            try:
                opt.step()
            except RuntimeError as error:
                assert scope == "global" and "float64" in str(error), (seed, cfg, str(error))
                assert_snapshot_equal(before, snapshot(opt), f"seed={seed}")
                return
        for i, (a, b) in enumerate(zip(all_params(opts[0]), all_params(opts[1]), strict=True)):
            msg = f"seed={seed} t={t} {cfg} param {i} ({a.dtype})"
            assert_params_close(a, b, msg)
            assert_state_close(opts[0].state[a]["exp_avg"], opts[1].state[b]["exp_avg"], a.dtype, msg)
        assert opts[0].mask_stats().keys() == opts[1].mask_stats().keys()
        for k, v in opts[0].mask_stats().items():
            assert v == pytest.approx(opts[1].mask_stats()[k], abs=1e-6), (seed, t, k)
        sync(opts[0], opts[1])


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mode", ["first", "second", "ensemble"])
def test_scalar_params_and_noncontiguous_grads(seed, mode, granularity):
    prob = Problem(
        [{"shapes": [(), (4, 3), (5,), (6, 2)]}],
        torch.float32,
        seed,
        mode=mode,
        granularity=granularity,
        upper=50.0,
    )
    gen = torch.Generator().manual_seed(seed + 5)

    def grads():
        # the 2-D gradients are transposed views (non-contiguous, same shape as their params)
        return [
            torch.randn((), generator=gen),
            torch.randn(3, 4, generator=gen).t(),
            torch.randn(5, generator=gen),
            torch.randn(2, 6, generator=gen).t(),
        ]

    for _ in range(3):
        g, kl = grads(), grads()
        assert not g[1].is_contiguous()
        prob.step(g, kl)
        prob.check("0-dim params, non-contiguous grads")
