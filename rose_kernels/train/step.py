"""The ROSE training step of semantics.md section 7, shared by ``rose-train`` and ``RoseTrainer``.

First order and ensemble: two forward passes with dropout active; the symmetric KL divergence of
the two passes (only to score parameters) and the mean of the two task losses (to train on).
Second order and off: one pass, one task loss. The KL gradients are taken with
``torch.autograd.grad`` into separate buffers, so that they can be summed over gradient-accumulation
micro-batches without touching ``.grad``, and are handed to ``RoseAdamW.record_first_order()``
right before the optimizer step. Losses are computed in float32 from half or bfloat16 outputs, and
in the outputs' own type from float32 or float64 ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.amp.grad_scaler import OptState

from rose_kernels.optim import RoseAdamW


def needs_two_passes(mode: str) -> bool:
    return mode in ("first", "ensemble")


def _loss_type(t: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 outputs in float32; float32 and float64 ones as they are (``.float()``
    would round a float64 model's outputs, and so its losses and gradients, to float32)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, or mean squared error for a 1-output (regression) head."""
    logits = _loss_type(logits)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def divergence(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``(sum_i KL(P2_i || P1_i) + KL(P1_i || P2_i)) / 4`` over the batch (the release's L_KL); the
    summed squared difference of the outputs for a 1-output head."""
    z1, z2 = _loss_type(z1), _loss_type(z2)
    if z1.shape[-1] == 1:
        return F.mse_loss(z1, z2, reduction="sum")
    log_p1, log_p2 = F.log_softmax(z1, dim=-1), F.log_softmax(z2, dim=-1)
    kl_p2_p1 = F.kl_div(log_p1, log_p2, reduction="sum", log_target=True)
    kl_p1_p2 = F.kl_div(log_p2, log_p1, reduction="sum", log_target=True)
    return (kl_p2_p1 + kl_p1_p2) / 4


def rose_losses(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, mode: str
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(task loss, KL divergence or None, logits of the first pass) for one batch."""
    z1 = model(**inputs).logits
    if not needs_two_passes(mode):
        return task_loss(z1, labels), None, z1
    z2 = model(**inputs).logits
    return (task_loss(z1, labels) + task_loss(z2, labels)) / 2, divergence(z1, z2), z1


class FirstOrderScores:
    """The KL gradients of the eligible parameters, summed over micro-batches, for one step.

    ``via_backward``: take them with ``loss_kl.backward()`` (every ``.grad`` set aside meanwhile)
    rather than ``torch.autograd.grad``: under FSDP2 the parameters the optimizer holds are the
    shards, which only a backward pass (FSDP's reduce-scatter) gives gradients to.
    ``average``: called on the buffers before they are recorded (the all-reduce under DDP, whose
    own averaging covers one backward pass per forward)."""

    def __init__(self, optimizer: RoseAdamW, *, via_backward: bool = False, average=None):
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups if g["rose"] for p in g["params"] if p.requires_grad]
        self.all_params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.via_backward = via_backward
        self.average = average
        self.buffers: list[torch.Tensor | None] | None = None

    def _gradients(self, loss_kl: torch.Tensor):
        if not self.via_backward:
            return torch.autograd.grad(loss_kl, self.params, retain_graph=True, allow_unused=True)
        saved = [p.grad for p in self.all_params]
        for p in self.all_params:
            p.grad = None
        try:
            loss_kl.backward(retain_graph=True)
            return [p.grad for p in self.params]
        finally:
            for p, g in zip(self.all_params, saved, strict=True):
                p.grad = g

    def add(self, loss_kl: torch.Tensor) -> None:
        """Accumulates d loss_kl / d params, keeping the graph for the task loss's backward."""
        grads = self._gradients(loss_kl)
        if self.buffers is None:
            self.buffers = [None if g is None else g.detach() for g in grads]
            return
        for i, g in enumerate(grads):
            if g is not None:
                self.buffers[i] = g.detach() if self.buffers[i] is None else self.buffers[i].add_(g)

    def record(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """``record_first_order()`` from the accumulated KL gradients; ``.grad`` is left as it was.

        ``scaler``: the GradScaler whose scale the KL losses were multiplied by
        (``add(scaler.scale(loss_kl))``). If it is enabled, the KL gradients are unscaled first, on the
        device, and a non-finite one (an overflow of the scaled KL backward) counts as an overflow of
        the step, as a non-finite task gradient does: it is added to the scaler's inf checks of the
        optimizer, so that ``scaler.step()`` skips the step and ``scaler.update()`` lowers the scale.
        The scores of such a step are never used (they are recorded from zeros in place of the
        non-finite values). The task gradients' inf checks come first: ``scaler.unscale_(optimizer)``
        is called here unless it was called for this step already.
        """
        if self.buffers is None:
            raise RuntimeError("FirstOrderScores.record(): no KL gradient was added for this step")
        if self.average is not None:
            self.average([g for g in self.buffers if g is not None])
        if scaler is not None and scaler.is_enabled():
            self._unscale(scaler)
        saved = [p.grad for p in self.params]
        try:
            for p, g in zip(self.params, self.buffers, strict=True):
                p.grad = g
            self.optimizer.record_first_order()
        finally:
            for p, g in zip(self.params, saved, strict=True):
                p.grad = g
            self.buffers = None

    @torch.no_grad()
    def _unscale(self, scaler: torch.amp.GradScaler) -> None:
        """Unscales the buffers in place and adds their inf check to the scaler's for the optimizer."""
        state = scaler._per_optimizer_states[id(self.optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("FirstOrderScores.record(scaler) must come before scaler.step(optimizer)")
        if state["stage"] is OptState.READY:
            scaler.unscale_(self.optimizer)
        scale = scaler._scale  # the scale of this step, a device tensor: no read of the device
        # As GradScaler.unscale_: the reciprocal in float64 (exact for the power-of-two scales).
        inv_scale = scale.reciprocal() if scale.device.type == "mps" else scale.double().reciprocal().float()
        found = state["found_inf_per_device"]
        grouped: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in self.buffers:
            if g is not None:
                grouped.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), grads in grouped.items():
            found_inf = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale.to(device))
            if device in found:
                found[device].add_(found_inf)
            else:
                found[device] = found_inf
            for g in grads:  # only an overflow step has any, and scaler.step() skips it
                g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
