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
        if mode in ("first", "ensemble"):
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


def bench_memory(layout_name: str, device: torch.device, backend: str = "auto") -> dict:
    rows = []
    for name, _, _ in CONFIGS:
        proc = subprocess.run(
            [sys.executable, "-m", "rose_kernels.benchmarks.memory", "--child", name, "--layout", layout_name,
             "--device", str(device), "--backend", backend],
            capture_output=True, text=True, timeout=900,
        )
        if proc.returncode != 0:
            rows.append({"config": name, "status": f"fails: {proc.stderr.strip().splitlines()[-1:]}"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["config"] == "torch AdamW fused" and "peak_bytes" in r), None)
    for r in rows:
        if "peak_bytes" in r:
            r["bytes_per_param"] = r["peak_bytes"] / r["params"]
            if base is not None:
                extra = r["peak_bytes"] - base["peak_bytes"]
                r["extra_bytes_per_param"] = extra / r["params"]
                r["extra_bits_per_eligible"] = 8 * extra / r["eligible"]
    return {"layout": layout_name, "device": str(device), "rows": rows}


def to_markdown(report: dict) -> str:
    lines = [f"Peak optimizer memory over 3 steps, {report['layout']} layout on {report['device']} (fresh process "
             "per configuration; beyond parameters and gradients).", "",
             "| configuration | bytes / param | extra over torch AdamW: bytes / param | bits / eligible element |",
             "|---|---|---|---|"]
    for r in report["rows"]:
        if "peak_bytes" not in r:
            lines.append(f"| {r['config']} | {r['status']} | | |")
            continue
        extra = r.get("extra_bytes_per_param")
        bits = r.get("extra_bits_per_eligible")
        lines.append(f"| {r['config']} | {r['bytes_per_param']:.2f} | "
                     f"{'' if extra is None else f'{extra:+.3f}'} | {'' if bits is None else f'{bits:+.2f}'} |")
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
