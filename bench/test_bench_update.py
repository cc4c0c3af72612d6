"""UPDATE: the masked AdamW kernel alone (uniform mask, inline second-order element mask) against
torch's fused AdamW kernel on the same tensors."""

import pytest
import torch

from rose_kernels import ops

SHAPES = [(768, 768)] * 24 + [(3072, 768)] * 8


def _tables(n: int, element: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """masked_adamw_'s ``hyper`` [n, 11] and ``masks`` [n, 4] tables (ops.HYPER_COLUMNS, ops.MASK_COLUMNS)."""
    hyper = {"lr": 1e-5, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "weight_decay": 0.01, "correct_bias": 1.0,
             "warmup_steps": 0.0, "weight_first": 0.0, "weight_second": 1.0, "element_second": float(element),
             "scale": 0.1}
    masks = {"mask_first": 1.0, "mask_second": 1.0, "lower": 0.0, "upper": 0.9}
    return (torch.tensor([[hyper[c] for c in ops.HYPER_COLUMNS]] * n, dtype=torch.float64),
            torch.tensor([[masks[c] for c in ops.MASK_COLUMNS]] * n, dtype=torch.float64))


@pytest.fixture(scope="module")
def tensors(gen):
    make = lambda: [torch.randn(s, generator=gen) for s in SHAPES]  # noqa: E731
    return make(), make(), make(), [t.abs() for t in make()]


@pytest.mark.benchmark(group="update: 28 M params")
@pytest.mark.parametrize("element", [False, True], ids=["uniform", "inline-second-order"])
def test_masked_adamw_rose(benchmark, tensors, element):
    params, grads, m, v = tensors
    steps = [torch.tensor(1.0) for _ in params]
    hyper, masks = _tables(len(params), element)
    found = torch.zeros(1, dtype=torch.int32)
    benchmark(ops.masked_adamw_, params, grads, m, v, steps, [None] * len(params), hyper, masks, found, element)


@pytest.mark.benchmark(group="update: 28 M params")
def test_torch_fused_adamw(benchmark, tensors):
    params, grads, m, v = tensors
    steps = [torch.tensor(1.0) for _ in params]
    benchmark(torch._fused_adamw_, params, grads, m, v, [], steps, lr=1e-5, beta1=0.9, beta2=0.98,
              weight_decay=0.01, eps=1e-6, amsgrad=False, maximize=False)
