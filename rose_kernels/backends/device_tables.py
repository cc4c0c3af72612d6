"""Device-side tables of the fused backends (cpu, cuda, triton): small tensors of host values that
rarely change, cached by value, and the bookkeeping that keeps them alive for CUDA graphs.

Nothing here reads device memory: a table is host work plus one non-blocking copy from pinned
memory. During CUDA-graph capture a missing table is an error (a host-to-device copy captured into
a graph would replay from a host buffer that is gone by then).

A captured graph replays raw device pointers, but the caches here evict (and so free) their
tables. Inside :func:`keep_alive`, every table handed out while a graph is being captured is also
appended to the caller's list (the optimizer's), which then owns it for as long as the graph may
be replayed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

import torch

_CACHE_LIMIT = 256


class _LRU(OrderedDict):
    def lookup(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def store(self, key, value):
        self[key] = value
        if len(self) > _CACHE_LIMIT:
            self.popitem(last=False)
        return value


_constants = _LRU()


def capturing(device: torch.device) -> bool:
    """Whether work issued for ``device`` now is being captured into a CUDA graph (the one place
    that decides it; tests patch it to exercise the capture paths on the CPU). It asks about
    ``device``'s current stream, which is not the current device's when the tensors live on
    another GPU."""
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def device_guard(device: torch.device) -> AbstractContextManager:
    """``device`` as the current CUDA device inside (a null context for other devices): launches
    that go to the current device (Triton kernels, CUDA events, the current stream) then go to the
    tensors' GPU, also when it is not the current one (parameters on cuda:1, current device cuda:0).
    Making the guard does not initialise CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


# The active keep-alive list and the ids already in it, or None outside a capture.
_sink: ContextVar[tuple[list, set[int]] | None] = ContextVar("rose_kernels_keep_alive", default=None)


@contextmanager
def keep_alive(sink: list | None, device: torch.device) -> Iterator[None]:
    """While a graph is captured on ``device``: every tensor handed out here (and passed to
    :func:`hold`) is appended to ``sink`` once. Outside a capture nothing is recorded."""
    active = (sink, {id(t) for t in sink}) if sink is not None and capturing(device) else None
    token = _sink.set(active)
    try:
        yield
    finally:
        _sink.reset(token)


def hold(*tensors) -> None:
    """Inside a capturing :func:`keep_alive`: the tensors (None, lists and block tables allowed) are
    owned by its list from now on. A no-op otherwise."""
    active = _sink.get()
    if active is None:
        return
    sink, seen = active
    stack = list(tensors)
    while stack:
        t = stack.pop()
        if isinstance(t, (list, tuple)):
            stack.extend(t)
        elif hasattr(t, "held_tensors"):  # e.g. a Triton launch table
            stack.extend(t.held_tensors())
        elif isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            sink.append(t)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, without a host synchronisation."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    if capturing(device):
        raise RuntimeError(
            "rose_kernels: a launch table is missing while a CUDA graph is being captured; "
            "run at least one eager step with the same tensors and hyper-parameters before capturing"
        )
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


# The NaN to put in constant() values. NaN != NaN, so a key holding a fresh float("nan") never
# matches its cache entry (a new entry and a host-to-device copy every call); this one object does.
NAN = float("nan")


def constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached device tensor of host values that rarely change (hyper-parameters, flags); NaNs
    must be :data:`NAN`."""
    key = (device, dtype, values)
    cached = _constants.lookup(key)
    if cached is None:
        cached = _constants.store(key, to_device(list(values), dtype, device))
    hold(cached)
    return cached
