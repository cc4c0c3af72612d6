"""RoseAdamW: robust selective fine-tuning (ROSE) as a drop-in ``torch.optim`` optimizer.

The class is thin: it checks arguments, owns the state (the keys of ``torch.optim.AdamW``), builds
one :class:`~rose_kernels.types.StepBatch` per step and hands it to a backend. The algorithm is in
``rose_kernels.reference`` (the oracle) and in the kernels; see ``docs/semantics.md``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from rose_kernels import backends
from rose_kernels.backends import sharded
from rose_kernels.reference import opmath_dtype
from rose_kernels.types import (
    GRANULARITIES,
    MODES,
    NONFINITE_POLICIES,
    SCOPES,
    THRESHOLDS,
    GroupHyper,
    RoseConfig,
    StepBatch,
)

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Group keys RoseAdamW adds to those of torch.optim.AdamW; kept across loading an AdamW checkpoint.
_ROSE_GROUP_KEYS = ("rose", "warmup_steps", "second_order_scale", "correct_bias")


def _check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                  high_open: bool = False, at_step: bool = False) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if at_step:
            return None  # checked when the group was added; reading it here may wait for the device
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


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_group(group: dict, *, at_step: bool = False) -> None:
    """Raises ValueError naming the first bad hyper-parameter of a param group."""
    _check_number("lr", group["lr"], low=0.0, at_step=at_step)
    _check_number("eps", group["eps"], low=0.0)
    _check_number("weight_decay", group["weight_decay"], low=0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    _check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    warmup = group["warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup!r}")
    if group["second_order_scale"] is not None:
        _check_number("second_order_scale", group["second_order_scale"])
    if not isinstance(group["rose"], bool):
        raise ValueError(f"the param group key 'rose' must be True or False, got {group['rose']!r}")
    if not isinstance(group["correct_bias"], bool):
        raise ValueError(f"correct_bias must be True or False, got {group['correct_bias']!r}")


def _new_state(p: torch.Tensor) -> dict:
    """The state of a parameter before its first step (a DTensor parameter gets DTensor moments,
    sharded like it, which torch.distributed.checkpoint saves and reshards)."""
    moment = dict(dtype=opmath_dtype(p.dtype), memory_format=torch.contiguous_format)
    return {
        # On the parameter's device for GPUs (as torch's fused AdamW keeps it).
        "step": torch.zeros((), dtype=torch.float32, device=p.device),
        "exp_avg": torch.zeros_like(p, **moment),
        "exp_avg_sq": torch.zeros_like(p, **moment),
    }


class RoseAdamW(Optimizer):
    r"""AdamW whose update is masked, every step, to the parameters ROSE deems robust.

    Args:
        params: parameters or param groups. A group may carry ``"rose": False`` to never be masked
            (see :func:`rose_kernels.rose_param_groups` for the released code's rule).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (decay is decoupled, applied after the
            Adam move and masked like it; ``eps`` is added to ``sqrt(v)``, as in the release).
        mode: ``"off"`` (plain AdamW), ``"first"`` (KL-gradient scores, needs
            :meth:`record_first_order` each step), ``"second"`` (gradient vs momentum) or
            ``"ensemble"`` (soft mask ``(1 - gamma) * M2 + gamma * M1``).
        granularity: ``"tensor"`` (one mask value per weight tensor, the release) or ``"element"``.
        scope: element granularity only: ``"tensor"`` (each tensor its own pool) or ``"global"``.
        lower, upper: the kept percentile interval ``[lower, upper]`` of the scores, in [0, 100].
        gamma: ensemble weight of the first-order mask.
        warmup_steps: steps during which nothing is masked.
        second_order_scale: ``c`` of the second-order score; default ``1 - beta1``; ``0.1``
            reproduces the released code for any beta1.
        correct_bias: Adam bias correction.
        backend: ``"auto"`` (fastest available for the parameters' device), ``"cpu"``, ``"triton"``
            (CUDA; CPU tensors only under ``TRITON_INTERPRET=1``) or ``"reference"``.
        thresholds: ``"exact"`` quantiles.
        nonfinite: what a step with non-finite gradients does without a GradScaler: ``"raise"``
            a RuntimeError, or ``"skip"`` the step (``skipped_steps`` counts them). Either way no
            parameter or state changes. ``"auto"`` (default) raises on the CPU, and skips on the
            GPU, where the skip is decided on the device: raising there means waiting for the
            device every step, which also rules out CUDA graphs. A step skipped on the host warns
            at once; one skipped on the device warns at the next :meth:`check`,
            :meth:`mask_stats` or :meth:`state_dict` (the first reads of the device after it).

    The state per parameter has the keys of ``torch.optim.AdamW`` (``step``, ``exp_avg``,
    ``exp_avg_sq``; moments in float32 for bf16/fp16 parameters), so checkpoints move both ways.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        mode: str = "second",
        granularity: str = "tensor",
        scope: str = "tensor",
        lower: float = 0.0,
        upper: float = 60.0,
        gamma: float = 0.5,
        warmup_steps: int = 0,
        second_order_scale: float | None = None,
        correct_bias: bool = True,
        backend: str = "auto",
        thresholds: str = "exact",
        nonfinite: str = "auto",
    ):
        _check_choice("mode", mode, MODES)
        _check_choice("granularity", granularity, GRANULARITIES)
        _check_choice("scope", scope, SCOPES)
        _check_choice("thresholds", thresholds, THRESHOLDS)
        _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        lower = _check_number("lower", lower, low=0.0, high=100.0)
        upper = _check_number("upper", upper, low=0.0, high=100.0)
        if lower > upper:
            raise ValueError(f"lower ({lower}) must not exceed upper ({upper})")
        gamma = _check_number("gamma", gamma, low=0.0, high=1.0)
        if backend != "auto" and backend not in backends.names():
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(backends.names())} or 'auto'")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rose=True,
            warmup_steps=warmup_steps,
            second_order_scale=second_order_scale,
            correct_bias=correct_bias,
        )
        _check_group(defaults)
        self.rose = RoseConfig(
            mode=mode, granularity=granularity, scope=scope, lower=lower, upper=upper, gamma=gamma,
            thresholds=thresholds, nonfinite=nonfinite,
        )
        self.backend = backend
        self._skipped_on_host = 0
        self._skipped_on_device: torch.Tensor | None = None
        self._device_skips_reported = 0  # value of _skipped_on_device at the last check
        self._first_order: dict[torch.Tensor, Any] | None = None
        self._first_order_nonfinite = False
        self._first_order_flag: torch.Tensor | None = None  # device-resident backends
        self._first_order_buffers: dict[torch.Tensor, Any] = {}  # last masks, reused as buffers
        # Device tensors read by steps captured in CUDA graphs, which replay raw pointers: owned
        # here for as long as the optimizer lives, whatever the backend's caches evict.
        self._graph_keepalive: list[torch.Tensor] = []
        # Device-resident backends' scratch (selection guesses, lr buffer), kept across steps.
        self._workspace: dict = {"graph_keepalive": self._graph_keepalive}
        self._kept: dict[torch.Tensor, int] = {}  # parameter -> position in _kept_values
        self._kept_values: list[float] | torch.Tensor = []
        self._kept_sharding = None  # sharded parameters: _kept_values are this shard's sums
        self._exp_avg_sumsq: dict[torch.Tensor, tuple[weakref.ref, int, float]] = {}
        # ||grad||^2 from rose_kernels.clip_grad_norm_, for the next step only (clip.py).
        self._grad_sumsq: dict[torch.Tensor, tuple[weakref.ref, int, Any]] = {}
        super().__init__(params, defaults)

    # -- construction -------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"RoseAdamW params must be tensors, got {type(p).__name__}")
            if p.is_complex():
                raise ValueError("RoseAdamW does not support complex parameters")
            if p.dtype not in _SUPPORTED_DTYPES:
                raise ValueError(f"RoseAdamW supports float32, float64, bfloat16 and float16 params, got {p.dtype}")
            if p.layout != torch.strided or not p.is_contiguous():
                raise ValueError(
                    "RoseAdamW needs contiguous dense parameters (the fused kernels read them as flat "
                    f"arrays); got one of shape {tuple(p.shape)} with strides {p.stride()}"
                )
        _check_group({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("rose", True)
            group.setdefault("warmup_steps", 0)
            group.setdefault("second_order_scale", None)
            group.setdefault("correct_bias", True)

    # -- checkpoints --------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a RoseAdamW or ``torch.optim.AdamW`` checkpoint; ROSE group keys missing from the
        checkpoint (an AdamW one) keep this optimizer's values."""
        current = [{k: g[k] for k in _ROSE_GROUP_KEYS} for g in self.param_groups]
        saved_groups = state_dict.get("param_groups", [])
        # torch's loader casts moments to the parameter's dtype; bf16/fp16 parameters keep float32
        # moments here, so take those from the checkpoint before that cast loses their precision.
        saved_state = state_dict.get("state", {})
        full_precision = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=False):
            for saved_id, p in zip(saved["params"], group["params"], strict=False):
                if opmath_dtype(p.dtype) != p.dtype and saved_id in saved_state:
                    full_precision[p] = {
                        k: v for k, v in saved_state[saved_id].items()
                        if k in ("exp_avg", "exp_avg_sq") and isinstance(v, torch.Tensor)
                    }
        super().load_state_dict(state_dict)
        for p, moments in full_precision.items():
            for key, value in moments.items():
                self.state[p][key] = value.to(device=p.device, dtype=opmath_dtype(p.dtype), copy=True)
        for group, mine, saved in zip(self.param_groups, current, saved_groups, strict=False):
            for key in _ROSE_GROUP_KEYS:
                if key not in saved:
                    group[key] = mine[key]
        for group in self.param_groups:
            _check_group(group)
        self._exp_avg_sumsq.clear()
        self._first_order = None
        self._first_order_nonfinite = False
        self._first_order_flag = None
        self._workspace.clear()
        self._workspace["graph_keepalive"] = self._graph_keepalive  # graphs captured before may replay

    @torch.no_grad()
    def init_state(self) -> None:
        """Creates now the state of every parameter that has none: counter 0 and zero moments,
        which behave exactly like no state (the next step is a first step).

        ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` and
        ``set_optimizer_state_dict`` fill an optimizer without state by calling ``step()`` on zero
        gradients, which modes ``first`` and ``ensemble`` refuse without a first-order record: call
        this before them (resuming a run, for instance)."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state.get(p):
                    self.state[p] = _new_state(p)

    # -- the step -----------------------------------------------------------------------------

    def _hyper(self, group: dict, *, device_resident: bool) -> GroupHyper:
        beta1, beta2 = (float(b) for b in group["betas"])
        scale = group["second_order_scale"]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and device_resident:
            pass  # stays a tensor: read on the device (CUDA graphs replay whatever value it holds)
        else:
            lr = _check_number("lr", lr, low=0.0)
        return GroupHyper(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            correct_bias=bool(group["correct_bias"]),
            warmup_steps=int(group["warmup_steps"]),
            scale=float(scale) if scale is not None else 1.0 - beta1,
        )

    def _backend_for(self, params: list[torch.Tensor]):
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise RuntimeError(f"RoseAdamW needs all parameters on one device, got {sorted(map(str, devices))}")
        return backends.resolve(self.backend, next(iter(devices)))

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it waits for the device, if any).

        A plain read: unlike :meth:`check` it neither warns nor marks device skips as reported."""
        on_device = 0 if self._skipped_on_device is None else int(self._skipped_on_device)
        return self._skipped_on_host + on_device

    def check(self) -> int:
        """Steps skipped for non-finite gradients so far (one read of the device, if any).

        Steps skipped on the device (GPU backends: the step never waits to find out) are reported
        here, by one RuntimeWarning for all those since the last check; :meth:`mask_stats` and
        :meth:`state_dict` do the same. Steps skipped on the host warned when they happened."""
        return self._skipped_on_host + self._report_device_skips()

    def _report_device_skips(self, count: int | None = None) -> int:
        """The device's skip count (``count``: already read), warning once about the new ones."""
        if self._skipped_on_device is None:
            return 0
        if count is None:
            count = int(self._skipped_on_device)
        new = count - self._device_skips_reported
        self._device_skips_reported = count
        if new > 0:
            warnings.warn(
                f"RoseAdamW: {new} step{'s were' if new > 1 else ' was'} skipped on the device since the last "
                "check (non-finite gradients); no parameter or state changed in "
                f"{'them' if new > 1 else 'it'}",
                RuntimeWarning, stacklevel=3,
            )
        return count

    def state_dict(self) -> dict:
        self._report_device_skips()
        return super().state_dict()

    def _policy(self, backend) -> str:
        if self.rose.nonfinite != "auto":
            return self.rose.nonfinite
        return "skip" if getattr(backend, "device_resident", False) else "raise"

    def _on_nonfinite(self, what: str, backend) -> None:
        message = (
            f"RoseAdamW: non-finite values in the {what}; the step was not taken and no parameter or "
            "state changed"
        )
        if self._policy(backend) == "raise":
            raise RuntimeError(message + " (pass nonfinite='skip' to skip such steps instead)")
        self._skipped_on_host += 1
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _count_device_skip(self, flag: torch.Tensor) -> None:
        counter = self._skipped_on_device
        if counter is None:
            self._skipped_on_device = torch.zeros((), dtype=torch.int64, device=flag.device)
        elif counter.device != flag.device:
            self._skipped_on_device = counter.to(flag.device)  # keeps the count (and what was reported)
        self._skipped_on_device.add_(flag)  # in place: a replayed CUDA graph keeps counting

    def _eligible_with_grads(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups if g["rose"] for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def record_first_order(self) -> None:
        """Scores eligible parameters from their current ``.grad`` (the KL-divergence gradient).

        Call it after ``loss_kl.backward(retain_graph=True)`` and before ``zero_grad()``, the task
        loss backward and :meth:`step`. Only modes ``"first"`` and ``"ensemble"`` use it.
        """
        if self.rose.mode not in ("first", "ensemble"):
            raise RuntimeError(
                f"record_first_order() is for mode='first' or 'ensemble'; this optimizer has mode={self.rose.mode!r}"
            )
        params = self._eligible_with_grads()
        previous = self._first_order or self._first_order_buffers
        self._first_order, self._first_order_nonfinite, self._first_order_flag = {}, False, None
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("RoseAdamW does not support sparse gradients")
        warmup = {p: g["warmup_steps"] for g in self.param_groups if g["rose"] for p in g["params"]}
        state_steps = [self.state[p]["step"] if self.state.get(p) else None for p in params]
        sharding = sharded.sharding_of(params)
        kl_grads = [sharded.local(p.grad) for p in params]
        kl_grads = [g if g.is_contiguous() else g.contiguous() for g in kl_grads]
        backend = self._backend_for(params)
        self._check_sharding_support(backend, sharding)
        warmups = [warmup[p] for p in params]
        reuse = [previous.get(p) for p in params]
        self._first_order_buffers, previous = {}, None  # only `reuse` holds the old masks now
        extra = {} if sharding is None else {"sharding": sharding}
        record = backend.record_first_order(kl_grads, state_steps, warmups, self.rose, reuse=reuse,
                                            workspace=self._workspace, **extra)
        del reuse
        if isinstance(record.nonfinite, torch.Tensor):
            if self._policy(backend) == "raise" and bool(record.nonfinite):
                self._first_order = None
                raise RuntimeError(
                    "RoseAdamW.record_first_order: non-finite values in the first-order (KL) gradients; "
                    "nothing was recorded (pass nonfinite='skip' to skip such steps instead)"
                )
            # Skipped on the device by the coming step's update.
            self._first_order_flag = record.nonfinite
        elif record.nonfinite:
            self._first_order = None
            self._first_order_nonfinite = True
            if self._policy(backend) == "raise":
                raise RuntimeError(
                    "RoseAdamW.record_first_order: non-finite values in the first-order (KL) gradients; "
                    "nothing was recorded (pass nonfinite='skip' to skip such steps instead)"
                )
            return
        self._first_order = {p: mask for p, mask in zip(params, record.masks, strict=True) if mask is not None}
        self._first_order_buffers = self._first_order

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One masked AdamW step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cfg = self.rose
        needs_first = cfg.mode in ("first", "ensemble")
        if needs_first and self._first_order_nonfinite:
            self._first_order_nonfinite = False
            self._on_nonfinite("first-order (KL) gradients recorded for this step", None)
            return loss
        if needs_first and self._first_order is None:
            raise RuntimeError(
                f"mode={cfg.mode!r} needs first-order scores for every step: call "
                "opt.record_first_order() after loss_kl.backward(retain_graph=True) and before "
                "zero_grad() / loss.backward() / opt.step() (torch.distributed.checkpoint's get_ and "
                "set_optimizer_state_dict call step() on an optimizer without state: call opt.init_state() first)"
            )

        batch, new_states, owners = self._collect()
        if not batch.params:
            self._first_order = None
            return loss
        if needs_first:
            batch.first_order = [self._first_order.get(p) for p in owners]
            batch.first_order_nonfinite = self._first_order_flag
        batch.workspace = self._workspace
        batch.exp_avg_sumsq = [
            self._cached_exp_avg_sumsq(p, m) for p, m in zip(owners, batch.exp_avgs, strict=True)
        ]
        if self._grad_sumsq:
            batch.grad_sumsq = [self._given_grad_sumsq(p) for p in owners]
            self._grad_sumsq = {}  # for this step only

        backend = self._backend_for(batch.params)
        self._check_sharding_support(backend, batch.sharding)
        capturing = getattr(backend, "capturing", None)
        capturing = capturing is not None and capturing(batch.params[0].device)
        result = backend.step(batch, cfg)
        self._first_order = None
        self._first_order_flag = None
        if isinstance(result.nonfinite, torch.Tensor):
            # Device-resident: a non-finite step was already skipped on the device.
            if self._policy(backend) == "raise" and bool(result.nonfinite):
                self._on_nonfinite("gradients", backend)
            self._count_device_skip(result.nonfinite)
        elif result.nonfinite:
            self._on_nonfinite("gradients", backend)
            return loss
        for p, state in new_states:
            self.state[p] = state
        kept = {p: i for i, p in enumerate(owners) if batch.eligible[i]}
        values = result.kept
        old = self._kept_values
        if (isinstance(values, torch.Tensor) and kept == self._kept and isinstance(old, torch.Tensor)
                and (old.shape, old.dtype, old.device) == (values.shape, values.dtype, values.device)):
            # Written in place, not replaced: a captured step then reads and writes this buffer on
            # every replay, so a replayed skipped step keeps the fractions of the step before it
            # (as on the host), and the graph never reads a tensor that a later step drops.
            if isinstance(result.nonfinite, torch.Tensor):
                values = torch.where(result.nonfinite, old, values)
            values = old.copy_(values)
        self._kept = kept
        self._kept_values = values
        self._kept_sharding = batch.sharding
        sumsqs = result.exp_avg_sumsq
        if sumsqs is not None:
            for i, p in enumerate(owners):
                m = batch.exp_avgs[i]
                self._exp_avg_sumsq[p] = (weakref.ref(m), m._version, sumsqs[i])
        if capturing:
            # What the captured step wrote or read of ours that a later step replaces (the buffer on
            # a new parameter set, the cached sums, the counter on a new device) stays ours.
            self._keep_alive(values, sumsqs, result.nonfinite, self._skipped_on_device)
        return loss

    def _keep_alive(self, *tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and not any(t is held for held in self._graph_keepalive):
                self._graph_keepalive.append(t)

    def _take_grad_sumsq(self, params: list[torch.Tensor], sums: torch.Tensor) -> None:
        """Called by rose_kernels.clip_grad_norm_: ``sums[i]`` is ``||params[i].grad||^2`` as it is now."""
        values = sums.tolist() if sums.device.type == "cpu" else list(sums.unbind())
        self._grad_sumsq = {p: (weakref.ref(p.grad), p.grad._version, v) for p, v in zip(params, values, strict=True)}

    def _given_grad_sumsq(self, p: torch.Tensor):
        entry = self._grad_sumsq.get(p)
        if entry is None:
            return None
        ref, version, value = entry
        if ref() is not p.grad or p.grad._version != version:
            return None  # replaced or changed in place since it was clipped: the step reads it
        return value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_sumsq = {}
        super().zero_grad(set_to_none)

    def _cached_exp_avg_sumsq(self, p: torch.Tensor, exp_avg: torch.Tensor) -> float | None:
        entry = self._exp_avg_sumsq.get(p)
        if entry is None:
            return None
        ref, version, value = entry
        if ref() is not exp_avg or exp_avg._version != version:
            return None
        return value

    def _collect(self) -> tuple[StepBatch, list[tuple[torch.Tensor, dict]], list[torch.Tensor]]:
        """Checks every group and gradient, then gathers the step's tensors; changes nothing.

        State for parameters seen for the first time is created here but only committed to
        ``self.state`` once the step has gone through. Also returns the participating parameters
        themselves: for sharded (DTensor) parameters the batch holds their local shards.
        """
        batch = StepBatch([], [], [], [], [], [], [])
        new_states = []
        owners = []
        with_grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        resident = bool(with_grads) and getattr(self._backend_for(with_grads), "device_resident", False)
        for group in self.param_groups:
            _check_group(group, at_step=True)
            hyper = self._hyper(group, device_resident=resident)
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("RoseAdamW does not support sparse gradients")
                if grad.shape != p.shape or grad.dtype != p.dtype:
                    raise RuntimeError(
                        f"gradient of shape {tuple(grad.shape)} and dtype {grad.dtype} does not match its "
                        f"parameter ({tuple(p.shape)}, {p.dtype})"
                    )
                if not sharded.local(p).is_contiguous():
                    raise RuntimeError("a parameter became non-contiguous after RoseAdamW was built")
                state = self.state.get(p)
                if not state:
                    state = _new_state(p)
                    new_states.append((p, state))
                else:
                    self._check_state(p, state)
                grad = sharded.local(grad)
                owners.append(p)
                batch.params.append(sharded.local(p))
                batch.grads.append(grad if grad.is_contiguous() else grad.contiguous())
                batch.exp_avgs.append(sharded.local(state["exp_avg"]))
                batch.exp_avg_sqs.append(sharded.local(state["exp_avg_sq"]))
                batch.state_steps.append(state["step"])
                batch.eligible.append(group["rose"])
                batch.hypers.append(hyper)
        batch.sharding = sharded.sharding_of(owners)
        return batch, new_states, owners

    @staticmethod
    def _check_sharding_support(backend, sharding) -> None:
        if sharding is not None and not hasattr(backend, "ops"):
            raise RuntimeError(
                f"RoseAdamW: backend {backend.name!r} does not run on sharded (DTensor) parameters; use "
                "backend='auto' (the fused kernels)"
            )

    @staticmethod
    def _check_state(p: torch.Tensor, state: dict) -> None:
        want = opmath_dtype(p.dtype)
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if t is not None and sharded.local(t).shape != sharded.local(p).shape:
                raise RuntimeError(
                    f"state[{key!r}] of a sharded parameter of shape {tuple(p.shape)} must be sharded like it "
                    f"(a DTensor with placements {getattr(p, 'placements', None)}); load sharded optimizer "
                    "state with torch.distributed.checkpoint"
                )
            if t is None or t.shape != p.shape or t.dtype != want or t.device != p.device:
                raise RuntimeError(
                    f"state[{key!r}] of a parameter of shape {tuple(p.shape)} must be a {want} tensor of the "
                    f"same shape on {p.device}; got {None if t is None else (tuple(t.shape), t.dtype, str(t.device))}"
                )
            if not t.is_contiguous():
                state[key] = t.contiguous()
        step = state.get("step")
        if not isinstance(step, torch.Tensor):
            state["step"] = torch.tensor(float(step or 0), dtype=torch.float32, device=p.device)
        elif step.device != p.device or step.dtype != torch.float32:
            # e.g. a torch.optim.AdamW checkpoint keeps CPU steps: move them once, not every step.
            state["step"] = step.to(device=p.device, dtype=torch.float32)

    # -- introspection ------------------------------------------------------------------------

    def mask_stats(self) -> dict[str, float]:
        """Kept fraction (mean mask value) of each eligible parameter at the last step.

        Keys are the group's ``param_names`` when given (as :func:`rose_param_groups` does), else
        ``"<group index>.<param index>"``. With sharded (FSDP2) parameters each rank holds its
        shard's share, and this call adds them up: a collective, to be called on every rank.
        """
        values = self._kept_values
        counter = self._skipped_on_device
        if self._kept_sharding is not None and len(values):
            # Each rank holds its shard's sums of mask values: one all-reduce (a collective call).
            values = self._kept_sharding.kept_fractions(torch.as_tensor(values))
        if isinstance(values, torch.Tensor):
            # Device-resident results: one read, here, when asked (with the skip counter).
            if counter is not None and counter.device == values.device:
                read = torch.cat([values.to(torch.float64), counter.reshape(1).to(torch.float64)]).tolist()
                values = read[:-1]
                self._report_device_skips(int(read[-1]))
            else:
                values = values.tolist()
                self._report_device_skips()
        else:
            self._report_device_skips()
        stats = {}
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                if p in self._kept:
                    stats[names[pi] if names else f"{gi}.{pi}"] = values[self._kept[p]]
        return stats
