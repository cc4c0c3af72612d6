"""The package's one dtype rule: which type scores, moments and arithmetic use per parameter dtype."""

from __future__ import annotations

import torch

# Parameter dtypes RoseAdamW and the kernels accept.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type scores, moments and arithmetic use for parameters of ``dtype``: float64 for float64,
    float32 for float32, bfloat16 and float16 (csrc/rose_math.h's ``opmath_t``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
