"""Gradient clipping plus one optimizer step: ``rose_kernels.clip_grad_norm_(..., optimizer=opt)`` +
``RoseAdamW.step()`` against ``torch.nn.utils.clip_grad_norm_`` + ``torch.optim.AdamW(fused=True)``,
on the parameter layouts of bench_step.py (MiniLM, BERT-base; float32, fixed random gradients).

The hand-off lets the step skip its own read of the gradients (finiteness, tensor ``||g||^2``), so
clip + step reads them twice and writes them once, as torch's pair does. For reference the table
also has RoseAdamW after torch's clipping (no hand-off). Timed round-robin in one process; medians
with min/max; ratios to torch's pair measured in the same run.

    python bench/bench_clip_step.py [--layouts minilm,bert-base] [--rounds 15] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rose_kernels
from rose_kernels import RoseAdamW
from rose_kernels.benchmarks.common import round_robin, summary
from rose_kernels.benchmarks.step import build_layout, machine_info

TARGETS = {"off": 1.02, "second/tensor": 1.05}


def make_runs(layout) -> dict:
    params = layout.params
    kw = dict(lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    torch_opt = torch.optim.AdamW(layout.groups(with_rose_key=False), fused=True, **kw)
    rose = {mode: RoseAdamW(layout.groups(with_rose_key=True), mode=mode, **kw) for mode in ("off", "second")}

    def torch_pair():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch_opt.step()

    def rose_pair(mode):
        def run():
            rose_kernels.clip_grad_norm_(params, 1.0, optimizer=rose[mode])
            rose[mode].step()
        return run

    def torch_clip_rose_step(mode):
        def run():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            rose[mode].step()
        return run

    return {
        "torch clip + AdamW(fused)": torch_pair,
        "off": rose_pair("off"),
        "second/tensor": rose_pair("second"),
        "torch clip + RoseAdamW off": torch_clip_rose_step("off"),
        "torch clip + RoseAdamW second/tensor": torch_clip_rose_step("second"),
    }


def run(layouts: list[str], rounds: int) -> dict:
    report = {"machine": machine_info(), "rounds": rounds, "layouts": {}}
    for name in layouts:
        layout = build_layout(name)
        times = round_robin(make_runs(layout), rounds, torch.device("cpu"), warmup=2)
        entry = {k: summary(v) for k, v in times.items()}
        base = entry["torch clip + AdamW(fused)"]["median"]
        for value in entry.values():
            value["ratio"] = value["median"] / base
        report["layouts"][name] = {"params": layout.numel, "results": entry}
        del layout
    return report


def to_markdown(report: dict) -> str:
    lines = [f"Clip (max norm 1.0) + one step, CPU, median of {report['rounds']} round-robin rounds (min-max); "
             "ratio to torch's clip + AdamW(fused) in the same run.", ""]
    names = list(report["layouts"])
    lines.append("| | " + " | ".join(f"{n} ({report['layouts'][n]['params'] / 1e6:.1f}M)" for n in names) + " |")
    lines.append("|---|" + "---|" * len(names))
    keys = list(next(iter(report["layouts"].values()))["results"])
    for key in keys:
        cells = []
        for n in names:
            r = report["layouts"][n]["results"][key]
            cells.append(f"{r['median'] * 1e3:.1f} ms ({r['min'] * 1e3:.1f}-{r['max'] * 1e3:.1f}), {r['ratio']:.2f}x")
        target = f" (target <= {TARGETS[key]}x)" if key in TARGETS else ""
        lines.append(f"| {key}{target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="minilm,bert-base")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    report = run(args.layouts.split(","), args.rounds)
    text = to_markdown(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    (out / f"clip-step-cpu-{stamp}.json").write_text(json.dumps(report, indent=1))
    (out / f"clip-step-cpu-{stamp}.md").write_text(f"# Clip + step (CPU), {stamp}\n\n{text}\n")
    return report


if __name__ == "__main__":
    main()
