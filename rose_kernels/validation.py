"""Argument checks shared by RoseAdamW and ``rose_kernels.functional``: each raises a ValueError that
names the first bad argument, before anything changes (docs/semantics.md section 6)."""

from __future__ import annotations

import math
from typing import Any

import torch

from rose_kernels.backends import sharded
from rose_kernels.dtypes import SUPPORTED_DTYPES


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 high_open: bool = False, at_step: bool = False) -> float | None:
    """``value`` as a finite float within the bounds; a one-element tensor is read unless ``at_step``
    (then it was checked when its group was added, and reading it here may wait for the device)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if at_step:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_group(group: dict, *, at_step: bool = False, params: Any = None) -> None:
    """Raises ValueError naming the first bad hyper-parameter of a param group. ``params``: the
    group's parameters (default ``group["params"]``, if any), for :func:`check_devices`."""
    check_devices(group, group.get("params") if params is None else params, at_step=at_step)
    check_number("lr", group["lr"], low=0.0, at_step=at_step)
    check_number("eps", group["eps"], low=0.0)
    check_number("weight_decay", group["weight_decay"], low=0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    warmup = group["warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup!r}")
    if group["second_order_scale"] is not None:
        check_number("second_order_scale", group["second_order_scale"])
    if not isinstance(group["rose"], bool):
        raise ValueError(f"the param group key 'rose' must be True or False, got {group['rose']!r}")
    if not isinstance(group["correct_bias"], bool):
        raise ValueError(f"correct_bias must be True or False, got {group['correct_bias']!r}")


def check_devices(group: dict, params: Any, *, at_step: bool = False) -> None:
    """A param group's parameters share one device, and a tensor ``lr`` lives on it.

    The fused backends read a tensor lr where the parameters are, every step (a CUDA graph replays
    its current value); copying it there each step would cost a copy (from the CPU, a host wait)
    and could not be captured. The other hyper-parameters are read as host floats, so tensors on
    any device work for them. At step time (``at_step``) only a tensor lr is checked, against the
    group's first parameter (parameters moved to several devices since are refused by the step)."""
    lr = group.get("lr")
    lr_tensor = isinstance(lr, torch.Tensor)
    if params is None or isinstance(params, set):  # a set gets torch's own TypeError
        return
    if at_step:
        devices = [params[0].device] if lr_tensor and params else []
    else:
        devices = []
        for p in params:
            p = p[1] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) else p
            if isinstance(p, torch.Tensor) and p.device not in devices:
                devices.append(p.device)
        if len(devices) > 1:
            raise ValueError(
                "the parameters of one param group must be on one device (RoseAdamW steps every "
                f"parameter where it lives, in one pass); got {', '.join(map(str, devices))}"
            )
    if lr_tensor and devices and lr.device != devices[0]:
        device = devices[0]
        raise ValueError(
            f"lr is a tensor on {lr.device} but this group's parameters are on {device}; pass a "
            f"float, or a tensor on {device}"
        )


def check_param(p: Any) -> None:
    """A parameter the fused kernels can step: a dense, contiguous, real floating tensor."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"RoseAdamW params must be tensors, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError("RoseAdamW does not support complex parameters")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"RoseAdamW supports float32, float64, bfloat16 and float16 params, got {p.dtype}")
    if p.layout != torch.strided or not p.is_contiguous():
        raise ValueError(
            "RoseAdamW needs contiguous dense parameters (the fused kernels read them as flat "
            f"arrays); got one of shape {tuple(p.shape)} with strides {p.stride()}"
        )


def check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    """A gradient the step can use, of a parameter that is still contiguous."""
    if grad.is_sparse:
        raise RuntimeError("RoseAdamW does not support sparse gradients")
    if grad.shape != p.shape or grad.dtype != p.dtype:
        raise RuntimeError(
            f"gradient of shape {tuple(grad.shape)} and dtype {grad.dtype} does not match its "
            f"parameter ({tuple(p.shape)}, {p.dtype})"
        )
    if not sharded.local(p).is_contiguous():
        raise RuntimeError("a parameter became non-contiguous after RoseAdamW was built")
