"""Ahead-of-time compilation of every Triton kernel the backend launches, for real GPU targets,
on a machine without a GPU.

Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run the kernels on the CPU) executes
kernels as Python and accepts code that the compiler rejects. So this tool drives the real
optimizer step (``RoseAdamW(backend="triton")`` over every mode, granularity, scope, dtype and
learning-rate kind) with CPU tensors while a target-only driver stands in for the GPU: each launch
is compiled for ``cuda:80`` / ``cuda:90`` (Triton ships LLVM and ``ptxas``) instead of run, with
the GPU's block sizes and the argument types of the real call. The step never reads device values
on the host, so the launches are exactly those of a GPU step.

For each compiled variant ``ptxas -v`` reports registers, spills and stack, the cubin's metadata
the shared memory, the PTX the width of the global loads, and ``cuobjdump -sass`` the instruction
count. ``python tools/triton_aot.py --markdown FILE`` writes the table (from any directory: the
script imports the ``rose_kernels`` of its repository); ``tests/test_triton_aot.py`` runs it in
``make test`` and fails on a kernel that does not compile, spills, or uses more shared memory than
an sm_80 block may.

Must run in a process where ``TRITON_INTERPRET`` is unset when Triton is imported (the kernels are
then compiler objects, not interpreter ones).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

# The repository's package, wherever this script is run from (``python tools/triton_aot.py``).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from rose_kernels.backends.triton import tables  # noqa: E402

# sm_80's largest shared memory per block (opt-in), the tightest of the targets.
SM80_MAX_SHARED = 163 * 1024
ARCHS = (80, 90)


@dataclass
class Variant:
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    key: str = ""
    ok: bool = True
    error: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    num_warps: int = 0
    sass: int = 0
    loads: dict = field(default_factory=dict)  # PTX global loads by width: v4, v2, scalar
    compile_s: float = 0.0


class _TargetOnlyDriver:
    """Enough of a Triton driver to compile for a GPU that is not there."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one kernel cache per target

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@contextlib.contextmanager
def compile_only(arch: int, compiled: dict):
    """Within: Triton launches compile for ``cuda:<arch>`` and record ``{key: (fn, kernel | error)}``
    in ``compiled`` instead of running; the Triton backend takes CPU tensors with GPU block sizes."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    if tables.interpreting():
        raise RuntimeError("triton_aot.compile_only needs TRITON_INTERPRET unset before Triton is imported")
    original_run = JITFunction.run
    # No public getter works without a GPU (it would create the CUDA driver); the attribute is
    # ``_active`` from Triton 3.5, ``active`` before.
    slot = "_active" if hasattr(driver, "_active") else "active"
    previous_driver = getattr(driver, slot)

    def run(self, *args, grid, warmup, **kwargs):
        key = tables.variant_key(self, args, kwargs)
        if key not in compiled:
            started = time.perf_counter()
            try:
                kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
            except Exception as error:  # noqa: BLE001 - the compiler's message is the result
                cause = f" (caused by {type(error.__cause__).__name__}: {error.__cause__})" if error.__cause__ else ""
                compiled[key] = (self, f"{type(error).__name__}: {error}{cause}", 0.0)
            else:
                compiled[key] = (self, kernel, time.perf_counter() - started)
        return None

    driver.set_active(_TargetOnlyDriver(arch))
    JITFunction.run = run
    tables.COMPILE_ONLY = True
    try:
        yield compiled
    finally:
        tables.COMPILE_ONLY = False
        JITFunction.run = original_run
        setattr(driver, slot, previous_driver)


def _aligned(shape, dtype) -> torch.Tensor:
    return torch.randn(shape).to(dtype)


def _unaligned(shape, dtype) -> torch.Tensor:
    """A contiguous tensor that starts 1 element past a 16-byte boundary (a view into a flat buffer)."""
    numel = 1
    for s in shape:
        numel *= s
    return torch.randn(numel + 1).to(dtype)[1:].view(shape)


def drive_every_step(*, log=print) -> int:
    """Runs RoseAdamW(backend="triton") steps over every configuration; returns how many."""
    from rose_kernels import RoseAdamW
    from rose_kernels.types import uses_first_order

    shapes = [(5,), (3, 700), (9000,), (0,)]
    layouts = {
        "f32": [torch.float32] * 4,
        "f64": [torch.float64] * 4,
        "bf16": [torch.bfloat16] * 4,
        "f16": [torch.float16] * 4,
        "mixed": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    }
    configs = [("off", "tensor", "tensor")] + [
        (mode, granularity, scope)
        for mode in ("first", "second", "ensemble")
        for granularity, scope in (("tensor", "tensor"), ("element", "tensor"), ("element", "global"))
    ]
    runs = 0
    for layout, dtypes in layouts.items():
        for aligned in (True, False):
            if not aligned and layout not in ("f32", "bf16"):
                continue
            for mode, granularity, scope in configs:
                for lr in (1e-3, torch.tensor(1e-3)):
                    make = _aligned if aligned else _unaligned
                    params = [make(s, d) for s, d in zip(shapes, dtypes, strict=True)]
                    groups = [{"params": params[:3]}, {"params": params[3:], "rose": False, "warmup_steps": 2}]
                    opt = RoseAdamW(groups, lr=lr, mode=mode, granularity=granularity, scope=scope,
                                    backend="triton", nonfinite="skip")
                    for _ in range(2):
                        if uses_first_order(mode):
                            for p in params:
                                p.grad = make(p.shape, p.dtype)
                            opt.record_first_order()
                        for p in params:
                            p.grad = make(p.shape, p.dtype)
                        opt.step()
                    runs += 1
        log(f"  {layout}: driven")
    return runs


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _measure(variant: Variant, kernel) -> None:
    arch = f"sm_{variant.arch}a" if variant.arch >= 90 else f"sm_{variant.arch}"
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:
            f.write(kernel.asm["cubin"])
        report = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={arch}", ptx_path, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True,
                              check=True).stdout
    variant.registers = int(re.search(r"Used (\d+) registers", report).group(1))
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    variant.stack, variant.spill_stores, variant.spill_loads = (int(x) for x in frame.groups())
    variant.shared = int(kernel.metadata.shared)
    variant.num_warps = int(kernel.metadata.num_warps)
    variant.sass = sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line))
    loads = re.findall(r"ld\.global(?:\.\w+)*?\.(v[24])?\.?[bfsu]\d+", ptx)
    variant.loads = {"v4": loads.count("v4"), "v2": loads.count("v2"), "scalar": loads.count("")}


def compile_all(archs=ARCHS, *, log=print) -> list[Variant]:
    """Every launched kernel variant compiled for every arch, with its resources (or its error)."""
    variants = []
    for arch in archs:
        compiled: dict = {}
        started = time.perf_counter()
        with compile_only(arch, compiled):
            drive_every_step(log=log)
        log(f"cuda:{arch}: {len(compiled)} variants compiled in {time.perf_counter() - started:.0f} s")
        for key, (fn, kernel, seconds) in sorted(compiled.items()):
            variant = Variant(kernel=fn.fn.__name__, arch=arch, signature={}, constexprs={}, key=key,
                              compile_s=seconds)
            if isinstance(kernel, str):
                variant.ok, variant.error = False, kernel
            else:
                variant.signature = {k: str(v) for k, v in kernel.src.signature.items()}
                variant.constexprs = {str(k): str(v) for k, v in kernel.src.constants.items()}
                _measure(variant, kernel)
            variants.append(variant)
    return variants


# H200 (sm_90): 132 SMs x 4 schedulers x 1 warp-instruction per clock x 1.98 GHz, and 4.8 TB/s of
# HBM3e (datasheet numbers; a copy reaches ~90% of it).
H200_WARP_INSTRUCTIONS_PER_S = 132 * 4 * 1.98e9
H200_BYTES_PER_S = 4.8e12


def _per_element(fn, make_args, constants: dict, arch: int) -> float:
    """Marginal warp-instructions per element of a kernel: the SASS growth from 1024- to
    2048-element blocks (static count: every branch counted once), times the warps, per element."""
    counts = []
    for block in (1024, 2048):
        compiled: dict = {}
        with compile_only(arch, compiled):
            fn[(1,)](*make_args(block), **constants, BLOCK=block, num_warps=8)
        (_, kernel, _), = compiled.values()
        if isinstance(kernel, str):
            raise RuntimeError(kernel)
        variant = Variant(kernel=fn.fn.__name__, arch=arch, signature={}, constexprs={})
        _measure(variant, kernel)
        counts.append(variant.sass)
    return (counts[1] - counts[0]) * 8 / 1024


def select_costs(arch: int = 90) -> dict:
    """Instruction costs behind SELECT's design (select.py): the window pass per rank window, and a
    masked ``tl.histogram`` by bin count."""
    import triton.language as tl

    from rose_kernels.backends.triton import select

    def i64(n=8):
        return torch.zeros(n, dtype=torch.int64)

    def i32(n=8):
        return torch.zeros(n, dtype=torch.int32)

    def window_args(block):
        return (i32(), i64(), i64(), i64(), i64(), torch.zeros(8, dtype=torch.float64), i32(), i32(), i32(), i64(64),
                i64(64), i32(), i64(), i64(), i64(), torch.zeros(block, dtype=torch.int32))

    window = {}
    for ranks in (1, 2, 4):
        window[ranks] = _per_element(select._window_pass_kernel, window_args, dict(
            A_DTYPE=tl.float32, B_DTYPE=tl.float32, OPMATH=tl.float32, SECOND=True, KEY64=False, CHECK=True,
            RANKS=ranks, ALIGNED=True), arch)

    def candidate_args(block):
        return (i32(), i64(), i32(), i64(64), i64(4096 * 8), i64(), i64(), i64(), torch.zeros(block, dtype=torch.int32),
                0, 8)

    histogram = {}
    for bins in (16, 256, 4096):
        histogram[bins] = _per_element(select._candidate_pass_kernel, candidate_args,
                                       dict(RANKS=1, BINS=bins), arch)
    return dict(arch=arch, window_pass=window, histogram=histogram)


def problems(variants: list[Variant]) -> list[str]:
    """What makes a variant unfit for a GPU: no compile, a spill, local memory, too much shared memory."""
    out = []
    for v in variants:
        where = f"cuda:{v.arch} {v.key}"
        if not v.ok:
            out.append(f"{where}: does not compile: {v.error}")
            continue
        if v.spill_stores or v.spill_loads or v.stack:
            out.append(f"{where}: spills ({v.spill_stores} B stores, {v.spill_loads} B loads, {v.stack} B stack)")
        if v.shared > SM80_MAX_SHARED:
            out.append(f"{where}: {v.shared} B of shared memory > {SM80_MAX_SHARED} B (sm_80 block limit)")
    return out


def to_markdown(variants: list[Variant], meta: dict) -> str:
    lines = [
        f"# Triton kernels compiled ahead of time ({meta['date']})", "",
        f"triton {meta['triton']}, torch {meta['torch']}, git {meta['git']}. Every kernel variant that "
        "`RoseAdamW(backend=\"triton\")` launches (every mode, granularity, scope, parameter dtype, "
        "aligned or not, float or tensor lr) compiled for each target without a GPU "
        "(`python tools/triton_aot.py`). Registers and spills from `ptxas -v`; "
        "shared memory from the compiled kernel; loads: global loads in the PTX by width (16 bytes "
        "are v4 of 32-bit or v2 of 64-bit words; the scalar ones include the per-tensor table reads "
        "and the masked tail of a tensor); SASS: static instruction count.", "",
        "| target | kernel | variant (code-choosing constexprs) | warps | registers | spill B | shared B "
        "| loads v4/v2/scalar | SASS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        choice = v.key.split("(", 1)[1].rstrip(")").replace("triton.language.", "")
        choice = ", ".join(part for part in choice.split(", ") if "=" in part)
        if not v.ok:
            lines.append(f"| cuda:{v.arch} | {v.kernel} | {choice} | | fails | | | | |")
            continue
        lines.append(f"| cuda:{v.arch} | {v.kernel} | {choice} | {v.num_warps} | {v.registers} | "
                     f"{v.spill_stores + v.spill_loads} | {v.shared} | "
                     f"{v.loads.get('v4', 0)}/{v.loads.get('v2', 0)}/{v.loads.get('scalar', 0)} | {v.sass} |")
    return "\n".join(lines) + "\n"


def costs_markdown(costs: dict) -> str:
    """The SELECT design's instruction budget (select.py's docstring cites it)."""
    issue = H200_WARP_INSTRUCTIONS_PER_S
    budget = {b: issue / (H200_BYTES_PER_S / b) for b in (4, 8)}
    lines = [
        f"## SELECT: instructions per element (cuda:{costs['arch']}, static SASS, marginal per element)", "",
        "Warp-instructions per element: the growth of the static SASS count from 1024- to 2048-element "
        "blocks (8 warps), times the warps, per element. Static counts include every branch once "
        "(both the full-block and the masked-tail loads, every rank's code), so they bound what runs "
        "from above. An H200 issues ~"
        f"{issue / 1e12:.2f}e12 warp-instructions/s (132 SMs x 4 schedulers x 1.98 GHz) and streams "
        f"{H200_BYTES_PER_S / 1e12:.1f} TB/s: a pass stays memory-bound under "
        f"{budget[4]:.2f} warp-instructions per element when it reads 4 B per element (first-order "
        f"scores, `|g|`) and {budget[8]:.2f} when it reads 8 B (second-order, `g` and `m`).", "",
        "| form | warp-instructions / element |", "|---|---|",
    ]
    for bins, cost in sorted(costs["histogram"].items()):
        lines.append(f"| masked `tl.histogram`, {bins} bins ({bins.bit_length() - 1}-bit digit), one rank, "
                     f"candidate keys | {cost:.2f} |")
    for ranks, cost in sorted(costs["window_pass"].items()):
        lines.append(f"| window pass, float32 second-order scores (IEEE division, finiteness check, counts, "
                     f"compaction), {ranks} distinct rank window{'s' if ranks > 1 else ''} | {cost:.2f} |")
    lines += [
        "",
        "The chosen form: the pass that reads every score on a hit is the window pass (no histogram; "
        "ranks k and k+1 share a window, so 2 distinct windows for two thresholds); histograms "
        f"use 8-bit digits ({costs['histogram'].get(256, float('nan')):.2f} per candidate key and "
        "rank) and run on the compacted candidates, or over the pool only on a miss. The previous "
        f"form, a 4096-bin histogram of every score in the first pass, cost "
        f"{costs['histogram'].get(4096, float('nan')):.1f} for the histogram alone. Whether the window "
        "pass reaches the bandwidth on an H200 is not yet measured: its static count is above the "
        "8-byte budget, its executed count is lower (one load path, two of the four rank bodies).",
    ]
    return "\n".join(lines) + "\n"


def _meta() -> dict:
    import triton

    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        git = "unknown"
    return dict(date=time.strftime("%Y-%m-%d"), triton=triton.__version__, torch=torch.__version__, git=git)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="CUDA compute capabilities")
    parser.add_argument("--json", help="write every variant's resources here")
    parser.add_argument("--markdown", help="write the resources table here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    variants = compile_all(tuple(args.arch), log=lambda m: print(m, file=sys.stderr, flush=True))
    meta = _meta()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, variants=[asdict(v) for v in variants], problems=problems(variants)), f,
                      indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(variants, meta) + "\n" + costs_markdown(select_costs(90)))
    found = problems(variants)
    for line in found:
        print(line, file=sys.stderr)
    print(f"{len(variants)} variants, {len(found)} problems", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
