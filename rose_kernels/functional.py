"""The functional core of RoseAdamW, the counterpart of ``torch.optim.adamw.adamw``.

``rose_adamw`` runs one masked AdamW step (score, select, update: docs/semantics.md sections 2-5)
over lists of tensors that the caller owns; ``record_first_order`` turns KL gradients into the
first-order masks the next ``rose_adamw`` call takes. :class:`rose_kernels.RoseAdamW` is checks,
state, param groups and checkpoints around these two functions, and gives exactly what they give.

ROSE pools span param groups, so one call takes the parameters of every group: each AdamW
hyper-parameter is a number for all of them, or a sequence with one value per parameter.
DTensor (FSDP2) parameters are stepped through their local shards, with global scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rose_kernels import backends
from rose_kernels.backends import sharded
from rose_kernels.backends.base import Backend
from rose_kernels.types import (
    GRANULARITIES,
    MODES,
    SCOPES,
    THRESHOLDS,
    FirstOrderRecord,
    GroupHyper,
    RoseConfig,
    StepBatch,
    StepResult,
)
from rose_kernels.validation import check_choice, check_number

__all__ = ["rose_adamw", "record_first_order", "resolve_backend", "rose_config"]

NONFINITE_MESSAGE = "non-finite values in the {what}; the step was not taken and no parameter or state changed"
NONFINITE_HINT = " (pass nonfinite='skip' to skip such steps instead)"


def resolve_backend(backend: str | Backend, tensors: Sequence[torch.Tensor]) -> Backend:
    """The backend object for ``backend`` ("auto", a registered name, or a Backend) on the tensors'
    one device; refuses tensors on several devices."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"RoseAdamW needs all parameters on one device, got {sorted(map(str, devices))}")
    if isinstance(backend, Backend):
        return backend
    return backends.resolve(backend, next(iter(devices)))


def _check_sharding(backend: Backend, sharding) -> None:
    if sharding is not None and not backend.supports_sharding:
        raise RuntimeError(
            f"RoseAdamW: backend {backend.name!r} does not run on sharded (DTensor) parameters; use "
            "backend='auto' (the fused kernels)"
        )


def _per_parameter(name: str, value: Any, n: int) -> Sequence:
    if isinstance(value, (list, tuple)) and name != "betas":
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} parameters")
        return value
    return (value,) * n


def _hypers(n: int, *, device_resident: bool, workspace: dict | None, lr, beta1, beta2, eps, weight_decay,
            warmup_steps, second_order_scale, correct_bias) -> list[GroupHyper]:
    """One GroupHyper per parameter; equal settings share one object (as a param group's do).

    With a workspace, the list of the last call is reused while every setting is the same: the same
    list then also keys the backends' own per-step tables (building them took ~0.3 ms of the
    ~0.5 ms of Python a 100-tensor step had on top of torch's fused AdamW). Tensor lrs are never
    cached (a host tensor is read here, and a tensor's == is not identity)."""
    columns = [_per_parameter(name, value, n) for name, value in (
        ("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay),
        ("warmup_steps", warmup_steps), ("second_order_scale", second_order_scale),
        ("correct_bias", correct_bias))]
    key = None
    if workspace is not None and not any(map(torch.is_tensor, columns[0])):
        key = (device_resident, *map(tuple, columns))
        cached = workspace.get("hypers")
        if cached is not None and cached[0] == key:
            return cached[1]
    hypers = _make_hypers(columns, device_resident)
    if key is not None:
        workspace["hypers"] = (key, hypers)
    return hypers


def _make_hypers(columns: list[Sequence], device_resident: bool) -> list[GroupHyper]:
    made: dict[tuple, GroupHyper] = {}
    hypers = []
    for row in zip(*columns, strict=True):
        key = tuple(id(v) if isinstance(v, torch.Tensor) else v for v in row)
        hyper = made.get(key)
        if hyper is None:
            hyper = made[key] = _hyper(*row, device_resident=device_resident)
        hypers.append(hyper)
    return hypers


def _hyper(lr, beta1, beta2, eps, weight_decay, warmup_steps, scale, correct_bias, *, device_resident) -> GroupHyper:
    if not (isinstance(lr, torch.Tensor) and device_resident):
        # A device-resident backend reads a tensor lr on the device (CUDA graphs replay its value).
        lr = check_number("lr", lr, low=0.0)
    beta1, beta2 = float(beta1), float(beta2)
    return GroupHyper(lr=lr, beta1=beta1, beta2=beta2, eps=float(eps), weight_decay=float(weight_decay),
                      correct_bias=bool(correct_bias), warmup_steps=int(warmup_steps),
                      scale=float(scale) if scale is not None else 1.0 - beta1)


def _check_lr_devices(hypers: list[GroupHyper], params: Sequence[torch.Tensor]) -> None:
    """A device-resident backend reads a tensor lr where its parameter is, every step (a CUDA graph
    replays its value): one elsewhere is refused before anything changes."""
    for i, (hyper, p) in enumerate(zip(hypers, params, strict=True)):
        if torch.is_tensor(hyper.lr) and hyper.lr.device != p.device:
            raise ValueError(f"rose_adamw: lr of params[{i}] is a tensor on {hyper.lr.device} but the parameter is "
                             f"on {p.device}; pass a float, or a tensor on {p.device}")


def _contiguous(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in sharded.local_all(tensors)]


@torch.no_grad()
def rose_adamw(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor | Sequence = 1e-3,
    beta1: float | Sequence[float] = 0.9,
    beta2: float | Sequence[float] = 0.999,
    eps: float | Sequence[float] = 1e-6,
    weight_decay: float | Sequence[float] = 0.0,
    warmup_steps: int | Sequence[int] = 0,
    second_order_scale: float | None | Sequence = None,
    correct_bias: bool | Sequence[bool] = True,
    eligible: bool | Sequence[bool] = True,
    mode: str = "second",
    granularity: str = "tensor",
    scope: str = "tensor",
    lower: float = 0.0,
    upper: float = 60.0,
    gamma: float = 0.5,
    first_order: Sequence | None = None,
    first_order_nonfinite: torch.Tensor | None = None,
    grad_sumsq: Sequence | None = None,
    exp_avg_sumsq: Sequence | None = None,
    backend: str | Backend = "auto",
    nonfinite: str = "raise",
    workspace: dict | None = None,
) -> StepResult:
    """One ROSE step, in place: ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps`` (float32
    0-d counters, incremented) move; the arguments mean what :class:`rose_kernels.RoseAdamW`'s do.

    ``eligible``: which parameters may be masked (a param group's ``rose`` key). ``first_order``:
    modes ``first``/``ensemble``, one recorded mask per parameter (``record_first_order(...).masks``
    placed at the parameter's position; None: not scored, kept), and ``first_order_nonfinite``
    its device flag. ``grad_sumsq`` / ``exp_avg_sumsq``: per-parameter ``||grad||^2`` /
    ``||exp_avg||^2`` already known (from the clipping, from the last step's result), or None
    entries. ``workspace``: a dict kept across calls (selection guesses, lr buffer, CUDA-graph
    keep-alive list); steps are faster with one. ``nonfinite``: on non-finite gradients nothing
    changes and ``"raise"`` raises a RuntimeError, ``"skip"`` returns a result whose ``nonfinite``
    is True (a device flag on GPU backends, whose update was then a no-op on the device);
    ``"unchecked"`` does not look (torch.optim.AdamW's behaviour: non-finite values reach the
    parameters and moments), which in mode ``off`` saves the read that looks.

    Returns the backend's :class:`~rose_kernels.types.StepResult`: ``kept`` (kept fraction per
    parameter) and ``exp_avg_sumsq`` (``||exp_avg||^2`` after the step, for the next call).
    """
    cfg = _config(mode, granularity, scope, lower, upper, gamma, nonfinite)
    n = len(params)
    for name, tensors in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                          ("state_steps", state_steps)):
        if len(tensors) != n:
            raise ValueError(f"rose_adamw: {len(tensors)} {name} for {n} params")
    if n == 0:
        return StepResult(nonfinite=False)
    chosen = resolve_backend(backend, params)
    sharding = sharded.sharding_of(list(params))
    _check_sharding(chosen, sharding)
    hypers = _hypers(n, device_resident=chosen.device_resident, workspace=workspace, lr=lr, beta1=beta1,
                     beta2=beta2, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                     second_order_scale=second_order_scale, correct_bias=correct_bias)
    tensor_lr = torch.is_tensor(lr) or (isinstance(lr, (list, tuple)) and any(map(torch.is_tensor, lr)))
    if chosen.device_resident and tensor_lr:
        _check_lr_devices(hypers, params)
    batch = StepBatch(
        params=sharded.local_all(params), grads=_contiguous(grads),
        exp_avgs=sharded.local_all(exp_avgs), exp_avg_sqs=sharded.local_all(exp_avg_sqs),
        state_steps=list(state_steps), eligible=[bool(e) for e in _per_parameter("eligible", eligible, n)],
        hypers=hypers, first_order=list(first_order) if cfg.uses_first_order and first_order is not None else None,
        exp_avg_sumsq=list(exp_avg_sumsq) if exp_avg_sumsq is not None else [None] * n,
        grad_sumsq=list(grad_sumsq) if grad_sumsq is not None else None,
        first_order_nonfinite=first_order_nonfinite if cfg.uses_first_order else None,
        workspace=workspace, sharding=sharding,
    )
    result = chosen.step(batch, cfg)
    result.sharding = sharding
    if nonfinite == "raise" and _flag_set(result.nonfinite):
        raise RuntimeError("rose_adamw: " + NONFINITE_MESSAGE.format(what="gradients") + NONFINITE_HINT)
    return result


@torch.no_grad()
def record_first_order(
    kl_grads: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor | None],
    *,
    warmup_steps: int | Sequence[int] = 0,
    granularity: str = "tensor",
    scope: str = "tensor",
    lower: float = 0.0,
    upper: float = 60.0,
    backend: str | Backend = "auto",
    nonfinite: str = "raise",
    reuse: Sequence | None = None,
    workspace: dict | None = None,
) -> FirstOrderRecord:
    """First-order masks (docs/semantics.md section 2) of the eligible parameters whose KL-divergence
    gradients are ``kl_grads``; ``state_steps``: their counters (None: no state yet), which decide
    warm-up. ``reuse``: the last record's masks, whose buffers are written again. On non-finite KL
    gradients ``"raise"`` raises, ``"skip"`` returns a record whose ``nonfinite`` is set, and
    ``"unchecked"`` records the masks of whatever scores they give (non-finite ones join no pool)."""
    cfg = _config("first", granularity, scope, lower, upper, 0.5, nonfinite)
    n = len(kl_grads)
    if len(state_steps) != n:
        raise ValueError(f"record_first_order: {len(state_steps)} state_steps for {n} kl_grads")
    if n == 0:
        return FirstOrderRecord(masks=[], nonfinite=False)
    chosen = resolve_backend(backend, kl_grads)
    sharding = sharded.sharding_of(list(kl_grads))
    _check_sharding(chosen, sharding)
    record = chosen.record_first_order(
        _contiguous(kl_grads), list(state_steps), [int(w) for w in _per_parameter("warmup_steps", warmup_steps, n)],
        cfg, reuse=list(reuse) if reuse is not None else None, workspace=workspace, sharding=sharding,
    )
    if nonfinite == "raise" and _flag_set(record.nonfinite):
        raise RuntimeError("record_first_order: non-finite values in the first-order (KL) gradients; nothing was "
                           "recorded (pass nonfinite='skip' to skip such steps instead)")
    return record


def _flag_set(flag: bool | torch.Tensor) -> bool:
    """A host verdict, or a device flag (reading it waits for the device)."""
    return bool(flag)


def _config(mode, granularity, scope, lower, upper, gamma, nonfinite) -> RoseConfig:
    check_choice("nonfinite", nonfinite, ("raise", "skip", "unchecked"))
    return rose_config(mode, granularity, scope, lower, upper, gamma, nonfinite=nonfinite)


def rose_config(mode: str, granularity: str, scope: str, lower: float, upper: float, gamma: float, *,
                thresholds: str = "exact", nonfinite: str = "raise") -> RoseConfig:
    """The selection settings checked (a ValueError names the first bad one) as a RoseConfig."""
    check_choice("mode", mode, MODES)
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("scope", scope, SCOPES)
    check_choice("thresholds", thresholds, THRESHOLDS)
    lower = check_number("lower", lower, low=0.0, high=100.0)
    upper = check_number("upper", upper, low=0.0, high=100.0)
    if lower > upper:
        raise ValueError(f"lower ({lower}) must not exceed upper ({upper})")
    gamma = check_number("gamma", gamma, low=0.0, high=1.0)
    return RoseConfig(mode=mode, granularity=granularity, scope=scope, lower=lower, upper=upper, gamma=gamma,
                      thresholds=thresholds, nonfinite=nonfinite)
