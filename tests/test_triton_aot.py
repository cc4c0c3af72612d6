"""Every Triton kernel variant the backend launches compiles for the GPU targets, without a GPU.

The interpreted tests (test_triton.py, conftest.py sets TRITON_INTERPRET=1 without a GPU) run the
kernels as Python, which accepts code the compiler rejects. Here `tools/triton_aot.py` drives
real optimizer steps (every mode, granularity, scope, dtype, aligned or not, float or tensor
lr) in a fresh process where each launch is compiled for cuda:80 and cuda:90 by Triton's own
LLVM and ptxas instead of run; a variant that does not compile, spills registers, uses local memory
or more shared memory than an sm_80 block may, fails. The variants the interpreted tests of this
session launched (recorded by conftest.py; this file runs after test_triton.py) must all be among
the compiled ones, so a kernel variant cannot be tested interpreted and never compiled.

The oldest Triton the kernels compile with is 3.4.0 (pyproject.toml's floor): 3.2 and 3.3 have
no `mask=` in `tl.histogram` (the digit and candidate passes fail there, every other variant
compiles). Checked on 2026-11-29 by running this compile (`tools/triton_aot.py`, then the module
`rose_kernels.backends.triton.aot`) in venvs with triton 3.2.0, 3.3.1, 3.4.0 and 3.5.1 beside
torch 2.13.0: 3.5.1 and 3.6.0 compile all 152 variants with no spill; 3.4.0 compiles all 152 but
spills 4 bytes in one (the window pass of first-order float32 scores with unaligned tensors,
sm_90), so this test's no-spill rule holds from 3.5 on; `make test` pins 3.6.0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import INTERPRETED_LAUNCHES

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_aot.py"), "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"the compile run crashed (exit {run.returncode}):\n{run.stderr[-6000:]}"
    report = json.loads(out.read_text())
    report["stderr"] = run.stderr
    return report


def test_every_launched_variant_compiles_for_sm80_and_sm90_without_spills(compiled):
    variants = compiled["variants"]
    assert {v["arch"] for v in variants} == {80, 90}
    kernels = {v["kernel"] for v in variants}
    assert {"_masked_adamw_kernel", "_window_pass_kernel", "_digit_pass_kernel", "_candidate_pass_kernel",
            "_block_sumsq_kernel", "_first_order_bits_kernel", "segment_sum_kernel"} <= kernels, kernels
    assert compiled["problems"] == [], "\n".join(compiled["problems"])
    for v in variants:
        assert v["ok"] and v["registers"] > 0 and v["sass"] > 0, v


def test_full_blocks_load_16_bytes_at_a_time(compiled):
    """Aligned launches of the streaming kernels vectorise (the address-table pointers carry the hint)."""
    for v in compiled["variants"]:
        if "ALIGNED=True" in v["key"] and v["kernel"] != "segment_sum_kernel":
            wide = v["loads"]["v4"] + v["loads"]["v2"]
            assert wide > 0, f"cuda:{v['arch']} {v['key']}: no 16-byte loads ({v['loads']})"


def _interpreted_steps() -> None:
    import torch

    from rose_kernels import RoseAdamW

    for mode, granularity in (("second", "element"), ("ensemble", "tensor")):
        params = [torch.randn(1500), torch.randn(7)]
        opt = RoseAdamW(params, mode=mode, granularity=granularity, backend="triton")
        for p in params:
            p.grad = torch.randn(p.shape)
        if mode == "ensemble":
            opt.record_first_order()
        opt.step()


def test_every_interpreted_launch_was_compiled(compiled):
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the kernels run compiled here (a GPU): every launch of the GPU tests is compiled by running it")
    if not INTERPRETED_LAUNCHES:
        # This file alone (make test runs test_triton.py first): record a few interpreted steps here.
        _interpreted_steps()
    assert INTERPRETED_LAUNCHES
    keys = {(v["arch"], v["key"]) for v in compiled["variants"]}
    for arch in (80, 90):
        missing = sorted(k for k in INTERPRETED_LAUNCHES if (arch, k) not in keys)
        assert not missing, f"launched by the interpreted tests but never compiled for cuda:{arch}:\n" + \
            "\n".join(missing)
