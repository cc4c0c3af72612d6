"""``rose-bench``: the benchmark suites in one command, with results files and plots.

    rose-bench --quick                      # < 2 minutes: small sizes, few rounds
    rose-bench                              # the full CPU suite (tens of minutes)
    rose-bench --device cuda --suites step,select,scaling
    rose-bench --suites select --sizes 1e5,1e6,1e7,1e8,1e9
    rose-bench --update-readme              # refresh bench/README.md's generated tables

Suites: ``step`` (the optimizer step on BERT-family layouts, every backend, mode and granularity
against torch AdamW fused and foreach), ``select`` (SELECT against torch.quantile, torch.kthvalue,
torch.sort and numpy.partition), ``memory`` (peak bytes per parameter against torch AdamW),
``scaling`` (step time against parameter count, log-log PNG with the copy roofline) and ``train``
(the trainer's step against the same loop with torch AdamW). Each writes
``<suite>-<device>-<date>[-quick].md/.json`` (and the PNG) to ``--out``; every file states the machine,
the date, the torch/Triton versions and the git revision.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from rose_kernels.benchmarks import step as step_mod

SUITES = ("step", "select", "memory", "scaling", "train")
DEFAULT_SUITES = ("step", "select", "memory", "scaling")
README_BEGIN = "<!-- rose-bench:begin -->"
README_END = "<!-- rose-bench:end -->"


def _sizes(text: str | None) -> list[int] | None:
    if not text:
        return None
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _machine(device: torch.device) -> dict:
    machine = step_mod.machine_info()
    try:
        import triton

        machine["triton"] = triton.__version__
    except ImportError:
        machine["triton"] = None
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def _header(machine: dict, title: str) -> str:
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['cores']} cores, {machine['torch_threads']} threads)"
    return (f"# {title}\n\n{where}; torch {machine['torch']}, triton {machine['triton'] or '-'}, rose_kernels "
            f"{machine['rose_kernels']}; {machine['date']}; git {machine['git']}.\n")


def run(suites: list[str], device: torch.device, quick: bool, sizes: list[int] | None, rounds: int | None,
        out: Path) -> dict:
    machine = _machine(device)
    stem_suffix = f"-{device.type}-{machine['date'][:10]}" + ("-quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    written = {}

    def write(suite: str, title: str, body: str, report: dict) -> None:
        text = _header(machine, title) + "\n" + body + "\n"
        (out / f"{suite}{stem_suffix}.md").write_text(text)
        (out / f"{suite}{stem_suffix}.json").write_text(json.dumps({"machine": machine, **report}, indent=1,
                                                                    default=str))
        written[suite] = text
        print(text, flush=True)

    if "select" in suites:
        from rose_kernels.benchmarks import select

        default = [10**5, 10**6, 10**7] if quick else [10**5, 10**6, 10**7, 10**8]
        report = select.bench_select(sizes or default, rounds or (2 if quick else 5), device)
        write("select", "SELECT: two exact thresholds against torch and numpy", select.to_markdown(report), report)
    if "scaling" in suites:
        from rose_kernels.benchmarks import scaling

        default = [10**6, 4 * 10**6, 16 * 10**6] if quick else [10**6, 4 * 10**6, 16 * 10**6, 64 * 10**6,
                                                                  256 * 10**6]
        report = scaling.bench_scaling(sizes or default, rounds or (3 if quick else 7), device)
        scaling.plot(report, machine, out / f"scaling{stem_suffix}.png")
        write("scaling", "Step time against parameter count", scaling.to_markdown(report)
              + f"\n\n![scaling](scaling{stem_suffix}.png)", report)
    if "memory" in suites:
        from rose_kernels.benchmarks import memory

        if quick:
            report = memory.bench_memory(("tiny", "minilm"), device,
                                         names=["rose off/tensor", "rose second/element", "rose first/element"])
        else:
            report = memory.bench_memory(("minilm", "bert-base"), device)
        write("memory", "Peak optimizer memory per parameter", memory.to_markdown(report), report)
    if "step" in suites:
        layouts = ["minilm"] if quick else ["minilm", "bert-base"]
        report = step_mod.run(layouts, rounds or (3 if quick else 10), 0 if quick else 2, {"minilm"},
                              with_reference=not quick)
        report["command"] = "rose-bench --suites step" + (" --quick" if quick else "")
        report["reference_note"] = ("not run (--quick)" if quick else
                                    "2 rounds; second/element on MiniLM only (it sorts every eligible element)")
        if device.type == "cpu":
            write("step", "One optimizer step (CPU backend)", step_mod.to_markdown(report), report)
        else:
            print("step suite: the GPU step benchmark is bench/bench_gpu.py (bench/device_check.sh)", file=sys.stderr)
    if "train" in suites:
        from rose_kernels.benchmarks import train_step

        report = train_step.run(rounds or (2 if quick else 8), 32, 64)
        write("train-step", "Trainer step", train_step.to_markdown(report), report)
    return written


def update_readme(readme: Path, written: dict[str, str], out: Path, device: torch.device) -> None:
    """Replaces the block between the rose-bench markers with the scaling, select and memory tables:
    this run's, or the newest full run's in ``out`` for suites this run did not include."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_BEGIN} ... {README_END} block to update")
    parts = []
    for suite in ("scaling", "select", "memory"):
        if suite in written:
            parts.append(written[suite])
            continue
        saved = sorted(p for p in out.glob(f"{suite}-{device.type}-*.md") if not p.stem.endswith("-quick"))
        if saved:
            parts.append(saved[-1].read_text())
    body = "\n".join(re.sub(r"^# ", "#### ", p, flags=re.M) for p in parts)
    body = body.replace("](scaling-", "](results/scaling-")
    new = re.sub(re.escape(README_BEGIN) + r".*?" + re.escape(README_END),
                 lambda _: f"{README_BEGIN}\n{body}\n{README_END}", text, flags=re.S)
    readme.write_text(new)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rose-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds (< 2 minutes)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--suites", default=",".join(DEFAULT_SUITES), help=f"comma-separated, from {', '.join(SUITES)}")
    parser.add_argument("--sizes", help="sizes for select (elements) and scaling (parameters), e.g. 1e6,1e7")
    parser.add_argument("--rounds", type=int, help="timed rounds per configuration")
    parser.add_argument("--out", type=Path, default=step_mod.RESULTS)
    parser.add_argument("--update-readme", action="store_true", help="write the tables into bench/README.md")
    args = parser.parse_args(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suites {unknown}; choose from {', '.join(SUITES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    written = run(suites, device, args.quick, _sizes(args.sizes), args.rounds, args.out)
    if args.update_readme:
        update_readme(step_mod.REPO / "bench" / "README.md", written, args.out, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
