"""SELECT on the GPU: exact linear-interpolated quantile thresholds, without sorting or host syncs.

Element scores are non-negative floats, so their bit patterns, read as integers, sort like the
scores (``key``). A quantile of a pool of ``n`` scores needs the order statistics ``x_k`` and
``x_{k+1}`` at ``k = floor(q * (n - 1))``: four ranks for the two thresholds. They are found by an
MSD radix select over the keys, 12 bits per pass:

- pass 0 reads every score once, builds a 4096-bin histogram of the top digit per pool (and checks
  every gradient for non-finite values on the way), which also yields ``n``;
- each later pass histograms the next digit of only the scores whose higher digits equal the
  prefix found so far for a rank: the boundary buckets, nothing else;
- between passes a few tiny device ops (cumsum, searchsorted) pick each rank's bucket.

float32 scores take 3 passes (31 bits: 12 + 12 + 7), float64 scores 6. Counts are int64, so pools
of any size work. Everything stays on the device: counts, ranks and thresholds never visit the host.

Only pass 0 has to read the gradients: the keys of the boundary buckets are compacted into a
candidate region per pool, and later passes read those. Pass 0 cannot know the boundary buckets
yet, so it compacts the buckets around the previous call's answer (``guesses``); when the answer
is still there (a hit: the usual case from one step to the next) the pool costs one read of g and
m. Otherwise pass 1 reads the pool again and compacts the now-known buckets; a region that
overflows (heavy ties) sends its pool to full passes. Every route gives the same exact result.

Pools of one score per tensor (tensor granularity: a few hundred values) are sorted instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rose_kernels.backends.triton import tables

# 12-bit digits: the top digit of a float32 score is its exponent and 4 mantissa bits (buckets
# 1/16 octave wide). On simulated second-order scores (noisy gradients, EMA moments) the bucket
# around the 60th percentile holds 4-8% of the pool at 12 bits, 8-15% at 11: the candidates must
# fit in CAPACITY_DIVISOR-th of the pool with the +-1 bucket window of a guess.
DIGIT_BITS = 12
BINS = 1 << DIGIT_BITS
RANKS = 4  # x_k and x_{k+1} for each of the two thresholds
_INF = float("inf")


@triton.jit
def precise_div(a, b, OPMATH: tl.constexpr):
    """IEEE division (the default float32 division on the GPU may be approximate)."""
    if OPMATH == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def precise_sqrt(a, OPMATH: tl.constexpr):
    if OPMATH == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def element_score(g, m, c, SECOND: tl.constexpr, OPMATH: tl.constexpr):
    """The element score in the opmath type (rose-semantics section 2) and where it is defined."""
    if SECOND:
        return tl.abs(precise_div(c * g, m, OPMATH) - 1.0), m != 0.0
    else:
        return tl.abs(g), g == g


@triton.jit
def in_bounds(s, lo, hi):
    """``lo <= s <= hi`` for float64 scores (rose-semantics section 3): +inf only if ``lo`` is +inf.

    (``tl.where`` rather than ``|`` of a scalar and a block: the interpreter cannot or those.)"""
    return (s >= lo) & (s <= hi) & tl.where(lo == _INF, True, s < _INF)


@triton.jit
def _rank_histograms(key, valid, pool, prefixes, hist, SHIFT: tl.constexpr, DIGIT: tl.constexpr,
                     RANKS: tl.constexpr, BINS: tl.constexpr):
    """For each rank: histogram of the digit at SHIFT of the keys whose higher digits equal the
    rank's prefix. Only non-empty bins are added (most blocks match no prefix at all)."""
    digit = ((key >> SHIFT) & ((1 << DIGIT) - 1)).to(tl.int32)
    high = key >> (SHIFT + DIGIT)
    bins = tl.arange(0, BINS)
    for r in tl.static_range(RANKS):
        prefix = tl.load(prefixes + pool * RANKS + r)
        match = valid & (high == prefix)
        if tl.max(match.to(tl.int32), axis=0) > 0:
            counts = tl.histogram(digit, BINS, mask=match)
            tl.atomic_add(hist + (pool * RANKS + r) * BINS + bins, counts.to(tl.int64), mask=counts > 0)


@triton.jit
def _compact(key, chosen, pool, counters, region, capacity, keys):
    """Appends the chosen keys to the pool's candidate region; the counter keeps counting past
    the capacity, which is how an overflow is noticed (the pool then falls back to full passes)."""
    count = tl.sum(chosen.to(tl.int64), axis=0)
    if count > 0:
        base = tl.atomic_add(counters + pool, count)
        position = base + tl.cumsum(chosen.to(tl.int64), axis=0) - 1
        ok = chosen & (position < tl.load(capacity + pool))
        tl.store(keys + tl.load(region + pool) + position, key, mask=ok)


@triton.jit
def _full_pass_kernel(block_tensor, block_start, numels, a_addrs, b_addrs, scales, pooled, pool_of,
                      route, prefixes, guesses, hist, found, counters, region, capacity, keys,
                      A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, OPMATH: tl.constexpr,
                      SECOND: tl.constexpr, KEY64: tl.constexpr, FIRST: tl.constexpr, COMPACT: tl.constexpr,
                      SHIFT: tl.constexpr, DIGIT: tl.constexpr, RANKS: tl.constexpr,
                      BINS: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over the scores themselves (computed from the gradients and moments).

    FIRST: the top-digit histogram per pool, the finiteness check of every gradient, and the
    compaction of the keys whose top digit lies within one bucket of the previous call's answer
    (``guesses``). Later passes run only for pools whose ``route`` is 0 (no usable candidates);
    with COMPACT they also compact the keys that match a rank's prefix."""
    b = tl.program_id(0)
    t = tl.load(block_tensor + b)
    pool = tl.load(pool_of + t).to(tl.int64)
    if (not FIRST) and tl.load(route + pool) != 0:
        return
    n = tl.load(numels + t)
    offs = tl.load(block_start + b) + tl.arange(0, BLOCK).to(tl.int64)
    inside = offs < n
    g = tl.load(tl.load(a_addrs + t).to(tl.pointer_type(A_DTYPE)) + offs, mask=inside, other=0.0).to(OPMATH)
    if FIRST:
        # The step's finiteness check rides on the first read of every gradient.
        bad = inside & ((g != g) | (tl.abs(g) == _INF))
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            tl.atomic_max(found, 1)
    if tl.load(pooled + t) != 0:
        if SECOND:
            m_ptr = tl.load(b_addrs + t).to(tl.pointer_type(B_DTYPE))
            m = tl.load(m_ptr + offs, mask=inside, other=0.0).to(OPMATH)
        else:
            m = g
        c = tl.load(scales + t).to(OPMATH)
        s, defined = element_score(g, m, c, SECOND, OPMATH)
        valid = inside & defined
        if KEY64:
            key = s.to(tl.float64).to(tl.int64, bitcast=True)
        else:
            key = s.to(tl.int32, bitcast=True)
        if FIRST:
            top = (key >> SHIFT).to(tl.int32)
            counts = tl.histogram(top, BINS, mask=valid)
            bins = tl.arange(0, BINS)
            tl.atomic_add(hist + pool * BINS + bins, counts.to(tl.int64), mask=counts > 0)
            if COMPACT:
                chosen = tl.zeros([BLOCK], dtype=tl.int1)
                for r in tl.static_range(RANKS):
                    guess = tl.load(guesses + pool * RANKS + r)
                    chosen = chosen | ((top >= guess - 1) & (top <= guess + 1))
                _compact(key, valid & chosen, pool, counters, region, capacity, keys)
        else:
            _rank_histograms(key, valid, pool, prefixes, hist, SHIFT, DIGIT, RANKS, BINS)
            if COMPACT:
                high = key >> (SHIFT + DIGIT)
                chosen = tl.zeros([BLOCK], dtype=tl.int1)
                for r in tl.static_range(RANKS):
                    chosen = chosen | (high == tl.load(prefixes + pool * RANKS + r))
                _compact(key, valid & chosen, pool, counters, region, capacity, keys)


@triton.jit
def _candidate_pass_kernel(chunk_pool, chunk_start, route, prefixes, hist, counters, region, capacity, keys,
                           SHIFT: tl.constexpr, DIGIT: tl.constexpr, RANKS: tl.constexpr,
                           BINS: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a pool's compacted candidate keys (pools whose ``route`` is 1)."""
    c = tl.program_id(0)
    pool = tl.load(chunk_pool + c).to(tl.int64)
    if tl.load(route + pool) == 0:
        return
    count = tl.minimum(tl.load(counters + pool), tl.load(capacity + pool))
    offs = tl.load(chunk_start + c) + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < count
    key = tl.load(keys + tl.load(region + pool) + offs, mask=valid, other=0)
    _rank_histograms(key, valid, pool, prefixes, hist, SHIFT, DIGIT, RANKS, BINS)


def digit_plan(key_bits: int) -> list[tuple[int, int]]:
    """(shift, bits) of each pass, most significant digit first."""
    plan, remaining = [], key_bits
    while remaining > 0:
        bits = min(DIGIT_BITS, remaining)
        remaining -= bits
        plan.append((remaining, bits))
    return plan


def interpolate(x_k: torch.Tensor, x_k1: torch.Tensor, r: torch.Tensor, k: torch.Tensor, n: torch.Tensor):
    """rose-semantics section 3 (and ``reference.quantile``) from the two order statistics, float64."""
    frac = r - k.to(torch.float64)
    plain = (frac == 0) | (k + 1 >= n) | (x_k == x_k1)
    value = torch.where(plain, x_k, x_k + frac * (x_k1 - x_k))
    return torch.where(n > 0, value, torch.full_like(value, float("nan")))


def _ranks(n: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position ``r = q (n - 1)``, ``k = min(floor(r), n - 1)`` and ``k + 1`` capped, for counts ``n``."""
    r = q * (n.to(torch.float64) - 1)
    k = torch.minimum(torch.floor(r).to(torch.int64), n - 1).clamp(min=0)
    return r, k, torch.minimum(k + 1, n - 1).clamp(min=0)


def in_interval(scores: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``reference.in_interval`` with device thresholds: inclusive; +inf only when ``lo`` is +inf."""
    return (scores >= lo) & (scores <= hi) & ((lo == _INF) | torch.isfinite(scores))


def small_pool_quantiles(scores: torch.Tensor, defined: torch.Tensor, q_lo: float, q_hi: float) -> torch.Tensor:
    """``[2]`` float64 thresholds of the defined scores of a small pool (a sort; no host sync)."""
    ordered = torch.sort(torch.where(defined, scores, torch.full_like(scores, float("nan")))).values
    n = defined.sum().reshape(1)
    out = []
    for q in (q_lo, q_hi):
        r, k, k1 = _ranks(n, q)
        out.append(interpolate(ordered.gather(0, k), ordered.gather(0, k1), r, k, n))
    return torch.cat(out)


# Candidate regions hold up to 1/4 of a pool's scores (int32 keys: 1 byte per score of memory).
# The boundary buckets of a quantile at 11-bit resolution hold a few percent of a smooth pool;
# more (heavy ties) overflows into full passes, which is slower but just as exact.
CAPACITY_DIVISOR = 4
NO_GUESS = -8  # a top bucket no score has: the first call compacts nothing in pass 0


def new_guesses(pools: int, device: torch.device) -> torch.Tensor:
    """The per-pool state that lets the next call find its candidates in its first pass."""
    return torch.full((pools, RANKS), NO_GUESS, dtype=torch.int64, device=device)


def _pick_buckets(hist: torch.Tensor, remaining: torch.Tensor, bits: int):
    """Per (pool, rank): the bucket holding the rank, and the rank within that bucket."""
    pools, ranks, bins = hist.shape
    cumulative = hist.cumsum(dim=-1).reshape(pools * ranks, bins)
    bucket = torch.searchsorted(cumulative, remaining.reshape(-1, 1), right=True).clamp_(max=(1 << bits) - 1)
    below = torch.where(bucket > 0, cumulative.gather(1, (bucket - 1).clamp(min=0)), 0)
    return bucket.reshape(pools, ranks), remaining - below.reshape(pools, ranks)


@torch.library.custom_op("rose_triton::element_thresholds", mutates_args=("guesses",))
def element_thresholds(
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    scales: torch.Tensor,
    pooled: torch.Tensor,
    q_lo: float,
    q_hi: float,
    global_pool: bool,
    guesses: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact thresholds of element scores: ``|a|`` (``b`` empty) or ``|c a / b - 1|`` (``b`` the
    moments, ``scales`` = c per tensor). Tensors whose ``pooled`` flag is 0 are only checked for
    non-finite values. Returns float64 ``[pools, 5]``: lower, upper, pool size, non-finite flag, and
    how many passes read the pool's scores from the gradients (the rest read its candidates).

    ``guesses`` (from :func:`new_guesses`, updated in place) carries each pool's top-digit buckets
    to the next call: when they still hold the answer, which is the rule from one optimizer step
    to the next, the pool is read once instead of twice. Results never depend on it."""
    device = a[0].device
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
    plan = digit_plan(63 if key64 else 31)
    scales = scales.to(torch.float64).contiguous()
    pooled = pooled.to(torch.int32).contiguous()
    found = torch.zeros(1, dtype=torch.int32, device=device)
    prefixes = torch.zeros((pools, RANKS), dtype=torch.int64, device=device)
    use_guesses = guesses is not None
    guess_table = guesses if use_guesses else prefixes

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
        blocks = tables.block_table(numels, tables.block_size("select", sum(numels)), device)
        whole = len(index) == n_tensors
        select = None if whole else tables.constant(tuple(index), torch.int64, device)
        launches.append(dict(
            blocks=blocks,
            numels=tables.constant(numels, torch.int64, device),
            a_addrs=tables.addresses(group_a, device=device)[0],
            b_addrs=tables.addresses(group_b, device=device)[0],
            scales=scales if whole else scales[select],
            pooled=pooled if whole else pooled[select],
            pool_of=tables.constant(tuple(0 if global_pool else i for i in index), torch.int32, device),
            A_DTYPE=tables.TL_DTYPES[dtype],
            B_DTYPE=tables.TL_DTYPES[group_b[0].dtype],
            OPMATH=tables.TL_DTYPES[tables.opmath(dtype)],
        ))

    def full_pass(hist, route, first, compact, shift, bits, ranks):
        for launch in launches:
            blocks = launch["blocks"]
            if blocks.num_blocks:
                _full_pass_kernel[(blocks.num_blocks,)](
                    blocks.block_tensor, blocks.block_start, launch["numels"], launch["a_addrs"],
                    launch["b_addrs"], launch["scales"], launch["pooled"], launch["pool_of"], route, prefixes,
                    guess_table, hist, found, counters, region, capacity, keys,
                    A_DTYPE=launch["A_DTYPE"], B_DTYPE=launch["B_DTYPE"], OPMATH=launch["OPMATH"],
                    SECOND=second, KEY64=key64, FIRST=first, COMPACT=compact, SHIFT=shift, DIGIT=bits,
                    RANKS=ranks, BINS=BINS, BLOCK=blocks.block,
                )

    def candidate_pass(hist, route, shift, bits):
        _candidate_pass_kernel[(chunks.num_blocks,)](
            chunks.block_tensor, chunks.block_start, route, prefixes, hist, counters, region, capacity, keys,
            SHIFT=shift, DIGIT=bits, RANKS=RANKS, BINS=BINS, BLOCK=chunk,
        )

    # Pass 0: every score once; the top digit's histogram gives the pool sizes and the ranks.
    shift, bits = plan[0]
    hist = torch.zeros((pools, 1, BINS), dtype=torch.int64, device=device)
    everywhere = torch.zeros(pools, dtype=torch.int32, device=device)
    full_pass(hist, everywhere, True, use_guesses, shift, bits, RANKS)
    n = hist.sum(dim=(1, 2))
    r_lo, k_lo, k1_lo = _ranks(n, q_lo)
    r_hi, k_hi, k1_hi = _ranks(n, q_hi)
    prefixes, remaining = _pick_buckets(hist.expand(pools, RANKS, BINS),
                                        torch.stack([k_lo, k1_lo, k_hi, k1_hi], dim=1), bits)
    top = prefixes
    if use_guesses:
        near = (top[:, :, None] - guesses[:, None, :]).abs() <= 1
        hit = near.any(dim=2).all(dim=1) & (counters <= capacity)
        counters.mul_(hit)  # misses compact again in pass 1
        route = hit.to(torch.int32)
        guesses.copy_(top)
    else:
        route = everywhere
    full_reads = 2 - route.to(torch.float64)

    # Later passes: candidates where they are complete, the full data (compacting in pass 1) elsewhere.
    for pass_index, (shift, bits) in enumerate(plan[1:], start=1):
        hist = torch.zeros((pools, RANKS, BINS), dtype=torch.int64, device=device)
        candidate_pass(hist, route, shift, bits)
        full_pass(hist, route, False, pass_index == 1, shift, bits, RANKS)
        if pass_index == 1:
            route = (counters <= capacity).to(torch.int32)
            full_reads = full_reads + (1 - route.to(torch.float64)) * (len(plan) - 2)
        bucket, remaining = _pick_buckets(hist, remaining, bits)
        prefixes = (prefixes << bits) | bucket

    if key64:
        values = prefixes.view(torch.float64)
    else:
        values = prefixes.to(torch.int32).view(torch.float32).to(torch.float64)
    r = torch.stack([r_lo, r_hi], dim=1)
    k = torch.stack([k_lo, k_hi], dim=1)
    bounds = interpolate(values[:, 0::2], values[:, 1::2], r, k, n[:, None])
    flag = found.to(torch.float64).expand(pools, 1)
    return torch.cat([bounds, n.to(torch.float64)[:, None], flag, full_reads[:, None]], dim=1)


@element_thresholds.register_fake
def _(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses=None):
    return a[0].new_empty((1 if global_pool else len(a), 5), dtype=torch.float64)
