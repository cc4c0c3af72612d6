"""Scores made global over FSDP2 shards: what a step adds when parameters are sharded DTensors.

Under ``torch.distributed.fsdp.fully_shard`` every rank holds one shard (rows along dim 0) of every
parameter, gradient and moment. RoseAdamW hands the fused backends the *local* shards, and the
backend asks this object to turn local partial results into the whole tensors' results, identical
on every rank (so are the masks):

- sums of squares (``||g||^2``, ``||m||^2``, the KL gradients' norms) are partial sums per shard:
  one all-reduce of the per-tensor sums (``2 n`` floats for ``second``, ``n`` otherwise). A
  non-finite value anywhere makes its sum non-finite on every rank, so the skip is global too;
- element granularity: each pool's exact quantiles over all shards, by an MSD radix select on the
  scores' integer keys (non-negative floats order like their bit patterns) whose 8-bit digit
  histograms are all-reduced at each pass: integer counts, so the thresholds are bit-identical to
  those of the unsharded pool. Each rank reads only its shard; one pass per key byte (4 for
  float32 scores, 8 for float64), each one all-reduce of ``pools x 4 x 256`` int64 counts; the
  first pass also carries the non-finite flag;
- kept fractions: the update returns each shard's sum of mask values; they are added over the
  ranks when :meth:`RoseAdamW.mask_stats` is called (a collective call under sharding).

The element scores come from ``rose_kernels.reference`` (the oracle: the same opmath arithmetic as
the kernels) and the quantile from ``fused.quantile_ranks`` / ``fused.interpolate``; the masks and
the update stay in the kernels, which receive the global thresholds.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from rose_kernels.backends.fused import interpolate, quantile_ranks
from rose_kernels.ops import THRESHOLD_COLUMNS
from rose_kernels.reference import first_order_element_scores, opmath_dtype, second_order_element_scores

RADIX_BITS = 8
_BINS = 1 << RADIX_BITS
_TARGETS = 4  # order statistics per pool: x_k and x_{k+1} of the lower and of the upper threshold


def _keys(scores: torch.Tensor, wide: bool) -> torch.Tensor:
    """int64 keys ordered like the non-negative float ``scores`` (``wide``: as float64 bit patterns)."""
    if wide:
        return scores.to(torch.float64).view(torch.int64)
    return scores.to(torch.float32).view(torch.int32).to(torch.int64)


def _values(keys: torch.Tensor, wide: bool) -> torch.Tensor:
    """float64 values of int64 ``keys`` made by :func:`_keys`."""
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

    def subset(self, numels: tuple[int, ...]) -> ShardedStep:
        """The same group for another list of parameters (the step and the record differ)."""
        view = ShardedStep(self.group, numels)
        view.collectives, view.bytes = self.collectives, self.bytes
        return view

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Adds ``tensor`` over the ranks, in place (every rank then holds the same values)."""
        self.collectives += 1
        self.bytes += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    # ---- element granularity: exact thresholds over the shards ------------------------------

    def element_thresholds(self, a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float] | None,
                           pooled: torch.Tensor, q_lo: float, q_hi: float, global_pool: bool) -> torch.Tensor:
        """``element_thresholds`` (same arguments, same ``[pools, 5]`` result) over the whole tensors.

        ``a``/``b``: local shards of the gradients and moments (``b`` empty: first-order scores
        ``|a|``); ``scales``: the second-order ``c`` per tensor as floats."""
        device = a[0].device if a else pooled.device
        pooled_host = pooled.tolist()
        nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        per_tensor: list[torch.Tensor | None] = []
        for i, g in enumerate(a):
            bad = ~torch.isfinite(g).all()
            if not pooled_host[i]:
                nonfinite |= bad
                per_tensor.append(None)
                continue
            if b:
                bad |= ~torch.isfinite(b[i]).all()
                scores, defined = second_order_element_scores(g.reshape(-1), b[i].reshape(-1), scales[i])
                scores = scores[defined]
            else:
                scores = first_order_element_scores(g.reshape(-1))
            nonfinite |= bad
            per_tensor.append(scores)
        wide = any(opmath_dtype(t.dtype) == torch.float64 for t, p in zip(a, pooled_host, strict=True) if p)
        if global_pool:
            present = [s for s in per_tensor if s is not None]
            pools = [_keys(torch.cat(present) if present else torch.empty(0, device=device), wide)]
        else:
            pools = [_keys(s, wide) if s is not None else torch.empty(0, dtype=torch.int64, device=device)
                     for s in per_tensor]
        lower, upper, count, flag = self._select(pools, wide, q_lo, q_hi, nonfinite, device)
        table = torch.empty((len(pools), len(THRESHOLD_COLUMNS)), dtype=torch.float64, device=device)
        table[:, 0], table[:, 1], table[:, 2] = lower, upper, count.to(torch.float64)
        table[:, 3] = flag.to(torch.float64)
        table[:, 4] = 1.0  # each shard is read once, whatever the pass count: later passes read candidates
        return table

    def _select(self, pools: list[torch.Tensor], wide: bool, q_lo: float, q_hi: float, nonfinite: torch.Tensor,
                device: torch.device):
        """Exact ``q_lo``/``q_hi`` quantiles of every pool (int64 keys, local part) over all ranks."""
        count_pools = len(pools)
        bits = 64 if wide else 32
        # Pass 1: the top digit of every key, and the non-finite flag, in one all-reduce.
        first = torch.zeros(count_pools * _BINS + 1, dtype=torch.int64, device=device)
        shift = bits - RADIX_BITS
        for p, keys in enumerate(pools):
            if keys.numel():
                first[p * _BINS:(p + 1) * _BINS] += torch.bincount((keys >> shift) & (_BINS - 1), minlength=_BINS)
        first[-1] = nonfinite
        self.all_reduce_sum_(first)
        flag = first[-1] > 0
        histogram = first[:-1].view(count_pools, 1, _BINS).expand(count_pools, _TARGETS, _BINS)
        n = histogram[:, 0].sum(1)
        ranks = []
        positions = []
        for q in (q_lo, q_hi):
            r, k, k1 = quantile_ranks(n, q)
            positions.append((r, k))
            ranks.extend((k, k1))
        remaining = torch.stack(ranks, dim=1)  # [pools, 4]: rank of each target within its bucket
        prefix = torch.zeros_like(remaining)  # [pools, 4]: the target's key bits found so far
        slots = torch.arange(_TARGETS, device=device) * _BINS
        for done in range(RADIX_BITS, bits + 1, RADIX_BITS):
            cumulative = histogram.cumsum(2)
            digit = torch.searchsorted(cumulative, remaining.unsqueeze(2), right=True).squeeze(2).clamp(max=_BINS - 1)
            below = torch.where(digit > 0, cumulative.gather(2, (digit - 1).clamp(min=0).unsqueeze(2)).squeeze(2), 0)
            remaining = remaining - below
            prefix = (prefix << RADIX_BITS) | digit
            if done == bits:
                break
            # Next pass: the following digit of the keys inside each target's bucket.
            counts = torch.zeros(count_pools, _TARGETS * _BINS, dtype=torch.int64, device=device)
            shift = bits - done
            for p, keys in enumerate(pools):
                if not keys.numel():
                    continue
                match = (keys >> shift).unsqueeze(1) == prefix[p].unsqueeze(0)  # [keys, 4]
                inside = match.any(1)
                keys, match = keys[inside], match[inside]
                pools[p] = keys  # only candidates are read again
                if keys.numel():
                    digits = ((keys >> (shift - RADIX_BITS)) & (_BINS - 1)).unsqueeze(1) + slots.unsqueeze(0)
                    counts[p] = torch.bincount(digits[match], minlength=_TARGETS * _BINS)
            self.all_reduce_sum_(counts)
            histogram = counts.view(count_pools, _TARGETS, _BINS)
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


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the same storage: in-place writes reach the DTensor); else itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _is_dtensor(tensor) -> bool:
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


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
