"""The backend contract: what RoseAdamW and ``rose_kernels.functional`` may ask of a backend.

A backend runs one ROSE step (``step``) and one first-order record (``record_first_order``) with
the semantics of ``rose_kernels.reference`` (docs/semantics.md); everything else it says about
itself is a declared attribute, never guessed: the optimizer reads ``device_resident`` to pick its
non-finite policy and to keep tensor learning rates on the device, ``supports_sharding`` before a
step on DTensor shards, ``capturing`` while a CUDA graph is captured, and ``sumsq_op`` is what
``rose_kernels.clip_grad_norm_`` reads the gradients with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rose_kernels.dtypes import SUPPORTED_DTYPES
from rose_kernels.types import FirstOrderRecord, RoseConfig, StepBatch, StepResult


class Backend:
    """Base class of every backend; register a new one with ``rose_kernels.backends.register``."""

    #: The name ``RoseAdamW(backend=...)`` selects it by.
    name: str = ""
    #: Results are device tensors read only when the user asks (GPU backends): ``StepResult.nonfinite``
    #: is then a device flag and a non-finite step is skipped on the device, not returned from early.
    device_resident: bool = False
    #: Steps the local shards of DTensor parameters (``StepBatch.sharding`` is then set).
    supports_sharding: bool = False

    def supports_device(self, device: torch.device) -> bool:
        """Whether this backend can run on ``device`` in this process (extension built, and so on)."""
        raise NotImplementedError

    def supports(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether this backend can step ``params``: all on one device it runs on, of supported dtypes."""
        devices = {p.device for p in params}
        return (len(devices) == 1 and self.supports_device(next(iter(devices)))
                and all(p.dtype in SUPPORTED_DTYPES for p in params))

    def capturing(self, device: torch.device) -> bool:
        """Whether work on ``device`` is being captured into a CUDA graph now (the optimizer then keeps
        its own tensors that the captured step reads alive, in ``workspace["graph_keepalive"]``)."""
        return False

    def sumsq_op(self) -> Callable[[list[torch.Tensor]], torch.Tensor] | None:
        """The fused multi-tensor sum of squares (float64 ``[n]``, one read of each tensor), or None
        where the backend has none (``clip_grad_norm_`` then uses torch's clipping)."""
        return None

    def record_first_order(
        self, kl_grads: list[torch.Tensor], state_steps: list[torch.Tensor | None], warmup_steps: list[int],
        cfg: RoseConfig, *, reuse: list | None = None, workspace: dict | None = None, sharding=None,
    ) -> FirstOrderRecord:
        """First-order masks of eligible parameters from their KL gradients (docs/semantics.md section 2).

        ``reuse``: last step's masks, whose buffers may be written again; ``workspace``: the
        optimizer's scratch kept across steps; ``sharding``: the gradients are local shards
        (``rose_kernels.backends.sharded.ShardedStep``), only when ``supports_sharding``."""
        raise NotImplementedError

    def step(self, batch: StepBatch, cfg: RoseConfig) -> StepResult:
        """One masked AdamW step of every tensor in ``batch``; on the host (not ``device_resident``)
        a step whose gradients are not finite changes nothing and returns ``nonfinite=True``."""
        raise NotImplementedError
