"""The fused backends' step, assembled once: ``cpu`` (C++), ``cuda`` (CUDA C++) and ``triton``.

All three implement one op family with one set of schemas (``csrc/ops.cpp``; the Triton kernels
register the same schemas under ``rose_triton``): ``sumsq``, ``element_thresholds``,
``first_order_mask_`` and ``masked_adamw_``. A step here is those ops plus a few small tensor
operations, and hands the same arguments to whichever implementation the backend names:

- SCORE (+ SELECT): one read of every gradient, which is also the finiteness check: per-tensor sums
  of squares, or the element scores' exact thresholds of every pool;
- tensor granularity: the pool of per-tensor scores (a few hundred values) is sorted;
- UPDATE: one call for every tensor; lr, step counters, thresholds and the non-finite flag are
  device tensors, and a set flag makes the update a no-op on the device.

On a GPU nothing waits for the host (results are device tensors the optimizer reads only when
asked), so a whole step can be captured in a CUDA graph: every device tensor a captured step reads
that a cache or the workspace could later free goes into ``workspace["graph_keepalive"]``. On the
CPU (``device_resident = False``) the results come back as Python values, and a step whose
gradients are not finite returns before the update.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from rose_kernels.backends import device_tables
from rose_kernels.backends.base import Backend
from rose_kernels.backends.quantiles import INF, in_interval, new_guesses, small_pool_quantiles
from rose_kernels.ops import HYPER_COLUMNS
from rose_kernels.types import FirstOrderRecord, RoseConfig, StepBatch, StepResult

_WEIGHTS = {"off": (0.0, 1.0), "second": (0.0, 1.0), "first": (1.0, 0.0)}


def _steps(state_steps: list[torch.Tensor | None], device: torch.device, on_host: bool) -> torch.Tensor:
    """float32 ``[n]`` of the counters before this step (0 where a parameter has no state).
    ``on_host``: the backend reads host values anyway (cpu), so the counters are read directly."""
    if on_host:  # one Python float per counter beats a stack of hundreds of views
        return torch.tensor([0.0 if s is None else float(s) for s in state_steps], dtype=torch.float32)
    zero = device_tables.constant((0.0,), torch.float32, device)[0]
    return torch.stack([zero if s is None else s.reshape(()).to(torch.float32) for s in state_steps])


def _guesses(workspace: dict | None, order: str, pools: int, device: torch.device) -> torch.Tensor | None:
    """Last step's guesses for each pool of this order's selection (speed only, never results)."""
    if workspace is None:
        return None
    key = f"guesses_{order}"
    guesses = workspace.get(key)
    if guesses is None or guesses.shape[0] != pools or guesses.device != device:
        guesses = workspace[key] = new_guesses(pools, device)
    device_tables.hold(guesses)  # replaced when the pools change; a captured graph keeps writing this one
    return guesses


def _column(values: list, device: torch.device) -> torch.Tensor:
    """float64 ``[n]`` on ``device`` from per-tensor values: host floats (one copy) or 0-d tensors."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return torch.tensor(values, dtype=torch.float64, device=device)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])


def _keep_alive(workspace: dict | None, device: torch.device):
    """device_tables.keep_alive into the optimizer's list (one is made in a workspace that has none)."""
    sink = None if workspace is None else workspace.setdefault("graph_keepalive", [])
    return device_tables.keep_alive(sink, device)


@dataclass
class _LrBuffer:
    """The float lrs of the step's parameters on the device, and the host side of their copy."""

    on_device: torch.Tensor  # float64 [n]
    values: tuple[float, ...] | None  # what on_device holds (once the queued copy has run)
    host: torch.Tensor | None = None  # pinned staging tensor (CUDA)
    copied: object = None  # torch.cuda.Event recorded after the last copy out of ``host``

    def __getstate__(self) -> dict:
        # A CUDA event does not pickle (nor deep-copy, which a copied optimizer does): made anew.
        return {**self.__dict__, "host": None, "copied": None}


def _float_lrs(workspace: dict | None, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """float64 ``[n]`` device tensor holding ``values``, refilled only when they change.

    Not a ``device_tables.constant``: an LR scheduler changes the lr every step, and a cache keyed
    by value would then make a new device tensor and cache entry (evicting useful ones) per step.
    The buffer belongs to the optimizer's workspace, so a graph that reads it stays valid."""
    lrs = workspace.get("lr") if workspace is not None else None
    if lrs is not None and lrs.values == values and lrs.on_device.device == device:
        device_tables.hold(lrs.on_device)
        return lrs.on_device
    if device_tables.capturing(device):
        # A host-to-device copy captured into a graph would replay from host memory that is reused.
        raise RuntimeError(
            "rose_kernels: a float lr changed since the last eager step while a CUDA graph is being "
            "captured; run one eager step with this lr before capturing, or pass the lr as a device "
            "tensor (a replay reads its value then)"
        )
    n = len(values)
    if lrs is None or lrs.on_device.shape != (n,) or lrs.on_device.device != device:
        lrs = _LrBuffer(torch.empty(n, dtype=torch.float64, device=device), None)
        if workspace is not None:
            workspace["lr"] = lrs
    staged = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":
        # The pinned staging tensor is rewritten only once its last copy has run (an event query,
        # no wait); else a fresh one comes from torch's pinned caching allocator, which recycles
        # the old one when its copy is done.
        if lrs.host is None or lrs.host.shape != (n,) or not lrs.copied.query():
            lrs.host = torch.empty(n, dtype=torch.float64, pin_memory=True)
            lrs.copied = torch.cuda.Event()
        lrs.host.copy_(staged)
        lrs.on_device.copy_(lrs.host, non_blocking=True)
        lrs.copied.record(torch.cuda.current_stream(device))
    else:
        lrs.on_device.copy_(staged)
    lrs.values = values
    device_tables.hold(lrs.on_device)
    return lrs.on_device


def _lr_column(workspace: dict | None, hypers, device: torch.device) -> torch.Tensor:
    """float64 ``[n]``: each parameter's lr on the device (tensor lrs are read there, never copied)."""
    tensors = [h.lr if isinstance(h.lr, torch.Tensor) else None for h in hypers]
    device_tables.hold(tensors)
    if all(t is not None for t in tensors):
        return torch.stack([t.reshape(()).to(torch.float64) for t in tensors])
    floats = _float_lrs(workspace, tuple(0.0 if t is not None else float(h.lr)
                                         for h, t in zip(hypers, tensors, strict=True)), device)
    if all(t is None for t in tensors):
        return floats
    return torch.stack([floats[i] if t is None else t.reshape(()).to(torch.float64) for i, t in enumerate(tensors)])


@dataclass
class _StepTables:
    """The device tables of a step that follow from its settings alone (not from the tensors'
    values): rebuilt only when the hyper-parameters (the list ``functional`` reuses while they are
    unchanged), the eligible flags, the sizes, the mode or the device change."""

    key: tuple
    hypers: list
    warmup: torch.Tensor
    eligible: torch.Tensor
    nan: torch.Tensor
    ones: torch.Tensor
    scales: torch.Tensor
    table: torch.Tensor  # the hyper table less its lr column
    sizes: torch.Tensor

    def held(self) -> _StepTables:
        device_tables.hold([self.warmup, self.eligible, self.nan, self.ones, self.scales, self.table, self.sizes])
        return self


def _step_tables(workspace: dict | None, batch: StepBatch, cfg: RoseConfig, numels: tuple[int, ...],
                 device: torch.device) -> _StepTables:
    hypers = batch.hypers
    key = (cfg.mode, cfg.gamma, cfg.granularity, tuple(batch.eligible), numels, device)
    cached = workspace.get("step_tables") if workspace is not None else None
    if cached is not None and cached.hypers is hypers and cached.key == key:
        return cached.held()
    n = len(hypers)
    w_first, w_second = _WEIGHTS.get(cfg.mode, (cfg.gamma, 1.0 - cfg.gamma))
    element_second = cfg.uses_second_order and cfg.element
    rows = []
    for e, h in zip(batch.eligible, hypers, strict=True):
        active = e and cfg.mode != "off"
        rows.extend((
            0.0, h.beta1, h.beta2, h.eps, h.weight_decay, float(h.correct_bias),  # lr: column 0, from _lr_column
            float(h.warmup_steps), w_first if active else 0.0, w_second if active else 1.0,
            float(active and element_second), h.scale,
        ))
    tables = _StepTables(
        key=key, hypers=hypers,
        warmup=device_tables.constant(tuple(float(h.warmup_steps) for h in hypers), torch.float32, device),
        eligible=device_tables.constant(tuple(e and k > 0 for e, k in zip(batch.eligible, numels, strict=True)),
                                        torch.bool, device),
        nan=device_tables.constant((device_tables.NAN,) * n, torch.float64, device),
        ones=device_tables.constant((1.0,) * n, torch.float64, device),
        scales=device_tables.constant(tuple(h.scale for h in hypers), torch.float64, device),
        table=device_tables.constant(tuple(rows), torch.float64, device).reshape(n, len(HYPER_COLUMNS))[:, 1:],
        sizes=device_tables.constant(tuple(float(k) for k in numels), torch.float64, device),
    )
    if workspace is not None:
        workspace["step_tables"] = tables
    return tables


@functools.cache
def native_ops():
    """The op family as the compiled extension registers it (CPU, and CUDA when built so)."""
    ns = torch.ops.rose_kernels
    return SimpleNamespace(sumsq=ns.sumsq.default, element_thresholds=ns.element_thresholds.default,
                           first_order_mask_=ns.first_order_mask_.default, masked_adamw_=ns.masked_adamw_.default)


class FusedBackend(Backend):
    """A backend made of one implementation of the op family (``ops``: a namespace of the four ops)."""

    name = "fused"
    # Step results are device tensors that RoseAdamW reads only when the user asks (GPU backends).
    device_resident = True
    # Scores and thresholds are made global over the shards by backends/sharded.py.
    supports_sharding = True

    def ops(self):
        raise NotImplementedError

    def capturing(self, device: torch.device) -> bool:
        return device_tables.capturing(device)

    def sumsq_op(self):
        return self.ops().sumsq

    # ---- first-order scores (the KL gradients of two dropout passes) -----------------------

    def record_first_order(
        self, kl_grads: list[torch.Tensor], state_steps: list[torch.Tensor | None], warmup_steps: list[int],
        cfg: RoseConfig, *, reuse: list | None = None, workspace: dict | None = None, sharding=None,
    ) -> FirstOrderRecord:
        """``reuse``: last step's masks; their buffers are written again (fixed addresses: launch
        tables stay cached, a captured CUDA graph keeps pointing at the right memory, and the old
        masks are not alive next to the new ones: 1 bit per element at the peak, not 2).
        ``sharding``: the KL gradients are local shards (backends/sharded.py)."""
        with _keep_alive(workspace, kl_grads[0].device):
            record = self._record_first_order(kl_grads, state_steps, warmup_steps, cfg, reuse, workspace, sharding)
            device_tables.hold(record.masks, record.nonfinite)
        if self.device_resident:
            return record
        masks = [m.item() if isinstance(m, torch.Tensor) and m.dim() == 0 else m for m in record.masks]
        return FirstOrderRecord(masks=masks, nonfinite=bool(record.nonfinite))

    def _record_first_order(self, kl_grads, state_steps, warmup_steps, cfg, reuse, workspace,
                            sharding) -> FirstOrderRecord:
        ops = self.ops()
        device = kl_grads[0].device
        n = len(kl_grads)
        warmup = device_tables.constant(tuple(warmup_steps), torch.float32, device)
        scored = _steps(state_steps, device, not self.device_resident) + 1 > warmup
        q_lo, q_hi = cfg.quantiles
        if not cfg.element:
            sums = ops.sumsq(kl_grads)
            if sharding is not None:
                sharding.all_reduce_sum_(sums)
            nonfinite = ~torch.isfinite(sums).all() if cfg.checks_finite else torch.zeros((), dtype=torch.bool,
                                                                                        device=device)
            scores = sums.sqrt()
            bounds = small_pool_quantiles(scores, scored, q_lo, q_hi)
            values = torch.where(scored, in_interval(scores, bounds[0], bounds[1]).to(torch.float64), 1.0)
            return FirstOrderRecord(masks=list(values.unbind()), nonfinite=nonfinite)
        ones = device_tables.constant((1.0,) * n, torch.float64, device)
        global_pool = cfg.scope == "global"
        guesses = _guesses(workspace, "first", 1 if global_pool else n, device)
        if sharding is not None:
            thresholds = sharding.element_thresholds(ops.element_thresholds, kl_grads, [], ones, scored, q_lo, q_hi,
                                                     global_pool)
        else:
            thresholds = ops.element_thresholds(kl_grads, [], ones, scored, q_lo, q_hi, global_pool, guesses)
        nonfinite = thresholds[0, 3] != 0
        if not cfg.checks_finite:
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        elif not self.device_resident and bool(nonfinite):
            return FirstOrderRecord(masks=[], nonfinite=True)
        everything = device_tables.constant((-INF, INF), torch.float64, device)
        bounds = torch.where(scored[:, None], thresholds[:, :2].expand(n, 2), everything)
        reuse = reuse or [None] * n
        bits = [
            old if isinstance(old, torch.Tensor) and old.dtype == torch.uint8 and old.numel() == (g.numel() + 7) // 8
            and old.device == device else torch.empty((g.numel() + 7) // 8, dtype=torch.uint8, device=device)
            for g, old in zip(kl_grads, reuse, strict=True)
        ]
        ops.first_order_mask_(kl_grads, bounds.contiguous(), bits)
        return FirstOrderRecord(masks=bits, nonfinite=nonfinite)

    # ---- the step ------------------------------------------------------------------------------

    def step(self, batch: StepBatch, cfg: RoseConfig) -> StepResult:
        with _keep_alive(batch.workspace, batch.params[0].device):
            # Inputs the optimizer may drop before a replay: last record's masks and flag, tensor lrs.
            device_tables.hold(batch.first_order, batch.first_order_nonfinite)
            result = self._step(batch, cfg)
            device_tables.hold(result.nonfinite, result.kept, result.exp_avg_sumsq)
        if self.device_resident or result.nonfinite is True:
            return result
        return StepResult(nonfinite=False, kept=result.kept.tolist(), exp_avg_sumsq=result.exp_avg_sumsq.tolist())

    def _step(self, batch: StepBatch, cfg: RoseConfig) -> StepResult:
        ops = self.ops()
        params = batch.params
        n = len(params)
        device = params[0].device
        hypers = batch.hypers
        sharding = batch.sharding
        numels = sharding.numels if sharding is not None else tuple(p.numel() for p in params)
        uses_second = cfg.uses_second_order
        uses_first = cfg.uses_first_order
        element = cfg.element
        q_lo, q_hi = cfg.quantiles

        steps = _steps(batch.state_steps, device, not self.device_resident)
        tables = _step_tables(batch.workspace, batch, cfg, numels, device)
        pooled = tables.eligible & (steps + 1 > tables.warmup)
        found = torch.zeros(1, dtype=torch.int32, device=device)
        checked = cfg.checks_finite
        if batch.first_order_nonfinite is not None and checked:
            found = found | torch.as_tensor(batch.first_order_nonfinite, device=device).reshape(1).to(torch.int32)
        ones = tables.ones
        mu1, mu2, lower, upper = ones, ones, tables.nan, tables.nan

        # SCORE (+ SELECT); every gradient is read once here, which is also the finiteness check.
        if uses_second and element:
            scales = tables.scales
            global_pool = cfg.scope == "global"
            guesses = _guesses(batch.workspace, "second", 1 if global_pool else n, device)
            if sharding is not None:
                thresholds = sharding.element_thresholds(ops.element_thresholds, batch.grads, batch.exp_avgs, scales,
                                                         pooled, q_lo, q_hi, global_pool)
            else:
                thresholds = ops.element_thresholds(batch.grads, batch.exp_avgs, scales, pooled, q_lo, q_hi,
                                                    global_pool, guesses)
            if checked:
                found = torch.maximum(found, thresholds[:1, 3].to(torch.int32))
            bounds = thresholds[:, :2].expand(n, 2)
            lower, upper = bounds[:, 0], bounds[:, 1]
        elif uses_second or checked:  # unchecked off/first: no score needs the gradients, so no read
            given = batch.grad_sumsq
            if given is not None and given and all(v is not None for v in given):
                # Handed over by clip_grad_norm_, which read the gradients just before: not read again.
                grad_sums = _column(given, device)
            else:
                grad_sums = ops.sumsq(batch.grads)
            m_sums = self._exp_avg_sums(batch, device) if uses_second else None
            if sharding is not None:  # the shards' partial sums, added up: one all-reduce
                both = sharding.all_reduce_sum_(grad_sums if m_sums is None else torch.cat([grad_sums, m_sums]))
                grad_sums, m_sums = (both, None) if m_sums is None else both.split(n)
            if checked:
                found = torch.maximum(found, (~torch.isfinite(grad_sums).all()).to(torch.int32).reshape(1))
            if uses_second:
                if checked and not self.device_resident and bool(found[0]):
                    return StepResult(nonfinite=True)
                mu2 = self._tensor_second_order(cfg, tables.scales, pooled, grad_sums, m_sums)
        if checked and not self.device_resident and bool(found[0]):
            return StepResult(nonfinite=True)

        first_masks: list[torch.Tensor | None] = [None] * n
        if uses_first:
            recorded = batch.first_order or [None] * n
            if element:
                first_masks = [r if e and isinstance(r, torch.Tensor) else None
                               for r, e in zip(recorded, batch.eligible, strict=True)]
            else:
                one = ones[0]
                mu1 = torch.stack([torch.as_tensor(r, dtype=torch.float64, device=device).reshape(())
                                   if (e and r is not None) else one
                                   for r, e in zip(recorded, batch.eligible, strict=True)])
        masks = torch.stack([mu1, mu2, lower, upper], dim=1)
        hyper = torch.cat([_lr_column(batch.workspace, hypers, device)[:, None], tables.table], dim=1)

        out = ops.masked_adamw_(
            params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.state_steps, first_masks, hyper, masks,
            found, element and (uses_second or uses_first),
        )
        if sharding is not None:  # this shard's sums of mask values; RoseAdamW adds them up when asked
            return StepResult(nonfinite=found[0] != 0, kept=out[:, 0], exp_avg_sumsq=out[:, 1])
        sizes = tables.sizes
        kept = torch.where(sizes > 0, out[:, 0] / sizes, 1.0)
        return StepResult(nonfinite=found[0] != 0, kept=kept, exp_avg_sumsq=out[:, 1])

    def _exp_avg_sums(self, batch, device) -> torch.Tensor:
        """float64 ``[n]``: ``||exp_avg||^2`` of every parameter, cached from the last update where valid."""
        cached = batch.exp_avg_sumsq or [None] * len(batch.params)
        if device_tables.capturing(device):
            # A graph would replay the cached values of the step before capture: recompute inside.
            cached = [None] * len(batch.params)
        missing = [i for i, c in enumerate(cached) if c is None]
        computed = self.ops().sumsq([batch.exp_avgs[i] for i in missing]).unbind() if missing else ()
        fresh = dict(zip(missing, computed, strict=True))
        return _column([fresh[i] if c is None else c for i, c in enumerate(cached)], device)

    def _tensor_second_order(self, cfg, scales, pooled, grad_sums, m_sums) -> torch.Tensor:
        """Tensor-granularity second-order masks, float64 ``[n]`` (1 where undefined or not pooled)."""
        defined = pooled & (m_sums != 0)
        scores = (scales * grad_sums.sqrt() / m_sums.sqrt() - 1.0).abs()
        q_lo, q_hi = cfg.quantiles
        bounds = small_pool_quantiles(scores, defined, q_lo, q_hi)
        return torch.where(defined, in_interval(scores, bounds[0], bounds[1]).to(torch.float64), 1.0)


class CpuBackend(FusedBackend):
    """``backend="cpu"``: the C++ kernels (csrc/cpu), compiled once per CPU capability."""

    name = "cpu"
    device_resident = False

    def ops(self):
        return native_ops()

    def supports_device(self, device: torch.device) -> bool:
        from rose_kernels import ops

        return device.type == "cpu" and ops.available()


class CudaBackend(FusedBackend):
    """``backend="cuda"``: the CUDA C++ kernels (csrc/cuda), when the extension was built with them."""

    name = "cuda"

    def ops(self):
        return native_ops()

    def supports_device(self, device: torch.device) -> bool:
        from rose_kernels import ops

        return device.type == "cuda" and ops.available() and ops.built_with_cuda()
