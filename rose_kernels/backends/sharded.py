"""Scores made global over FSDP2 shards: what a step adds when parameters are sharded DTensors.

Under ``torch.distributed.fsdp.fully_shard`` every rank holds one shard (rows along dim 0) of every
parameter, gradient and moment. RoseAdamW hands the fused backends the *local* shards, and the
backend asks this object to turn local partial results into the whole tensors' results, identical
on every rank (so are the masks):

- sums of squares (``||g||^2``, ``||m||^2``, the KL gradients' norms) are partial sums per shard:
  one all-reduce of the per-tensor sums (``2 n`` floats for ``second``, ``n`` otherwise). A
  non-finite value anywhere makes its sum non-finite on every rank, so the skip is global too;
- element granularity: each pool's exact quantiles over all shards, by an MSD radix select on the
  scores' integer keys (non-negative floats order like their bit patterns) whose digit histograms
  are all-reduced at each pass: integer counts, so the thresholds are bit-identical to those of
  the unsharded pool. Each rank reads its shard once; later passes read only the keys inside the
  buckets of the four wanted order statistics. 3 passes for float32 scores (digits of 12, 10 and
  9 bits), 5 for float64 (15, then 4 x 12), each one all-reduce; the first also carries the
  non-finite flag. Per pool (float32): 4096 int64 counts, then 4 x 1024 and 4 x 512;
- kept fractions: the update returns each shard's sum of mask values; they are added over the
  ranks when :meth:`RoseAdamW.mask_stats` is called (a collective call under sharding).

The element scores come from ``rose_kernels.reference`` (the oracle: the same opmath arithmetic as
the kernels) and the quantile from ``quantiles.quantile_ranks`` / ``quantiles.interpolate``; the
masks and the update stay in the kernels, which receive the global thresholds.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from rose_kernels.backends.quantiles import interpolate, quantile_ranks
from rose_kernels.dtypes import opmath_dtype
from rose_kernels.ops import THRESHOLD_COLUMNS
from rose_kernels.reference import first_order_element_scores, second_order_element_scores

# Digit widths of the radix select, from the bit below the sign bit down (31 bits of a float32 key,
# 63 of a float64 one). The first digit holds the exponent and the top mantissa bits (1/16 octave
# for float32, 1/16 for float64), so that the four buckets holding the wanted order statistics
# hold a few percent of a pool of gradient-like scores: only those are read again. The later
# digits take the rest in as few passes (all-reduces) as keep each histogram at 4 x 1024 counts.
DIGITS = {False: (12, 10, 9), True: (15, 12, 12, 12, 12)}
_TARGETS = 4  # order statistics per pool: x_k and x_{k+1} of the lower and of the upper threshold


def _keys(scores: torch.Tensor, wide: bool) -> torch.Tensor:
    """Integer keys ordered like the non-negative float ``scores``: their float32 bit patterns as
    int32, or (``wide``) their float64 ones as int64."""
    if wide:
        return scores.to(torch.float64).view(torch.int64)
    return scores.to(torch.float32).view(torch.int32)


def _values(keys: torch.Tensor, wide: bool) -> torch.Tensor:
    """float64 values of (int64) ``keys`` made by :func:`_keys`."""
    if wide:
        return keys.view(torch.float64)
    return keys.to(torch.int32).view(torch.float32).to(torch.float64)


class ShardedStep:
    """The process group over which a step's parameters are sharded, and their whole sizes."""

    def __init__(self, group: dist.ProcessGroup, numels: tuple[int, ...]):
        self.group = group
        self.numels = numels  # of the whole (unsharded) parameters, in batch order
        self.collectives = 0  # all-reduces issued (read by tests and the communication report)
        self.bytes = 0  # payload bytes of those all-reduces

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Adds ``tensor`` over the ranks, in place (every rank then holds the same values)."""
        self.collectives += 1
        self.bytes += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    # ---- element granularity: exact thresholds over the shards ------------------------------

    def element_thresholds(self, local_op, a: list[torch.Tensor], b: list[torch.Tensor], scales: torch.Tensor,
                           pooled: torch.Tensor, q_lo: float, q_hi: float, global_pool: bool) -> torch.Tensor:
        """``element_thresholds`` (same arguments, same ``[pools, 5]`` result) over the whole tensors.

        ``local_op``: the backend's ``element_thresholds``, run on the shards for the finiteness
        check (exactly one process's check: every gradient, and the moments of pooled tensors);
        ``a``/``b``: local shards of the gradients and moments (``b`` empty: first-order scores
        ``|a|``)."""
        device = a[0].device if a else pooled.device
        # Tensor pools here: the op refuses a float64 tensor in one global pool with float32 ones.
        nonfinite = local_op(a, b, scales, pooled, q_lo, q_hi, False)[0, 3].to(torch.int64)
        pooled_host = pooled.tolist()
        scales_host = scales.tolist()
        wide = any(opmath_dtype(t.dtype) == torch.float64 for t, p in zip(a, pooled_host, strict=True) if p)
        per_tensor: list[torch.Tensor | None] = [None] * len(a)
        if not bool(nonfinite):  # else every rank skips the step: the counts need not be right
            for i, g in enumerate(a):
                if pooled_host[i] and b:
                    scores, defined = second_order_element_scores(g.reshape(-1), b[i].reshape(-1), scales_host[i])
                    # NaN for "undefined": its key sorts above +inf's, in a first-digit bucket that
                    # the select leaves out (cheaper than compacting the defined scores)
                    per_tensor[i] = scores.masked_fill_(defined.logical_not_(), math.nan)
                elif pooled_host[i]:
                    per_tensor[i] = first_order_element_scores(g.reshape(-1))
        empty = torch.empty(0, dtype=torch.float64 if wide else torch.float32, device=device)
        rows = [i for i, p in enumerate(pooled_host) if p]  # pools that have scores (the same on every rank)
        if global_pool and not rows:
            pools, sizes = [], []
        elif global_pool:
            present = [s for s in per_tensor if s is not None]
            pools = [_keys(torch.cat([s.to(empty.dtype) for s in present]) if present else empty, wide)]
            sizes = [sum(self.numels[i] for i in rows)]
        else:
            pools = [_keys(per_tensor[i] if per_tensor[i] is not None else empty, wide) for i in rows]
            sizes = [self.numels[i] for i in rows]
        counts_dtype = torch.int32 if max(sizes, default=0) < 2**31 else torch.int64  # half the bytes when safe
        lower, upper, count, flag = self._select(pools, wide, q_lo, q_hi, nonfinite, device, counts_dtype)
        table = torch.full((1 if global_pool else len(a), len(THRESHOLD_COLUMNS)), math.nan, dtype=torch.float64,
                           device=device)
        table[:, 2] = 0.0  # an unpooled tensor: an empty pool
        where = slice(None) if global_pool else torch.tensor(rows, dtype=torch.int64, device=device)
        if pools:
            table[where, 0], table[where, 1], table[where, 2] = lower, upper, count.to(torch.float64)
        table[:, 3] = flag.to(torch.float64)
        table[:, 4] = 1.0  # each shard is read once, whatever the pass count: later passes read candidates
        return table

    def _select(self, pools: list[torch.Tensor], wide: bool, q_lo: float, q_hi: float, nonfinite: torch.Tensor,
                device: torch.device, counts_dtype: torch.dtype):
        """Exact ``q_lo``/``q_hi`` quantiles of every pool (int keys, local part) over all ranks."""
        count_pools = len(pools)
        widths = DIGITS[wide]
        top = 63 if wide else 31  # the bits below the sign bit, which a non-negative score leaves 0
        # Pass 1: the top digit of every key, and the non-finite flag, in one all-reduce. The digits
        # are kept: the first compaction is a table lookup on them.
        bins = 1 << widths[0]
        shift = top - widths[0]
        first = torch.zeros(count_pools * bins + 1, dtype=counts_dtype, device=device)
        first_digits = []
        for p, keys in enumerate(pools):
            digits = keys >> shift  # non-negative: the scores are finite or +inf (else no key was made)
            first_digits.append(digits)
            if keys.numel():
                first[p * bins:(p + 1) * bins] = torch.bincount(digits, minlength=bins)
        first[-1] = nonfinite
        self.all_reduce_sum_(first)
        flag = first[-1] > 0
        if not count_pools:  # nothing pooled (on every rank alike): the flag was all there was to add
            nothing = torch.empty(0, dtype=torch.float64, device=device)
            return nothing, nothing, nothing, flag
        undefined = int(_keys(torch.tensor([math.nan]), wide)[0]) >> shift  # the first bucket of NaN keys
        histogram = first[:-1].view(count_pools, bins)
        histogram[:, undefined:] = 0
        histogram = histogram.view(count_pools, 1, bins).expand(count_pools, _TARGETS, bins)
        n = histogram[:, 0].sum(1, dtype=torch.int64)
        ranks = []
        positions = []
        for q in (q_lo, q_hi):
            r, k, k1 = quantile_ranks(n, q)
            positions.append((r, k))
            ranks.extend((k, k1))
        remaining = torch.stack(ranks, dim=1).reshape(count_pools, _TARGETS)  # rank of each target in its bucket
        prefix = torch.zeros_like(remaining)  # [pools, 4]: the target's key bits found so far
        consumed = 0
        for j, width in enumerate(widths):
            bins = 1 << width
            cumulative = histogram.cumsum(2)
            digit = torch.searchsorted(cumulative, remaining.unsqueeze(2), right=True).squeeze(2).clamp(max=bins - 1)
            below = torch.where(digit > 0, cumulative.gather(2, (digit - 1).clamp(min=0).unsqueeze(2)).squeeze(2), 0)
            remaining = remaining - below
            prefix = (prefix << width) | digit
            consumed += width
            if j == len(widths) - 1:
                break
            # Next pass: the following digit of the keys inside each target's bucket.
            next_bins = 1 << widths[j + 1]
            shift = top - consumed - widths[j + 1]
            slots = torch.arange(_TARGETS, device=device) * next_bins
            counts = torch.zeros(count_pools, _TARGETS * next_bins, dtype=counts_dtype, device=device)
            for p, keys in enumerate(pools):
                if not keys.numel():
                    continue
                if j == 0:  # from the whole shard to the keys of (at most) four first-digit buckets
                    digits, inside = first_digits[p], None
                    for wanted in set(prefix[p].tolist()):  # comparisons: 9x faster than a table lookup
                        inside = digits == wanted if inside is None else inside.logical_or_(digits == wanted)
                    keys = keys[inside]
                    first_digits[p] = None
                    match = (keys >> (top - consumed)).unsqueeze(1) == prefix[p].unsqueeze(0)  # [keys, 4]
                else:
                    match = (keys >> (top - consumed)).unsqueeze(1) == prefix[p].unsqueeze(0)
                    inside = match.any(1)
                    keys, match = keys[inside], match[inside]
                pools[p] = keys  # only candidates are read again
                if keys.numel():
                    digits = ((keys >> shift) & (next_bins - 1)).unsqueeze(1) + slots.unsqueeze(0)
                    counts[p] = torch.bincount(digits[match], minlength=_TARGETS * next_bins)
            self.all_reduce_sum_(counts)
            histogram = counts.view(count_pools, _TARGETS, next_bins)
        order_statistics = _values(prefix, wide)  # [pools, 4]
        (r_lo, k_lo), (r_hi, k_hi) = positions
        lower = interpolate(order_statistics[:, 0], order_statistics[:, 1], r_lo, k_lo, n)
        upper = interpolate(order_statistics[:, 2], order_statistics[:, 3], r_hi, k_hi, n)
        return lower, upper, n, flag

    # ---- kept fractions ------------------------------------------------------------------

    def kept_fractions(self, local_sums: torch.Tensor) -> torch.Tensor:
        """Whole-tensor kept fractions from each shard's sum of mask values (float64 ``[n]``)."""
        total = self.all_reduce_sum_(local_sums.to(torch.float64).clone())
        sizes = torch.tensor([float(k) for k in self.numels], dtype=torch.float64, device=total.device)
        return torch.where(sizes > 0, total / sizes.clamp(min=1.0), 1.0)


@functools.cache
def dtensor_class():
    """``torch.distributed.tensor.DTensor``, or None where torch has no distributed support."""
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


# (DTensor,), or () where torch has no distributed support; resolved at the first call. A step calls
# local() several times per parameter: one isinstance per call, no function chain (that chain was
# ~0.3 ms of a 103-tensor step's Python).
_DTENSOR_TYPES: tuple | None = None


def _dtensor_types() -> tuple:
    global _DTENSOR_TYPES
    if _DTENSOR_TYPES is None:
        dtensor = dtensor_class()
        _DTENSOR_TYPES = (dtensor,) if dtensor is not None else ()
    return _DTENSOR_TYPES


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the same storage: in-place writes reach the DTensor); else itself."""
    return tensor.to_local() if isinstance(tensor, _DTENSOR_TYPES or _dtensor_types()) else tensor


def local_all(tensors) -> list[torch.Tensor]:
    """``[local(t) for t in tensors]``, with one lookup."""
    types = _DTENSOR_TYPES or _dtensor_types()
    if not types:
        return list(tensors)
    return [t.to_local() if isinstance(t, types) else t for t in tensors]


def _is_dtensor(tensor) -> bool:
    return isinstance(tensor, _DTENSOR_TYPES or _dtensor_types())


def sharding_of(params: list[torch.Tensor]) -> ShardedStep | None:
    """The sharding of ``params`` (DTensors sharded along one mesh dimension, as FSDP2 makes them),
    or None for plain tensors. Raises for layouts whose scores this package cannot make global."""
    flags = [_is_dtensor(p) for p in params]
    if not any(flags):
        return None
    if not all(flags):
        raise RuntimeError(
            "RoseAdamW: some parameters are DTensors and some are plain tensors; under FSDP2 apply "
            "fully_shard to the root module too, so that every parameter is sharded"
        )
    mesh = params[0].device_mesh
    placements = params[0].placements
    for p in params:
        if p.device_mesh != mesh:
            raise RuntimeError("RoseAdamW: sharded parameters must share one device mesh")
        if any(pl.is_partial() for pl in p.placements):
            raise RuntimeError("RoseAdamW: parameters with Partial placements are not supported")
    shard_dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    if not shard_dims:
        return None  # replicated everywhere: every rank holds whole tensors
    if len(shard_dims) > 1:
        raise NotImplementedError("RoseAdamW: parameters sharded over more than one mesh dimension")
    dim = shard_dims[0]
    for p in params:
        if not p.placements[dim].is_shard():
            raise RuntimeError(
                f"RoseAdamW: every parameter must be sharded along mesh dimension {dim} (one has "
                f"placements {p.placements}): a replicated one would be counted once per rank"
            )
    return ShardedStep(mesh.get_group(dim), tuple(p.numel() for p in params))
