"""``RoseTrainer``: a ``transformers.Trainer`` that fine-tunes with ROSE.

Switching an existing Trainer script is changing the class (and, optionally, the ``rose_*``
arguments): the optimizer becomes :class:`~rose_kernels.RoseAdamW` over
:func:`~rose_kernels.rose_param_groups` (the release's eligibility rule, no decay for biases and
LayerNorm), built by :func:`rose_kernels.train.optimizer.build_optimizer` (the one builder
``rose-train`` uses too) from the TrainingArguments' lr, betas, eps and weight decay. The ``rose_*``
defaults are the builder's (:data:`rose_kernels.train.optimizer.DEFAULTS`): ``rose_mode="ensemble"``,
as ``rose-train``'s, where ``RoseAdamW`` itself defaults to ``mode="second"``. In the modes with a
first-order part (``first`` and ``ensemble``) the training step runs two dropout passes, keeps the
KL gradients aside (summed over gradient-accumulation micro-batches) and records them right before
each optimizer step.
Schedulers, mixed precision and logging stay the Trainer's own; the Trainer's gradient clipping
runs through :func:`rose_kernels.clip_grad_norm_`, whose read of the gradients also serves the
optimizer's step (its non-finite check and the tensor second-order norms).

Under ``torchrun`` with DDP the Trainer's DDP averages the task gradients; the KL gradients, taken
aside with ``torch.autograd.grad``, are averaged here over the ranks before they are recorded (and
the KL divergence, a sum over the batch, is weighted by the number of ranks), so every rank records
the scores of the global batch and keeps the same masks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import Trainer

from rose_kernels.clip import clip_grad_norm_
from rose_kernels.distributed import average_tensors_
from rose_kernels.optim import RoseAdamW
from rose_kernels.train.optimizer import DEFAULTS, build_optimizer
from rose_kernels.train.step import FirstOrderScores, rose_losses
from rose_kernels.types import uses_first_order


class RoseTrainer(Trainer):
    """``transformers.Trainer`` with RoseAdamW and ROSE's training step (see the module's docstring).

    ``rose_mode`` (default ``"ensemble"``), ``rose_granularity``, ``rose_scope``, ``rose_lower``,
    ``rose_upper``, ``rose_gamma`` and ``rose_backend`` are RoseAdamW's ``mode``, ``granularity``, ...;
    their defaults are :data:`rose_kernels.train.optimizer.DEFAULTS`."""

    def __init__(self, *args, rose_mode: str = DEFAULTS.mode, rose_granularity: str = DEFAULTS.granularity,
                 rose_scope: str = DEFAULTS.scope, rose_lower: float = DEFAULTS.lower,
                 rose_upper: float = DEFAULTS.upper, rose_gamma: float = DEFAULTS.gamma,
                 rose_backend: str = DEFAULTS.backend, **kwargs):
        self.rose_options = dict(mode=rose_mode, granularity=rose_granularity, scope=rose_scope, lower=rose_lower,
                                 upper=rose_upper, gamma=rose_gamma, backend=rose_backend)
        self._first: FirstOrderScores | None = None
        self._first_since: int | None = None  # global step at which the KL buffers were started
        super().__init__(*args, **kwargs)
        self._torch_clip = self.accelerator.clip_grad_norm_
        self.accelerator.clip_grad_norm_ = self._rose_clip_grad_norm

    def _rose_clip_grad_norm(self, parameters, max_norm, norm_type=2):
        """The Trainer's clipping (Accelerator.clip_grad_norm_) with one fused read handed to RoseAdamW;
        Accelerate's own for the engines that shard or own the gradients (FSDP, DeepSpeed)."""
        from accelerate.utils import DistributedType

        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        plain = self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                      DistributedType.MULTI_CPU)
        if not plain or not isinstance(optimizer, RoseAdamW):
            return self._torch_clip(parameters, max_norm, norm_type)
        self.accelerator.unscale_gradients()  # a no-op without fp16's GradScaler
        return clip_grad_norm_(parameters, max_norm, norm_type, optimizer=optimizer)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            args = self.args
            self.optimizer = build_optimizer(opt_model, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                             eps=args.adam_epsilon, weight_decay=args.weight_decay,
                                             **self.rose_options)
        if uses_first_order(self.rose_options["mode"]) and self._first is None:
            distributed = self.args.world_size > 1 and dist.is_available() and dist.is_initialized()
            self._first = FirstOrderScores(self.optimizer, average=average_tensors_ if distributed else None)
            self.optimizer.register_step_pre_hook(self._record_first_order)
        return self.optimizer

    def _record_first_order(self, optimizer, args, kwargs) -> None:
        if self._first is not None and self._first.buffers is not None:
            self._first.record()
            self._first_since = None

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        # No read from the device here: the loss is returned as a tensor (the Trainer sums it on the
        # device and reads it every logging_steps), the KL gradients stay in device buffers, and
        # mask_stats() is never called. The Trainer's own loop still checks each micro-batch's loss for
        # NaN/Inf on the host (a sync per micro-batch) unless TrainingArguments(logging_nan_inf_filter=False).
        if not uses_first_order(self.rose_options["mode"]):
            return super().training_step(model, inputs, num_items_in_batch)  # one pass; RoseAdamW masks
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        if self._first_since is not None and self._first_since != self.state.global_step:
            self._first.buffers = None  # a step skipped by a GradScaler never consumed them
        self._first_since = self.state.global_step
        with self.compute_loss_context_manager():
            loss, loss_kl, _ = rose_losses(model, inputs, labels, self.rose_options["mode"])
        loss = loss / self.current_gradient_accumulation_steps
        world = self.args.world_size
        self._first.add(loss_kl * world if world > 1 else loss_kl)
        self.accelerator.backward(loss)
        return loss.detach()
