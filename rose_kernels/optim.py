"""RoseAdamW: robust selective fine-tuning (ROSE) as a drop-in ``torch.optim`` optimizer.

The class checks arguments, owns the state (the keys of ``torch.optim.AdamW``), the param groups
and checkpoints; each step collects the tensors, calls ``rose_kernels.functional.rose_adamw`` and
commits what it returned. The algorithm is in ``rose_kernels.reference`` (the oracle) and in the
kernels; see ``docs/semantics.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from rose_kernels import backends, functional
from rose_kernels.backends import sharded
from rose_kernels.backends.base import Backend
from rose_kernels.dtypes import opmath_dtype
from rose_kernels.optim_state import (
    CheckedStates,
    FirstOrderMasks,
    KeptFractions,
    SkipCounter,
    VersionedValues,
    collect_step,
    full_precision_moments,
    new_state,
)
from rose_kernels.types import NONFINITE_POLICIES
from rose_kernels.validation import check_choice, check_group, check_param

# Group keys RoseAdamW adds to those of torch.optim.AdamW; kept across loading an AdamW checkpoint.
_ROSE_GROUP_DEFAULTS = {"rose": True, "warmup_steps": 0, "second_order_scale": None, "correct_bias": True}
# Instance attributes that are configuration, kept by copies and pickles (torch's __getstate__
# keeps only defaults, state and param_groups); the rest is rebuilt empty (_reset_transients).
_CONFIG_ATTRIBUTES = ("rose", "backend", "_skips", "_kept", "_first_order")


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
            ``"unchecked"``: no check and no guarantee, as ``torch.optim.AdamW`` (non-finite values
            reach the parameters and moments; masks scored from them are unspecified). It saves
            the one read that looks only where no score reads the gradients (mode ``off``, and
            ``first``'s step): for users whose clipping or GradScaler already checks.

    The state per parameter has the keys of ``torch.optim.AdamW`` (``step``, ``exp_avg``,
    ``exp_avg_sq``; moments in float32 for bf16/fp16 parameters), so checkpoints move both ways.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | Iterable[tuple[str, torch.Tensor]],
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
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.rose = functional.rose_config(mode, granularity, scope, lower, upper, gamma, thresholds=thresholds,
                                           nonfinite=nonfinite)
        if backend != "auto" and backend not in backends.names():
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(backends.names())} or 'auto'")
        self.backend = backend
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **_ROSE_GROUP_DEFAULTS)
        defaults.update(warmup_steps=warmup_steps, second_order_scale=second_order_scale, correct_bias=correct_bias)
        check_group(defaults)
        self._skips, self._kept, self._first_order = SkipCounter(), KeptFractions(), FirstOrderMasks()
        self._reset_transients()
        super().__init__(params, defaults)

    def _reset_transients(self) -> None:
        """Caches and scratch, rebuilt empty for a new, copied or unpickled optimizer."""
        # Device tensors read by steps captured in CUDA graphs, which replay raw pointers: owned
        # here for as long as the optimizer lives, whatever the backend's caches evict.
        self._graph_keepalive: list[torch.Tensor] = []
        # Device-resident backends' scratch (selection guesses, lr buffer), kept across steps.
        self._workspace: dict = {"graph_keepalive": self._graph_keepalive}
        self._exp_avg_sumsq = VersionedValues()  # ||exp_avg||^2 from the last update, per parameter
        self._checked = CheckedStates()  # state tensors check_state passed
        self._grad_sumsq = VersionedValues()  # ||grad||^2 from clip_grad_norm_, for the next step only

    # -- construction, copies, checkpoints ----------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # a set gets torch's own TypeError
            params = list(params)  # once: a generator is spent by the checks below
        for p in params:
            check_param(p[1] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) else p)
        check_group({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}, params=params)
        super().add_param_group({**param_group, "params": params})

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in _CONFIG_ATTRIBUTES if key in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in _ROSE_GROUP_DEFAULTS.items():
                group.setdefault(key, default)
        if "rose" not in self.__dict__:  # pickled by torch's Optimizer alone: the constructor's defaults
            self.rose, self.backend = functional.rose_config("second", "tensor", "tensor", 0.0, 60.0, 0.5), "auto"
        for key, make in (("_skips", SkipCounter), ("_kept", KeptFractions), ("_first_order", FirstOrderMasks)):
            self.__dict__.setdefault(key, make())
        self._reset_transients()

    def __repr__(self) -> str:
        cfg = self.rose
        return (f"{super().__repr__()[:-1]}ROSE: mode={cfg.mode} granularity={cfg.granularity} scope={cfg.scope} "
                f"[{cfg.lower:g}, {cfg.upper:g}] gamma={cfg.gamma:g} backend={self.backend} "
                f"nonfinite={cfg.nonfinite}\n)")

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a RoseAdamW or ``torch.optim.AdamW`` checkpoint; ROSE group keys missing from the
        checkpoint (an AdamW one) keep this optimizer's values."""
        current = [{k: g[k] for k in _ROSE_GROUP_DEFAULTS} for g in self.param_groups]
        saved_groups = state_dict.get("param_groups", [])
        moments = full_precision_moments(state_dict, self.param_groups)
        super().load_state_dict(state_dict)
        for p, saved in moments.items():
            for key, value in saved.items():
                self.state[p][key] = value.to(device=p.device, dtype=opmath_dtype(p.dtype), copy=True)
        for group, mine, saved in zip(self.param_groups, current, saved_groups, strict=False):
            for key in _ROSE_GROUP_DEFAULTS:
                if key not in saved:
                    group[key] = mine[key]
        for group in self.param_groups:
            check_group(group)
        keepalive = self._graph_keepalive  # graphs captured before may replay
        self._first_order = FirstOrderMasks()
        self._reset_transients()
        self._graph_keepalive = self._workspace["graph_keepalive"] = keepalive

    def state_dict(self) -> dict:
        self._skips.report()
        return super().state_dict()

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
                    self.state[p] = new_state(p)

    # -- the public hooks of the step ---------------------------------------------------------

    def backend_for(self, params: list[torch.Tensor] | None = None) -> Backend:
        """The backend that steps ``params`` (default: every parameter of the optimizer)."""
        if params is None:
            params = [p for g in self.param_groups for p in g["params"]]
        return functional.resolve_backend(self.backend, params)

    def offer_grad_sumsq(self, params: list[torch.Tensor], sums: torch.Tensor) -> None:
        """``sums[i]`` is ``||params[i].grad||^2`` as it is now (from ``rose_kernels.clip_grad_norm_``):
        the next step uses it for every gradient still unchanged instead of reading it again."""
        values = sums.tolist() if sums.device.type == "cpu" else list(sums.unbind())
        self._grad_sumsq.clear()
        for p, value in zip(params, values, strict=True):
            self._grad_sumsq.put(p, p.grad, value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_sumsq.clear()
        super().zero_grad(set_to_none)

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def record_first_order(self) -> None:
        """Scores eligible parameters from their current ``.grad`` (the KL-divergence gradient).

        Call it after ``loss_kl.backward(retain_graph=True)`` and before ``zero_grad()``, the task
        loss backward and :meth:`step`. Only modes ``"first"`` and ``"ensemble"`` use it.
        """
        cfg = self.rose
        if not cfg.uses_first_order:
            raise RuntimeError(
                f"record_first_order() is for mode='first' or 'ensemble'; this optimizer has mode={cfg.mode!r}"
            )
        rows = [(p, g["warmup_steps"]) for g in self.param_groups if g["rose"] for p in g["params"]
                if p.grad is not None]
        params = [p for p, _ in rows]
        reuse = self._first_order.start(params)
        if not rows:
            return
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("RoseAdamW does not support sparse gradients")
        backend = self.backend_for(params)
        record = functional.record_first_order(
            [p.grad for p in params], [self.state[p]["step"] if self.state.get(p) else None for p in params],
            warmup_steps=[w for _, w in rows], granularity=cfg.granularity, scope=cfg.scope, lower=cfg.lower,
            upper=cfg.upper, backend=backend, nonfinite=self._step_policy(), reuse=reuse, workspace=self._workspace,
        )
        del reuse  # the old masks' memory is the new masks' now
        on_device = isinstance(record.nonfinite, torch.Tensor)
        if not on_device and record.nonfinite:
            self._first_order.failed()  # the coming step is skipped (or raises) too
        if self._policy(backend) == "raise" and bool(record.nonfinite):
            if on_device:
                self._first_order.consumed()
            raise RuntimeError("RoseAdamW.record_first_order: non-finite values in the first-order (KL) gradients; "
                               "nothing was recorded (pass nonfinite='skip' to skip such steps instead)")
        if not self._first_order.nonfinite:
            self._first_order.keep(params, record.masks, record.nonfinite if on_device else None)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One masked AdamW step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._first_order_ready():
            return loss
        owners, new_states, columns = collect_step(self.param_groups, self.state, self._checked)
        if not owners:
            self._first_order.consumed()
            return loss
        backend = self.backend_for(owners)
        capturing = backend.capturing(owners[0].device)
        cfg = self.rose
        exp_avgs = columns["exp_avgs"]
        if cfg.uses_first_order:
            columns.update(first_order=[self._first_order.get(p) for p in owners],
                           first_order_nonfinite=self._first_order.flag)
        if self._grad_sumsq:
            columns["grad_sumsq"] = [self._grad_sumsq.get(p, p.grad) for p in owners]
            self._grad_sumsq.clear()  # for this step only
        cached = None
        if self._caches_exp_avg_sums():
            cached = [self._exp_avg_sumsq.get(p, sharded.local(m)) for p, m in zip(owners, exp_avgs, strict=True)]
        result = functional.rose_adamw(
            owners, exp_avg_sumsq=cached,
            mode=cfg.mode, granularity=cfg.granularity, scope=cfg.scope, lower=cfg.lower, upper=cfg.upper,
            gamma=cfg.gamma, backend=backend, nonfinite=self._step_policy(), workspace=self._workspace, **columns,
        )
        self._first_order.consumed()
        self._commit(owners, new_states, columns, result, backend, capturing)
        return loss

    def _caches_exp_avg_sums(self) -> bool:
        """Only the second-order tensor score reads ``||exp_avg||^2``: other modes neither pass nor keep it."""
        return self.rose.uses_second_order and not self.rose.element

    def _first_order_ready(self) -> bool:
        """Modes first/ensemble: whether this step has its record (a non-finite one skips the step)."""
        if not self.rose.uses_first_order:
            return True
        if self._first_order.nonfinite:
            self._first_order.consumed()
            self._on_nonfinite("first-order (KL) gradients recorded for this step", None)
            return False
        if not self._first_order.recorded:
            raise RuntimeError(
                f"mode={self.rose.mode!r} needs first-order scores for every step: call "
                "opt.record_first_order() after loss_kl.backward(retain_graph=True) and before "
                "zero_grad() / loss.backward() / opt.step() (torch.distributed.checkpoint's get_ and "
                "set_optimizer_state_dict call step() on an optimizer without state: call opt.init_state() first)"
            )
        return True

    def _commit(self, owners, new_states, columns, result, backend, capturing) -> None:
        """Takes in what a step returned: new state, kept fractions, cached sums, skip counts."""
        if isinstance(result.nonfinite, torch.Tensor):
            # Device-resident: a non-finite step was already skipped on the device.
            if self._policy(backend) == "raise" and bool(result.nonfinite):
                self._on_nonfinite("gradients", backend)
            self._skips.count_device(result.nonfinite)
        elif result.nonfinite:
            self._on_nonfinite("gradients", backend)
            return
        for p, state in new_states:
            self.state[p] = state
        self._kept.update(owners, columns["eligible"], result.kept, result.nonfinite, result.sharding)
        sums = result.exp_avg_sumsq
        if sums is not None and self._caches_exp_avg_sums():
            for p, m, value in zip(owners, columns["exp_avgs"], sums, strict=True):
                self._exp_avg_sumsq.put(p, sharded.local(m), value)
        if capturing:
            # What the captured step wrote or read of ours that a later step replaces (the buffer on
            # a new parameter set, the cached sums, the counter on a new device) stays ours.
            for t in (self._kept.values, sums, result.nonfinite, self._skips.on_device):
                if isinstance(t, torch.Tensor) and not any(t is held for held in self._graph_keepalive):
                    self._graph_keepalive.append(t)

    # -- non-finite steps ---------------------------------------------------------------------

    def _step_policy(self) -> str:
        """What functional's calls do on non-finite gradients: look and tell (then this class decides),
        or not look at all."""
        return "unchecked" if self.rose.nonfinite == "unchecked" else "skip"

    def _policy(self, backend: Backend | None) -> str:
        if self.rose.nonfinite != "auto":
            return self.rose.nonfinite
        return "skip" if backend is not None and backend.device_resident else "raise"

    def _on_nonfinite(self, what: str, backend: Backend | None) -> None:
        message = "RoseAdamW: " + functional.NONFINITE_MESSAGE.format(what=what)
        if self._policy(backend) == "raise":
            raise RuntimeError(message + functional.NONFINITE_HINT)
        self._skips.skipped_on_host(message)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it waits for the device, if any).

        A plain read: unlike :meth:`check` it neither warns nor marks device skips as reported."""
        return self._skips.total()

    def check(self) -> int:
        """Steps skipped for non-finite gradients so far (one read of the device, if any).

        Steps skipped on the device (GPU backends: the step never waits to find out) are reported
        here, by one RuntimeWarning for all those since the last check; :meth:`mask_stats` and
        :meth:`state_dict` do the same. Steps skipped on the host warned when they happened."""
        return self._skips.on_host + self._skips.report()

    # -- introspection ------------------------------------------------------------------------

    def mask_stats(self) -> dict[str, float]:
        """Kept fraction (mean mask value) of each eligible parameter at the last step.

        Keys are the group's ``param_names`` when given (as :func:`rose_param_groups` does, or
        torch's ``(name, tensor)`` pairs), else ``"<group index>.<param index>"``. With sharded
        (FSDP2) parameters each rank holds its shard's share, and this call adds them up: a
        collective, to be called on every rank.
        """
        return self._kept.read(self.param_groups, self._skips)
