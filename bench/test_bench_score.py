"""SCORE: multi-tensor sums of squares (the non-finite check and tensor norms) and the 1-bit mask."""

import pytest
import torch

from rose_kernels import ops

SHAPES = [(768, 768)] * 24 + [(3072, 768)] * 8  # a few BERT-base layers


@pytest.fixture(scope="module")
def grads(gen):
    return [torch.randn(s, generator=gen) for s in SHAPES]


@pytest.mark.benchmark(group="score: sums of squares")
def test_sumsq_rose(benchmark, grads):
    benchmark(ops.sumsq, grads)


@pytest.mark.benchmark(group="score: sums of squares")
def test_sumsq_torch_foreach_norm(benchmark, grads):
    benchmark(torch._foreach_norm, grads)


@pytest.mark.benchmark(group="score: 1-bit first-order mask")
def test_first_order_mask_rose(benchmark, grads):
    bounds = torch.tensor([[0.2, 1.5]] * len(grads), dtype=torch.float64)
    masks = [torch.empty((g.numel() + 7) // 8, dtype=torch.uint8) for g in grads]
    benchmark(ops.first_order_mask_, grads, bounds, masks)


@pytest.mark.benchmark(group="score: 1-bit first-order mask")
def test_first_order_mask_torch_bool(benchmark, grads):
    benchmark(lambda: [(g.abs() >= 0.2) & (g.abs() <= 1.5) for g in grads])
