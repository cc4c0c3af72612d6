"""UPDATE: the masked AdamW kernel alone (uniform mask, inline second-order element mask) against
torch's fused AdamW kernel on the same tensors."""

import pytest
import torch

from rose_kernels import ops

SHAPES = [(768, 768)] * 24 + [(3072, 768)] * 8


def _row(element: bool):
    # lr, beta1, beta2, eps, wd, correct_bias, warmup, w1, mu1, w2, mu2, element_second, lower, upper, scale
    return [1e-5, 0.9, 0.98, 1e-6, 0.01, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, float(element), 0.0, 0.9, 0.1]


@pytest.fixture(scope="module")
def tensors(gen):
    make = lambda: [torch.randn(s, generator=gen) for s in SHAPES]  # noqa: E731
    return make(), make(), make(), [t.abs() for t in make()]


@pytest.mark.benchmark(group="update: 28 M params")
@pytest.mark.parametrize("element", [False, True], ids=["uniform", "inline-second-order"])
def test_masked_adamw_rose(benchmark, tensors, element):
    params, grads, m, v = tensors
    steps = [torch.tensor(1.0) for _ in params]
    table = torch.tensor([_row(element)] * len(params), dtype=torch.float64)
    benchmark(ops.masked_adamw_, params, grads, m, v, steps, [None] * len(params), table)


@pytest.mark.benchmark(group="update: 28 M params")
def test_torch_fused_adamw(benchmark, tensors):
    params, grads, m, v = tensors
    steps = [torch.tensor(1.0) for _ in params]
    benchmark(torch._fused_adamw_, params, grads, m, v, [], steps, lr=1e-5, beta1=0.9, beta2=0.98,
              weight_decay=0.01, eps=1e-6, amsgrad=False, maximize=False)
