"""SELECT on the GPU: exact linear-interpolated quantile thresholds, without sorting or host syncs.

Element scores are non-negative floats, so their bit patterns, read as integers, sort like the
scores (``key``). A quantile of a pool of ``n`` scores needs the order statistics ``x_k`` and
``x_{k+1}`` at ``k = floor(q * (n - 1))``: four ranks for the two thresholds. Each rank is looked
for in a *window* of keys: three consecutive top-12-bit buckets (a bucket is 1/16 octave of scores)
around where the rank is expected.

- **Window pass** (one read of g and m): per pool, the number of scores ``n``, and per rank the
  number of scores below its window and inside it; the keys inside any window are appended to the
  pool's candidate region. It carries the step's finiteness check of every gradient. The windows
  come from the previous call's answer (``guesses``): when every rank lies inside its window (a
  hit, the rule from one optimizer step to the next), this is the only read of the pool.
- **Miss** (first call, or the scores moved by more than a bucket): two digit passes over the pool
  find each rank's exact top-12-bit bucket (8 bits, then 4), and a second window pass compacts the
  windows around those.
- **Candidate passes** then find each rank inside its window by MSD radix select over
  ``key - window start`` (8-bit digits: 3 passes for float32 scores, 7 for float64), reading only
  the compacted keys. A region that overflowed (heavy ties) sends its pool through the same digit
  passes over the full pool instead.

Why 8-bit digits and no histogram in the window pass: ``tl.histogram`` lowers to warp ballots whose
cost grows with the bins. Compiled for sm_90 (``python tools/triton_aot.py``,
bench/results/triton-aot-*.md), a masked histogram costs ~15.6 warp-instructions per key at 4096
bins, 2.9 at 256 and 1.7 at 16, while an H200 streaming g and m (8 bytes per element) can issue
~1.7 per element before the pass stops being memory-bound. The window pass only counts and
compacts (comparisons, block sums, a two-level scan): ~3 per element in the static count, half of
it the IEEE division of the score and the compaction; histograms run on the compacted candidates
(a few percent of a pool) or, on the rare misses, over the pool.

Counts are int64, so pools of any size work. Everything stays on the device: counts, ranks and
thresholds never visit the host. Every route gives the same exact result. Pools of one score per
tensor (tensor granularity: a few hundred values) are sorted instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rose_kernels.backends.quantiles import interpolate, new_guesses
from rose_kernels.backends.quantiles import quantile_ranks as _ranks
from rose_kernels.backends.triton import tables
from rose_kernels.backends.triton.rose_math import element_score
from rose_kernels.dtypes import opmath_dtype
from rose_kernels.ops import GUESS_RANKS, SELECT_RADIX, schema_of

RANKS = GUESS_RANKS  # x_k and x_{k+1} for each of the two thresholds
GUESS_BITS = 12  # windows are made of top-12-bit buckets of the keys (1/16 octave of scores)
DIGIT_BITS = 8  # radix digit of the histogram passes (256 bins)
BINS = 1 << DIGIT_BITS
MISS_DIGITS = (8, 4)  # a miss finds the top 12 bits of each rank in two full passes


@triton.jit
def _pool_keys(block_tensor, block_start, numels, a_addrs, b_addrs, scales, pool_of,
               A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, OPMATH: tl.constexpr, SECOND: tl.constexpr,
               KEY64: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's scores as integer keys (int32 for float32 scores: 64-bit integer compares and
    sums cost two instructions each): (tensor, pool, gradients, moments (the gradients for first-order
    scores), keys, valid)."""
    _, t, _, offs, inside, full = tables.block_elements(block_tensor, block_start, numels, BLOCK)
    pool = tl.load(pool_of + t).to(tl.int64)
    g = tables.load_block(tables.typed_pointer(a_addrs, t, A_DTYPE, ALIGNED), offs, inside, full).to(OPMATH)
    if SECOND:
        m = tables.load_block(tables.typed_pointer(b_addrs, t, B_DTYPE, ALIGNED), offs, inside, full).to(OPMATH)
    else:
        m = g
    s, defined = element_score(g, m, tl.load(scales + t).to(OPMATH), SECOND, OPMATH)
    if KEY64:
        key = s.to(tl.float64).to(tl.int64, bitcast=True)
    else:
        key = s.to(tl.int32, bitcast=True)
    return t, pool, g, m, key, inside & defined


@triton.jit
def _compact(key, chosen, pool, counters, region, capacity, keys):
    """Appends the chosen keys to the pool's candidate region; the counter keeps counting past
    the capacity, which is how an overflow is noticed (the pool then takes full passes).

    Positions come from a two-level scan (rows of 8, then the row totals): compiled for sm_90 it
    costs 0.7 warp-instructions per element against 1.6 for ``tl.cumsum`` over the whole block."""
    count = tl.sum(chosen.to(tl.int32), axis=0)
    if count > 0:
        base = tl.atomic_add(counters + pool, count.to(tl.int64))
        rows: tl.constexpr = key.shape[0] // 8
        picked = tl.reshape(chosen.to(tl.int32), (rows, 8))
        per_row = tl.sum(picked, axis=1)
        local = (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(picked, axis=1) - picked
        room = tl.maximum(tl.minimum(tl.load(capacity + pool) - base, key.shape[0]), 0).to(tl.int32)
        ok = (picked != 0) & (local < room)  # 32-bit positions within this block's share
        tl.store(keys + (tl.load(region + pool) + base) + local, tl.reshape(key, (rows, 8)), mask=ok)


@triton.jit
def _window_pass_kernel(block_tensor, block_start, numels, a_addrs, b_addrs, scales, pooled, pool_of,
                        todo, windows, counts, found, counters, region, capacity, keys,
                        A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, OPMATH: tl.constexpr,
                        SECOND: tl.constexpr, KEY64: tl.constexpr, CHECK: tl.constexpr,
                        RANKS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Per pool: ``counts[pool] = [n, below_0, inside_0, ..., below_3, inside_3]`` for the rank
    windows ``windows[pool, r] = [start, end)``, and the keys inside any window compacted. CHECK:
    also the finiteness check of every gradient (pooled or not) and of pooled moments. Pools whose ``todo`` is 0 are
    skipped; ranks whose window equals the previous rank's are left to the host to copy."""
    t, pool, g, m, key, valid = _pool_keys(block_tensor, block_start, numels, a_addrs, b_addrs, scales, pool_of,
                                        A_DTYPE, B_DTYPE, OPMATH, SECOND, KEY64, ALIGNED, BLOCK)
    if CHECK:
        # The step's finiteness check rides on the first read of every gradient, and of the moments
        # that pooled second-order scores divide by (what the CPU backend checks too).
        # x * 0 is NaN exactly when x is NaN or infinite: one multiply-add per value (two compares
        # and a max cost three times that, measured on the compiled pass).
        probe = tl.sum(g * 0.0, axis=0)
        if SECOND:
            if tl.load(pooled + t) != 0:
                probe += tl.sum(m * 0.0, axis=0)
        if probe != probe:
            tl.atomic_max(found, 1)
    if (tl.load(pooled + t) != 0) & (tl.load(todo + pool) != 0):
        row = counts + pool * (1 + 2 * RANKS)
        if CHECK:
            tl.atomic_add(row, tl.sum(valid.to(tl.int32), axis=0).to(tl.int64))
        chosen = tl.zeros(key.shape, dtype=tl.int1)
        previous_start = tl.full((), -1, key.dtype)
        previous_end = tl.full((), -1, key.dtype)
        for r in tl.static_range(RANKS):
            # Windows fit the key type (the host clamps them): compare in it.
            start = tl.load(windows + (pool * RANKS + r) * 2).to(key.dtype)
            end = tl.load(windows + (pool * RANKS + r) * 2 + 1).to(key.dtype)
            if (start != previous_start) | (end != previous_end):
                below = tl.sum((valid & (key < start)).to(tl.int32), axis=0)
                within = valid & (key >= start) & (key < end)
                tl.atomic_add(row + 1 + 2 * r, below.to(tl.int64))
                tl.atomic_add(row + 2 + 2 * r, tl.sum(within.to(tl.int32), axis=0).to(tl.int64))
                chosen = chosen | within
            previous_start = start
            previous_end = end
        _compact(key, chosen, pool, counters, region, capacity, keys)


@triton.jit
def _rank_histograms(key, valid, pool, table, hist, shift, digit, RANKS: tl.constexpr, BINS: tl.constexpr):
    """For each rank: the histogram of the digit at ``shift`` of ``key - start`` over the keys of
    its window ``table[pool, r] = [start, end, prefix]`` whose higher digits equal the prefix.
    Only non-empty bins are added (most blocks match no prefix at all); a rank whose row equals the
    previous rank's is skipped (the host copies the previous histogram)."""
    bins = tl.arange(0, BINS)
    previous_start = tl.full((), -1, key.dtype)
    previous_end = tl.full((), -1, key.dtype)
    previous_prefix = tl.full((), -1, key.dtype)
    for r in tl.static_range(RANKS):
        row = table + (pool * RANKS + r) * 3
        start = tl.load(row).to(key.dtype)
        end = tl.load(row + 1).to(key.dtype)
        prefix = tl.load(row + 2).to(key.dtype)
        if (start != previous_start) | (end != previous_end) | (prefix != previous_prefix):
            offset = key - start
            match = valid & (key >= start) & (key < end) & ((offset >> (shift + digit)) == prefix)
            if tl.max(match.to(tl.int32), axis=0) > 0:
                counts = tl.histogram(((offset >> shift) & ((1 << digit) - 1)).to(tl.int32), BINS, mask=match)
                tl.atomic_add(hist + (pool * RANKS + r) * BINS + bins, counts.to(tl.int64), mask=counts > 0)
        previous_start = start
        previous_end = end
        previous_prefix = prefix


@triton.jit(do_not_specialize=["shift", "digit"])
def _digit_pass_kernel(block_tensor, block_start, numels, a_addrs, b_addrs, scales, pooled, pool_of,
                       todo, table, hist, shift, digit,
                       A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, OPMATH: tl.constexpr,
                       SECOND: tl.constexpr, KEY64: tl.constexpr, RANKS: tl.constexpr,
                       BINS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One radix digit over the scores themselves (computed from g and m), for pools whose
    ``todo`` is set (misses, and overflowed candidate regions)."""
    b = tl.program_id(0)
    t = tl.load(block_tensor + b)
    if (tl.load(todo + tl.load(pool_of + t)) != 0) & (tl.load(pooled + t) != 0):
        _, pool, _, _, key, valid = _pool_keys(block_tensor, block_start, numels, a_addrs, b_addrs, scales, pool_of,
                                            A_DTYPE, B_DTYPE, OPMATH, SECOND, KEY64, ALIGNED, BLOCK)
        _rank_histograms(key, valid, pool, table, hist, shift, digit, RANKS, BINS)


@triton.jit(do_not_specialize=["shift", "digit"])
def _candidate_pass_kernel(chunk_pool, chunk_start, todo, table, hist, counters, region, capacity, keys,
                           shift, digit, RANKS: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr):
    """One radix digit over a pool's compacted candidate keys (pools whose ``todo`` is set)."""
    c = tl.program_id(0)
    pool = tl.load(chunk_pool + c).to(tl.int64)
    if tl.load(todo + pool) != 0:
        count = tl.minimum(tl.load(counters + pool), tl.load(capacity + pool))
        offs = tl.load(chunk_start + c) + tl.arange(0, BLOCK).to(tl.int64)
        valid = offs < count
        key = tl.load(keys + tl.load(region + pool) + offs, mask=valid, other=0)
        _rank_histograms(key, valid, pool, table, hist, shift, digit, RANKS, BINS)


def digit_plan(key_bits: int, digit_bits: int = DIGIT_BITS) -> list[tuple[int, int]]:
    """(shift, bits) of each pass, most significant digit first."""
    plan, remaining = [], key_bits
    while remaining > 0:
        bits = min(digit_bits, remaining)
        remaining -= bits
        plan.append((remaining, bits))
    return plan


# Candidate regions hold up to 1/4 of a pool's scores (1 byte per float32 score of memory). A window
# of three 1/16-octave buckets holds a few percent of a smooth pool per rank; more (heavy ties)
# overflows into full passes, which is slower but just as exact.
CAPACITY_DIVISOR = 4


def _windows(buckets: torch.Tensor, shift: int, key_max: int) -> torch.Tensor:
    """int64 ``[pools, RANKS, 2]``: keys ``[start, end)`` of the buckets ``b - 1 .. b + 1`` (empty
    for a negative bucket), ends capped at ``key_max`` (the kernels compare in the key type; only
    NaN patterns lie above it)."""
    start = (buckets - 1).clamp(min=0) << shift
    end = torch.where(buckets < 0, start, ((buckets + 2) << shift).clamp(max=key_max))
    return torch.stack([start, end], dim=-1)


def _copy_repeated(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The kernels skip a rank whose row (window, prefix) equals the previous rank's: copy its result."""
    same = (rows[:, 1:] == rows[:, :-1]).flatten(2).all(dim=2)
    parts = [values[:, 0]]
    for r in range(1, values.shape[1]):
        parts.append(torch.where(same[:, r - 1].reshape((-1,) + (1,) * (values.dim() - 2)), parts[-1], values[:, r]))
    return torch.stack(parts, dim=1)


def _pick_buckets(hist: torch.Tensor, remaining: torch.Tensor, bits: int):
    """Per (pool, rank): the bucket holding the rank, and the rank within that bucket."""
    pools, ranks, bins = hist.shape
    cumulative = hist.cumsum(dim=-1).reshape(pools * ranks, bins)
    bucket = torch.searchsorted(cumulative, remaining.reshape(-1, 1), right=True).clamp_(max=(1 << bits) - 1)
    below = torch.where(bucket > 0, cumulative.gather(1, (bucket - 1).clamp(min=0)), 0)
    return bucket.reshape(pools, ranks), remaining - below.reshape(pools, ranks)


@torch.library.custom_op(
    "rose_triton::element_thresholds", mutates_args=("guesses",), schema=schema_of("element_thresholds")
)
def element_thresholds(
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    scales: torch.Tensor,
    pooled: torch.Tensor,
    q_lo: float,
    q_hi: float,
    global_pool: bool,
    guesses: torch.Tensor | None = None,
    strategy: int = 0,
) -> torch.Tensor:
    """Exact thresholds of element scores: ``|a|`` (``b`` empty) or ``|c a / b - 1|`` (``b`` the
    moments, ``scales`` = c per tensor). Tensors whose ``pooled`` flag is 0 are only checked for
    non-finite values. Returns float64 ``[pools, 5]``: lower, upper, pool size, non-finite flag, and
    how many passes read the pool's scores from the gradients (the rest read its candidates).

    ``guesses`` (from :func:`new_guesses`, updated in place) carries each pool's top-12-bit buckets
    to the next call: when they still hold the answer, which is the rule from one optimizer step
    to the next, the pool is read once instead of four times. Results never depend on it."""
    device = a[0].device
    with tables.device_guard(device):  # launches go to the current device, not to the tensors'
        return _element_thresholds(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses, strategy, device)


def _element_thresholds(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses, strategy, device):
    n_tensors = len(a)
    second = len(b) > 0
    if second and len(b) != n_tensors:
        raise ValueError("element_thresholds: a and b must have the same length")
    if scales.shape != (n_tensors,) or pooled.shape != (n_tensors,):
        raise ValueError("element_thresholds: scales and pooled need one entry per tensor")
    pools = 1 if global_pool else n_tensors
    if guesses is not None and (guesses.shape != (pools, RANKS) or guesses.dtype != torch.int64):
        raise ValueError(f"element_thresholds: guesses must be int64 of shape ({pools}, {RANKS})")
    key64 = any(t.dtype == torch.float64 for t in a)
    key_bits = 63 if key64 else 31
    bucket_shift = key_bits - GUESS_BITS
    offset_plan = digit_plan(bucket_shift + 2)  # a window spans 3 buckets: offsets < 3 << bucket_shift
    scales = scales.to(torch.float64).contiguous()
    pooled = pooled.to(torch.int32).contiguous()
    found = torch.zeros(1, dtype=torch.int32, device=device)

    # Candidate regions, one per pool, and the chunks the candidate passes run over.
    sizes = [sum(t.numel() for t in a)] if global_pool else [t.numel() for t in a]
    chunk = tables.block_size("select", sum(sizes))
    capacities = tuple(-(-max(chunk, n // CAPACITY_DIVISOR) // chunk) * chunk for n in sizes)
    regions = tuple(sum(capacities[:i]) for i in range(pools))
    chunks = tables.block_table(capacities, chunk, device)
    capacity = tables.constant(capacities, torch.int64, device)
    region = tables.constant(regions, torch.int64, device)
    keys = torch.empty(sum(capacities), dtype=torch.int64 if key64 else torch.int32, device=device)
    counters = torch.zeros(pools, dtype=torch.int64, device=device)

    launches = []
    for dtype, index in tables.by_dtype(a).items():
        group_a = [a[i] for i in index]
        group_b = [b[i] for i in index] if second else group_a
        numels = tuple(t.numel() for t in group_a)
        blocks = tables.block_table(numels, tables.block_size("select", sum(numels), dtype), device)
        whole = len(index) == n_tensors
        select = None if whole else tables.constant(tuple(index), torch.int64, device)
        aligned = tables.aligned_addresses(group_a) and (not second or tables.aligned_addresses(group_b))
        if blocks.num_blocks:
            launches.append(dict(
                grid=(blocks.num_blocks,),
                args=(blocks.block_tensor, blocks.block_start, tables.constant(numels, torch.int64, device),
                      tables.addresses(group_a, device=device)[0], tables.addresses(group_b, device=device)[0],
                      scales if whole else scales[select], pooled if whole else pooled[select],
                      tables.constant(tuple(0 if global_pool else i for i in index), torch.int32, device)),
                constants=dict(A_DTYPE=tables.TL_DTYPES[dtype], B_DTYPE=tables.TL_DTYPES[group_b[0].dtype],
                               OPMATH=tables.TL_DTYPES[opmath_dtype(dtype)], SECOND=second, KEY64=key64,
                               RANKS=RANKS, ALIGNED=aligned, BLOCK=blocks.block,
                               num_warps=tables.warps("select")),
            ))

    def window_pass(todo, windows, check):
        counts = torch.zeros((pools, 1 + 2 * RANKS), dtype=torch.int64, device=device)
        for launch in launches:
            _window_pass_kernel[launch["grid"]](*launch["args"], todo, windows, counts, found, counters, region,
                                                capacity, keys, CHECK=check, **launch["constants"])
        counts = counts.clone()
        counts[:, 1:] = _copy_repeated(counts[:, 1:].reshape(pools, RANKS, 2), windows).reshape(pools, -1)
        return counts

    def digit_pass(full, candidates, table, shift, bits):
        hist = torch.zeros((pools, RANKS, BINS), dtype=torch.int64, device=device)
        for launch in launches:
            _digit_pass_kernel[launch["grid"]](*launch["args"], full, table, hist, shift, bits, BINS=BINS,
                                               **launch["constants"])
        if candidates is not None:
            _candidate_pass_kernel[(chunks.num_blocks,)](
                chunks.block_tensor, chunks.block_start, candidates, table, hist, counters, region, capacity, keys,
                shift, bits, RANKS=RANKS, BINS=BINS, BLOCK=chunk, num_warps=tables.warps("select"),
            )
        return _copy_repeated(hist, table)

    # The window pass around the guesses: n, the finiteness check, and (on a hit) the candidates.
    # SELECT_RADIX: no guesses (the window pass then misses, and the digit passes find the ranks).
    radix_only = strategy == SELECT_RADIX
    guessed = guesses if guesses is not None and not radix_only else new_guesses(pools, device)
    everyone = torch.ones(pools, dtype=torch.int32, device=device)
    key_max = (1 << key_bits) - 1
    windows = _windows(guessed, bucket_shift, key_max)
    counts = window_pass(everyone, windows, True)
    n = counts[:, 0]
    r_lo, k_lo, k1_lo = _ranks(n, q_lo)
    r_hi, k_hi, k1_hi = _ranks(n, q_hi)
    ranks = torch.stack([k_lo, k1_lo, k_hi, k1_hi], dim=1)
    below, inside = counts[:, 1::2], counts[:, 2::2]
    hit = (((ranks >= below) & (ranks < below + inside)).all(dim=1) & (counters <= capacity)) | (n == 0)
    miss = (~hit).to(torch.int32)
    counters.mul_(hit)  # misses compact again below

    # A miss: the exact top-12-bit bucket of each rank (two digit passes), then a window pass around it.
    everything = tables.constant((0, key_max, 0), torch.int64, device)
    table = everything.expand(pools, RANKS, 3).contiguous()
    remaining, bucket, shift = ranks, torch.zeros_like(ranks), key_bits
    for bits in MISS_DIGITS:
        shift -= bits
        digit, remaining = _pick_buckets(digit_pass(miss, None, table, shift, bits), remaining, bits)
        bucket = (bucket << bits) | digit
        table = torch.cat([table[..., :2], bucket[..., None]], dim=-1).contiguous()
    exact_windows = _windows(bucket, bucket_shift, key_max)
    exact_counts = window_pass(miss, exact_windows, False)
    windows = torch.where(hit[:, None, None], windows, exact_windows)
    below = torch.where(hit[:, None], below, exact_counts[:, 1::2])

    # Each rank inside its window: candidates where the region held them all, full passes elsewhere.
    fits = counters <= capacity
    candidates, overflow = fits.to(torch.int32), (~fits).to(torch.int32)
    remaining = ranks - below
    prefix = torch.zeros_like(ranks)
    for shift, bits in offset_plan:
        table = torch.cat([windows, prefix[..., None]], dim=-1).contiguous()
        digit, remaining = _pick_buckets(digit_pass(overflow, candidates, table, shift, bits), remaining, bits)
        prefix = (prefix << bits) | digit
    final = windows[..., 0] + prefix
    if guesses is not None and not radix_only:
        guesses.copy_(torch.where(n[:, None] > 0, final >> bucket_shift, guesses))
    full_reads = 1 + 3 * miss.to(torch.float64) + len(offset_plan) * overflow.to(torch.float64)

    if key64:
        values = final.view(torch.float64)
    else:
        values = final.to(torch.int32).view(torch.float32).to(torch.float64)
    r = torch.stack([r_lo, r_hi], dim=1)
    k = torch.stack([k_lo, k_hi], dim=1)
    bounds = interpolate(values[:, 0::2], values[:, 1::2], r, k, n[:, None])
    flag = found.to(torch.float64).expand(pools, 1)
    return torch.cat([bounds, n.to(torch.float64)[:, None], flag, full_reads[:, None]], dim=1)


@element_thresholds.register_fake
def _(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses=None, strategy=0):
    return a[0].new_empty((1 if global_pool else len(a), 5), dtype=torch.float64)
