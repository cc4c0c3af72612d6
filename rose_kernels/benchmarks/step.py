"""One optimizer step of RoseAdamW against torch.optim.AdamW, on BERT-base and MiniLM layouts.

Every configuration lives in one process and the configurations are timed round-robin
(A B C ... A B C ...), so that slow drifts of the machine (frequency, other tenants) fall on all
of them alike; each is reported as median / min / max over its rounds, as a ratio to
``torch.optim.AdamW(fused=True)`` timed in the same run on the same layout, and as achieved GB/s
under an explicit byte model (see ``BYTE_MODELS`` and bench/README.md), next to a plain
``dst.copy_(src)`` of the same number of float32 elements.

Run ``python bench/bench_step.py --help``; importable (``run``, ``to_markdown``, ``main``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import rose_kernels
from rose_kernels import RoseAdamW, is_eligible
from rose_kernels.types import uses_first_order

# The checkout this runs from (results go to its bench/results/ unless --out says otherwise).
REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"

# ROSE released settings.
HYPER = dict(lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
ROSE_INTERVAL = dict(lower=0.0, upper=60.0)
# Warm-up steps before timing: the momentum's distribution, and with it the second-order scores',
# settles over ~1 / (1 - beta1) steps from zero (SELECT's guessed windows then follow a drifting
# threshold). The reference backend keeps no guesses: two steps.
WARMUP_STEPS = 30
REFERENCE_WARMUP_STEPS = 2
# Gradients change every step, as in training: i.i.d. standard normal views into a pool of 2 x 4 B
# per parameter (Layout.use_step_gradients), new values for every element at every step. With fixed
# gradients the second-order scores |c g / m - 1| collapse step after step (m converges to g, so
# kept scores tie at |c - 1|) and with a few sets used in turn they swing with the set's phase:
# either way the thresholds jump every step and SELECT's guessed windows never hold, a selection
# no training run sees. Fresh gradients keep the scores' distribution stationary after warm-up.
POOL_OFFSETS = 61  # distinct views before they repeat (the momentum forgets in ~10 steps)

# -- layouts -------------------------------------------------------------------------------------

LAYOUTS = {
    # BertForSequenceClassification (bert-base-uncased, 2 labels): 109,483,778 parameters.
    "bert-base": dict(vocab=30522, hidden=768, layers=12, intermediate=3072, positions=512,
                      type_vocab=2, prefix="bert.", classifier=2),
    # sentence-transformers/all-MiniLM-L6-v2 (a BertModel, pooler included): 22,713,216 parameters.
    "minilm": dict(vocab=30522, hidden=384, layers=6, intermediate=1536, positions=512,
                   type_vocab=2, prefix="", classifier=0),
    # BertForSequenceClassification (bert-large-uncased, 2 labels): 335,143,938 parameters (GPU bench).
    "bert-large": dict(vocab=30522, hidden=1024, layers=24, intermediate=4096, positions=512,
                       type_vocab=2, prefix="bert.", classifier=2),
    # A 1.3B-parameter encoder (GPT-2 XL-like widths, BERT names so the release's rule applies).
    "1.3b": dict(vocab=50257, hidden=2048, layers=24, intermediate=8192, positions=2048,
                 type_vocab=2, prefix="", classifier=0),
    # A few blocks' worth, for smoke runs of the GPU bench under the Triton interpreter.
    "tiny": dict(vocab=64, hidden=32, layers=2, intermediate=64, positions=16, type_vocab=2, prefix="",
                 classifier=2),
}


def layout_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face parameter names and shapes of a BERT-family model, in module order."""
    c = LAYOUTS[name]
    h, pre = c["hidden"], c["prefix"]
    shapes: list[tuple[str, tuple[int, ...]]] = [
        (f"{pre}embeddings.word_embeddings.weight", (c["vocab"], h)),
        (f"{pre}embeddings.position_embeddings.weight", (c["positions"], h)),
        (f"{pre}embeddings.token_type_embeddings.weight", (c["type_vocab"], h)),
        (f"{pre}embeddings.LayerNorm.weight", (h,)),
        (f"{pre}embeddings.LayerNorm.bias", (h,)),
    ]

    def dense(prefix: str, n_in: int, n_out: int) -> None:
        shapes.append((f"{prefix}.weight", (n_out, n_in)))
        shapes.append((f"{prefix}.bias", (n_out,)))

    def layer_norm(prefix: str) -> None:
        shapes.append((f"{prefix}.weight", (h,)))
        shapes.append((f"{prefix}.bias", (h,)))

    for i in range(c["layers"]):
        layer = f"{pre}encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            dense(f"{layer}.attention.self.{proj}", h, h)
        dense(f"{layer}.attention.output.dense", h, h)
        layer_norm(f"{layer}.attention.output.LayerNorm")
        dense(f"{layer}.intermediate.dense", h, c["intermediate"])
        dense(f"{layer}.output.dense", c["intermediate"], h)
        layer_norm(f"{layer}.output.LayerNorm")
    dense(f"{pre}pooler.dense", h, h)
    if c["classifier"]:
        dense("classifier", h, c["classifier"])
    return shapes


def _no_decay(name: str) -> bool:
    # The released scripts' rule (as rose_kernels.rose_param_groups): biases and LayerNorm weights.
    return name.endswith("bias") or "layernorm" in name.lower()


@dataclass
class Layout:
    name: str
    names: list[str]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]      # this step's task gradients
    kl_grads: list[torch.Tensor]   # this step's KL gradients
    gradient_pool: torch.Tensor | None = None  # fresh gradients: views into it (use_step_gradients)
    pool_starts: list[int] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def eligible_numel(self) -> int:
        return sum(p.numel() for n, p in zip(self.names, self.params, strict=True) if is_eligible(n))

    def groups(self, with_rose_key: bool) -> list[dict]:
        """(eligible, no-decay) groups with ``param_names``, as rose_param_groups builds them."""
        buckets: dict[tuple[bool, bool], tuple[list, list]] = {}
        for n, p in zip(self.names, self.params, strict=True):
            params, names = buckets.setdefault((is_eligible(n), _no_decay(n)), ([], []))
            params.append(p)
            names.append(n)
        groups = []
        order = sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
        for (eligible, no_decay), (params, names) in order:
            group = {"params": params, "param_names": names,
                     "weight_decay": 0.0 if no_decay else HYPER["weight_decay"]}
            if with_rose_key:
                group["rose"] = eligible
            groups.append(group)
        return groups

    def use_step_gradients(self, step: int) -> None:
        """With a gradient pool: makes this step's task and KL gradients views of it at an offset of
        their own (no copy). Offsets advance by a 64-byte multiple per step and repeat only after
        POOL_OFFSETS steps, so every element sees a new i.i.d. value each step; the KL view lies half
        the pool away from the task view."""
        if self.gradient_pool is None:
            return
        span = self.gradient_pool.numel() // 2  # views start in [0, span); each covers <= span
        stride = -(-span // (POOL_OFFSETS * 16)) * 16
        offset = (step % POOL_OFFSETS) * stride % span  # (the modulo: tiny layouts round up past span)
        kl_offset = (offset + span // 2 // 16 * 16) % span
        self.grads = self._views(offset)
        self.kl_grads = self._views(kl_offset)

    def _views(self, offset: int) -> list[torch.Tensor]:
        pool = self.gradient_pool
        return [pool[offset + start: offset + start + p.numel()].view(p.shape)
                for p, start in zip(self.params, self.pool_starts, strict=True)]

    def set_grads(self, grads: list[torch.Tensor]) -> None:
        """Points every ``.grad`` at ``grads`` (no copy)."""
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g


def build_layout(name: str, seed: int = 0, fresh_gradients: bool = False) -> Layout:
    """Parameters, task gradients and KL gradients: float32, standard normal. Fixed gradients by
    default; ``fresh_gradients``: new ones every step (views into a pool, Layout.use_step_gradients)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = layout_shapes(name)

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    params = [randn(s).mul_(0.02).requires_grad_(True) for _, s in shapes]
    names = [n for n, _ in shapes]
    if not fresh_gradients:
        layout = Layout(name, names, params, [randn(s) for _, s in shapes], [randn(s) for _, s in shapes])
    else:
        # Every view starts on a 64-byte boundary, as a fresh gradient would (same vector alignment).
        starts, total = [], 0
        for p in params:
            starts.append(total)
            total += -(-p.numel() // 16) * 16
        pool = randn(2 * total)
        layout = Layout(name, names, params, [], [], pool, starts)
        layout.use_step_gradients(0)
    layout.set_grads(layout.grads)
    return layout


# -- byte model ----------------------------------------------------------------------------------

# Above this many involuntary context switches per ms of timed step, the report flags the run.
CONTENDED_PREEMPTIONS_PER_MS = 0.1

BASE_BYTES = 28  # fp32 AdamW: read p, g, m, v (16 B), write p, m, v (12 B)

# (extra bytes per *eligible* parameter, on top of 28 B per parameter, explanation)
BYTE_MODELS: dict[tuple[str, str], tuple[float, str]] = {
    ("off", "-"): (0.0, "28 B/param"),
    ("second", "tensor"): (4.0, "28 B/param + 4 B/eligible (read g for ||g||; ||m|| cached by the update)"),
    ("second", "element"): (8.0, "28 B/param + 8 B/eligible (select pass reads g, m; mask recomputed "
                                 "inline)"),
    ("first", "tensor"): (4.0, "28 B/param + 4 B/eligible (record reads KL g)"),
    ("first", "element"): (8.25, "28 B/param + 8.25 B/eligible (record: select reads KL g, mask pass "
                                 "reads KL g + writes 1 bit; update reads 1 bit)"),
    ("ensemble", "tensor"): (8.0, "28 B/param + 8 B/eligible (first/tensor + second/tensor)"),
    ("ensemble", "element"): (16.25, "28 B/param + 16.25 B/eligible (first/element + second/element)"),
}
# record_first_order() alone, bytes per eligible parameter.
RECORD_BYTES = {"tensor": (4.0, "4 B/eligible (read KL g)"),
                "element": (8.125, "8.125 B/eligible (select reads KL g; mask pass reads KL g, writes "
                                   "1 bit)")}


# -- configurations ------------------------------------------------------------------------------

@dataclass
class Config:
    name: str
    family: str            # "torch", "rose-cpu", "rose-reference", "copy"
    mode: str = "off"      # off / second / first / ensemble
    granularity: str = "-"
    rounds: int | None = None  # None: every round
    factory: Callable[[Layout], object] | None = None
    note: str = ""
    times: list[float] = field(default_factory=list)
    record_times: list[float] = field(default_factory=list)
    preemptions: list[int] = field(default_factory=list)  # involuntary context switches per timed step

    @property
    def first_order(self) -> bool:
        return uses_first_order(self.mode)

    def byte_model(self) -> tuple[float, str]:
        if self.family == "copy":
            return 0.0, "2 x 4 B/element (read src, write dst)"
        key = (self.mode, self.granularity if self.mode != "off" else "-")
        return BYTE_MODELS[key]


def _rose(backend: str, mode: str, granularity: str, **options) -> Callable[[Layout], object]:
    def make(layout: Layout):
        return RoseAdamW(layout.groups(with_rose_key=True), **HYPER, mode=mode, granularity=granularity,
                         scope="tensor", backend=backend, **ROSE_INTERVAL, **options)
    return make


def make_configs(layout_name: str, rounds: int, reference_rounds: int, reference_element_layouts: set[str],
                 with_reference: bool = True) -> list[Config]:
    configs = [
        Config("torch AdamW fused", "torch",
               factory=lambda lay: torch.optim.AdamW(lay.groups(with_rose_key=False), **HYPER, fused=True)),
        Config("torch AdamW foreach", "torch",
               factory=lambda lay: torch.optim.AdamW(lay.groups(with_rose_key=False), **HYPER, foreach=True)),
        Config("rose cpu off", "rose-cpu", factory=_rose("cpu", "off", "tensor")),
        # torch's own contract (no look at the gradients): the finiteness read of `off` saved.
        Config("rose cpu off unchecked", "rose-cpu", factory=_rose("cpu", "off", "tensor", nonfinite="unchecked"),
               note='nonfinite="unchecked"'),
    ]
    for mode in ("second", "first", "ensemble"):
        for gran in ("tensor", "element"):
            configs.append(Config(f"rose cpu {mode}/{gran}", "rose-cpu", mode, gran,
                                  factory=_rose("cpu", mode, gran)))
    if with_reference:
        ref_rounds = min(rounds, reference_rounds)
        configs.append(Config("rose reference off", "rose-reference", rounds=ref_rounds,
                              factory=_rose("reference", "off", "tensor")))
        configs.append(Config("rose reference second/tensor", "rose-reference", "second", "tensor",
                              rounds=ref_rounds, factory=_rose("reference", "second", "tensor")))
        if layout_name in reference_element_layouts:
            configs.append(Config("rose reference second/element", "rose-reference", "second", "element",
                                  rounds=ref_rounds, factory=_rose("reference", "second", "element")))
    configs.append(Config("copy_ (same element count)", "copy"))
    return configs


# -- timing --------------------------------------------------------------------------------------

def _one_step(opt, layout: Layout, first_order: bool, step: int) -> tuple[float, float]:
    """Step ``step`` (its gradient set), timed; returns (step seconds, record_first_order seconds or nan).

    First-order modes: the KL gradients are put in ``.grad`` (untimed; a KL backward would do it),
    then record_first_order() + pointing ``.grad`` back at the task gradients + step() are timed.
    """
    layout.use_step_gradients(step)
    if not first_order:
        layout.set_grads(layout.grads)
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0, float("nan")
    layout.set_grads(layout.kl_grads)
    t0 = time.perf_counter()
    opt.record_first_order()
    t1 = time.perf_counter()
    layout.set_grads(layout.grads)
    opt.step()
    t2 = time.perf_counter()
    return t2 - t0, t1 - t0


def _involuntary_switches() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _summary(times: list[float]) -> dict:
    if not times:
        return {}
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3, "n": len(times)}


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bench_layout(layout_name: str, rounds: int, reference_rounds: int, reference_element_layouts: set[str],
                 with_reference: bool = True, log: Callable[[str], None] = print) -> dict:
    t_start = time.perf_counter()
    load_before = _loadavg()
    layout = build_layout(layout_name, fresh_gradients=True)
    n, n_elig = layout.numel, layout.eligible_numel
    log(f"[{layout_name}] {n:,} params ({n_elig:,} eligible) in {len(layout.params)} tensors; "
        f"building optimizers + {WARMUP_STEPS} warm-up steps each")
    configs = make_configs(layout_name, rounds, reference_rounds, reference_element_layouts, with_reference)
    opts: dict[str, object] = {}
    src = torch.randn(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    for cfg in configs:
        if cfg.family == "copy":
            for _ in range(WARMUP_STEPS):
                dst.copy_(src)
            continue
        t0 = time.perf_counter()
        opt = cfg.factory(layout)
        warmup = REFERENCE_WARMUP_STEPS if cfg.family == "rose-reference" else WARMUP_STEPS
        for step in range(WARMUP_STEPS - warmup, WARMUP_STEPS):
            _one_step(opt, layout, cfg.first_order, step)
        opts[cfg.name] = opt
        log(f"  {cfg.name}: warm ({time.perf_counter() - t0:.1f} s, peak RSS {_peak_rss_gib():.1f} GiB)")
    for r in range(rounds):
        t_round = time.perf_counter()
        for cfg in configs:
            if cfg.rounds is not None and r >= cfg.rounds:
                continue
            gc.collect()
            switches = _involuntary_switches()
            if cfg.family == "copy":
                t0 = time.perf_counter()
                dst.copy_(src)
                cfg.times.append(time.perf_counter() - t0)
            else:
                step_s, record_s = _one_step(opts[cfg.name], layout, cfg.first_order, WARMUP_STEPS + r)
                cfg.times.append(step_s)
                if cfg.first_order:
                    cfg.record_times.append(record_s)
            cfg.preemptions.append(_involuntary_switches() - switches)
        log(f"  round {r + 1}/{rounds}: {time.perf_counter() - t_round:.1f} s")
    peak = _peak_rss_gib()
    del opts, src, dst
    layout.set_grads([None] * len(layout.params))
    del layout
    gc.collect()
    return {
        "layout": layout_name,
        "params": n,
        "eligible_params": n_elig,
        "rounds": rounds,
        "peak_rss_gib": peak,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "seconds": time.perf_counter() - t_start,
        "configs": [
            {"name": c.name, "family": c.family, "mode": c.mode, "granularity": c.granularity,
             "rounds": len(c.times), "times_s": c.times, "record_times_s": c.record_times,
             "involuntary_context_switches": c.preemptions,
             "extra_bytes_per_eligible": c.byte_model()[0], "byte_model": c.byte_model()[1]}
            for c in configs
        ],
    }


def _derive(result: dict) -> None:
    """Adds summaries, bytes, GB/s, ratios and fractions of the copy to a layout's result."""
    n, n_elig = result["params"], result["eligible_params"]
    by_name = {c["name"]: c for c in result["configs"]}
    for c in result["configs"]:
        c.update(_summary(c["times_s"]))
        if c["family"] == "copy":
            c["bytes"] = 2 * 4 * n
        else:
            c["bytes"] = BASE_BYTES * n + c["extra_bytes_per_eligible"] * n_elig
        c["gbps"] = c["bytes"] / (c["median_ms"] * 1e-3) / 1e9
        c["gbps_at_min"] = c["bytes"] / (c["min_ms"] * 1e-3) / 1e9
        if c["record_times_s"]:
            rec = _summary(c["record_times_s"])
            c["record"] = {**rec, "bytes": RECORD_BYTES[c["granularity"]][0] * n_elig,
                           "byte_model": RECORD_BYTES[c["granularity"]][1]}
            c["record"]["gbps"] = c["record"]["bytes"] / (rec["median_ms"] * 1e-3) / 1e9
    fused = by_name["torch AdamW fused"]["median_ms"]
    copy_gbps = by_name["copy_ (same element count)"]["gbps"]
    result["copy_gbps"] = copy_gbps
    per_ms = [s / (t * 1e3) for c in result["configs"]
              for s, t in zip(c["involuntary_context_switches"], c["times_s"], strict=True) if t > 0]
    result["preemptions_per_ms"] = statistics.median(per_ms) if per_ms else float("nan")
    fused_min = by_name["torch AdamW fused"]["min_ms"]
    for c in result["configs"]:
        c["ratio_to_fused"] = c["median_ms"] / fused
        c["ratio_to_fused_at_min"] = c["min_ms"] / fused_min
        c["fraction_of_copy"] = c["gbps"] / copy_gbps
        if "record" in c:
            c["record"]["fraction_of_copy"] = c["record"]["gbps"] / copy_gbps


# -- machine info and report ---------------------------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        if dirty:
            rev += " (+ uncommitted changes)"
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    try:
        capability = rose_kernels.ops.cpu_capability()
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        capability = f"unavailable ({error})"
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory": mem,
        "torch": torch.__version__,
        "rose_kernels": rose_kernels.__version__,
        "cpu_capability": capability,
        "python": platform.python_version(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": rev,
    }


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _load(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values) or "n/a"


def to_markdown(report: dict) -> str:
    info = report["machine"]
    lines = [
        f"# One optimizer step on CPU ({info['date'][:10]})",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores (torch threads: {info['torch_threads']}), "
        f"memory {info['memory']}",
        f"- torch {info['torch']}, rose_kernels {info['rose_kernels']}, "
        f"`rose_kernels.ops.cpu_capability()` = {info['cpu_capability']}, Python {info['python']}",
        f"- git {info['git']}, date {info['date']}",
        f"- command: `{report['command']}`; total runtime {report['seconds']:.0f} s",
        f"- hyper-parameters: lr={HYPER['lr']}, betas={HYPER['betas']}, eps={HYPER['eps']}, "
        f"weight_decay={HYPER['weight_decay']} (0 for biases and LayerNorm), "
        f"lower={ROSE_INTERVAL['lower']:g}, upper={ROSE_INTERVAL['upper']:g}, scope=tensor; float32 "
        "parameters; gradients i.i.d. standard normal and new at every step (views into a pool at a moving "
        "offset, the same sequence for every optimizer); every optimizer warmed up with "
        f"{WARMUP_STEPS} steps (the reference backend {REFERENCE_WARMUP_STEPS}); configurations timed round-robin "
        "in one process",
        "- first/ensemble: the timed step is `record_first_order()` + pointing `.grad` back at the task "
        "gradients (no copy) + `step()`; `record_first_order()` alone is in the second table",
        f"- reference backend: {report['reference_note']}",
        "- GB/s = bytes of the byte model / median time; the copy's GB/s counts read + write "
        "(2 x 4 B/element; the write-allocate read of dst is not counted); \"% copy\" = GB/s / the copy's "
        "GB/s (median over median); \"GB/s @min\" uses the fastest round. Byte models are minimum traffic, "
        "not what an implementation moves (e.g. rose cpu also reads every gradient once to check finiteness)",
        "- the machine is not isolated: the load averages below show what else ran; trust medians and "
        "ratios within one layout over absolute numbers",
        "",
    ]
    for res in report["layouts"]:
        lines += [
            f"## {res['layout']}: {res['params']:,} parameters ({res['eligible_params']:,} ROSE-eligible), "
            f"{res['rounds']} rounds",
            "",
            f"Copy of {res['params']:,} float32: {_fmt(res['copy_gbps'])} GB/s. "
            f"Peak RSS {res['peak_rss_gib']:.1f} GiB; layout took {res['seconds']:.0f} s; "
            f"load average (1, 5, 15 min) {_load(res['loadavg_before'])} before, "
            f"{_load(res['loadavg_after'])} after; median {res['preemptions_per_ms']:.2f} involuntary "
            "context switches per ms of timed step (other load on the machine).",
            "",
        ]
        if res["preemptions_per_ms"] > CONTENDED_PREEMPTIONS_PER_MS:
            lines += [
                f"**Contended run** (> {CONTENDED_PREEMPTIONS_PER_MS} preemptions/ms): other processes "
                "shared the cores. torch's AdamW opens a parallel region per tensor (or per kernel), and "
                "each one waits for a preempted OpenMP thread, so its median can be many times its "
                "quiet-machine time while RoseAdamW's few multi-tensor regions suffer far less. Judge "
                "speed by \"x fused @min\" (fastest rounds), or rerun on an idle machine or "
                "with `--threads 1`.",
                "",
            ]
        lines += [
            "| configuration | rounds | median ms | min ms | max ms | x fused AdamW | x fused @min | GB/s "
            "| GB/s @min | % copy | byte model |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for c in res["configs"]:
            lines.append(
                f"| {c['name']} | {c['n']} | {_fmt(c['median_ms'], 2)} | {_fmt(c['min_ms'], 2)} | "
                f"{_fmt(c['max_ms'], 2)} | {c['ratio_to_fused']:.2f} | {c['ratio_to_fused_at_min']:.2f} | "
                f"{_fmt(c['gbps'])} | "
                f"{_fmt(c['gbps_at_min'])} | "
                f"{100 * c['fraction_of_copy']:.0f}% | {c['byte_model']} |"
            )
        recs = [c for c in res["configs"] if "record" in c]
        if recs:
            lines += [
                "",
                "`record_first_order()` alone:",
                "",
                "| configuration | median ms | min ms | max ms | GB/s | % copy | byte model |",
                "|---|---:|---:|---:|---:|---:|---|",
            ]
            for c in recs:
                r = c["record"]
                lines.append(
                    f"| {c['name']} | {_fmt(r['median_ms'], 2)} | {_fmt(r['min_ms'], 2)} | "
                    f"{_fmt(r['max_ms'], 2)} "
                    f"| {_fmt(r['gbps'])} | {100 * r['fraction_of_copy']:.0f}% | {r['byte_model']} |"
                )
        lines.append("")
    return "\n".join(lines)


# -- entry points --------------------------------------------------------------------------------

def run(layouts: list[str], rounds: int, reference_rounds: int, reference_element_layouts: set[str],
        with_reference: bool = True, log: Callable[[str], None] = print) -> dict:
    """Runs the benchmark on each layout in turn (all state freed in between); returns the report."""
    t0 = time.perf_counter()
    report = {"machine": machine_info(), "layouts": []}
    for name in layouts:
        result = bench_layout(name, rounds, reference_rounds, reference_element_layouts, with_reference, log)
        _derive(result)
        report["layouts"].append(result)
    report["seconds"] = time.perf_counter() - t0
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="minilm,bert-base",
                        help=f"comma-separated, from {', '.join(LAYOUTS)} (default: minilm,bert-base)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per configuration (default 10; --quick: 5)")
    parser.add_argument("--reference-rounds", type=int, default=None,
                        help="rounds for the slow reference backend, 0 to skip it (default 3; --quick: 0)")
    parser.add_argument("--reference-element", default="minilm",
                        help="layouts on which reference second/element runs (comma-separated, or 'none'; "
                             "default: minilm, since it sorts every eligible element in float64)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) before anything runs (default: torch's default)")
    parser.add_argument("--quick", action="store_true", help="MiniLM only, few rounds (under a minute)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the .md and .json results")
    args = parser.parse_args(argv)
    if args.quick:
        args.layouts = "minilm"
    args.rounds = args.rounds or (5 if args.quick else 10)
    if args.reference_rounds is None:
        args.reference_rounds = 0 if args.quick else 3
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    unknown = [x for x in args.layouts if x not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; choose from {', '.join(LAYOUTS)}")
    args.reference_element = set() if args.reference_element == "none" else {
        x.strip() for x in args.reference_element.split(",") if x.strip()}
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with_reference = args.reference_rounds > 0
    report = run(args.layouts, args.rounds, args.reference_rounds, args.reference_element, with_reference)
    report["command"] = "python bench/bench_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if not with_reference:
        report["reference_note"] = "not run (--reference-rounds 0; the --quick default)"
    else:
        elem = ", ".join(sorted(args.reference_element & set(args.layouts))) or "no layout"
        report["reference_note"] = (
            "slow (Python loop, sorts), so timed in only the first "
            f"{min(args.rounds, args.reference_rounds)} rounds; second/element only on {elem}")
    text = to_markdown(report)
    print()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"cpu-step-{report['machine']['date'][:10]}" + (f"-threads{args.threads}" if args.threads else "")
            + ("-quick" if args.quick else ""))
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")
    return report


if __name__ == "__main__":
    main()
