"""UPDATE on the GPU: the masked AdamW step (semantics.md section 5) for many tensors per launch.

One program per block of one tensor (``tables.block_table``); each program derives its tensor's
coefficients (bias corrections from the step counter, warm-up, the uniform mask) in float64 from a
small per-tensor table, then streams p, g, m, v once. Mask values per element come from the 1-bit
first-order mask and/or the second-order score recomputed inline from g and m against the pool's
thresholds, so no mask is ever materialised. A set ``found`` flag (non-finite gradients) turns the
whole launch into a no-op, step counters included: that is the skip, decided on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rose_kernels.backends.triton import tables
from rose_kernels.backends.triton.rose_math import element_score, in_bounds, precise_div, precise_sqrt
from rose_kernels.backends.triton.score import segment_sum
from rose_kernels.dtypes import opmath_dtype
from rose_kernels.ops import HYPER_COLUMNS, MASK_COLUMNS, schema_of

_H = len(HYPER_COLUMNS)


@triton.jit
def _masked_adamw_kernel(block_tensor, block_start, numels, p_addrs, g_addrs, m_addrs, v_addrs, bit_addrs,
                         step_addrs, steps, step_sizes, hyper, masks, found, partials,
                         P_DTYPE: tl.constexpr, OPMATH: tl.constexpr, ELEMENT: tl.constexpr,
                         H: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    b, t, start, offs, inside, full = tables.block_elements(block_tensor, block_start, numels, BLOCK)
    m_ptr = tables.typed_pointer(m_addrs, t, OPMATH, ALIGNED)
    if tl.load(found) != 0:
        # Skipped: nothing is written; report NaN kept and the unchanged ||m||^2 (the next step's
        # tensor score reads it from the optimizer's cache).
        m_old = tables.load_block(m_ptr, offs, inside, full).to(tl.float64)
        tl.store(partials + 2 * b, float("nan"))
        tl.store(partials + 2 * b + 1, tl.sum(m_old * m_old, axis=0))
        return

    row = hyper + t * H
    lr = tl.load(row + 0)
    beta1 = tl.load(row + 1)
    beta2 = tl.load(row + 2)
    eps = tl.load(row + 3)
    weight_decay = tl.load(row + 4)
    warmup = tl.load(row + 6)
    w1 = tl.load(row + 7)
    w2 = tl.load(row + 8)
    element_second = tl.load(row + 9)
    scale = tl.load(row + 10)
    step = tl.load(steps + t).to(tl.float64) + 1.0
    step_size = tl.load(step_sizes + t)
    warm = step <= warmup
    mu1_uniform = tl.load(masks + 4 * t)
    mu2_uniform = tl.load(masks + 4 * t + 1)
    lo = tl.load(masks + 4 * t + 2)
    hi = tl.load(masks + 4 * t + 3)
    if start == 0:
        # The counter moves once per tensor; every program read the snapshot ``steps``.
        tl.store(tl.load(step_addrs + t).to(tl.pointer_type(tl.float32)), step.to(tl.float32))

    p_ptr = tables.typed_pointer(p_addrs, t, P_DTYPE, ALIGNED)
    g_ptr = tables.typed_pointer(g_addrs, t, P_DTYPE, ALIGNED)
    v_ptr = tables.typed_pointer(v_addrs, t, OPMATH, ALIGNED)
    p = tables.load_block(p_ptr, offs, inside, full).to(OPMATH)
    g = tables.load_block(g_ptr, offs, inside, full).to(OPMATH)
    m = tables.load_block(m_ptr, offs, inside, full)
    v = tables.load_block(v_ptr, offs, inside, full)

    if ELEMENT:
        bits_address = tl.load(bit_addrs + t)
        bits_ptr = bits_address.to(tl.pointer_type(tl.uint8))
        byte = tl.load(bits_ptr + offs // 8, mask=inside & (bits_address != 0), other=0).to(tl.int32)
        mu1 = tl.where(bits_address != 0, ((byte >> (offs % 8).to(tl.int32)) & 1).to(tl.float64), mu1_uniform)
        s, _ = element_score(g, m, scale.to(OPMATH), True, OPMATH)
        s = s.to(tl.float64)
        kept2 = in_bounds(s, lo, hi) | (m == 0.0)
        mu2 = tl.where(element_second != 0.0, kept2.to(tl.float64), mu2_uniform)
        mu = tl.where(warm, 1.0, w1.to(OPMATH) * mu1.to(OPMATH) + w2.to(OPMATH) * mu2.to(OPMATH))
    else:
        mu_uniform = tl.where(warm, 1.0, w1 * mu1_uniform + w2 * mu2_uniform).to(OPMATH)
        mu = tl.zeros([BLOCK], dtype=OPMATH) + mu_uniform

    b1 = beta1.to(OPMATH)
    b2 = beta2.to(OPMATH)
    one_minus_b1 = (1.0 - beta1).to(OPMATH)
    one_minus_b2 = (1.0 - beta2).to(OPMATH)
    g_masked = mu * g + (1.0 - mu) * m
    m_new = b1 * m + one_minus_b1 * g_masked
    v_new = b2 * v + one_minus_b2 * (g_masked * g_masked)
    denom = precise_sqrt(v_new, OPMATH) + eps.to(OPMATH)
    p_new = p - precise_div(step_size.to(OPMATH) * (mu * m_new), denom, OPMATH)
    p_new = p_new - ((lr * weight_decay).to(OPMATH) * mu) * p_new
    frozen = mu == 0.0
    m_out = tl.where(frozen, m, m_new)
    p_out = tl.where(frozen, p, p_new)
    tables.store_block(m_ptr, offs, m_out, inside, full)
    tables.store_block(v_ptr, offs, v_new, inside, full)
    tables.store_block(p_ptr, offs, p_out.to(P_DTYPE), inside, full)

    m_wide = tl.where(inside, m_out, 0.0).to(tl.float64)
    tl.store(partials + 2 * b, tl.sum(tl.where(inside, mu, 0.0).to(tl.float64), axis=0))
    tl.store(partials + 2 * b + 1, tl.sum(m_wide * m_wide, axis=0))


@torch.library.custom_op(
    "rose_triton::masked_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "state_steps"),
    schema=schema_of("masked_adamw_"),
)
def masked_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    first_masks: list[torch.Tensor | None],
    hyper: torch.Tensor,
    masks: torch.Tensor,
    found: torch.Tensor,
    element: bool,
) -> torch.Tensor:
    """The masked AdamW update of every tensor; a no-op (counters included) when ``found`` is set.

    ``hyper``: float64 ``[n, len(HYPER_COLUMNS)]``; ``masks``: float64 ``[n, 4]`` (MASK_COLUMNS);
    ``found``: int32 ``[1]``; ``element``: whether any tensor has a per-element mask. Returns float64
    ``[n, 2]``: the sum of mask values and the sum of squares of the new ``exp_avg`` per tensor.
    """
    device = params[0].device
    with tables.device_guard(device):  # launches go to the current device, not to the tensors'
        return _masked_adamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, hyper, masks, found,
                             element, device)


def _masked_adamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, hyper, masks, found, element,
                  device) -> torch.Tensor:
    n = len(params)
    shapes_ok = hyper.shape == (n, _H) and masks.shape == (n, len(MASK_COLUMNS))
    if not shapes_ok or hyper.dtype != torch.float64 or masks.dtype != torch.float64:
        raise ValueError(f"masked_adamw_: hyper must be float64 [{n}, {_H}] and masks float64 [{n}, 4]")
    for step in state_steps:
        if step.dtype != torch.float32 or step.numel() != 1 or step.device != device:
            raise ValueError(f"masked_adamw_: step counters must be one-element float32 tensors on {device}")
    steps = torch.stack([s.reshape(()) for s in state_steps])
    # Bias corrections with torch's float64 pow on the device (Triton has no portable float64 pow).
    t = steps.to(torch.float64) + 1
    lr, beta1, beta2, correct_bias = hyper[:, 0], hyper[:, 1], hyper[:, 2], hyper[:, 5]
    step_sizes = torch.where(correct_bias != 0, lr * torch.sqrt(1 - beta2**t) / (1 - beta1**t), lr)
    hyper = hyper.contiguous()
    masks = masks.contiguous()
    out = torch.empty((n, 2), dtype=torch.float64, device=device)
    for dtype, index in tables.by_dtype(params).items():
        group = [params[i] for i in index]
        numels = tuple(t.numel() for t in group)
        blocks = tables.block_table(numels, tables.block_size("update", sum(numels)), device, empty_gets_block=True)
        whole = len(index) == n
        select = None if whole else tables.constant(tuple(index), torch.int64, device)
        roles = tables.addresses(
            group, [grads[i] for i in index], [exp_avgs[i] for i in index], [exp_avg_sqs[i] for i in index],
            [first_masks[i] for i in index], [state_steps[i] for i in index], device=device,
        )
        partials = torch.empty((blocks.num_blocks, 2), dtype=torch.float64, device=device)
        aligned = all(tables.aligned_addresses([role[i] for i in index])
                      for role in (params, grads, exp_avgs, exp_avg_sqs))
        _masked_adamw_kernel[(blocks.num_blocks,)](
            blocks.block_tensor, blocks.block_start, tables.constant(numels, torch.int64, device),
            roles[0], roles[1], roles[2], roles[3], roles[4], roles[5],
            steps if whole else steps[select], step_sizes if whole else step_sizes[select],
            hyper if whole else hyper[select], masks if whole else masks[select],
            found, partials,
            P_DTYPE=tables.TL_DTYPES[dtype], OPMATH=tables.TL_DTYPES[opmath_dtype(dtype)], ELEMENT=element,
            H=_H, ALIGNED=aligned, BLOCK=blocks.block, num_warps=tables.warps("update"),
        )
        tables.put(out, index, segment_sum(partials, blocks, len(group)))
    return out


@masked_adamw_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, hyper, masks, found, element):
    return params[0].new_empty((len(params), 2), dtype=torch.float64)
