"""Compiles and links the CUDA extension without a GPU, loads it, and checks every op has a CUDA kernel.

Run by ``make cuda-check`` with the Python of a venv holding a CUDA build of torch (the Makefile
makes one). Steps:

1. ``setup.py build_ext`` into ``--build-dir`` (not in place: the CPU build's ``_C`` stays where it
   is), with ``ROSE_KERNELS_CUDA=1`` (fail rather than fall back to a CPU-only build), the
   architectures of ``TORCH_CUDA_ARCH_LIST`` (default sm_80 and sm_90) and ``ptxas -v``;
2. the built library is loaded into a fresh interpreter (``dlopen`` with ``RTLD_NOW``: a symbol the
   link left unresolved fails here), and for each op of ``rose_kernels.ops.OP_NAMES`` the dispatcher
   must hold a CPU and a CUDA kernel;
3. registers, spills and stack per kernel and architecture, from ``ptxas -v``, go to a Markdown
   report (``--report``); any spill or stack frame fails the check.

Builds are cached by content (``--cache-dir``): the key hashes the sources and headers, setup.py,
this script, the torch version, the architectures and CUDA_HOME, so a clean clone of a tree that
was checked before on this machine only loads and checks the cached library and reuses its ptxas
report; any change to a source builds again (in a fresh folder).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def op_names() -> tuple[str, ...]:
    """rose_kernels.ops.OP_NAMES, read from the source: importing the package here would load the
    in-place CPU build of the extension, made for another torch."""
    with open(os.path.join(ROOT, "rose_kernels", "ops.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "OP_NAMES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise SystemExit("cuda-check: OP_NAMES not found in rose_kernels/ops.py")

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")


def cache_key(torch_version: str) -> str:
    """What the built library depends on, hashed: sources, headers, build script, toolchain."""
    digest = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True))
    files += [os.path.join(ROOT, "setup.py"), os.path.abspath(__file__)]
    for path in files:
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    for part in (torch_version, os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"), os.environ.get("CUDA_HOME", "")):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def prune(cache_dir: str, keep: int) -> None:
    """Keeps the `keep` most recent builds (each is some tens of MB)."""
    builds = sorted((os.path.join(cache_dir, d) for d in os.listdir(cache_dir)), key=os.path.getmtime, reverse=True)
    for old in builds[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def build(build_dir: str) -> tuple[str, bool]:
    """Runs the build; returns its output and whether anything was compiled."""
    env = dict(os.environ, ROSE_KERNELS_CUDA="1", ROSE_KERNELS_PTXAS_VERBOSE="1")
    env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", os.path.join(build_dir, "lib"),
           "--build-temp", os.path.join(build_dir, "temp")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        errors = [line for line in output.splitlines() if "error" in line.lower()]
        sys.stderr.write(output[-20000:])
        raise SystemExit(f"cuda-check: the CUDA extension did not build ({len(errors)} error lines above)")
    return output, "ptxas info" in output


def kernel_resources(ptxas_output: str) -> list[dict]:
    """One row per (kernel, architecture) from ``ptxas -v``."""
    rows, current = [], None
    for line in ptxas_output.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = {"mangled": entry.group(1), "arch": entry.group(2)}
            rows.append(current)
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            current.update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))
        used = _USED.search(line)
        if used:
            current["registers"] = int(used.group(1))
    names = demangle([r["mangled"] for r in rows])
    for row, name in zip(rows, names, strict=True):
        row["kernel"] = name
    return rows


def demangle(names: list[str]) -> list[str]:
    if not names:
        return []
    try:
        done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        out = done.stdout.splitlines()
        return out if len(out) == len(names) else names
    except (OSError, subprocess.CalledProcessError):
        return names


def short(kernel: str) -> str:
    """The kernel's name without namespaces and with shorter template arguments."""
    for long, brief in (("rose_kernels::cuda::", ""), ("c10::BFloat16", "bf16"), ("c10::Half", "fp16"),
                        ("(anonymous namespace)::", ""), ("unsigned long", "u64"), ("unsigned int", "u32")):
        kernel = kernel.replace(long, brief)
    return kernel


def check_registrations(library: str) -> list[str]:
    """Loads the built library in a fresh interpreter; returns the problems found."""
    probe = (
        "import sys, torch\n"
        "torch.ops.load_library(sys.argv[1])\n"
        "assert torch.ops.rose_kernels.built_with_cuda(), 'built_with_cuda() is False'\n"
        "for op in sys.argv[2:]:\n"
        "    for key in ('CPU', 'CUDA'):\n"
        "        if not torch._C._dispatch_has_kernel_for_dispatch_key('rose_kernels::' + op, key):\n"
        "            print(f'rose_kernels::{op} has no {key} kernel')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, library, *op_names()], capture_output=True, text=True)
    problems = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0:
        problems.append("loading the library failed:\n" + done.stderr[-4000:])
    return problems


def report(rows: list[dict], torch_version: str, arch_list: str) -> str:
    lines = [
        f"# CUDA kernels: registers and spills ({datetime.date.today().isoformat()})",
        "",
        f"`make cuda-check`: csrc/cuda compiled and linked against torch {torch_version} for "
        f"TORCH_CUDA_ARCH_LIST=\"{arch_list}\" with nvcc's `ptxas -v`, no GPU needed. The library was "
        f"loaded and every op of the family has a CPU and a CUDA kernel. Not run on a GPU here: the "
        f"GPU tests (tests/test_cuda.py) and benchmarks run through bench/device_check.sh.",
        "",
        "| kernel | arch | registers | spill stores (B) | spill loads (B) | stack (B) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (short(r["kernel"]), r["arch"])):
        lines.append(f"| `{short(r['kernel'])}` | {r['arch']} | {r.get('registers', '?')} | "
                     f"{r.get('spill_stores', '?')} | {r.get('spill_loads', '?')} | {r.get('stack', '?')} |")
    worst = max((r.get("registers", 0) for r in rows), default=0)
    spills = sum(r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in rows)
    lines += ["", f"{len(rows)} kernel variants; at most {worst} registers; {spills} bytes of spills in all.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, "build", "cuda-check"),
                        help="builds are kept here, one folder per content key")
    parser.add_argument("--report", help="also write the Markdown report here")
    args = parser.parse_args()
    import torch

    if torch.version.cuda is None:
        raise SystemExit(f"cuda-check: needs a CUDA build of torch, this is {torch.__version__}")
    build_dir = os.path.join(args.cache_dir, cache_key(torch.__version__))
    log = os.path.join(build_dir, "ptxas.log")
    if os.path.exists(log):
        print(f"cuda-check: these sources were built before ({build_dir}); loading that build")
        with open(log) as f:
            output = f.read()
    else:
        shutil.rmtree(build_dir, ignore_errors=True)  # a build that did not finish
        os.makedirs(build_dir)
        output, compiled = build(build_dir)
        if not compiled:
            raise SystemExit(f"cuda-check: nothing was compiled in the fresh folder {build_dir}")
        with open(log + ".tmp", "w") as f:
            f.write(output)
        os.replace(log + ".tmp", log)  # written last: marks a finished build
        prune(args.cache_dir, keep=3)
    args.build_dir = build_dir
    libraries = glob.glob(os.path.join(args.build_dir, "lib", "rose_kernels", "_C*.so"))
    if len(libraries) != 1:
        raise SystemExit(f"cuda-check: expected one built library, found {libraries}")
    problems = check_registrations(libraries[0])
    rows = kernel_resources(output)
    if not rows:
        problems.append("ptxas reported no kernels")
    for r in rows:
        if r.get("spill_stores", 0) or r.get("spill_loads", 0) or r.get("stack", 0):
            problems.append(f"{short(r['kernel'])} on {r['arch']}: {r.get('spill_stores')} B spill stores, "
                            f"{r.get('spill_loads')} B spill loads, {r.get('stack')} B stack")
    text = report(rows, torch.__version__, os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
    with open(os.path.join(args.build_dir, "report.md"), "w") as f:
        f.write(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    archs = sorted({r["arch"] for r in rows})
    print(f"cuda-check: {len(rows)} kernel variants for {', '.join(archs)}; "
          f"report in {os.path.join(args.build_dir, 'report.md')}")
    if problems:
        raise SystemExit("cuda-check failed:\n  " + "\n  ".join(problems))
    print("cuda-check: built, linked and loaded; every op has a CPU and a CUDA kernel; no spills")


if __name__ == "__main__":
    main()
