"""What RoseAdamW keeps besides ``self.state``: per-parameter state creation and checks, sums cached
for one tensor version, the count of skipped steps, and the kept fractions of the last step.

Each piece is small and has one owner (the optimizer); they live here so that the class reads as
checks, state, groups and checkpoints around ``rose_kernels.functional``.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

from rose_kernels.backends import sharded
from rose_kernels.dtypes import opmath_dtype
from rose_kernels.validation import check_grad, check_group


def new_state(p: torch.Tensor) -> dict:
    """The state of a parameter before its first step (a DTensor parameter gets DTensor moments,
    sharded like it, which torch.distributed.checkpoint saves and reshards)."""
    moment = dict(dtype=opmath_dtype(p.dtype), memory_format=torch.contiguous_format)
    return {
        # On the parameter's device for GPUs (as torch's fused AdamW keeps it).
        "step": torch.zeros((), dtype=torch.float32, device=p.device),
        "exp_avg": torch.zeros_like(p, **moment),
        "exp_avg_sq": torch.zeros_like(p, **moment),
    }


def check_state(p: torch.Tensor, state: dict) -> None:
    """Raises on state that does not fit its parameter; makes moments contiguous and moves the step
    counter to the parameter's device as float32 (once, e.g. after loading an AdamW checkpoint)."""
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
        state["step"] = step.to(device=p.device, dtype=torch.float32)


# rose_adamw's per-parameter arguments, from each param group's keys.
_GROUP_COLUMNS = (("lr", "lr"), ("eps", "eps"), ("weight_decay", "weight_decay"), ("warmup_steps", "warmup_steps"),
                  ("second_order_scale", "second_order_scale"), ("correct_bias", "correct_bias"), ("eligible", "rose"))


class CheckedStates:
    """The state tensors of each parameter as they were when :func:`check_state` last passed them:
    while a state dict still holds those very tensors, the next step does not check them again (the
    check was ~40% of a 100-tensor step's Python time). Nothing can be skipped that matters: the
    kernels check every tensor's size, dtype and device again before they change anything."""

    def __init__(self) -> None:
        self._entries: dict[torch.Tensor, tuple] = {}

    def check(self, p: torch.Tensor, state: dict) -> None:
        seen = self._entries.get(p)
        if (seen is not None and seen[0]() is state.get("exp_avg") and seen[1]() is state.get("exp_avg_sq")
                and seen[2]() is state.get("step")):
            return
        check_state(p, state)
        # Weak: a state the user drops must not stay alive here.
        self._entries[p] = (weakref.ref(state["exp_avg"]), weakref.ref(state["exp_avg_sq"]), weakref.ref(state["step"]))

    def clear(self) -> None:
        self._entries = {}

    def __getstate__(self) -> dict:
        return {"_entries": {}}  # checked again after a copy or unpickling


def collect_step(param_groups: list[dict], states: dict,
                 checked: CheckedStates | None = None) -> tuple[list, list, dict[str, list]]:
    """Checks every group and gradient, then gathers a step's tensors and per-parameter settings
    (``rose_kernels.functional.rose_adamw``'s arguments); changes nothing. Returns the parameters
    with gradients, the state made for those seen for the first time (to commit only once the step
    went through), and the arguments. ``checked``: the states already checked (else all are)."""
    owners, new_states = [], []
    grads, exp_avgs, exp_avg_sqs, state_steps = [], [], [], []
    columns = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "state_steps": state_steps,
               "beta1": [], "beta2": [], **{name: [] for name, _ in _GROUP_COLUMNS}}
    check = check_state if checked is None else checked.check
    for group in param_groups:
        check_group(group, at_step=True)
        with_grads = [p for p in group["params"] if p.grad is not None]
        for p in with_grads:
            grad = p.grad
            check_grad(p, grad)
            state = states.get(p)
            if not state:
                state = new_state(p)
                new_states.append((p, state))
            else:
                check(p, state)
            owners.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
        k = len(with_grads)
        for name, key in _GROUP_COLUMNS:
            columns[name].extend([group[key]] * k)
        columns["beta1"].extend([group["betas"][0]] * k)
        columns["beta2"].extend([group["betas"][1]] * k)
    return owners, new_states, columns


def full_precision_moments(state_dict: dict, param_groups: list[dict]) -> dict[torch.Tensor, dict]:
    """The float32 moments of bf16/fp16 parameters in a checkpoint, taken before torch's loader casts
    them to the parameter's dtype (which would lose their precision)."""
    saved_state = state_dict.get("state", {})
    moments = {}
    for saved, group in zip(state_dict.get("param_groups", []), param_groups, strict=False):
        for saved_id, p in zip(saved["params"], group["params"], strict=False):
            if opmath_dtype(p.dtype) != p.dtype and saved_id in saved_state:
                moments[p] = {k: v for k, v in saved_state[saved_id].items()
                              if k in ("exp_avg", "exp_avg_sq") and isinstance(v, torch.Tensor)}
    return moments


class VersionedValues:
    """A value per parameter that holds only while a given tensor is the same object, unchanged
    (identity and version counter): the cached ``||exp_avg||^2`` and the clipping's ``||grad||^2``."""

    def __init__(self) -> None:
        self._entries: dict[torch.Tensor, tuple[weakref.ref, int, Any]] = {}

    def put(self, p: torch.Tensor, tensor: torch.Tensor, value: Any) -> None:
        self._entries[p] = (weakref.ref(tensor), tensor._version, value)

    def get(self, p: torch.Tensor, tensor: torch.Tensor | None) -> Any:
        """The value stored for ``p`` if ``tensor`` is still the tensor it was stored with, unchanged."""
        entry = self._entries.get(p)
        if entry is None or tensor is None:
            return None
        ref, version, value = entry
        if ref() is not tensor or tensor._version != version:
            return None  # replaced or changed in place since
        return value

    def clear(self) -> None:
        self._entries = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __getstate__(self) -> dict:
        return {"_entries": {}}  # weak references neither pickle nor outlive a copy: recomputed


class SkipCounter:
    """Steps skipped for non-finite gradients: counted on the host, or on the device (GPU backends,
    where the step never waits to find out) and reported by one warning at the next read."""

    def __init__(self) -> None:
        self.on_host = 0
        self.on_device: torch.Tensor | None = None
        self.reported = 0  # value of on_device at the last report

    def total(self) -> int:
        """A plain read (waits for the device, if any); neither warns nor marks anything reported."""
        return self.on_host + (0 if self.on_device is None else int(self.on_device))

    def skipped_on_host(self, message: str) -> None:
        self.on_host += 1
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def count_device(self, flag: torch.Tensor) -> None:
        counter = self.on_device
        if counter is None:
            self.on_device = torch.zeros((), dtype=torch.int64, device=flag.device)
        elif counter.device != flag.device:
            self.on_device = counter.to(flag.device)  # keeps the count (and what was reported)
        self.on_device.add_(flag)  # in place: a replayed CUDA graph keeps counting

    def report(self, count: int | None = None) -> int:
        """The device's skip count (``count``: already read), warning once about the new ones."""
        if self.on_device is None:
            return 0
        if count is None:
            count = int(self.on_device)
        new = count - self.reported
        self.reported = count
        if new > 0:
            warnings.warn(
                f"RoseAdamW: {new} step{'s were' if new > 1 else ' was'} skipped on the device since the last "
                "check (non-finite gradients); no parameter or state changed in "
                f"{'them' if new > 1 else 'it'}",
                RuntimeWarning, stacklevel=4,
            )
        return count


class KeptFractions:
    """The kept fraction of every eligible parameter at the last step, as the backend returned it
    (host floats, or one device tensor read only when asked)."""

    def __init__(self) -> None:
        self.positions: dict[torch.Tensor, int] = {}  # parameter -> position in values
        self.values: list[float] | torch.Tensor = []
        self.sharding = None  # sharded parameters: values are this shard's sums of mask values

    def update(self, owners: list[torch.Tensor], eligible: list[bool], values, nonfinite, sharding) -> None:
        positions = {p: i for i, p in enumerate(owners) if eligible[i]}
        old = self.values
        if (isinstance(values, torch.Tensor) and positions == self.positions and isinstance(old, torch.Tensor)
                and (old.shape, old.dtype, old.device) == (values.shape, values.dtype, values.device)):
            # Written in place, not replaced: a captured step then reads and writes this buffer on
            # every replay, so a replayed skipped step keeps the fractions of the step before it
            # (as on the host), and the graph never reads a tensor that a later step drops.
            if isinstance(nonfinite, torch.Tensor):
                values = torch.where(nonfinite, old, values)
            values = old.copy_(values)
        self.positions = positions
        self.values = values
        self.sharding = sharding

    def read(self, param_groups: list[dict], skips: SkipCounter) -> dict[str, float]:
        """``{name: fraction}`` (one read of the device, with the skip counter, which is reported)."""
        values = self.values
        counter = skips.on_device
        if self.sharding is not None and len(values):
            # Each rank holds its shard's sums of mask values: one all-reduce (a collective call).
            values = self.sharding.kept_fractions(torch.as_tensor(values))
        if isinstance(values, torch.Tensor):
            if counter is not None and counter.device == values.device:
                read = torch.cat([values.to(torch.float64), counter.reshape(1).to(torch.float64)]).tolist()
                values = read[:-1]
                skips.report(int(read[-1]))
            else:
                values = values.tolist()
                skips.report()
        else:
            skips.report()
        stats = {}
        for gi, group in enumerate(param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                if p in self.positions:
                    stats[names[pi] if names else f"{gi}.{pi}"] = values[self.positions[p]]
        return stats


class FirstOrderMasks:
    """The first-order masks recorded for the coming step (modes first/ensemble), by parameter."""

    def __init__(self) -> None:
        self.masks: dict[torch.Tensor, Any] | None = None  # None: nothing recorded since the last step
        self.nonfinite = False  # the record found non-finite KL gradients (on the host)
        self.flag: torch.Tensor | None = None  # the same verdict on the device, read by the update
        self._buffers: dict[torch.Tensor, Any] = {}  # the last masks, whose memory a record reuses

    def get(self, p: torch.Tensor) -> Any:
        return None if self.masks is None else self.masks.get(p)

    @property
    def recorded(self) -> bool:
        return self.masks is not None or self.nonfinite

    def start(self, params: list[torch.Tensor]) -> list:
        """Forgets the current record; returns the old masks of ``params``, for their buffers."""
        previous = self.masks or self._buffers
        self.masks, self.nonfinite, self.flag, self._buffers = {}, False, None, {}
        return [previous.get(p) for p in params]

    def keep(self, params: list[torch.Tensor], masks: list, flag: torch.Tensor | None) -> None:
        self.masks = self._buffers = {p: m for p, m in zip(params, masks, strict=True) if m is not None}
        self.flag = flag

    def failed(self) -> None:
        """The record's KL gradients were not finite (host): the coming step is skipped."""
        self.masks, self.nonfinite = None, True

    def consumed(self) -> None:
        self.masks, self.nonfinite, self.flag = None, False, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_buffers": {}}
