"""The ROSE training step of semantics.md section 7, shared by ``rose-train`` and ``RoseTrainer``.

First order and ensemble: two forward passes with dropout active; the symmetric KL divergence of
the two passes (only to score parameters) and the mean of the two task losses (to train on).
Second order and off: one pass, one task loss. The KL gradients are taken with
``torch.autograd.grad`` into separate buffers, so that they can be summed over gradient-accumulation
micro-batches without touching ``.grad``, and are handed to ``RoseAdamW.record_first_order()``
right before the optimizer step. Losses are computed in float32 from half or bfloat16 outputs, and
in the outputs' own type from float32 or float64 ones.

:func:`train_step` is rose-train's whole optimizer step around them (micro-batches, GradScaler,
clipping, data parallel); ``RoseTrainer`` (trainer.py) runs ``rose_losses`` and ``FirstOrderScores``
inside the transformers Trainer's own step instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.amp.grad_scaler import OptState

from rose_kernels.clip import clip_grad_norm_
from rose_kernels.distributed import average_gradients_
from rose_kernels.optim import RoseAdamW
from rose_kernels.train.config import TrainConfig
from rose_kernels.train.parallel import Parallel
from rose_kernels.types import uses_first_order


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
    if not uses_first_order(mode):  # one pass
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


def train_step(model: torch.nn.Module, optimizer: RoseAdamW, scaler: torch.amp.GradScaler,
               first: FirstOrderScores | None, batches: list[tuple[dict, torch.Tensor]], cfg: TrainConfig,
               parallel: Parallel | None = None, count: int | None = None) -> torch.Tensor:
    """One optimizer step of rose-train (semantics.md section 7) over the micro-batches of the step.

    ``batches``: ``[(inputs, labels)]`` on the model's device, the step's ``--grad-accum`` micro-batches;
    ``first``: the FirstOrderScores of ``optimizer`` in modes first and ensemble, else None. For each
    micro-batch: the forward pass(es), the KL gradients kept aside (summed over the micro-batches), the
    backward of the task loss weighted by the micro-batch's share of the step's examples. Then the
    gradients are unscaled, the first-order scores recorded (a KL overflow skips the step and lowers the
    scale, as a task-gradient overflow does), the gradients clipped, the optimizer and the scaler
    stepped and the gradients set to None. The learning-rate schedule is the caller's.
    Returns the step's loss, the mean over its examples, as a 0-d tensor left on the device.

    Data parallel (``parallel``): ``batches`` are this rank's rows and ``count`` the step's examples
    over all ranks. The gradients are averaged over the ranks, so each rank's losses are weighted by
    the number of ranks too (the KL divergence, a sum over the batch, as well); the returned loss is
    this rank's share of the step's mean (their sum over the ranks is the mean).
    """
    parallel = parallel or Parallel()
    device = batches[0][1].device
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    sum_dtype = torch.float32 if device.type == "mps" else torch.float64  # float64: the sums of Python floats
    count = count or sum(len(labels) for _, labels in batches)
    loss_sum = torch.zeros((), dtype=sum_dtype, device=device)
    for i, (inputs, labels) in enumerate(batches):
        with parallel.no_sync(model, last=i == len(batches) - 1, two_pass=first is not None):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                loss, loss_kl, _ = rose_losses(model, inputs, labels, cfg.mode)
            weight = len(labels) / count  # the step's loss is the mean over its examples
            if first is not None:
                kl = scaler.scale(loss_kl)  # scaled like the task loss: small KL gradients must not underflow
                first.add(kl * parallel.world if parallel.world > 1 else kl)
            scaled = loss * weight
            scaler.scale(scaled * parallel.world if parallel.world > 1 else scaled).backward()
        loss_sum = loss_sum + loss.detach().to(sum_dtype) * weight  # no read: stays on the device
    if parallel.average_by_hand(first is not None):
        average_gradients_(model.parameters())
    scaler.unscale_(optimizer)
    if first is not None:
        first.record(scaler)  # unscales the KL gradients; their overflow joins the scaler's inf checks
    if cfg.max_grad_norm > 0:
        # One fused read for the clipping, which also gives the step its non-finite check and the
        # tensor second-order ||g||^2 (rose_kernels/clip.py; torch's clipping for sharded gradients).
        clip_grad_norm_(model.parameters(), cfg.max_grad_norm, optimizer=optimizer)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum
