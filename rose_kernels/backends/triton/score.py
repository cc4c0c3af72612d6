"""SCORE on the GPU: multi-tensor sums of squares and the 1-bit first-order element mask.

Both are one launch over the blocks of every tensor (``tables.block_table``) followed by a
per-tensor reduction of the block partials in block order, so results are deterministic (no float
atomics) and a tensor of any size is summed in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rose_kernels.backends.triton import tables
from rose_kernels.backends.triton.rose_math import in_bounds
from rose_kernels.dtypes import opmath_dtype
from rose_kernels.ops import schema_of


@triton.jit
def _block_sumsq_kernel(block_tensor, block_start, numels, addrs, partials,
                        DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    b, t, _, offs, inside, full = tables.block_elements(block_tensor, block_start, numels, BLOCK)
    x = tables.load_block(tables.typed_pointer(addrs, t, DTYPE, ALIGNED), offs, inside, full).to(tl.float64)
    tl.store(partials + b, tl.sum(x * x, axis=0))


@triton.jit
def segment_sum_kernel(partials, first_block, out, COLUMNS: tl.constexpr, CHUNK: tl.constexpr,
                       CHUNKS: tl.constexpr):
    """``out[t, :] = sum of partials[first_block[t]:first_block[t + 1], :]``, in block order.

    ``CHUNKS`` (the most blocks any tensor has, in CHUNKs) bounds the loop: the Triton interpreter
    (with numpy 2) cannot loop to a bound that is a tensor, loaded or passed."""
    t = tl.program_id(0)
    lo = tl.load(first_block + t)
    hi = tl.load(first_block + t + 1)
    cols = tl.arange(0, COLUMNS)
    acc = tl.zeros((CHUNK, COLUMNS), dtype=tl.float64)
    for c in range(0, CHUNKS):
        rows = lo + c * CHUNK + tl.arange(0, CHUNK).to(tl.int64)
        acc += tl.load(partials + rows[:, None] * COLUMNS + cols[None, :], mask=(rows < hi)[:, None], other=0.0)
    tl.store(out + t * COLUMNS + cols, tl.sum(acc, axis=0))


def segment_sum(partials: torch.Tensor, blocks: tables.BlockTable, n: int) -> torch.Tensor:
    """Per-tensor sums ``[n, columns]`` of per-block partials ``[num_blocks, columns]``."""
    columns = partials.shape[1]
    out = torch.empty((n, columns), dtype=torch.float64, device=partials.device)
    if n:
        chunk = 256
        # A power of two: a new model size seldom means a new compile of this loop.
        chunks = 1 << max(0, -(-blocks.most_blocks // chunk) - 1).bit_length()
        segment_sum_kernel[(n,)](partials, blocks.first_block, out, COLUMNS=columns, CHUNK=chunk, CHUNKS=chunks)
    return out


@triton.jit
def _first_order_bits_kernel(block_tensor, block_start, numels, g_addrs, bit_addrs, bounds, partials,
                             DTYPE: tl.constexpr, OPMATH: tl.constexpr, ALIGNED: tl.constexpr,
                             BLOCK: tl.constexpr):
    b, t, start, offs, inside, full = tables.block_elements(block_tensor, block_start, numels, BLOCK)
    n = tl.load(numels + t)
    g = tables.load_block(tables.typed_pointer(g_addrs, t, DTYPE, ALIGNED), offs, inside, full)
    s = tl.abs(g.to(OPMATH)).to(tl.float64)
    lo = tl.load(bounds + 2 * t)
    hi = tl.load(bounds + 2 * t + 1)
    keep = inside & in_bounds(s, lo, hi)
    lanes = tl.reshape(keep.to(tl.int32), (BLOCK // 8, 8)) << tl.arange(0, 8)[None, :]
    packed = tl.sum(lanes, axis=1)
    byte = start // 8 + tl.arange(0, BLOCK // 8).to(tl.int64)
    bits_ptr = tl.load(bit_addrs + t).to(tl.pointer_type(tl.uint8))
    tl.store(bits_ptr + byte, packed.to(tl.uint8), mask=byte < (n + 7) // 8)
    tl.store(partials + b, tl.sum(keep.to(tl.float64), axis=0))


def _numels(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return tables.constant(tuple(t.numel() for t in tensors), torch.int64, device)


@torch.library.custom_op(
    "rose_triton::sumsq", mutates_args=(), schema=schema_of("sumsq")
)
def sumsq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor sums of squares in float64; a non-finite value makes its tensor's sum non-finite."""
    device = tensors[0].device
    with tables.device_guard(device):  # launches go to the current device, not to the tensors'
        return _sumsq(tensors, device)


def _sumsq(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    for dtype, index in tables.by_dtype(tensors).items():
        group = [tensors[i] for i in index]
        numels = tuple(t.numel() for t in group)
        blocks = tables.block_table(numels, tables.block_size("reduce", sum(numels)), device)
        partials = torch.empty((blocks.num_blocks, 1), dtype=torch.float64, device=device)
        if blocks.num_blocks:
            _block_sumsq_kernel[(blocks.num_blocks,)](
                blocks.block_tensor, blocks.block_start, _numels(group, device),
                tables.addresses(group, device=device), partials,
                DTYPE=tables.TL_DTYPES[dtype], ALIGNED=tables.aligned_addresses(group), BLOCK=blocks.block,
                num_warps=tables.warps("reduce"),
            )
        tables.put(out, index, segment_sum(partials, blocks, len(group))[:, 0])
    return out


@sumsq.register_fake
def _(tensors):
    return tensors[0].new_empty((len(tensors),), dtype=torch.float64)


@torch.library.custom_op(
    "rose_triton::first_order_mask_", mutates_args=("masks",), schema=schema_of("first_order_mask_")
)
def first_order_mask_(grads: list[torch.Tensor], bounds: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Writes ``lo <= |g| <= hi`` as one bit per element (element ``i``: byte ``i // 8``, bit
    ``i % 8``); ``bounds`` is float64 ``[n, 2]`` on the device. Returns the kept count per tensor."""
    device = grads[0].device
    with tables.device_guard(device):  # launches go to the current device, not to the tensors'
        return _first_order_mask(grads, bounds, masks, device)


def _first_order_mask(grads: list[torch.Tensor], bounds: torch.Tensor, masks: list[torch.Tensor],
                      device: torch.device) -> torch.Tensor:
    if bounds.shape != (len(grads), 2) or bounds.dtype != torch.float64:
        raise ValueError(f"bounds must be float64 of shape ({len(grads)}, 2), got {bounds.dtype} {tuple(bounds.shape)}")
    for g, m in zip(grads, masks, strict=True):
        if m.dtype != torch.uint8 or m.numel() != (g.numel() + 7) // 8 or not m.is_contiguous():
            raise ValueError("each mask must be a contiguous uint8 tensor of ceil(numel / 8) bytes")
    out = torch.empty(len(grads), dtype=torch.float64, device=device)
    bounds = bounds.contiguous()
    for dtype, index in tables.by_dtype(grads).items():
        group = [grads[i] for i in index]
        numels = tuple(t.numel() for t in group)
        blocks = tables.block_table(numels, tables.block_size("reduce", sum(numels)), device)
        partials = torch.empty((blocks.num_blocks, 1), dtype=torch.float64, device=device)
        whole = len(index) == len(grads)
        group_bounds = bounds if whole else bounds[tables.constant(tuple(index), torch.int64, device)]
        if blocks.num_blocks:
            _first_order_bits_kernel[(blocks.num_blocks,)](
                blocks.block_tensor, blocks.block_start, _numels(group, device),
                tables.addresses(group, device=device), tables.addresses([masks[i] for i in index], device=device),
                group_bounds, partials,
                DTYPE=tables.TL_DTYPES[dtype], OPMATH=tables.TL_DTYPES[opmath_dtype(dtype)],
                ALIGNED=tables.aligned_addresses(group), BLOCK=blocks.block, num_warps=tables.warps("reduce"),
            )
        tables.put(out, index, segment_sum(partials, blocks, len(group))[:, 0])
    return out


@first_order_mask_.register_fake
def _(grads, bounds, masks):
    return grads[0].new_empty((len(grads),), dtype=torch.float64)
