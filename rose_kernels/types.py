"""Plain data passed between RoseAdamW and its backends, and the names of the modes and their parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("off", "first", "second", "ensemble")
# The modes whose mask has a first-order part (two dropout passes and record_first_order() every
# step) and those with a second-order part; test a mode with uses_first_order() / uses_second_order().
FIRST_ORDER_MODES = frozenset({"first", "ensemble"})
SECOND_ORDER_MODES = frozenset({"second", "ensemble"})
GRANULARITIES = ("tensor", "element")
SCOPES = ("tensor", "global")
THRESHOLDS = ("exact",)
NONFINITE_POLICIES = ("auto", "raise", "skip", "unchecked")


def uses_first_order(mode: str) -> bool:
    """Whether ``mode`` scores with the KL gradient of two dropout passes (record_first_order())."""
    return mode in FIRST_ORDER_MODES


def uses_second_order(mode: str) -> bool:
    """Whether ``mode`` scores the gradient against the momentum."""
    return mode in SECOND_ORDER_MODES


@dataclass(frozen=True)
class RoseConfig:
    """Optimizer-wide selection settings: pools can span param groups, so these are not per group."""

    mode: str = "second"
    granularity: str = "tensor"
    scope: str = "tensor"
    lower: float = 0.0
    upper: float = 60.0
    gamma: float = 0.5
    thresholds: str = "exact"
    nonfinite: str = "raise"

    @property
    def uses_first_order(self) -> bool:
        return uses_first_order(self.mode)

    @property
    def uses_second_order(self) -> bool:
        return uses_second_order(self.mode)

    @property
    def checks_finite(self) -> bool:
        """Whether a step looks for non-finite gradients (every policy but ``"unchecked"``)."""
        return self.nonfinite != "unchecked"

    @property
    def element(self) -> bool:
        """Element granularity (one mask value per element, not per tensor)."""
        return self.granularity == "element"

    @property
    def quantiles(self) -> tuple[float, float]:
        """``lower`` and ``upper`` as quantiles in [0, 1]."""
        return self.lower / 100, self.upper / 100


@dataclass(frozen=True)
class GroupHyper:
    """The per-parameter AdamW hyper-parameters of its group, with the second-order scale resolved."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    correct_bias: bool
    warmup_steps: int
    scale: float  # c of the second-order score


@dataclass
class StepBatch:
    """Every parameter that takes part in one step, flattened across param groups."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    state_steps: list[torch.Tensor]
    eligible: list[bool]
    hypers: list[GroupHyper]
    # Per parameter: the recorded first-order mask (backend-specific object) or None.
    first_order: list[Any] | None = None
    # Per parameter: sum of squares of exp_avg if a backend cached it at the end of the last step
    # (a float, or a 0-d device tensor for device-resident backends).
    exp_avg_sumsq: list[Any] | None = None
    # Per parameter: ||grad||^2 handed over by rose_kernels.clip_grad_norm_ for this step (a float,
    # or a 0-d device tensor), or None; when every entry is set, the step does not read the
    # gradients for the finiteness check and the tensor second-order score.
    grad_sumsq: list[Any] | None = None
    # Device-resident backends: the non-finite flag of the recorded first-order scores (0-d bool).
    first_order_nonfinite: torch.Tensor | None = None
    # The optimizer's scratch space for the backend, kept across steps (never part of results).
    # ``workspace["graph_keepalive"]``: a list the optimizer keeps for its lifetime; a backend puts
    # there every device tensor that a step captured in a CUDA graph reads and could otherwise free.
    workspace: dict | None = None
    # Parameters sharded over ranks (FSDP2): the tensors above are the local shards, and this
    # object (rose_kernels.backends.sharded.ShardedStep) makes scores and thresholds global.
    sharding: Any = None


@dataclass
class StepResult:
    """What a step did. Device-resident backends return 0-d/1-d device tensors instead of Python
    values (``nonfinite``: the step was skipped on the device) so that nothing waits on the host."""

    nonfinite: bool | torch.Tensor
    # kept fraction (mean mask value); under sharding, this shard's sum of mask values instead
    kept: list[float] | torch.Tensor = field(default_factory=list)
    exp_avg_sumsq: list[float] | torch.Tensor | None = None  # sum of squares of the new exp_avg
    sharding: Any = None  # the step's ShardedStep (set by rose_kernels.functional), or None


@dataclass
class FirstOrderRecord:
    masks: list[Any]  # per parameter: backend-specific mask (None: undefined, treated as kept)
    nonfinite: bool | torch.Tensor
