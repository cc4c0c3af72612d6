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
from rose_kernels.types import FirstOrderRecord, RoseConfig, StepBatch, StepResult

__all__ = ["TritonBackend", "TRITON_OPS", "element_thresholds", "first_order_mask_", "masked_adamw_", "sumsq"]

TRITON_OPS = SimpleNamespace(sumsq=sumsq, element_thresholds=element_thresholds,
                             first_order_mask_=first_order_mask_, masked_adamw_=masked_adamw_)


class TritonBackend(FusedBackend):
    name = "triton"

    def ops(self):
        return TRITON_OPS

    # The whole step on the tensors' device (each op guards itself too): the lr buffer's copy event,
    # the capture test and the tensor work between the ops then all go to the tensors' GPU.
    def step(self, batch: StepBatch, cfg: RoseConfig) -> StepResult:
        with tables.device_guard(batch.params[0].device):
            return super().step(batch, cfg)

    def record_first_order(self, kl_grads: list[torch.Tensor], state_steps, warmup_steps, cfg: RoseConfig,
                           **kwargs) -> FirstOrderRecord:
        with tables.device_guard(kl_grads[0].device):
            return super().record_first_order(kl_grads, state_steps, warmup_steps, cfg, **kwargs)

    def supports_device(self, device: torch.device) -> bool:
        return device.type == "cuda" or (device.type == "cpu" and tables.on_host())
