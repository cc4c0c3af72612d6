"""Multi-tensor launch tables: which block of which tensor each Triton program handles.

A kernel over many tensors gets, instead of one launch per tensor, a flat table built once:
``block_tensor[b]`` (the tensor of program ``b``), ``block_start[b]`` (its first element) and
``first_block[t]`` (where tensor ``t``'s blocks start, for per-tensor reductions), plus one int64
address table per tensor role (params, grads, ...). Kernels cast those addresses back to typed
pointers. Block tables depend only on the tensors' sizes and are cached by them; address tables are
cached by the addresses, so a step whose tensors did not move (static gradients, CUDA graphs)
copies nothing to the device.

Tables are device tensors made and cached by ``rose_kernels.backends.device_tables`` (its
``to_device``, ``hold`` and ``keep_alive`` rules apply: nothing read on the device, an error for a
missing table during CUDA-graph capture, everything a captured graph reads kept alive).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The host-side caches and capture bookkeeping shared with the other fused backends.
from rose_kernels.backends.device_tables import (  # noqa: F401  (re-exported for the kernels' modules)
    _LRU,
    NAN,
    capturing,
    constant,
    device_guard,
    hold,
    keep_alive,
    to_device,
)


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set by ``compile_only`` in tools/triton_aot.py: kernels are compiled for a GPU target (not run)
# while the backend is driven with CPU tensors, with the GPU's block sizes, so every launch of a
# real step is compiled.
COMPILE_ONLY = False


def on_host() -> bool:
    """Whether the backend accepts CPU tensors: interpreted kernels, or compile-only launches."""
    return interpreting() or COMPILE_ONLY


# Constexprs that size a launch rather than choose code: the interpreter uses other values.
SIZE_CONSTEXPRS = ("BLOCK", "CHUNK", "CHUNKS")


def _describe(value) -> str:
    """The type of one kernel argument, as specialization sees it."""
    if isinstance(value, torch.Tensor):
        return f"*{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return repr(value)


def variant_key(fn, args: tuple, kwargs: dict) -> str:
    """What decides a kernel's code: its name, argument types and code-choosing constexprs. The
    same key is computed for interpreted launches (tests/conftest.py records them) and compiled
    ones (tools/triton_aot.py), so the tests can check that every interpreted variant compiles."""
    names = list(fn.arg_names)
    bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
    parts = []
    for name in names:
        if name in SIZE_CONSTEXPRS or name not in bound:
            continue
        value = bound[name]
        parts.append(f"{name}={value!r}" if name.isupper() else f"{name}:{_describe(value)}")
    return f"{fn.fn.__name__}({', '.join(parts)})"


_blocks = _LRU()
_addresses = _LRU()


@dataclass(frozen=True)
class BlockTable:
    """Programs of a launch over tensors of the given sizes, ``block`` elements each."""

    block: int
    num_blocks: int
    block_tensor: torch.Tensor  # int32 [num_blocks]
    block_start: torch.Tensor  # int64 [num_blocks]
    first_block: torch.Tensor  # int64 [n + 1]
    most_blocks: int  # of any one tensor

    def held_tensors(self) -> tuple[torch.Tensor, ...]:
        """What a captured graph reads of this table (device_tables.hold keeps them alive)."""
        return (self.block_tensor, self.block_start, self.first_block)


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
