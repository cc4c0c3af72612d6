"""The GPU backends (triton, and cuda when the extension has its kernels): one optimizer step against
torch.optim.AdamW(fused=True), and SELECT alone.

One configuration at a time, so that at most two optimizers' state is alive: for each configuration
a fresh ``torch.optim.AdamW(fused=True)`` reference and that configuration's optimizer are built on
the layout's shared parameters and gradients, both warmed up (Triton compiles, tables are cached,
the selection has its guess), then timed interleaved round-robin (fused, config, copy_, fused,
config, copy_, ...) with CUDA events; the row reports the configuration's median / min / max, its
ratio to the fused median of that same pairing, and GB/s under the byte model of bench_step.py next
to the device-to-device ``copy_`` of the same float32 element count timed in the same rounds. Both
optimizers are then deleted, ``gc.collect()`` and ``torch.cuda.empty_cache()`` run, and the next
configuration starts. The "torch AdamW fused" row is a second fused instance against the reference
(its ratio shows the pairing's noise). SELECT: two exact thresholds of 1e9 float32 scores against
one read of them (``torch.sum``).

Memory: before each layout (and before SELECT) the script estimates what it needs
(``layout_bytes``, ``select_bytes``) and compares it with the free memory
(``torch.cuda.mem_get_info()``; ``--memory-budget-gib`` overrides it; on the CPU MemAvailable of
/proc/meminfo). A layout that does not fit is skipped and SELECT is shrunk or skipped, with the
reason (needed vs free GiB) in the report.

Results survive a crash or a timeout: gpu-step.json and gpu-step.md in ``--out`` are rewritten
(atomically: a temporary file, then ``os.replace``) at the start and after every configuration,
and once more with the state "interrupted (SIGTERM)" (what ``timeout`` sends) or "crashed (...)"
when the run ends early. A configuration that raises (e.g. out of memory) becomes an error row
with the exception's first line, its memory is freed and the next configuration runs; the exit
status is 1 if any did (a skipped layout or SELECT is no error).

    python bench/bench_gpu.py [--layouts bert-large,1.3b] [--rounds 15] [--select-elements 1e9]
                              [--backends triton,cuda] [--configs fused,off,...]
                              [--memory-budget-gib G] [--device cuda] [--out DIR]

``--device cpu`` with ``TRITON_INTERPRET=1`` and ``--layouts tiny`` smoke-tests the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # the package of this checkout (nothing is imported from bench/)
    sys.path.insert(0, str(HERE.parent))

from rose_kernels import RoseAdamW, is_eligible  # noqa: E402
from rose_kernels.benchmarks import step as bench_step  # noqa: E402  (layouts, byte models, machine info)
from rose_kernels.types import uses_first_order  # noqa: E402

FUSED = "torch AdamW fused"
TORCH_CONFIGS = [(FUSED, None, "fused", None), ("torch AdamW foreach", None, "foreach", None)]
ROSE_CONFIGS = [("off", "tensor"), ("second", "tensor"), ("second", "element"), ("ensemble", "element")]
# Step time over torch's fused AdamW that each configuration should stay under (README targets).
TARGETS = {"off": 1.0, "second/tensor": 1.10, "second/element": 1.50}
WARMUP_STEPS = 3

GIB = 2**30
# -- memory estimates ----------------------------------------------------------------------------
# Bytes per float32 element of a layout while one pairing runs (everything is float32):
#   12  parameters, task gradients, KL gradients (shared by every optimizer of the layout)
#    8  the copy_ buffers (src, dst), alive for the whole layout
#    8  the fused AdamW reference's exp_avg, exp_avg_sq
#    8  the configuration's exp_avg, exp_avg_sq (RoseAdamW's masks and caches add <= 0.2 B)
#    4  the configuration's step workspace, the largest of: foreach AdamW's sqrt(exp_avg_sq) list
#       (4 B/param, allocated every step), RoseAdamW's SELECT candidate keys (n/4 int32 = 1 B per
#       eligible element) and first-order mask (1 bit)
LAYOUT_BYTES_PER_ELEMENT = 40
# Allocator slack: the caching allocator rounds every large block up (to 2 MiB) and a few hundred
# tensors per list fragment its segments; 10 % on top covers it with room to spare.
ALLOCATOR_SLACK = 1.10
# Fixed workspace: cuBLAS/CUDA/Triton workspaces and modules, launch tables, per-tensor step and lr
# tensors, and whatever the context grows by after the free memory was read.
LAYOUT_CONSTANT = 2 * GIB
# SELECT: the scores (4 B) + the candidate keys of the window route (n/4 int32 = 1 B per element);
# the histograms, pool states and torch.sum's workspace are in the constant.
SELECT_BYTES_PER_ELEMENT = 5
SELECT_CONSTANT = 1 * GIB
MIN_SELECT_ELEMENTS = 10**6  # below this, SELECT times launches, not bandwidth: skip instead


def gib(n_bytes: float) -> str:
    """Bytes as GiB, with enough digits for small budgets (0.5 GiB, 0.00098 GiB)."""
    x = n_bytes / GIB
    return f"{x:.1f} GiB" if abs(x) >= 1 or x == 0 else f"{x:.2g} GiB"


def count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 10**5 else f"{n:,}"


def layout_bytes(numel: int) -> int:
    """Estimated peak device bytes of one layout's pairing (see LAYOUT_BYTES_PER_ELEMENT)."""
    return int(numel * LAYOUT_BYTES_PER_ELEMENT * ALLOCATOR_SLACK) + LAYOUT_CONSTANT


def select_bytes(elements: int) -> int:
    """Estimated peak device bytes of the SELECT benchmark on ``elements`` float32 scores."""
    return int(elements * SELECT_BYTES_PER_ELEMENT * ALLOCATOR_SLACK) + SELECT_CONSTANT


def plan_select(elements: int, free: int | None) -> tuple[int, str | None]:
    """(elements to run, note): all of them if they fit in ``free`` bytes, else the largest one-digit
    count that fits (e.g. 3e8), else 0 (skip) when that is under MIN_SELECT_ELEMENTS."""
    need = select_bytes(elements)
    if free is None or need <= free:
        return elements, None
    fits = int((free - SELECT_CONSTANT) / (SELECT_BYTES_PER_ELEMENT * ALLOCATOR_SLACK))
    if fits >= 1:
        scale = 10 ** int(math.floor(math.log10(fits)))
        fits = fits // scale * scale
    why = f"{elements:.3g} elements need {gib(need)} (estimate), {gib(free)} free"
    if fits < MIN_SELECT_ELEMENTS:
        return 0, f"skipped: {why}"
    return fits, f"shrunk from {elements:.3g} to {fits:.3g} elements: {why}"


def free_memory(device: torch.device, budget_gib: float | None) -> tuple[int | None, str]:
    """Free bytes on ``device`` and where the number comes from (None: no limit known)."""
    if budget_gib is not None:
        return int(budget_gib * GIB), "--memory-budget-gib"
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        return free, "torch.cuda.mem_get_info()"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable (/proc/meminfo)"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "os.sysconf(SC_AVPHYS_PAGES)"
    except (OSError, ValueError, AttributeError):
        return None, "unknown (no limit)"


# -- configurations ------------------------------------------------------------------------------

class Terminated(SystemExit):
    """SIGTERM (``timeout`` at the stage's cap): ends the run through main's bookkeeping."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def _on_sigterm(signum, frame):
    raise Terminated


def configs(backends: list[str]) -> list[tuple[str, str | None, str, str | None]]:
    """(name, mode, granularity or torch variant, backend) of every timed configuration."""
    out = list(TORCH_CONFIGS)
    for backend in backends:
        for mode, kind in ROSE_CONFIGS:
            label = mode if mode == "off" else f"{mode}/{kind}"
            out.append((f"rose {backend} {label}", mode, kind, backend))
    return out


def select_configs(timed: list, wanted: list[str] | None) -> list:
    """The configurations whose name is one of ``wanted`` or ends with " <item>" (all if None)."""
    if not wanted:
        return timed
    return [c for c in timed if any(c[0] == w or c[0].endswith(" " + w) for w in wanted)]


def target_of(name: str) -> float | None:
    return TARGETS.get(name.split(" ", 2)[-1]) if name.startswith("rose ") else None


def default_backends(device: torch.device) -> list[str]:
    from rose_kernels import ops

    return ["triton"] + (["cuda"] if device.type == "cuda" and ops.built_with_cuda() else [])


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        """Waits for the queued work: every timed round starts on an idle device, the first one too."""
        if self.cuda:
            torch.cuda.synchronize()

    def stop(self, started) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return started.elapsed_time(end) / 1e3
        return time.perf_counter() - started


def build(layout: str, device: torch.device):
    shapes = bench_step.layout_shapes(layout)
    gen = torch.Generator(device=device).manual_seed(0)
    names = [n for n, _ in shapes]
    params = [torch.randn(s, device=device, generator=gen).mul_(0.02).requires_grad_(True) for _, s in shapes]
    grads = [torch.randn(s, device=device, generator=gen) for _, s in shapes]
    kl = [torch.randn(s, device=device, generator=gen) for _, s in shapes]
    return names, params, grads, kl


def groups(names, params, with_rose: bool):
    buckets = {}
    for n, p in zip(names, params, strict=True):
        buckets.setdefault((is_eligible(n), bench_step._no_decay(n)), []).append(p)
    out = []
    for (eligible, no_decay), ps in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        group = {"params": ps, "weight_decay": 0.0 if no_decay else bench_step.HYPER["weight_decay"]}
        if with_rose:
            group["rose"] = eligible
        out.append(group)
    return out


def make(mode, kind, backend, names, params):
    if mode is None:
        return torch.optim.AdamW(groups(names, params, False), **bench_step.HYPER, **{kind: True})
    return RoseAdamW(groups(names, params, True), **bench_step.HYPER, mode=mode, granularity=kind,
                     backend=backend, nonfinite="skip", **bench_step.ROSE_INTERVAL)


def step_once(opt, mode, params, grads, kl) -> None:
    """One optimizer step (first-order modes: record_first_order() on the KL gradients first)."""
    if uses_first_order(mode):
        for p, g in zip(params, kl, strict=True):
            p.grad = g
        opt.record_first_order()
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()


def moved_bytes(mode, kind, numel: int, eligible: int) -> float:
    if mode is None:
        extra = 0.0
    else:
        key = (mode, kind if mode != "off" else "-")
        extra = bench_step.BYTE_MODELS[key][0] + (4.0 if mode == "off" else 0.0)  # + finiteness read
    return bench_step.BASE_BYTES * numel + extra * eligible


def bench_config(cfg, data: dict, rounds: int, timer: Timer) -> dict:
    """One configuration against its own fused reference: builds both, warms both up, times them
    interleaved (fused, config, copy_) for ``rounds`` rounds; returns the row and the copy times.
    Both optimizers are dropped on return, also when this raises."""
    name, mode, kind, backend = cfg
    names, params, grads, kl, src, dst = (data[k] for k in ("names", "params", "grads", "kl", "src", "dst"))
    started_at = time.perf_counter()
    ref = opt = None
    try:
        ref = make(None, "fused", None, names, params)
        opt = make(mode, kind, backend, names, params)
        for _ in range(WARMUP_STEPS):  # compile, build launch tables, allocate the state
            step_once(ref, None, params, grads, kl)
            step_once(opt, mode, params, grads, kl)
            dst.copy_(src)
        timer.sync()
        ref_times, times, copy_times = [], [], []
        for _ in range(rounds):
            started = timer.start()
            step_once(ref, None, params, grads, kl)
            ref_times.append(timer.stop(started))
            started = timer.start()
            step_once(opt, mode, params, grads, kl)
            times.append(timer.stop(started))
            started = timer.start()
            dst.copy_(src)
            copy_times.append(timer.stop(started))
    finally:
        del ref, opt
        for p in params:
            p.grad = None
    numel, eligible = data["numel"], data["eligible"]
    # (a timer's resolution bounds every median from below: no division by zero on a tiny layout)
    fused, med, copy_s = (max(statistics.median(t), 1e-9) for t in (ref_times, times, copy_times))
    gbs = moved_bytes(mode, kind, numel, eligible) / med / 1e9
    copy_gbs = 8 * numel / copy_s / 1e9
    row = dict(name=name, rounds=rounds, median_ms=med * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
               fused_median_ms=fused * 1e3, ratio=med / fused, gbs=gbs, copy_ms=copy_s * 1e3,
               of_copy=gbs / copy_gbs, target=target_of(name), seconds=time.perf_counter() - started_at)
    return dict(row=row, copy_times=copy_times)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def log(message: str) -> None:
    print(message, flush=True)


def build_data(layout: str, device: torch.device, numel: int, eligible: int) -> dict:
    """The layout's shared tensors: parameters, gradients, KL gradients and the copy_ buffers."""
    names, params, grads, kl = build(layout, device)
    src = torch.empty(numel, device=device)
    return dict(names=names, params=params, grads=grads, kl=kl, src=src, dst=torch.empty_like(src),
                numel=numel, eligible=eligible)


def bench_layout(layout: str, timed: list, rounds: int, device: torch.device, budget_gib: float | None,
                 report: dict, save) -> None:
    """Runs (or skips) one layout, appending its entry to ``report`` and saving after every row."""
    shapes = bench_step.layout_shapes(layout)
    numel = sum(math.prod(s) for _, s in shapes)
    eligible = sum(math.prod(s) for n, s in shapes if is_eligible(n))
    need = layout_bytes(numel)
    release(device)
    free, source = free_memory(device, budget_gib)
    entry = dict(layout=layout, params=numel, eligible=eligible, rounds=rounds, needed_gib=need / GIB,
                 free_gib=None if free is None else free / GIB, free_source=source, rows=[])
    report["layouts"].append(entry)
    free_text = "no limit known" if free is None else f"{gib(free)} free ({source})"
    if free is not None and need > free:
        entry["skipped"] = f"needs {gib(need)} (estimate), {gib(free)} free ({source})"
        report["skipped"].append(f"layout {layout}: {entry['skipped']}")
        log(f"[{layout}] skipped: {entry['skipped']}")
        save()
        return
    log(f"[{layout}] {count(numel)} params ({count(eligible)} eligible): needs {gib(need)} "
        f"(estimate), {free_text}; {len(timed)} configurations")
    try:
        data = build_data(layout, device, numel, eligible)
    except Exception as error:  # noqa: BLE001 - recorded, the next layout runs
        entry["error"] = error_line(error)
        report["errors"].append(f"layout {layout}: {entry['error']}")
        log(f"[{layout}] ERROR building the layout: {entry['error']}")
        del error  # (its traceback holds the frames, and so the tensors, of the failed build)
        release(device)
        save()
        return
    timer = Timer(device)
    all_copies = []
    for i, cfg in enumerate(timed, 1):
        try:
            result = bench_config(cfg, data, rounds, timer)
        except Exception as error:  # noqa: BLE001 - recorded, the next configuration runs
            row = dict(name=cfg[0], error=error_line(error), target=target_of(cfg[0]))
            report["errors"].append(f"{layout} / {cfg[0]}: {row['error']}")
            log(f"[{layout}] {i}/{len(timed)} {cfg[0]}: ERROR {row['error']}")
            del error
        else:
            row = result["row"]
            all_copies += result["copy_times"]
            copy_s = statistics.median(all_copies)
            entry.update(copy_ms=copy_s * 1e3, copy_gbs=8 * numel / copy_s / 1e9)
            log(f"[{layout}] {i}/{len(timed)} {row['name']}: {row['median_ms']:.3f} ms "
                f"({row['min_ms']:.3f}-{row['max_ms']:.3f}), {row['ratio']:.2f}x fused "
                f"({row['fused_median_ms']:.3f} ms), {row['gbs']:.0f} GB/s, {row['seconds']:.1f} s")
        entry["rows"].append(row)
        result = None
        release(device)  # both optimizers are gone: give their memory back before the next one
        save()
    data = None
    release(device)


# -- SELECT --------------------------------------------------------------------------------------

def select_op(backend: str):
    if backend == "cuda":
        from rose_kernels.backends.fused import native_ops

        return native_ops().element_thresholds
    from rose_kernels.backends.triton import TRITON_OPS

    return TRITON_OPS.element_thresholds


def bench_select(elements: int, rounds: int, device: torch.device, backend: str = "triton") -> dict:
    """Two thresholds (0th and 60th percentile) of N(0, 1) scores' magnitudes, without and with the
    previous call's guesses (what an optimizer step has), against one torch.sum."""
    from rose_kernels.backends.quantiles import new_guesses

    element_thresholds = select_op(backend)

    scores = torch.randn(elements, device=device)
    ones = torch.ones(1, dtype=torch.float64, device=device)
    pooled = torch.ones(1, dtype=torch.bool, device=device)
    guesses = new_guesses(1, device)
    timer = Timer(device)
    times = {"cold": [], "guessed": [], "read": []}
    reads = {}
    for _ in range(2):
        element_thresholds([scores], [], ones, pooled, 0.0, 0.6, False)
        scores.sum()
    timer.sync()
    for _ in range(rounds):
        for what in times:
            if what == "guessed":  # the guess of the call before: same scores, so a hit
                element_thresholds([scores], [], ones, pooled, 0.0, 0.6, False, guesses)
                timer.sync()
            started = timer.start()
            if what == "read":
                scores.sum()
            else:
                out = element_thresholds([scores], [], ones, pooled, 0.0, 0.6, False,
                                         guesses if what == "guessed" else None)
            times[what].append(timer.stop(started))
            if what != "read":
                reads[what] = float(out[0, 4])
    med = {k: statistics.median(v) for k, v in times.items()}
    del scores
    return dict(backend=backend, elements=elements, read_ms=med["read"] * 1e3, target=4.0,
                cold_ms=med["cold"] * 1e3, cold_ratio=med["cold"] / med["read"], cold_reads=reads["cold"],
                guessed_ms=med["guessed"] * 1e3, guessed_ratio=med["guessed"] / med["read"],
                guessed_reads=reads["guessed"])


def run_select(requested: int, rounds: int, device: torch.device, backends: list[str], budget_gib: float | None,
               report: dict, save) -> None:
    release(device)
    free, source = free_memory(device, budget_gib)
    elements, note = plan_select(requested, free)
    if note:
        note += f" ({source})"
        log(f"[select] {note}")
    if elements == 0:
        for backend in backends:
            report["select"].append(dict(backend=backend, elements=0, requested=requested, skipped=note, note=note))
        report["skipped"].append(f"select: {note}")
        save()
        return
    for backend in backends:
        started = time.perf_counter()
        try:
            sel = bench_select(elements, rounds, device, backend)
        except Exception as error:  # noqa: BLE001 - recorded, the next backend runs
            sel = dict(backend=backend, elements=elements, error=error_line(error))
            report["errors"].append(f"select {backend}: {sel['error']}")
            log(f"[select] {backend}: ERROR {sel['error']}")
            del error
        else:
            log(f"[select] {backend}: {elements:.3g} scores, cold {sel['cold_ratio']:.2f}x, guessed "
                f"{sel['guessed_ratio']:.2f}x one read ({sel['read_ms']:.2f} ms), "
                f"{time.perf_counter() - started:.1f} s")
        sel.update(requested=requested, note=note)
        report["select"].append(sel)
        release(device)
        save()


# -- report --------------------------------------------------------------------------------------

def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU backends on {m['gpu']} ({m['date']})", "",
             f"torch {m['torch']}, triton {m['triton']}, git {m['git']}; command `{report.get('command', '')}`. "
             "Each configuration is timed interleaved with its own torch.optim.AdamW(fused=True) "
             "reference (built and freed with it); \"vs fused\" is the ratio of medians within that pairing, "
             "\"fused ms\" the reference's median there; the fused row is a second fused instance against "
             "the reference.", ""]
    if report.get("state") != "done":
        lines += [f"**Partial report** ({report.get('state', 'running')}): the run had not finished when "
                  "this was written.", ""]
    for lay in report["layouts"]:
        head = (f"## {lay['layout']}: {count(lay['params'])} params ({count(lay['eligible'])} eligible), "
                f"{lay['rounds']} rounds")
        if "skipped" in lay:
            lines += [f"{head}: skipped", "", f"Skipped: {lay['skipped']}.", ""]
            continue
        if "copy_gbs" in lay:
            head += f"; copy_ {lay['copy_gbs']:.0f} GB/s"
        free = "no limit known" if lay["free_gib"] is None else f"{gib(lay['free_gib'] * GIB)} free"
        lines += [head, "", f"Memory: needs {gib(lay['needed_gib'] * GIB)} (estimate), {free} "
                  f"({lay['free_source']}).", ""]
        if "error" in lay:
            lines += [f"**Error** building the layout: `{lay['error']}`", ""]
            continue
        lines += ["| configuration | median ms (min-max) | vs fused | fused ms | GB/s | of copy | target |",
                  "|---|---|---|---|---|---|---|"]
        for r in lay["rows"]:
            target = f"<= {r['target']:.2f}x" if r.get("target") else ""
            if "error" in r:
                lines.append(f"| {r['name']} | error: `{r['error']}` | | | | | {target} |")
                continue
            lines.append(f"| {r['name']} | {r['median_ms']:.3f} ({r['min_ms']:.3f}-{r['max_ms']:.3f}) | "
                         f"{r['ratio']:.2f}x | {r['fused_median_ms']:.3f} | {r['gbs']:.0f} | "
                         f"{100 * r['of_copy']:.0f}% | {target} |")
        lines.append("")
    for sel in report.get("select", []):
        lines += [f"## SELECT ({sel['backend']})", ""]
        if sel.get("note"):
            lines += [f"Memory: {sel['note']}.", ""]
        if "skipped" in sel:
            continue
        if "error" in sel:
            lines += [f"**Error**: `{sel['error']}`", ""]
            continue
        lines += [f"Two exact thresholds of {sel['elements']:.3g} float32 "
                  f"scores against one read of them (torch.sum, {sel['read_ms']:.2f} ms); target <= 4x.", "",
                  "| | median ms | vs one read | passes reading the scores |", "|---|---|---|---|",
                  f"| no guess | {sel['cold_ms']:.2f} | {sel['cold_ratio']:.2f}x | {sel['cold_reads']:.0f} |",
                  f"| previous call's buckets | {sel['guessed_ms']:.2f} | {sel['guessed_ratio']:.2f}x | "
                  f"{sel['guessed_reads']:.0f} |", ""]
    if report.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {s}" for s in report["skipped"]] + [""]
    if report.get("errors"):
        lines += ["## Errors", ""] + [f"- `{e}`" for e in report["errors"]] + [""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """``path`` has the old text or the new one, never a part; no temporary file is left behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_report(report: dict, out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "gpu-step.json", json.dumps(report, indent=1))
    write_atomic(out / "gpu-step.md", to_markdown(report) + "\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv=None) -> dict:
    """Runs the benchmark; returns the report (``report["errors"]`` lists what failed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="bert-large,1.3b",
                        help=f"comma-separated, from {', '.join(bench_step.LAYOUTS)}")
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--select-elements", type=float, default=1e9, help="0 skips SELECT")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default=None, help="comma-separated; default: triton, and cuda when built")
    parser.add_argument("--configs", default=None,
                        help="comma-separated filter: a configuration runs if its name is an item or ends with "
                             "' ITEM' (fused, foreach, off, second/element, 'triton off', ...); default: all")
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="free memory to plan with instead of torch.cuda.mem_get_info() (or the CPU's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    unknown = [x for x in layouts if x not in bench_step.LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; choose from {', '.join(bench_step.LAYOUTS)}")
    device = torch.device(args.device)
    import triton

    machine = bench_step.machine_info()
    machine.update(gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
                   triton=triton.__version__)
    if os.environ.get("ROSE_GIT_REV"):
        machine["git"] = os.environ["ROSE_GIT_REV"]
    backends = [x.strip() for x in args.backends.split(",") if x.strip()] if args.backends else []
    backends = backends or default_backends(device)
    wanted = [x.strip() for x in args.configs.split(",") if x.strip()] if args.configs else None
    timed = select_configs(configs(backends), wanted)
    if wanted and not timed:
        parser.error(f"--configs {args.configs} matches none of {[c[0] for c in configs(backends)]}")
    command = "python bench/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"machine": machine, "command": command, "backends": backends, "configs": [c[0] for c in timed],
              "memory_model": dict(layout_bytes_per_element=LAYOUT_BYTES_PER_ELEMENT, slack=ALLOCATOR_SLACK,
                                   layout_constant_gib=LAYOUT_CONSTANT / GIB,
                                   select_bytes_per_element=SELECT_BYTES_PER_ELEMENT,
                                   select_constant_gib=SELECT_CONSTANT / GIB),
              "state": "running", "layouts": [], "select": [], "skipped": [], "errors": []}

    def save():
        save_report(report, args.out)

    save()
    started = time.perf_counter()
    try:
        def select():
            if args.select_elements > 0:
                run_select(int(args.select_elements), args.rounds, device, backends, args.memory_budget_gib, report,
                           save)
            else:
                report["skipped"].append("select: --select-elements 0")

        # SELECT right after the first layout: the largest layout comes last, so that a stage cut
        # at its cap loses the rows of that layout only, not SELECT too.
        for i, layout in enumerate(layouts):
            bench_layout(layout, timed, args.rounds, device, args.memory_budget_gib, report, save)
            if i == 0:
                select()
        if not layouts:
            select()
    except BaseException as error:  # the rows so far stay, marked as such; then it goes on up
        if isinstance(error, Terminated):
            report["state"] = "interrupted (SIGTERM)"
        elif isinstance(error, KeyboardInterrupt):
            report["state"] = "interrupted (KeyboardInterrupt)"
        else:
            report["state"] = f"crashed ({error_line(error)})"
            report["errors"].append(f"crashed: {error_line(error)}")
        report["seconds"] = time.perf_counter() - started
        save()
        rows = sum(len(lay["rows"]) for lay in report["layouts"])
        log(f"{report['state']}: {rows} rows" + (f", kept in {args.out}" if args.out else ""))
        raise
    report["state"] = "done"
    report["seconds"] = time.perf_counter() - started
    save()
    print(to_markdown(report), flush=True)
    return report


def cli(argv=None) -> int:
    """main() with SIGTERM turned into a clean end; the exit status: 1 if anything raised, else 0."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return 1 if main(argv)["errors"] else 0
    finally:
        if in_main_thread:  # (None: a handler not set from Python; the default is the closest)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(cli())
