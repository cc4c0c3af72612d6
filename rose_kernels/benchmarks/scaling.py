"""Step time against the parameter count, with the memory-bandwidth roofline of the same run.

Layouts are BERT-like encoders of 12 layers whose width grows with the size (Q, K, V, O and the two
FFN matrices per layer, with biases and LayerNorms named as Hugging Face names them, so the release's
eligibility rule applies). At every size: torch AdamW fused and foreach, RoseAdamW (off,
second/tensor, second/element) on the fastest backend for the device, the reference backend where
it is affordable, and a ``copy_`` of the same element count, round-robin. The roofline is the time
28 bytes per parameter (AdamW's reads and writes) take at the copy's bandwidth.
"""

from __future__ import annotations

import math

import torch

from rose_kernels import RoseAdamW
from rose_kernels.benchmarks.common import round_robin, summary
from rose_kernels.benchmarks.step import HYPER, ROSE_INTERVAL, Layout

LAYERS = 12
REFERENCE_LIMIT = 20_000_000  # the reference backend's Python loop is timed up to this size
CONFIGS = [("torch AdamW fused", None, None), ("torch AdamW foreach", None, None),
           ("rose off", "off", "tensor"), ("rose second/tensor", "second", "tensor"),
           ("rose second/element", "second", "element"), ("reference second/tensor", "second", "tensor")]


def layout_of_size(target: int, device: torch.device, seed: int = 0) -> Layout:
    """About ``target`` parameters: 12 layers of width h, 12 h^2 + 13 h each."""
    h = max(16, int(round(math.sqrt(target / (12 * LAYERS)) / 16)) * 16)
    shapes = []
    for i in range(LAYERS):
        pre = f"encoder.layer.{i}"
        for name, rows, cols in (("attention.self.query", h, h), ("attention.self.key", h, h),
                                 ("attention.self.value", h, h), ("attention.output.dense", h, h),
                                 ("intermediate.dense", 4 * h, h), ("output.dense", h, 4 * h)):
            shapes += [(f"{pre}.{name}.weight", (rows, cols)), (f"{pre}.{name}.bias", (rows,))]
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes += [(f"{pre}.{norm}.weight", (h,)), (f"{pre}.{norm}.bias", (h,))]
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=gen, device=device).mul_(0.02).requires_grad_(True) for _, s in shapes]
    grads = [torch.randn(s, generator=gen, device=device) for _, s in shapes]
    layout = Layout(f"{LAYERS}x{h}", [n for n, _ in shapes], params, grads, [])
    layout.set_grads(grads)
    return layout


def _backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpu"


def bench_scaling(sizes: list[int], rounds: int, device: torch.device) -> dict:
    points = []
    for target in sizes:
        layout = layout_of_size(target, device)
        n = layout.numel
        opts = {}
        for name, mode, gran in CONFIGS:
            if name.startswith("torch"):
                kind = "fused" if "fused" in name else "foreach"
                opts[name] = torch.optim.AdamW(layout.groups(with_rose_key=False), **HYPER, **{kind: True})
            elif name.startswith("reference"):
                if n <= REFERENCE_LIMIT:
                    opts[name] = RoseAdamW(layout.groups(with_rose_key=True), **HYPER, mode=mode, granularity=gran,
                                           backend="reference", **ROSE_INTERVAL)
            else:
                opts[name] = RoseAdamW(layout.groups(with_rose_key=True), **HYPER, mode=mode, granularity=gran,
                                       backend=_backend(device), **ROSE_INTERVAL)
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        runs = {name: opt.step for name, opt in opts.items()}
        runs["copy_"] = lambda dst=dst, src=src: dst.copy_(src)
        times = round_robin(runs, rounds, device, warmup=2)
        rows = {name: summary(t) for name, t in times.items()}
        copy_s = rows["copy_"]["median"]
        copy_gbs = 8 * n / copy_s / 1e9
        fused = rows["torch AdamW fused"]["median"]
        for row in rows.values():
            if "median" in row:
                row["vs_fused"] = row["median"] / fused
        points.append({"params": n, "layout": layout.name, "eligible": layout.eligible_numel, "rows": rows,
                       "copy_gbs": copy_gbs, "roofline_s": 28 * n / (copy_gbs * 1e9)})
        del opts, runs, layout
    return {"device": str(device), "backend": _backend(device), "points": points}


def plot(report: dict, machine: dict, path) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = report["points"]
    names = [c[0] for c in CONFIGS]
    cmap = matplotlib.colormaps["tab10"]
    for i, name in enumerate(names):
        xs = [p["params"] for p in points if "median" in p["rows"].get(name, {})]
        ys = [p["rows"][name]["median"] * 1e3 for p in points if "median" in p["rows"].get(name, {})]
        if xs:
            ax.plot(xs, ys, marker="o", label=name, color=cmap(i), linewidth=1.4)
    ax.plot([p["params"] for p in points], [p["roofline_s"] * 1e3 for p in points], "k--", linewidth=1.2,
            label="roofline: 28 B/param at copy_ bandwidth")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("optimizer step, ms (median)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"{machine.get('gpu') or machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}"
                 f"{', triton ' + machine['triton'] if machine.get('triton') else ''}\n"
                 f"{machine['date'][:10]}, git {machine['git']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def to_markdown(report: dict) -> str:
    names = ["torch AdamW fused", "rose off", "rose second/tensor", "rose second/element", "reference second/tensor"]
    lines = [f"Optimizer step on {report['device']} (RoseAdamW backend `{report['backend']}`): median ms, and the "
             "ratio to torch AdamW fused in the same run.", "",
             "| params | " + " | ".join(names) + " | roofline ms |", "|---" * (len(names) + 2) + "|"]
    for p in report["points"]:
        cells = []
        for name in names:
            row = p["rows"].get(name)
            if row is None:
                cells.append("-")
            elif "median" in row:
                ratio = "" if name == "torch AdamW fused" else f" ({row['vs_fused']:.2f}x)"
                cells.append(f"{row['median'] * 1e3:.1f}{ratio}")
            else:
                cells.append(row["status"])
        lines.append(f"| {p['params'] / 1e6:.1f}M | " + " | ".join(cells) + f" | {p['roofline_s'] * 1e3:.1f} |")
    return "\n".join(lines)
