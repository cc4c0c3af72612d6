"""The oracle itself (rose_kernels.reference) against torch.quantile and against hand-worked examples.

The hand-worked cases spell out the scores, thresholds and masks of semantics.md sections 2-4 as
literal numbers; the updates use `_adamw`, section 5 written for one scalar. Both backends
("reference" and "cpu") must reproduce them.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import snapshot

from rose_kernels import RoseAdamW, reference
from rose_kernels.types import uses_first_order

BACKENDS = ("reference", "cpu")


# ------------------------------------------------------------------------------------------------
# quantile / in_interval
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 100, 1001])
def test_quantile_matches_torch_quantile(seed, n):
    gen = torch.Generator().manual_seed(seed)
    for trial in range(5):
        pool = torch.rand(n, dtype=torch.float64, generator=gen) * 10 ** (trial - 2)
        if trial == 4:  # ties
            pool = torch.round(pool * 3)
        qs = torch.rand(20, dtype=torch.float64, generator=gen).tolist() + [0.0, 0.25, 0.5, 0.6, 0.75, 1.0]
        for q in qs:
            got = reference.quantile(pool, q)
            want = torch.quantile(pool, q, interpolation="linear").item()
            assert math.isclose(got, want, rel_tol=1e-15, abs_tol=0.0), (seed, n, trial, q, got, want)


def test_quantile_hand_examples():
    pool = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64)  # sorted 1 2 3 4, n - 1 = 3
    assert reference.quantile(pool, 0.0) == 1.0
    assert reference.quantile(pool, 1.0) == 4.0
    assert reference.quantile(pool, 0.5) == 2.5  # r = 1.5
    assert reference.quantile(pool, 0.25) == 1.75  # r = 0.75: 1 + 0.75 * (2 - 1)
    assert reference.quantile(pool, 2 / 3) == 3.0  # r = 2 (integral)
    # float32 input: the quantile is computed on the float64 values
    assert reference.quantile(torch.tensor([0.1], dtype=torch.float32), 0.3) == float(torch.tensor(0.1))


def test_quantile_empty_single_and_inf():
    assert math.isnan(reference.quantile(torch.empty(0, dtype=torch.float64), 0.5))
    assert math.isnan(reference.quantile(torch.empty(0), 0.0))
    for q in (0.0, 0.3, 1.0):
        assert reference.quantile(torch.tensor([2.5], dtype=torch.float64), q) == 2.5
    inf = math.inf
    pool = torch.tensor([1.0, inf, inf, 2.0], dtype=torch.float64)  # sorted 1 2 inf inf
    assert reference.quantile(pool, 1.0) == inf
    assert reference.quantile(pool, 2 / 3) == inf  # r = 2 exactly: x_2, no 0 * inf
    assert reference.quantile(pool, 0.9) == inf  # between inf and inf: inf, not inf - inf = NaN
    assert reference.quantile(pool, 0.5) == inf  # between 2 and inf: 2 + 0.5 * inf
    assert reference.quantile(pool, 1 / 3) == 2.0
    assert reference.quantile(pool, 0.0) == 1.0
    assert reference.quantile(torch.tensor([inf], dtype=torch.float64), 0.4) == inf
    all_inf = torch.full((5,), inf, dtype=torch.float64)
    for q in (0.0, 0.1, 0.5, 1.0):
        assert reference.quantile(all_inf, q) == inf


def test_in_interval_inclusive_and_inf_rule():
    inf, nan = math.inf, math.nan
    s = torch.tensor([0.0, 1.0, 1.5, 2.0, 2.5, inf, nan], dtype=torch.float64)
    assert reference.in_interval(s, 1.0, 2.0).tolist() == [False, True, True, True, False, False, False]
    assert reference.in_interval(s, 0.0, 0.0).tolist() == [True, False, False, False, False, False, False]
    # +inf upper threshold with a finite lower one: +inf scores still do not qualify
    assert reference.in_interval(s, 2.0, inf).tolist() == [False, False, False, True, True, False, False]
    # both thresholds +inf: only the +inf scores qualify; NaN never does
    assert reference.in_interval(s, inf, inf).tolist() == [False, False, False, False, False, True, False]
    # NaN thresholds (empty pool): nothing qualifies
    assert not reference.in_interval(s, nan, nan).any()
    # float32 scores are compared by value (no rounding of the thresholds)
    s32 = torch.tensor([0.1], dtype=torch.float32)
    exact = float(s32)
    assert reference.in_interval(s32, exact, exact).tolist() == [True]
    assert reference.in_interval(s32, 0.1, 1.0).tolist() == [exact >= 0.1]


def test_second_order_scores_hand():
    assert reference.second_order_score(5.0, 5.0, 0.5) == 0.5
    assert reference.second_order_score(1.0, 0.0, 0.5) is None
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert reference.second_order_tensor_score(g, torch.tensor([0.0, 5.0], dtype=torch.float64), 0.1) == 0.9
    assert reference.second_order_tensor_score(g, torch.zeros(2, dtype=torch.float64), 0.1) is None
    scores, defined = reference.second_order_element_scores(
        torch.tensor([2.0, 4.0, 1.0, 6.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]), 0.5
    )
    assert scores.dtype == torch.float32
    assert scores[:3].tolist() == [0.0, 1.0, 0.5] and defined.tolist() == [True, True, True, False]


# ------------------------------------------------------------------------------------------------
# Hand-worked optimizer steps (float64)
# ------------------------------------------------------------------------------------------------

LR, B1, B2, EPS, WD = 0.1, 0.5, 0.6, 0.01, 0.1
# c = 1 - beta1 = 0.5. With a preloaded state at step 1, this step is t = 2:
# step_size = lr * sqrt(1 - 0.6**2) / (1 - 0.5**2) = 0.1 * 0.8 / 0.75 = 0.10666...
# and for a fresh state (t = 1): 0.1 * sqrt(0.4) / 0.5.


def _adamw(p, g, m, v, mu, t, *, lr=LR, b1=B1, b2=B2, eps=EPS, wd=WD, correct_bias=True):
    """Section 5 for one scalar; returns the new (p, exp_avg, exp_avg_sq)."""
    gp = mu * g + (1 - mu) * m
    m_new = b1 * m + (1 - b1) * gp
    v_new = b2 * v + (1 - b2) * gp * gp
    step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else lr
    p_new = p - step_size * (mu * m_new) / (math.sqrt(v_new) + eps)
    p_new = p_new - lr * wd * mu * p_new
    if mu == 0:
        return p, m, v_new
    return p_new, m_new, v_new


def test_scalar_formula_worked_by_hand():
    # kept, t = 2, p = 1, g = 1, m = 2, v = 4:
    # m = 0.5 * 2 + 0.5 * 1 = 1.5; v = 0.6 * 4 + 0.4 * 1 = 2.8; step_size = 0.1 * 0.8 / 0.75
    # p = 1 - 0.10666 * 1.5 / (sqrt(2.8) + 0.01) = 0.904949...; p *= 1 - 0.1 * 0.1 -> 0.8959002477209917
    p, m, v = _adamw(1.0, 1.0, 2.0, 4.0, 1.0, 2)
    assert (m, v) == (1.5, 2.8) and p == pytest.approx(0.8959002477209917, rel=1e-15)
    # frozen: p and m kept, v = 0.6 * 4 + 0.4 * 2**2 = 4.0
    assert _adamw(1.0, 1.0, 2.0, 4.0, 0.0, 2) == (1.0, 2.0, 4.0)
    # soft mask 0.25, g = 2, m = 1: g' = 0.25 * 2 + 0.75 * 1 = 1.25; m = 0.5 + 0.625 = 1.125
    # v = 0.6 * 1 + 0.4 * 1.5625 = 1.225; p = 1 - ss * 0.25 * 1.125 / (sqrt(1.225) + 0.01), then decay 0.25
    p, m, v = _adamw(1.0, 2.0, 1.0, 1.0, 0.25, 2)
    assert (m, v) == (1.125, 1.225)
    p1 = 1 - (0.1 * 0.8 / 0.75) * 0.25 * 1.125 / (math.sqrt(1.225) + 0.01)
    assert p == pytest.approx(p1 - 0.1 * 0.1 * 0.25 * p1, rel=1e-15)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _build(spec: dict, backend: str, **kw):
    """Params (float64), optional preloaded state at step 1, and the optimizer; spec maps names to
    dicts with p, g, optional m/v (preloaded state), optional kl, and rose (default True)."""
    names = list(spec)
    params = {n: _t(spec[n]["p"]) for n in names}
    eligible = [n for n in names if spec[n].get("rose", True)]
    other = [n for n in names if not spec[n].get("rose", True)]
    groups = [{"params": [params[n] for n in eligible], "param_names": eligible}]
    if other:
        groups.append({"params": [params[n] for n in other], "param_names": other, "rose": False})
    opt = RoseAdamW(groups, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, backend=backend, **kw)
    for n in names:
        if "m" in spec[n]:
            opt.state[params[n]] = {
                "step": torch.tensor(1.0),
                "exp_avg": _t(spec[n]["m"]),
                "exp_avg_sq": _t(spec[n]["v"]),
            }
    return opt, params


def _run_and_check(spec, masks, backend, *, t, **kw):
    """One step; `masks[name]` is the hand-computed mask (list per element, or one value per tensor)."""
    opt, params = _build(spec, backend, **kw)
    if uses_first_order(kw.get("mode")):
        for n, p in params.items():
            p.grad = _t(spec[n]["kl"])
        opt.record_first_order()
    for n, p in params.items():
        p.grad = _t(spec[n]["g"])
    opt.step()
    for n, p in params.items():
        s = spec[n]
        size = len(s["p"])
        mu = masks.get(n, 1.0)
        mus = mu if isinstance(mu, list) else [mu] * size
        m0 = s.get("m", [0.0] * size)
        v0 = s.get("v", [0.0] * size)
        want = [_adamw(s["p"][j], s["g"][j], m0[j], v0[j], mus[j], t) for j in range(size)]
        msg = f"backend={backend} tensor {n} mask {mus}"
        state = opt.state[p]
        torch.testing.assert_close(
            p, _t([w[0] for w in want]), rtol=1e-14, atol=1e-15, msg=lambda m, msg=msg: f"{msg} p {m}"
        )
        torch.testing.assert_close(
            state["exp_avg"],
            _t([w[1] for w in want]),
            rtol=1e-14,
            atol=1e-15,
            msg=lambda m, msg=msg: f"{msg} m {m}",
        )
        torch.testing.assert_close(
            state["exp_avg_sq"],
            _t([w[2] for w in want]),
            rtol=1e-14,
            atol=1e-15,
            msg=lambda m, msg=msg: f"{msg} v {m}",
        )
        assert float(state["step"]) == t, msg
        for j in range(size):  # frozen elements keep p and m bit for bit
            if mus[j] == 0:
                assert p[j].item() == s["p"][j] and state["exp_avg"][j].item() == m0[j], msg
    expected_stats = {
        n: (
            sum(masks.get(n, 1.0)) / len(spec[n]["p"])
            if isinstance(masks.get(n, 1.0), list)
            else masks.get(n, 1.0)
        )
        for n in spec
        if spec[n].get("rose", True)
    }
    stats = opt.mask_stats()
    assert stats.keys() == expected_stats.keys(), (backend, stats)
    for n in stats:
        assert stats[n] == pytest.approx(expected_stats[n], abs=1e-15), (backend, n, stats, expected_stats)


# Tensor granularity, second order, state preloaded at step 1 (t = 2), c = 0.5:
#   A: ||g|| = ||[3, 4]|| = 5, ||m|| = ||[3, 4]|| = 5        -> s = |0.5 * 5 / 5 - 1|  = 0.5
#   B: ||g|| = ||[0, 6, 8]|| = 10, ||m|| = ||[1, 2, 2]|| = 3  -> s = |0.5 * 10 / 3 - 1| = 2/3
#   C: ||g|| = ||[1, 1, 1, 1]|| = 2, ||m|| = ||[2, 2, 2, 2]|| = 4 -> s = |0.5 * 2 / 4 - 1| = 0.75
#   D: ||m|| = 0: no score, kept, not in the pool.  E: rose=False, plain update.
# Pool sorted [0.5, 2/3, 0.75] (n - 1 = 2).
TENSOR_SPEC = {
    "A": {"p": [1.0, -1.0], "g": [3.0, 4.0], "m": [3.0, 4.0], "v": [1.0, 2.0], "kl": [3.0, 4.0]},
    "B": {
        "p": [0.5, -0.5, 2.0],
        "g": [0.0, 6.0, 8.0],
        "m": [1.0, 2.0, 2.0],
        "v": [1.0, 1.0, 1.0],
        "kl": [1.0, 2.0, 2.0],
    },
    "C": {"p": [1.0, 2.0, 3.0, 4.0], "g": [1.0] * 4, "m": [2.0] * 4, "v": [4.0] * 4, "kl": [1.0] * 4},
    "D": {"p": [1.0, 1.0], "g": [1.0, -1.0], "m": [0.0, 0.0], "v": [1.0, 1.0], "kl": [6.0, 8.0]},
    "E": {
        "p": [-1.0, 1.0],
        "g": [2.0, -2.0],
        "m": [1.0, 1.0],
        "v": [1.0, 1.0],
        "kl": [100.0, 100.0],
        "rose": False,
    },
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lower, upper, scale, masks",
    [
        # lo = x_0 = 0.5 (A, inclusive), hi = q 0.5 -> r = 1 -> x_1 = 2/3 (B, inclusive)
        (0.0, 50.0, None, {"A": 1.0, "B": 1.0, "C": 0.0}),
        # lo: r = 0.5 -> 0.5 + 0.5 * (2/3 - 0.5) = 7/12; hi: r = 1.5 -> 2/3 + 0.5 * (0.75 - 2/3) = 17/24
        (25.0, 75.0, None, {"A": 0.0, "B": 1.0, "C": 0.0}),
        # lo = hi = max = 0.75
        (100.0, 100.0, None, {"A": 0.0, "B": 0.0, "C": 1.0}),
        # c = 0.1: A |0.1 - 1| = 0.9, B |0.1 * 10/3 - 1| = 2/3, C |0.1 * 0.5 - 1| = 0.95;
        # sorted [2/3, 0.9, 0.95]: lo = 2/3, hi = 0.9
        (0.0, 50.0, 0.1, {"A": 1.0, "B": 1.0, "C": 0.0}),
        # c = 0.1, q 0.5 / 1: lo = x_1 = 0.9 (A, inclusive), hi = x_2 = 0.95 (C, inclusive)
        (50.0, 100.0, 0.1, {"A": 1.0, "B": 0.0, "C": 1.0}),
    ],
)
def test_hand_tensor_second_order(backend, lower, upper, scale, masks):
    kw = {} if scale is None else {"second_order_scale": scale}
    _run_and_check(TENSOR_SPEC, masks, backend, t=2, mode="second", lower=lower, upper=upper, **kw)


# Element granularity, second order (t = 2), s_j = |0.5 * g_j / m_j - 1|:
#   A: g [2, 4, 1, 6], m [1, 1, 1, 0]  -> s [0, 1, 0.5, undefined (kept, not pooled)]
#   B: g [-2, 8, 3], m [2, 2, -1]      -> s [|-0.5 - 1|, |2 - 1|, |-1.5 - 1|] = [1.5, 1, 2.5]
#   C: g [1, 3], m [2, 2]              -> s [0.75, 0.25]
ELEMENT_SPEC = {
    "A": {
        "p": [1.0, -2.0, 3.0, 0.5],
        "g": [2.0, 4.0, 1.0, 6.0],
        "m": [1.0, 1.0, 1.0, 0.0],
        "v": [1.0, 2.0, 3.0, 4.0],
        "kl": [1.0, 2.0, 3.0, 4.0],
    },
    "B": {
        "p": [0.25, 1.0, -1.0],
        "g": [-2.0, 8.0, 3.0],
        "m": [2.0, 2.0, -1.0],
        "v": [4.0, 1.0, 1.0],
        "kl": [-3.0, 1.0, 2.0],
    },
    "C": {"p": [2.0, -2.0], "g": [1.0, 3.0], "m": [2.0, 2.0], "v": [1.0, 1.0], "kl": [5.0, -5.0]},
    "E": {
        "p": [1.0, 1.0],
        "g": [0.5, 0.5],
        "m": [1.0, 1.0],
        "v": [1.0, 1.0],
        "kl": [0.0, 9.0],
        "rose": False,
    },
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "scope, lower, upper, masks",
    [
        # per-tensor pools, q = 0.25 / 0.75:
        #  A sorted [0, 0.5, 1]: lo r=0.5 -> 0.25, hi r=1.5 -> 0.75 -> [0, 0, 1, 1(undefined)]
        #  B sorted [1, 1.5, 2.5]: lo 1.25, hi 1.5 + 0.5 * 1 = 2.0  -> [1, 0, 0]
        #  C sorted [0.25, 0.75]: lo r=0.25 -> 0.375, hi r=0.75 -> 0.625 -> [0, 0]
        ("tensor", 25.0, 75.0, {"A": [0.0, 0.0, 1.0, 1.0], "B": [1.0, 0.0, 0.0], "C": [0.0, 0.0]}),
        # per-tensor pools, q = 0 / 0.5 (both ends inclusive):
        #  A: lo 0, hi x_1 = 0.5 -> [1, 0, 1, 1]; B: lo 1, hi 1.5 -> [1, 1, 0]; C: lo 0.25, hi 0.5 -> [0, 1]
        ("tensor", 0.0, 50.0, {"A": [1.0, 0.0, 1.0, 1.0], "B": [1.0, 1.0, 0.0], "C": [0.0, 1.0]}),
        # one pool: sorted [0, 0.25, 0.5, 0.75, 1, 1, 1.5, 2.5] (n - 1 = 7)
        #  lo r=1.75 -> 0.25 + 0.75 * 0.25 = 0.4375; hi r=5.25 -> 1 + 0.25 * 0.5 = 1.125
        ("global", 25.0, 75.0, {"A": [0.0, 1.0, 1.0, 1.0], "B": [0.0, 1.0, 0.0], "C": [1.0, 0.0]}),
    ],
)
def test_hand_element_second_order(backend, scope, lower, upper, masks):
    _run_and_check(
        ELEMENT_SPEC,
        masks,
        backend,
        t=2,
        mode="second",
        granularity="element",
        scope=scope,
        lower=lower,
        upper=upper,
    )


# First order, fresh state (t = 1, m = v = 0); step_size = 0.1 * sqrt(0.4) / 0.5.
FIRST_SPEC = {
    "A": {"p": [1.0, -1.0], "g": [1.0, 2.0], "kl": [3.0, 4.0]},  # ||kl|| = 5
    "B": {"p": [0.5, -0.5, 2.0], "g": [1.0, -1.0, 2.0], "kl": [1.0, 2.0, 2.0]},  # 3
    "C": {"p": [1.0, 2.0, 3.0, 4.0], "g": [0.5] * 4, "kl": [1.0, 1.0, 1.0, 1.0]},  # 2
    "E": {"p": [-1.0, 1.0], "g": [2.0, -2.0], "kl": [1e-3, 1e-3], "rose": False},
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_tensor_first_order(backend):
    # pool sorted [2, 3, 5]: lo = 2 (C), hi = q 0.5 -> x_1 = 3 (B); A (5) frozen
    masks = {"A": 0.0, "B": 1.0, "C": 1.0}
    _run_and_check(FIRST_SPEC, masks, backend, t=1, mode="first", lower=0.0, upper=50.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_element_first_order_global(backend):
    spec = {
        "A": {"p": [1.0, 2.0, 3.0, 4.0], "g": [1.0, -1.0, 0.5, 2.0], "kl": [1.0, 2.0, 3.0, 4.0]},
        "B": {"p": [-1.0, 0.0, 1.0], "g": [0.25, 0.5, -3.0], "kl": [-3.0, 1.0, 2.0]},
        "C": {"p": [2.0, 2.0], "g": [1.0, 1.0], "kl": [5.0, -5.0]},
        "E": {"p": [1.0], "g": [1.0], "kl": [0.0], "rose": False},
    }
    # |kl| pooled: sorted [1, 1, 2, 2, 3, 3, 4, 5, 5] (n - 1 = 8): lo r=2 -> 2, hi r=6 -> 4
    masks = {"A": [0.0, 1.0, 1.0, 1.0], "B": [1.0, 0.0, 1.0], "C": [0.0, 0.0]}
    _run_and_check(
        spec, masks, backend, t=1, mode="first", granularity="element", scope="global", lower=25.0, upper=75.0
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_tensor_ensemble(backend):
    # M2 as in test_hand_tensor_second_order (0, 50): A 1, B 1, C 0, D 1 (undefined).
    # M1: ||kl|| A 5, B 3, C 2, D 10 -> sorted [2, 3, 5, 10]: lo 2, hi r=1.5 -> 4: A 0, B 1, C 1, D 0.
    # gamma = 0.25: M = 0.75 * M2 + 0.25 * M1 -> A 0.75, B 1, C 0.25, D 0.75
    masks = {"A": 0.75, "B": 1.0, "C": 0.25, "D": 0.75}
    _run_and_check(TENSOR_SPEC, masks, backend, t=2, mode="ensemble", lower=0.0, upper=50.0, gamma=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_element_ensemble(backend):
    # M2 (per-tensor pools, 25/75) from test_hand_element_second_order: A [0,0,1,1], B [1,0,0], C [0,0].
    # M1 per tensor: A |kl| sorted [1,2,3,4]: lo r=0.75 -> 1.75, hi r=2.25 -> 3.25 -> [0,1,1,0]
    #                B |kl| [3,1,2] sorted [1,2,3]: lo 1.5, hi 2.5 -> [0,0,1];  C [5,5]: lo = hi = 5 -> [1,1]
    # gamma = 0.25: A [0, 0.25, 1, 0.75], B [0.75, 0, 0.25], C [0.25, 0.25]
    masks = {"A": [0.0, 0.25, 1.0, 0.75], "B": [0.75, 0.0, 0.25], "C": [0.25, 0.25]}
    _run_and_check(
        ELEMENT_SPEC,
        masks,
        backend,
        t=2,
        mode="ensemble",
        granularity="element",
        scope="tensor",
        lower=25.0,
        upper=75.0,
        gamma=0.25,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_warmup_masks_nothing(backend):
    # warmup_steps = 2 and t = 2: mask 1 everywhere despite the (25, 75) interval excluding A and C
    opt, params = _build(TENSOR_SPEC, backend, mode="second", lower=25.0, upper=75.0, warmup_steps=2)
    for n, p in params.items():
        p.grad = _t(TENSOR_SPEC[n]["g"])
    opt.step()
    for n, p in params.items():
        s = TENSOR_SPEC[n]
        want = [_adamw(s["p"][j], s["g"][j], s["m"][j], s["v"][j], 1.0, 2)[0] for j in range(len(s["p"]))]
        torch.testing.assert_close(p, _t(want), rtol=1e-14, atol=1e-15)
    assert opt.mask_stats() == {"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0}


# ------------------------------------------------------------------------------------------------
# mode="off" is HF-style AdamW
# ------------------------------------------------------------------------------------------------


def _hf_adamw(p, g, m, v, t, lr, b1, b2, eps, wd, correct_bias=True):
    """transformers.AdamW: eps added to sqrt(v), bias correction folded into the step size, decay after."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else lr
    p.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)
    p.add_(p, alpha=-lr * wd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("correct_bias", [True, False])
def test_mode_off_is_hf_adamw(seed, backend, correct_bias):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3,), (4, 5), (17,)]
    lr, betas, eps = 3e-2, (0.9, 0.98), 1e-6
    wds = [0.01, 0.0]
    params = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    mine = [p.clone() for p in params]
    opt = RoseAdamW(
        [
            {"params": mine[:2], "weight_decay": wds[0]},
            {"params": mine[2:], "weight_decay": wds[1], "rose": False},
        ],
        lr=lr,
        betas=betas,
        eps=eps,
        mode="off",
        backend=backend,
        correct_bias=correct_bias,
    )
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    for t in range(1, 5):
        grads = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
        for i, p in enumerate(params):
            _hf_adamw(
                p, grads[i], ms[i], vs[i], t, lr, *betas, eps, wds[0] if i < 2 else wds[1], correct_bias
            )
        for p, g in zip(mine, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, p in enumerate(mine):
            msg = f"seed={seed} t={t} param {i}"
            torch.testing.assert_close(
                p, params[i], rtol=1e-13, atol=1e-14, msg=lambda m, msg=msg: f"{msg}: {m}"
            )
            torch.testing.assert_close(opt.state[p]["exp_avg"], ms[i], rtol=1e-13, atol=1e-14)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], vs[i], rtol=1e-13, atol=1e-14)
            assert float(opt.state[p]["step"]) == t
    assert opt.mask_stats() == {"0.0": 1.0, "0.1": 1.0}


def test_reference_backend_changes_nothing_on_nonfinite():
    p = torch.ones(3, dtype=torch.float64)
    opt = RoseAdamW([p], backend="reference", nonfinite="skip")
    p.grad = torch.tensor([1.0, math.nan, 0.0], dtype=torch.float64)
    before = snapshot(opt)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(p, before["params"][0]) and len(opt.state) == 0 and opt.skipped_steps == 1
