"""``backend="triton"``: SCORE, SELECT and UPDATE as Triton kernels (score.py, select.py, update.py).

The GPU path. A step never waits on the host: step counters, lr (when a tensor), pool sizes,
thresholds, masks and the non-finite flag are device tensors, and the kernels skip the update on
the device when an input is not finite. So ``step()`` issues kernels and returns, and a whole
step can be captured in a CUDA graph. Launch tables are cached (``tables.py``), so in a steady state
a step copies nothing from the host (a float lr only when it changed: one small copy into a
buffer of the optimizer's workspace).

While a CUDA graph is captured, every device tensor the captured work reads that the caches or
the workspace could later free goes into ``workspace["graph_keepalive"]`` (the optimizer's list),
so that a replay never reads memory handed to something else.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly); that is how the tests
exercise this backend on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rose_kernels.backends.triton import tables
from rose_kernels.backends.triton.score import first_order_mask_, sumsq
from rose_kernels.backends.triton.select import element_thresholds, in_interval, new_guesses, small_pool_quantiles
from rose_kernels.backends.triton.update import masked_adamw_
from rose_kernels.types import FirstOrderRecord, RoseConfig, StepBatch, StepResult

__all__ = ["TritonBackend", "element_thresholds", "first_order_mask_", "masked_adamw_", "sumsq"]

_WEIGHTS = {"off": (0.0, 1.0), "second": (0.0, 1.0), "first": (1.0, 0.0)}


def _steps(state_steps: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """float32 ``[n]`` of the counters before this step (0 where a parameter has no state)."""
    zero = tables.constant((0.0,), torch.float32, device)[0]
    return torch.stack([zero if s is None else s.reshape(()).to(torch.float32) for s in state_steps])


def _guesses(workspace: dict | None, order: str, pools: int, device: torch.device) -> torch.Tensor | None:
    """Last step's top-digit buckets of each pool (select.py): speed only, never results."""
    if workspace is None:
        return None
    guesses = workspace.get(order)
    if guesses is None or guesses.shape[0] != pools or guesses.device != device:
        guesses = workspace[order] = new_guesses(pools, device)
    tables.hold(guesses)  # replaced when the pools change; a captured graph keeps writing this one
    return guesses


def _keep_alive(workspace: dict | None, device: torch.device):
    """tables.keep_alive into the optimizer's list (one is made in a workspace that has none)."""
    sink = None if workspace is None else workspace.setdefault("graph_keepalive", [])
    return tables.keep_alive(sink, device)


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

    Not a ``tables.constant``: an LR scheduler changes the lr every step, and a cache keyed by
    value would then make a new device tensor and cache entry (evicting useful ones) per step.
    The buffer belongs to the optimizer's workspace, so a graph that reads it stays valid."""
    lrs = workspace.get("lr") if workspace is not None else None
    if lrs is not None and lrs.values == values and lrs.on_device.device == device:
        tables.hold(lrs.on_device)
        return lrs.on_device
    if tables.capturing(device):
        # A host-to-device copy captured into a graph would replay from host memory that is reused.
        raise RuntimeError(
            "rose_kernels (triton): a float lr changed since the last eager step while a CUDA graph is "
            "being captured; run one eager step with this lr before capturing, or pass the lr as a "
            "device tensor (a replay reads its value then)"
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
        lrs.copied.record()
    else:
        lrs.on_device.copy_(staged)
    lrs.values = values
    tables.hold(lrs.on_device)
    return lrs.on_device


def _lr_column(workspace: dict | None, hypers, device: torch.device) -> torch.Tensor:
    """float64 ``[n]``: each parameter's lr on the device (tensor lrs are read there, never copied)."""
    tensors = [h.lr if isinstance(h.lr, torch.Tensor) else None for h in hypers]
    tables.hold(tensors)
    if all(t is not None for t in tensors):
        return torch.stack([t.reshape(()).to(torch.float64) for t in tensors])
    floats = _float_lrs(workspace, tuple(0.0 if t is not None else float(h.lr)
                                         for h, t in zip(hypers, tensors, strict=True)), device)
    if all(t is None for t in tensors):
        return floats
    return torch.stack([floats[i] if t is None else t.reshape(()).to(torch.float64) for i, t in enumerate(tensors)])


class TritonBackend:
    name = "triton"
    # Step results are device tensors: RoseAdamW reads them only when the user asks.
    device_resident = True

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" or (device.type == "cpu" and tables.on_host())

    @staticmethod
    def capturing(device: torch.device) -> bool:
        """Whether work on ``device`` is being captured into a CUDA graph now (RoseAdamW then keeps
        its own tensors that the captured step reads in ``workspace["graph_keepalive"]``)."""
        return tables.capturing(device)

    def record_first_order(
        self, kl_grads: list[torch.Tensor], state_steps: list[torch.Tensor | None], warmup_steps: list[int],
        cfg: RoseConfig, reuse: list[torch.Tensor | None] | None = None, workspace: dict | None = None,
    ) -> FirstOrderRecord:
        """``reuse``: last step's masks; their buffers are written again (fixed addresses: the launch
        tables stay cached and a captured CUDA graph keeps pointing at the right memory)."""
        with _keep_alive(workspace, kl_grads[0].device):
            record = self._record_first_order(kl_grads, state_steps, warmup_steps, cfg, reuse, workspace)
            tables.hold(record.masks, record.nonfinite)
            return record

    def _record_first_order(self, kl_grads, state_steps, warmup_steps, cfg, reuse, workspace) -> FirstOrderRecord:
        device = kl_grads[0].device
        n = len(kl_grads)
        scored = _steps(state_steps, device) + 1 > tables.constant(tuple(warmup_steps), torch.float32, device)
        q_lo, q_hi = cfg.quantiles
        if cfg.granularity == "tensor":
            sums = sumsq(kl_grads)
            nonfinite = ~torch.isfinite(sums).all()
            scores = sums.sqrt()
            bounds = small_pool_quantiles(scores, scored, q_lo, q_hi)
            values = torch.where(scored, in_interval(scores, bounds[0], bounds[1]).to(torch.float64), 1.0)
            return FirstOrderRecord(masks=list(values.unbind()), nonfinite=nonfinite)
        ones = tables.constant((1.0,) * n, torch.float64, device)
        global_pool = cfg.scope == "global"
        guesses = _guesses(workspace, "first", 1 if global_pool else n, device)
        thresholds = element_thresholds(kl_grads, [], ones, scored, q_lo, q_hi, global_pool, guesses)
        nonfinite = thresholds[0, 3] != 0
        everything = tables.constant((-float("inf"), float("inf")), torch.float64, device)
        bounds = torch.where(scored[:, None], thresholds[:, :2].expand(n, 2), everything)
        reuse = reuse or [None] * n
        bits = [
            old if isinstance(old, torch.Tensor) and old.dtype == torch.uint8 and old.numel() == (g.numel() + 7) // 8
            and old.device == device else torch.empty((g.numel() + 7) // 8, dtype=torch.uint8, device=device)
            for g, old in zip(kl_grads, reuse, strict=True)
        ]
        first_order_mask_(kl_grads, bounds, bits)
        return FirstOrderRecord(masks=bits, nonfinite=nonfinite)

    def step(self, batch: StepBatch, cfg: RoseConfig) -> StepResult:
        with _keep_alive(batch.workspace, batch.params[0].device):
            # Inputs the optimizer may drop before a replay: last record's masks and flag, tensor lrs.
            tables.hold(batch.first_order, batch.first_order_nonfinite)
            result = self._step(batch, cfg)
            tables.hold(result.nonfinite, result.kept, result.exp_avg_sumsq)
            return result

    def _step(self, batch: StepBatch, cfg: RoseConfig) -> StepResult:
        params = batch.params
        n = len(params)
        device = params[0].device
        hypers = batch.hypers
        numels = tuple(p.numel() for p in params)
        uses_second = cfg.mode in ("second", "ensemble")
        uses_first = cfg.mode in ("first", "ensemble")
        element = cfg.granularity == "element"
        q_lo, q_hi = cfg.quantiles

        steps = _steps(batch.state_steps, device)
        warmup = tables.constant(tuple(float(h.warmup_steps) for h in hypers), torch.float32, device)
        eligible = tables.constant(tuple(e and k > 0 for e, k in zip(batch.eligible, numels, strict=True)),
                                   torch.bool, device)
        pooled = eligible & (steps + 1 > warmup)
        found = torch.zeros(1, dtype=torch.int32, device=device)
        if batch.first_order_nonfinite is not None:
            found = found | batch.first_order_nonfinite.reshape(1).to(torch.int32)
        nan = tables.constant((tables.NAN,) * n, torch.float64, device)
        ones = tables.constant((1.0,) * n, torch.float64, device)
        mu1, mu2, lower, upper = ones, ones, nan, nan

        # SCORE (+ SELECT); every gradient is read once here, which is also the finiteness check.
        if uses_second and element:
            scales = tables.constant(tuple(h.scale for h in hypers), torch.float64, device)
            global_pool = cfg.scope == "global"
            guesses = _guesses(batch.workspace, "second", 1 if global_pool else n, device)
            thresholds = element_thresholds(batch.grads, batch.exp_avgs, scales, pooled, q_lo, q_hi, global_pool,
                                            guesses)
            found = torch.maximum(found, thresholds[:1, 3].to(torch.int32))
            bounds = thresholds[:, :2].expand(n, 2)
            lower, upper = bounds[:, 0], bounds[:, 1]
        else:
            grad_sums = sumsq(batch.grads)
            found = torch.maximum(found, (~torch.isfinite(grad_sums).all()).to(torch.int32).reshape(1))
            if uses_second:
                mu2 = self._tensor_second_order(batch, cfg, pooled, grad_sums, device)

        first_masks: list[torch.Tensor | None] = [None] * n
        if uses_first:
            recorded = batch.first_order or [None] * n
            if element:
                first_masks = [r if e else None for r, e in zip(recorded, batch.eligible, strict=True)]
            else:
                one = ones[0]
                mu1 = torch.stack([r if (e and r is not None) else one
                                   for r, e in zip(recorded, batch.eligible, strict=True)])
        masks = torch.stack([mu1, mu2, lower, upper], dim=1)

        w_first, w_second = _WEIGHTS.get(cfg.mode, (cfg.gamma, 1.0 - cfg.gamma))
        rows = []
        for i, h in enumerate(hypers):
            active = batch.eligible[i] and cfg.mode != "off"
            rows.extend((
                0.0, h.beta1, h.beta2, h.eps, h.weight_decay, float(h.correct_bias),  # lr: column 0, below
                float(h.warmup_steps), w_first if active else 0.0, w_second if active else 1.0,
                float(active and uses_second and element), h.scale,
            ))
        table = tables.constant(tuple(rows), torch.float64, device).reshape(n, -1)
        hyper = torch.cat([_lr_column(batch.workspace, hypers, device)[:, None], table[:, 1:]], dim=1)

        out = masked_adamw_(
            params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.state_steps, first_masks, hyper, masks,
            found, element and (uses_second or uses_first),
        )
        sizes = tables.constant(numels, torch.float64, device)
        kept = torch.where(sizes > 0, out[:, 0] / sizes, 1.0)
        return StepResult(nonfinite=found[0] != 0, kept=kept, exp_avg_sumsq=out[:, 1])

    @staticmethod
    def _tensor_second_order(batch, cfg, pooled, grad_sums, device) -> torch.Tensor:
        """Tensor-granularity second-order masks, float64 ``[n]`` (1 where undefined or not pooled)."""
        cached = batch.exp_avg_sumsq or [None] * len(batch.params)
        if tables.capturing(device):
            # A graph would replay the cached values of the step before capture: recompute inside.
            cached = [None] * len(batch.params)
        missing = [i for i, c in enumerate(cached) if c is None]
        computed = sumsq([batch.exp_avgs[i] for i in missing]).unbind() if missing else ()
        fresh = dict(zip(missing, computed, strict=True))
        m_sums = torch.stack([fresh[i] if c is None else c.reshape(()) for i, c in enumerate(cached)])
        scales = tables.constant(tuple(h.scale for h in batch.hypers), torch.float64, device)
        defined = pooled & (m_sums != 0)
        scores = (scales * grad_sums.sqrt() / m_sums.sqrt() - 1.0).abs()
        q_lo, q_hi = cfg.quantiles
        bounds = small_pool_quantiles(scores, defined, q_lo, q_hi)
        return torch.where(defined, in_interval(scores, bounds[0], bounds[1]).to(torch.float64), 1.0)
