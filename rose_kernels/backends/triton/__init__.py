"""``backend="triton"``: the op family as Triton kernels (score.py, select.py, update.py).

The step itself is the fused backends' one (``rose_kernels.backends.fused``); this package gives
it the Triton implementation of each op, registered with the same schemas as the C++ ops under
the ``rose_triton`` namespace. Launch tables are cached (``tables.py``), so in a steady state a
step copies nothing from the host (a float lr only when it changed: one small copy into a buffer
of the optimizer's workspace).

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly); that is how the tests
exercise this backend on machines without a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rose_kernels.backends.fused import FusedBackend
from rose_kernels.backends.triton import tables
from rose_kernels.backends.triton.score import first_order_mask_, sumsq
from rose_kernels.backends.triton.select import element_thresholds
from rose_kernels.backends.triton.update import masked_adamw_

__all__ = ["TritonBackend", "TRITON_OPS", "element_thresholds", "first_order_mask_", "masked_adamw_", "sumsq"]

TRITON_OPS = SimpleNamespace(sumsq=sumsq, element_thresholds=element_thresholds,
                             first_order_mask_=first_order_mask_, masked_adamw_=masked_adamw_)


class TritonBackend(FusedBackend):
    name = "triton"

    def ops(self):
        return TRITON_OPS

    def supports_device(self, device: torch.device) -> bool:
        return device.type == "cuda" or (device.type == "cpu" and tables.on_host())
