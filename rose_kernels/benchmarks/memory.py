"""Peak memory of an optimizer over its steps, beyond the parameters and gradients, per parameter,
against ``torch.optim.AdamW`` (fused) measured the same way.

Each configuration runs in a fresh process (``python -m rose_kernels.benchmarks.memory --child``):
it builds the layout's parameters and gradients, resets the peak (``/proc/self/clear_refs``, 5: the
peak resident set size) or, on a GPU, the allocator's peak, then creates the optimizer and runs three
steps (with ``record_first_order()`` in first-order modes). The peak minus the resident size just
before the optimizer existed is its memory: state, masks and every transient buffer.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch

from rose_kernels.types import uses_first_order

CONFIGS = [("torch AdamW fused", None, None)] + [
    (f"rose {mode}/{gran}", mode, gran)
    for mode in ("off", "second", "first", "ensemble")
    for gran in (("tensor",) if mode == "off" else ("tensor", "element"))
]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(config: str, layout_name: str, device: str, backend: str) -> dict:
    from rose_kernels import RoseAdamW
    from rose_kernels.benchmarks.step import HYPER, ROSE_INTERVAL, build_layout

    dev = torch.device(device)
    layout = build_layout(layout_name)
    if dev.type == "cuda":
        for group in (layout.params, layout.grads, layout.kl_grads):
            for i, t in enumerate(group):
                group[i] = t.to(dev)
        layout.params = [p.detach().requires_grad_(True) for p in layout.params]
    layout.set_grads(layout.grads)
    mode, gran = dict((c[0], c[1:]) for c in CONFIGS)[config]
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = _rss_kib("VmRSS") * 1024
    if mode is None:
        opt = torch.optim.AdamW(layout.groups(with_rose_key=False), **HYPER, fused=True)
    else:
        opt = RoseAdamW(layout.groups(with_rose_key=True), **HYPER, mode=mode, granularity=gran,
                        backend=backend, **ROSE_INTERVAL)
    for _ in range(3):
        if uses_first_order(mode):
            layout.set_grads(layout.kl_grads)
            opt.record_first_order()
        layout.set_grads(layout.grads)
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    return {"config": config, "params": layout.numel, "eligible": layout.eligible_numel,
            "peak_bytes": peak - before}


def _measure(name: str, layout_name: str, device: torch.device, backend: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "rose_kernels.benchmarks.memory", "--child", name, "--layout", layout_name,
         "--device", str(device), "--backend", backend],
        capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        return {"config": name, "status": f"fails: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(layouts: tuple[str, str], device: torch.device, backend: str = "auto",
                 names: list[str] | None = None) -> dict:
    """Peaks on a smaller and a larger layout. Per-element costs are the slope between the two:
    constant costs (the extension's code pages that a mode touches, thread pools) cancel there,
    where they would blur a per-parameter figure taken from one size."""
    small, large = layouts
    rows = []
    for name, _, _ in CONFIGS:
        if names is not None and name not in names and name != "torch AdamW fused":
            continue
        rows.append({"config": name, "small": _measure(name, small, device, backend),
                     "large": _measure(name, large, device, backend)})
    base = rows[0]
    for r in rows:
        a, b = r["small"], r["large"]
        if "peak_bytes" not in a or "peak_bytes" not in b or "peak_bytes" not in base["large"]:
            r["status"] = a.get("status") or b.get("status") or "baseline failed"
            continue
        r["bytes_per_param"] = b["peak_bytes"] / b["params"]
        extra_small = a["peak_bytes"] - base["small"]["peak_bytes"]
        extra_large = b["peak_bytes"] - base["large"]["peak_bytes"]
        r["extra_bytes_per_param"] = extra_large / b["params"]
        r["extra_bits_per_eligible"] = 8 * extra_large / b["eligible"]
        r["marginal_bits_per_eligible"] = 8 * (extra_large - extra_small) / (b["eligible"] - a["eligible"])
        r["constant_mib"] = (extra_large - r["marginal_bits_per_eligible"] / 8 * b["eligible"]) / 2**20
    return {"layouts": list(layouts), "device": str(device), "rows": rows}


def to_markdown(report: dict) -> str:
    small, large = report["layouts"]
    lines = [f"Peak optimizer memory over 3 steps on {report['device']} (fresh process per configuration; beyond "
             f"parameters and gradients), {large} layout; the per-element cost is the slope between {small} and "
             f"{large}, the rest is a constant.", "",
             f"| configuration | bytes / param ({large}) | extra over torch AdamW: bytes / param | "
             "bits / eligible element | per eligible element (slope) | constant |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "bytes_per_param" not in r:
            lines.append(f"| {r['config']} | {r.get('status', '')} | | | | |")
            continue
        if r["config"] == "torch AdamW fused":
            lines.append(f"| {r['config']} | {r['bytes_per_param']:.2f} | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['bytes_per_param']:.2f} | {r['extra_bytes_per_param']:+.3f} | "
                     f"{r['extra_bits_per_eligible']:+.2f} bits | {r['marginal_bits_per_eligible']:+.2f} bits | "
                     f"{r['constant_mib']:+.1f} MiB |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", required=True)
    parser.add_argument("--layout", default="minilm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    print(json.dumps(child(args.child, args.layout, args.device, args.backend)))


if __name__ == "__main__":
    main()
