"""SELECT: two exact thresholds of 4M scores against torch and numpy."""

import pytest
import torch

from rose_kernels.benchmarks.select import methods

N = 1 << 22


@pytest.fixture(scope="module")
def runs(gen):
    return methods(torch.randn(N, generator=gen).abs_(), torch.device("cpu"))


@pytest.mark.benchmark(group="select: 4M scores, two thresholds")
@pytest.mark.parametrize("method", ["rose_kernels", "torch.quantile", "2 x torch.kthvalue", "torch.sort",
                                    "numpy.partition"])
def test_select(benchmark, runs, method):
    benchmark(runs[method])
