"""A performance regression guard that fits in `make test`: on tiny sizes the fused CPU step must be
faster than the reference backend (the released-code stand-in), as a ratio of medians measured in
one process, alternating, never as an absolute time. (The real numbers are `rose-bench`.)"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from rose_kernels import RoseAdamW, ops

pytestmark = pytest.mark.skipif(not ops.available(), reason=f"extension not built: {ops.EXTENSION_ERROR}")

SHAPES = [(64, 64)] * 12 + [(256, 64)] * 4 + [(64,)] * 8  # ~115k params in 24 tensors


@pytest.mark.parametrize("mode, granularity", [("off", "tensor"), ("second", "tensor"), ("second", "element"),
                                               ("ensemble", "element")])
def test_fused_cpu_step_is_faster_than_the_reference(seed, mode, granularity):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    kls = [torch.randn(s, generator=gen) for s in SHAPES]
    opts = {}
    for backend in ("cpu", "reference"):
        params = [torch.randn(s, generator=gen) for s in SHAPES]
        opts[backend] = (params, RoseAdamW(params, lr=1e-3, mode=mode, granularity=granularity, backend=backend))
    times = {backend: [] for backend in opts}
    for round_index in range(8):
        for backend, (params, opt) in opts.items():
            started = time.perf_counter()
            if mode in ("first", "ensemble"):
                for p, k in zip(params, kls, strict=True):
                    p.grad = k
                opt.record_first_order()
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            if round_index >= 2:  # the first rounds create state
                times[backend].append(time.perf_counter() - started)
    cpu, ref = statistics.median(times["cpu"]), statistics.median(times["reference"])
    assert cpu < ref, f"seed={seed} {mode}/{granularity}: cpu {cpu * 1e3:.2f} ms vs reference {ref * 1e3:.2f} ms"
