"""Loss-landscape analysis around trained weights (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets").

The ROSE paper compares how flat the minima found by different fine-tuning methods are by evaluating the loss on
1-D and 2-D slices L(theta + a*d1) and L(theta + a*d1 + b*d2) along random, filter-normalised directions. Filter
normalisation makes the slices comparable across networks: without it a direction's effect would depend on the
arbitrary scale of each layer's weights (which e.g. LayerNorm makes meaningless).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["Landscape", "filter_normalized_direction", "loss_landscape", "plot_landscape"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    # Draw and normalise in at least float32 so that half-precision weights still get filters of the right norm
    # (a bf16 sum of squares over a large filter is far off).
    return torch.float64 if dtype == torch.float64 else torch.float32


def filter_normalized_direction(
    model: torch.nn.Module, generator: torch.Generator, *, ignore_1d: bool = True
) -> list[torch.Tensor]:
    """One random filter-normalised direction, a tensor per parameter of `model` (in `model.parameters()` order).

    Each direction is drawn from N(0, 1) with `generator` (a CPU generator, so that the same seed gives the same
    direction whatever device the model is on) and returned with its parameter's shape, dtype and device. For
    parameters with at least two dimensions, each filter (slice along dim 0) is rescaled to the norm of the same
    filter of the parameter; a zero filter gets a zero direction. Parameters with fewer than two dimensions (biases,
    norm scales) get a zero direction when `ignore_1d`, as in the paper, and are otherwise normalised as one filter.
    """
    directions = []
    for p in model.parameters():
        if not p.is_floating_point():
            # Integer (non-trainable) parameters cannot be moved along a real direction.
            directions.append(torch.zeros_like(p))
            continue
        work = _draw_dtype(p.dtype)
        # Drawn even when it is zeroed below so that the next parameters' (and the next direction's) draws do not
        # depend on ignore_1d.
        d = torch.randn(p.shape, generator=generator, dtype=work, device="cpu")
        if p.dim() < 2 and ignore_1d:
            d.zero_()
        elif d.numel() > 0:
            w = p.detach().to(device="cpu", dtype=work)
            rows = 1 if p.dim() < 2 else p.shape[0]
            w_norm = w.reshape(rows, -1).norm(dim=1, keepdim=True)
            d_norm = d.reshape(rows, -1).norm(dim=1, keepdim=True)
            # An exact ratio, not the reference's w / (d + 1e-10): filters of tiny weights keep their exact norm,
            # and a filter whose draw is all zero (one-element filters, in principle) stays zero instead of NaN.
            scale = torch.where(d_norm > 0, w_norm / torch.where(d_norm > 0, d_norm, 1), 0)
            d = (d.reshape(rows, -1) * scale).reshape(p.shape)
        directions.append(d.to(device=p.device, dtype=p.dtype))
    return directions


@dataclass
class Landscape:
    """Losses on a 1-D slice and a 2-D slice through the trained weights.

    `losses_2d[i][j]` is the loss at alpha = `grid[i]` (along d1) and beta = `grid[j]` (along d2).
    """

    alphas: list[float]
    losses_1d: list[float]
    grid: list[float]
    losses_2d: list[list[float]]
    center_loss: float

    def to_dict(self) -> dict:
        """The fields as plain Python lists and floats (json.dumps-able; non-finite losses stay NaN / inf)."""
        return asdict(self)

    def sharpness(self) -> float:
        """Mean rise of the loss over the 1-D slice, mean(L(theta + a*d1) - L(theta)): larger is sharper."""
        if not self.losses_1d:
            return float("nan")
        return sum(loss - self.center_loss for loss in self.losses_1d) / len(self.losses_1d)


def _axis(span: float, points: int, name: str) -> list[float]:
    if isinstance(points, bool) or not isinstance(points, int):
        raise TypeError(f"{name} must be an int, got {type(points).__name__}")
    # Odd so that the trained point itself is on the grid; at least 3 so that the slice has a width (linspace with
    # a single point returns -span, not 0).
    if points < 3 or points % 2 == 0:
        raise ValueError(f"{name} must be odd and >= 3 so that 0 is on the grid, got {points}")
    values = torch.linspace(-span, span, points, dtype=torch.float64).tolist()
    # linspace's middle value can be ~1e-17 instead of 0; the centre must be theta itself, bit for bit.
    values[points // 2] = 0.0
    return values


def _move_to(
    params: list[torch.Tensor],
    origin: list[torch.Tensor],
    d1: list[torch.Tensor],
    d2: list[torch.Tensor],
    alpha: float,
    beta: float,
) -> None:
    """Sets every parameter to origin + alpha*d1 + beta*d2 in place (the caller holds no_grad)."""
    for p, o, u, v in zip(params, origin, d1, d2, strict=True):
        if not p.is_floating_point():
            continue
        if p.dtype in _LOW_PRECISION:
            # Summed in float32 and rounded once: two half-precision roundings would blur small steps.
            x = o.float()
            x.add_(u.float(), alpha=alpha).add_(v.float(), alpha=beta)
            p.copy_(x)
        else:
            p.copy_(o)
            if alpha != 0.0:
                p.add_(u, alpha=alpha)
            if beta != 0.0:
                p.add_(v, alpha=beta)


def loss_landscape(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], float],
    *,
    span: float = 1.0,
    points_1d: int = 21,
    points_2d: int = 11,
    seed: int = 0,
    progress: Callable[[int], object] | None = None,
) -> Landscape:
    """Evaluates `loss_fn(model)` at theta, along d1 on a 1-D grid and over a 2-D (d1, d2) grid.

    Both grids are torch.linspace(-span, span, points) with odd `points` (ValueError otherwise), so that the trained
    point is on them. d1 and d2 come, in that order, from filter_normalized_direction with a CPU generator seeded
    with `seed`. The parameters are moved in place and `loss_fn` runs under torch.no_grad() with every module in
    eval mode; afterwards the parameters are restored bit for bit from a saved copy (not by subtracting, which
    would not round-trip) and each module's training flag is restored, also when `loss_fn` raises. `progress`, if
    given, is called with 1 after each of the 1 + points_1d + points_2d**2 evaluations.
    """
    span = float(span)
    if not math.isfinite(span) or span <= 0:
        raise ValueError(f"span must be finite and > 0, got {span}")
    alphas = _axis(span, points_1d, "points_1d")
    grid = _axis(span, points_2d, "points_2d")

    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(model, generator)
    d2 = filter_normalized_direction(model, generator)

    # Per module, not model.train(mode): a model in train() may hold submodules deliberately left in eval()
    # (frozen BatchNorm, say), which a blanket restore would flip.
    modes = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]

    def evaluate() -> float:
        loss = float(loss_fn(model))
        if progress is not None:
            progress(1)
        return loss

    try:
        model.eval()
        with torch.no_grad():
            center_loss = evaluate()
            losses_1d = []
            for a in alphas:
                _move_to(params, saved, d1, d2, a, 0.0)
                losses_1d.append(evaluate())
            losses_2d = []
            for a in grid:
                row = []
                for b in grid:
                    _move_to(params, saved, d1, d2, a, b)
                    row.append(evaluate())
                losses_2d.append(row)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        for m, mode in modes:
            m.training = mode

    return Landscape(alphas=alphas, losses_1d=losses_1d, grid=grid, losses_2d=losses_2d, center_loss=center_loss)


def plot_landscape(landscape: Landscape, path: str | os.PathLike, *, title: str = "") -> None:
    """Writes a PNG with the 1-D curve (loss vs alpha) and a filled contour plot of the 2-D slice.

    Uses a bare Figure on an Agg canvas rather than pyplot, so that it neither needs a display nor changes the
    backend of a caller that has already configured one. Parent directories of `path` are created.
    """
    # Imported here: matplotlib is only needed for plotting, not a dependency of the package.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)

    ax1.plot(landscape.alphas, landscape.losses_1d, marker="o", markersize=3)
    ax1.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax1.set_xlabel("alpha (direction d1)")
    ax1.set_ylabel("loss")
    ax1.set_title("1-D slice")
    ax1.grid(True, alpha=0.3)

    # Diverged points (inf / NaN far from theta) are left blank rather than breaking the contour levels.
    z = np.ma.masked_invalid(np.asarray(landscape.losses_2d, dtype=np.float64))
    g = np.asarray(landscape.grid, dtype=np.float64)
    if z.count() > 0 and float(z.max()) > float(z.min()):
        filled = ax2.contourf(g, g, z, levels=20, cmap="viridis")
        ax2.contour(g, g, z, levels=filled.levels, colors="k", linewidths=0.4, alpha=0.6)
        fig.colorbar(filled, ax=ax2, label="loss")
    else:
        # contourf needs at least two distinct finite values to place levels.
        ax2.text(0.5, 0.5, "flat or non-finite surface", ha="center", va="center", transform=ax2.transAxes)
    ax2.plot([0.0], [0.0], marker="*", color="red", markersize=10)
    # Rows of losses_2d are alphas (y), columns betas (x).
    ax2.set_xlabel("beta (direction d2)")
    ax2.set_ylabel("alpha (direction d1)")
    ax2.set_title("2-D slice")
    ax2.set_aspect("equal")

    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png", dpi=120)
