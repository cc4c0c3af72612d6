"""The one place the trainer builds its optimizer, for ``rose-train`` and ``RoseTrainer`` alike.

:func:`build_optimizer` is :class:`~rose_kernels.RoseAdamW` over
:func:`~rose_kernels.rose_param_groups` (the release's eligibility rule; no weight decay for biases
and LayerNorm weights). :data:`DEFAULTS` holds its defaults, which ``TrainConfig`` (``rose-train``'s
options) and ``RoseTrainer``'s ``rose_*`` arguments take as theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rose_kernels.groups import rose_param_groups
from rose_kernels.optim import RoseAdamW


@dataclass(frozen=True)
class OptimizerDefaults:
    """The trainer's optimizer settings when none is given.

    ``mode="ensemble"``: the trainer (``rose-train`` and ``RoseTrainer``) defaults to the release's
    ensemble of the first- and second-order scores, while ``RoseAdamW`` itself defaults to
    ``mode="second"`` (one forward pass, no ``record_first_order()`` to call). The AdamW settings are
    those of bare ``rose-train``: lr 2e-4 (a 60-step run needs the top of the release's range),
    betas (0.9, 0.98), eps 1e-6, weight decay 0.01; ``RoseTrainer`` passes its TrainingArguments'
    own instead."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    mode: str = "ensemble"
    granularity: str = "tensor"
    scope: str = "tensor"
    lower: float = 0.0
    upper: float = 60.0
    gamma: float = 0.5
    warmup_steps: int = 0  # RoseAdamW's: steps without masking (not rose-train's learning-rate warm-up)
    backend: str = "auto"


DEFAULTS = OptimizerDefaults()


def build_optimizer(model: torch.nn.Module, *, lr: float = DEFAULTS.lr, betas: tuple[float, float] = DEFAULTS.betas,
                    eps: float = DEFAULTS.eps, weight_decay: float = DEFAULTS.weight_decay, mode: str = DEFAULTS.mode,
                    granularity: str = DEFAULTS.granularity, scope: str = DEFAULTS.scope,
                    lower: float = DEFAULTS.lower, upper: float = DEFAULTS.upper, gamma: float = DEFAULTS.gamma,
                    warmup_steps: int = DEFAULTS.warmup_steps, backend: str = DEFAULTS.backend) -> RoseAdamW:
    """RoseAdamW over ``rose_param_groups(model, weight_decay)``, for rose-train and RoseTrainer.

    The defaults are :data:`DEFAULTS` (see :class:`OptimizerDefaults`): in particular ``mode`` is
    ``"ensemble"``, the trainer's default, where ``RoseAdamW(mode=...)`` itself defaults to
    ``"second"``. ``warmup_steps`` is RoseAdamW's (steps during which nothing is masked), not the
    learning-rate warm-up of ``rose-train --warmup-steps``, which is the scheduler's.
    """
    return RoseAdamW(rose_param_groups(model, weight_decay=weight_decay), lr=lr, betas=betas, eps=eps, mode=mode,
                     granularity=granularity, scope=scope, lower=lower, upper=upper, gamma=gamma,
                     warmup_steps=warmup_steps, backend=backend)
