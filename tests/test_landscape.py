"""Loss-landscape analysis: filter-normalised directions, the grids on a quadratic, restoring the model, the plot."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rose_kernels.train.landscape import Landscape, filter_normalized_direction, loss_landscape, plot_landscape

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Net(nn.Module):
    """Linear, conv and LayerNorm parameters: >= 2-D weights and 1-D biases / scales."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.lin = nn.Linear(7, 5)
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 0.1)
            # A zero filter must get a zero direction.
            self.lin.weight[2].zero_()
            self.conv.weight[1].zero_()


class Quadratic(nn.Module):
    """One 2-D parameter W; the loss scale * ||W - W0||^2 is minimal at the trained point W0."""

    def __init__(self, w0: torch.Tensor):
        super().__init__()
        self.W = nn.Parameter(w0.clone())


def quadratic(seed: int, shape=(6, 9), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return Quadratic(w0), w0.clone()


def quadratic_loss(w0: torch.Tensor, scale: float = 1.0):
    return lambda m: scale * float(((m.W - w0) ** 2).sum())


def filter_norms(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().reshape(t.shape[0], -1).norm(dim=1)


def directions(model: nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return filter_normalized_direction(model, gen), filter_normalized_direction(model, gen)


# --- filter normalisation ---------------------------------------------------------------------------------------


def test_filters_have_the_parameters_norms(seed):
    model = Net(torch.Generator().manual_seed(seed))
    ds = filter_normalized_direction(model, torch.Generator().manual_seed(seed))
    params = list(model.parameters())
    assert len(ds) == len(params), f"seed={seed}"
    for (name, p), d in zip(model.named_parameters(), ds, strict=True):
        msg = f"seed={seed} {name}"
        assert d.shape == p.shape and d.dtype == p.dtype and d.device == p.device, msg
        if p.dim() >= 2:
            torch.testing.assert_close(filter_norms(d), filter_norms(p), rtol=1e-5, atol=0, msg=msg)
        else:
            assert torch.count_nonzero(d) == 0, f"{msg}: 1-D parameters get a zero direction when ignore_1d"
    assert torch.count_nonzero(ds[0][2]) == 0, f"seed={seed}: zero filter of lin.weight"
    assert torch.count_nonzero(ds[2][1]) == 0, f"seed={seed}: zero filter of conv.weight"
    assert torch.count_nonzero(ds[0][0]) > 0, f"seed={seed}"


def test_1d_parameters_normalised_as_one_filter(seed):
    model = Net(torch.Generator().manual_seed(seed))
    ds = filter_normalized_direction(model, torch.Generator().manual_seed(seed), ignore_1d=False)
    for (name, p), d in zip(model.named_parameters(), ds, strict=True):
        if p.dim() == 1:
            torch.testing.assert_close(
                d.double().norm(), p.detach().double().norm(), rtol=1e-5, atol=0, msg=f"seed={seed} {name}"
            )
    # ignore_1d only zeroes the 1-D directions: the draws, hence the >= 2-D directions, are the same.
    kept = filter_normalized_direction(model, torch.Generator().manual_seed(seed), ignore_1d=True)
    for (name, p), a, b in zip(model.named_parameters(), ds, kept, strict=True):
        if p.dim() >= 2:
            assert torch.equal(a, b), f"seed={seed} {name}"


def test_direction_keeps_dtype(seed):
    model = Net(torch.Generator().manual_seed(seed)).to(torch.float64)
    ds = filter_normalized_direction(model, torch.Generator().manual_seed(seed))
    for (name, p), d in zip(model.named_parameters(), ds, strict=True):
        assert d.dtype == torch.float64, f"seed={seed} {name}"
        if p.dim() >= 2:
            torch.testing.assert_close(filter_norms(d), filter_norms(p), rtol=1e-12, atol=0, msg=f"seed={seed}")


def test_direction_is_seeded(seed):
    model = Net(torch.Generator().manual_seed(seed))
    a = filter_normalized_direction(model, torch.Generator().manual_seed(seed))
    b = filter_normalized_direction(model, torch.Generator().manual_seed(seed))
    c = filter_normalized_direction(model, torch.Generator().manual_seed(seed + 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"seed={seed}: same seed, same direction"
    assert not torch.equal(a[0], c[0]), f"seed={seed}: another seed, another direction"


# --- the landscape on a quadratic -------------------------------------------------------------------------------


def test_quadratic_matches_the_analytic_losses(seed):
    model, w0 = quadratic(seed)
    ls = loss_landscape(model, quadratic_loss(w0), span=1.5, points_1d=9, points_2d=5, seed=seed)
    d1, d2 = (d[0].double() for d in directions(model, seed))
    msg = f"seed={seed}"

    assert len(ls.alphas) == len(ls.losses_1d) == 9, msg
    assert len(ls.losses_2d) == len(ls.grid) == 5 and all(len(r) == 5 for r in ls.losses_2d), msg
    assert ls.alphas[4] == 0.0 and ls.grid[2] == 0.0, msg
    linspace = torch.linspace(-1.5, 1.5, 9, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(ls.alphas, dtype=torch.float64), linspace, msg=msg)
    assert ls.center_loss == 0.0, msg
    assert min(range(9), key=ls.losses_1d.__getitem__) == 4, f"{msg}: the minimum is at alpha 0"

    # W - W0 is a*d1 up to the float32 rounding of W, ~1e-7 relative.
    scale = float((d1**2).sum())
    expected_1d = [float(((a * d1) ** 2).sum()) for a in ls.alphas]
    torch.testing.assert_close(
        torch.tensor(ls.losses_1d), torch.tensor(expected_1d), rtol=1e-5, atol=1e-12 * scale, msg=msg
    )
    expected_2d = [[float(((a * d1 + b * d2) ** 2).sum()) for b in ls.grid] for a in ls.grid]
    torch.testing.assert_close(
        torch.tensor(ls.losses_2d), torch.tensor(expected_2d), rtol=1e-5, atol=1e-12 * scale, msg=msg
    )
    assert ls.losses_2d[2][2] == ls.center_loss, msg


def test_parameters_restored_bit_for_bit(seed):
    model, w0 = quadratic(seed)
    before = model.W.detach().clone()
    calls = []

    def loss_fn(m):
        calls.append(1)
        return quadratic_loss(w0)(m)

    ls = loss_landscape(model, loss_fn, points_1d=5, points_2d=3, seed=seed, progress=calls.append)
    assert torch.equal(model.W.view(torch.int32), before.view(torch.int32)), f"seed={seed}"
    assert model.W.grad is None and model.W.requires_grad, f"seed={seed}"
    # One progress tick per evaluation: the centre, the 1-D grid and the 2-D grid.
    assert len(calls) == 2 * (1 + 5 + 9), f"seed={seed}"
    assert ls.center_loss == 0.0, f"seed={seed}"


def test_parameters_restored_when_loss_fn_raises(seed):
    model, w0 = quadratic(seed)
    model.train()
    before = model.W.detach().clone()
    calls = 0

    def loss_fn(m):
        nonlocal calls
        calls += 1
        if calls == 3:  # the trained point, then alpha = -span, then the next (moved) point
            raise RuntimeError("boom")
        return quadratic_loss(w0)(m)

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape(model, loss_fn, points_1d=5, points_2d=3, seed=seed)
    assert calls == 3, f"seed={seed}"
    assert torch.equal(model.W.view(torch.int32), before.view(torch.int32)), f"seed={seed}"
    assert model.training, f"seed={seed}"


def test_training_mode_restored(seed):
    model, w0 = quadratic(seed)
    model.sub = nn.Dropout(0.5)
    seen = []

    def loss_fn(m):
        seen.append((m.training, m.sub.training, torch.is_grad_enabled()))
        return quadratic_loss(w0)(m)

    model.train()
    loss_landscape(model, loss_fn, points_1d=3, points_2d=3, seed=seed)
    assert seen and all(s == (False, False, False) for s in seen), f"seed={seed}: eval mode and no_grad: {seen}"
    assert model.training and model.sub.training, f"seed={seed}"

    # A submodule deliberately left in eval stays there (no blanket model.train()).
    model.sub.eval()
    loss_landscape(model, loss_fn, points_1d=3, points_2d=3, seed=seed)
    assert model.training and not model.sub.training, f"seed={seed}"

    model.eval()
    loss_landscape(model, loss_fn, points_1d=3, points_2d=3, seed=seed)
    assert not model.training and not model.sub.training, f"seed={seed}"


@pytest.mark.parametrize("points", [{"points_1d": 20}, {"points_2d": 10}, {"points_1d": 1}, {"points_2d": 0}])
def test_bad_point_counts_rejected(seed, points):
    model, w0 = quadratic(seed)
    before = model.W.detach().clone()
    with pytest.raises(ValueError, match="odd"):
        loss_landscape(model, quadratic_loss(w0), seed=seed, **points)
    assert torch.equal(model.W, before), f"seed={seed}"


def test_same_seed_same_landscape(seed):
    model, w0 = quadratic(seed)
    a = loss_landscape(model, quadratic_loss(w0), points_1d=5, points_2d=3, seed=seed)
    b = loss_landscape(model, quadratic_loss(w0), points_1d=5, points_2d=3, seed=seed)
    assert a == b, f"seed={seed}"


# --- the result and the plot ------------------------------------------------------------------------------------


def test_to_dict_and_sharpness(seed):
    model, w0 = quadratic(seed)
    flat = loss_landscape(model, quadratic_loss(w0), points_1d=7, points_2d=3, seed=seed)
    sharp = loss_landscape(model, quadratic_loss(w0, 10.0), points_1d=7, points_2d=3, seed=seed)

    d = flat.to_dict()
    assert set(d) == {"alphas", "losses_1d", "grid", "losses_2d", "center_loss"}, f"seed={seed}"
    assert Landscape(**json.loads(json.dumps(d, allow_nan=False))) == flat, f"seed={seed}"

    assert flat.sharpness() > 0, f"seed={seed}"
    assert sharp.sharpness() > flat.sharpness(), f"seed={seed}"
    assert sharp.sharpness() == pytest.approx(10 * flat.sharpness(), rel=1e-6), f"seed={seed}"


def test_plot_writes_a_png(seed, tmp_path):
    model, w0 = quadratic(seed)
    ls = loss_landscape(model, quadratic_loss(w0), points_1d=5, points_2d=5, seed=seed)
    path = tmp_path / "not" / "yet" / "landscape.png"
    plot_landscape(ls, path, title=f"quadratic seed={seed}")
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE) and data.startswith(PNG_SIGNATURE), f"seed={seed}"


def test_plot_survives_non_finite_and_flat_surfaces(tmp_path):
    nan, inf = float("nan"), float("inf")
    grid = [-1.0, 0.0, 1.0]
    diverged = Landscape(grid, [inf, 0.0, 2.0], grid, [[inf, 1.0, nan], [1.0, 0.0, 1.0], [2.0, 1.0, inf]], 0.0)
    flat = Landscape(grid, [1.0] * 3, grid, [[1.0] * 3 for _ in grid], 1.0)
    for name, ls in (("diverged", diverged), ("flat", flat)):
        path = tmp_path / f"{name}.png"
        plot_landscape(ls, str(path))
        assert path.read_bytes().startswith(PNG_SIGNATURE), name
