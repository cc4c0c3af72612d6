"""Multi-tensor launch tables: which block of which tensor each Triton program handles.

A kernel over many tensors gets, instead of one launch per tensor, a flat table built once:
``block_tensor[b]`` (the tensor of program ``b``), ``block_start[b]`` (its first element) and
``first_block[t]`` (where tensor ``t``'s blocks start, for per-tensor reductions), plus one int64
address table per tensor role (params, grads, ...). Kernels cast those addresses back to typed
pointers. Block tables depend only on the tensors' sizes and are cached by them; address tables are
cached by the addresses, so a step whose tensors did not move (static gradients, CUDA graphs)
copies nothing to the device.

Nothing here reads device memory: building a table is host work plus one non-blocking copy from
pinned memory. During CUDA-graph capture a missing table is an error (a host-to-device copy
captured into a graph would replay from a host buffer that is gone by then).

A captured graph replays raw device pointers, but the caches here evict (and so free) their
tables. Inside :func:`keep_alive`, every table handed out while a graph is being captured is also
appended to the caller's list (the optimizer's), which then owns it for as long as the graph may
be replayed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_CACHE_LIMIT = 256


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set by ``aot.compile_only``: kernels are compiled for a GPU target (not run) while the backend is
# driven with CPU tensors, with the GPU's block sizes, so every launch of a real step is compiled.
COMPILE_ONLY = False


def on_host() -> bool:
    """Whether the backend accepts CPU tensors: interpreted kernels, or compile-only launches."""
    return interpreting() or COMPILE_ONLY


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


_blocks = _LRU()
_addresses = _LRU()
_constants = _LRU()


def capturing(device: torch.device) -> bool:
    """Whether work issued for ``device`` now is being captured into a CUDA graph (the one place
    that decides it; tests patch it to exercise the capture paths on the CPU)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


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
        elif isinstance(t, BlockTable):
            stack.extend((t.block_tensor, t.block_start, t.first_block))
        elif isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            sink.append(t)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, without a host synchronisation."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    if capturing(device):
        raise RuntimeError(
            "rose_kernels (triton): a launch table is missing while a CUDA graph is being captured; "
            "run at least one eager step with the same tensors and hyper-parameters before capturing"
        )
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


@dataclass(frozen=True)
class BlockTable:
    """Programs of a launch over tensors of the given sizes, ``block`` elements each."""

    block: int
    num_blocks: int
    block_tensor: torch.Tensor  # int32 [num_blocks]
    block_start: torch.Tensor  # int64 [num_blocks]
    first_block: torch.Tensor  # int64 [n + 1]
    most_blocks: int  # of any one tensor


def block_table(numels: tuple[int, ...], block: int, device: torch.device, *, empty_gets_block: bool = False
                ) -> BlockTable:
    """The block map of tensors with ``numels`` elements.

    ``empty_gets_block`` gives every empty tensor one program too (the update kernel uses it to
    advance the step counter of an empty parameter, as torch's AdamW does).
    """
    key = (device, numels, block, empty_gets_block)
    cached = _blocks.lookup(key)
    if cached is not None:
        hold(cached)
        return cached
    tensor_of, starts, first = [], [], [0]
    for t, n in enumerate(numels):
        count = -(-n // block) if n else int(empty_gets_block)
        tensor_of.extend([t] * count)
        starts.extend(range(0, count * block, block))
        first.append(first[-1] + count)
    table = BlockTable(
        block=block,
        num_blocks=len(tensor_of),
        block_tensor=to_device(tensor_of, torch.int32, device),
        block_start=to_device(starts, torch.int64, device),
        first_block=to_device(first, torch.int64, device),
        most_blocks=max((b - a for a, b in zip(first, first[1:], strict=False)), default=0),
    )
    hold(table)
    return _blocks.store(key, table)


def addresses(*roles: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """int64 ``[len(roles), n]``: the data pointer of each tensor of each role (0 for None)."""
    pointers = tuple(tuple(0 if t is None else t.data_ptr() for t in role) for role in roles)
    key = (device, pointers)
    cached = _addresses.lookup(key)
    if cached is None:
        cached = _addresses.store(key, to_device([list(p) for p in pointers], torch.int64, device))
    hold(cached)
    return cached


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


# Elements and warps per program on the GPU. 8 warps of 8 elements per thread (2048-element
# blocks; 4096 for the plain sums) compile without a spill for every variant, float64 included
# (bench/results/triton-aot-*.md); the first choice, 8192/4096 elements on 4 warps (32-64 per
# thread), spilled up to 4.8 KB per thread in the float64 update and the element SELECT.
# Interpreted, every program costs ~1 ms of Python, so large pools get large blocks.
_GPU_BLOCKS = {"reduce": 4096, "select": 2048, "update": 2048}
_GPU_WARPS = {"reduce": 8, "select": 8, "update": 8}


def block_size(kind: str, total_elements: int, dtype: torch.dtype | None = None) -> int:
    if interpreting() and not COMPILE_ONLY:
        return 1024 if total_elements <= (1 << 21) else 1 << 16
    if kind == "select" and dtype == torch.float64:
        return _GPU_BLOCKS[kind] // 2  # float64 scores, keys and the moments' check: 2048 spilled 4 B
    return _GPU_BLOCKS[kind]


def warps(kind: str) -> int:
    """``num_warps`` of a launch of this kind (the interpreter ignores it)."""
    return _GPU_WARPS[kind]


TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Positions of the tensors grouped by dtype: one launch per dtype (pointers are typed)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def put(out: torch.Tensor, index: list[int], values: torch.Tensor) -> None:
    """``out[index] = values`` (rows of one dtype group back into the whole): a plain copy when the
    group is everything, in order."""
    if len(index) == out.shape[0]:
        out.copy_(values)
    else:
        out[constant(tuple(index), torch.int64, out.device)] = values


def aligned_addresses(tensors: list[torch.Tensor | None]) -> bool:
    """Whether every tensor starts on a 16-byte boundary (what ``typed_pointer``'s ALIGNED promises).
    Fresh allocations do; a view into a flat buffer may not, and then its launch loads element-wise."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


@triton.jit
def block_elements(block_tensor, block_start, numels, BLOCK: tl.constexpr):
    """This program's block of a multi-tensor launch (block_table): (block, tensor, first
    element, element offsets, offsets inside the tensor, whether the whole block is inside).

    Block starts are multiples of BLOCK; the hint lets the compiler vectorise the loads of a full
    block (a mask against a length loaded from memory would keep them scalar)."""
    b = tl.program_id(0)
    t = tl.load(block_tensor + b)
    start = tl.multiple_of(tl.load(block_start + b), BLOCK)
    n = tl.load(numels + t)
    lanes = tl.arange(0, BLOCK)
    # The tail test in 32 bits (a 64-bit compare per element costs two instructions or more).
    inside = lanes < tl.minimum(n - start, BLOCK).to(tl.int32)
    return b, t, start, start + lanes.to(tl.int64), inside, start + BLOCK <= n


@triton.jit
def typed_pointer(addresses, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s pointer from an address table. ALIGNED: every address of the launch is a
    multiple of 16 bytes (checked on the host, ``aligned_addresses``), so full blocks load 16 bytes
    per instruction. The hint must sit on the pointer made from the integer: on the integer (or on
    a function argument) the compiler loses it and every load stays 4 bytes wide."""
    pointer = tl.load(addresses + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def load_block(ptr, offs, inside, full):
    """The block's values (0 outside the tensor): unmasked, hence vectorised, when the block is full."""
    if full:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=inside, other=0)
    return x


@triton.jit
def store_block(ptr, offs, value, inside, full):
    if full:
        tl.store(ptr + offs, value)
    else:
        tl.store(ptr + offs, value, mask=inside)
