"""The whole optimizer step on the MiniLM layout: RoseAdamW (every mode and granularity) against
torch AdamW fused and foreach."""

import pytest
import torch

from rose_kernels import RoseAdamW
from rose_kernels.benchmarks.step import HYPER, ROSE_INTERVAL, build_layout
from rose_kernels.types import uses_first_order


@pytest.fixture(scope="module")
def layout():
    return build_layout("minilm")


def _run(opt, layout, first_order):
    def step():
        if first_order:
            layout.set_grads(layout.kl_grads)
            opt.record_first_order()
        layout.set_grads(layout.grads)
        opt.step()
    return step


@pytest.mark.benchmark(group="step: MiniLM 22.7M")
@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_torch_adamw(benchmark, layout, kind):
    opt = torch.optim.AdamW(layout.groups(with_rose_key=False), **HYPER, **{kind: True})
    benchmark(_run(opt, layout, False))


@pytest.mark.benchmark(group="step: MiniLM 22.7M")
@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("mode", ["off", "second", "first", "ensemble"])
def test_rose_adamw(benchmark, layout, mode, granularity):
    if mode == "off" and granularity == "element":
        pytest.skip("off has no granularity")
    opt = RoseAdamW(layout.groups(with_rose_key=True), **HYPER, mode=mode, granularity=granularity, backend="cpu",
                    **ROSE_INTERVAL)
    benchmark(_run(opt, layout, uses_first_order(mode)))
