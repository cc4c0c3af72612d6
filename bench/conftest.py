"""pytest-benchmark entry points (``pytest bench/ --benchmark-json out.json``): one file per kernel
family plus the optimizer step and the trainer step. Comparisons live in one benchmark group each,
so pytest-benchmark's table shows them side by side; the A/B-alternating runs with medians, ratios
and plots are ``rose-bench`` (rose_kernels/benchmarks/cli.py)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rose_kernels import ops  # noqa: E402

if not ops.available():
    pytest.skip(f"extension not built: {ops.EXTENSION_ERROR}", allow_module_level=True)


@pytest.fixture(scope="session")
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
