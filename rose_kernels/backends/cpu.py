"""``backend="cpu"``: the fused C++ kernels (csrc/cpu), driven through the op registry.

Per step: at most one SCORE pass over the gradients (sums of squares, or the element-score
selection, which also checks that every gradient is finite), a few hundred float64 numbers of
bookkeeping in Python, and one UPDATE call for every tensor of every group.
"""

from __future__ import annotations

import math

import torch

from rose_kernels import ops
from rose_kernels.reference import in_interval, scored_on_host, second_order_score
from rose_kernels.types import FirstOrderRecord, RoseConfig, StepBatch, StepResult


def _tensor_pool_masks(scores: torch.Tensor, cfg: RoseConfig) -> list[float]:
    """0/1 per tensor score (float64, all defined), thresholds over the pool of all of them."""
    if scores.numel() == 0:
        return []
    q_lo, q_hi = cfg.quantiles
    thresholds = ops.element_thresholds([scores], [], [], q_lo, q_hi, True)
    lo, hi = thresholds[0, 0].item(), thresholds[0, 1].item()
    return in_interval(scores, lo, hi).to(torch.float64).tolist()


class CpuBackend:
    name = "cpu"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu" and ops.available()

    def record_first_order(
        self, kl_grads: list[torch.Tensor], state_steps: list[torch.Tensor | None], warmup_steps: list[int],
        cfg: RoseConfig, reuse: list | None = None, workspace: dict | None = None,
    ) -> FirstOrderRecord:
        """``reuse``: the last step's masks, written again instead of allocating new ones (the old
        ones would otherwise be alive next to the new: 2 bits per element at the peak, not 1)."""
        scored = scored_on_host(state_steps, warmup_steps)
        masks: list = [None] * len(kl_grads)
        index = [i for i, s in enumerate(scored) if s]
        unscored = [kl_grads[i] for i, s in enumerate(scored) if not s]
        if unscored and not torch.isfinite(ops.sumsq(unscored)).all():
            return FirstOrderRecord(masks=[], nonfinite=True)
        grads = [kl_grads[i] for i in index]
        if not grads:
            return FirstOrderRecord(masks=masks, nonfinite=False)
        if cfg.granularity == "tensor":
            sums = ops.sumsq(grads)
            if not torch.isfinite(sums).all():
                return FirstOrderRecord(masks=[], nonfinite=True)
            for i, mu in zip(index, _tensor_pool_masks(sums.sqrt(), cfg), strict=True):
                masks[i] = mu
            return FirstOrderRecord(masks=masks, nonfinite=False)
        q_lo, q_hi = cfg.quantiles
        thresholds = ops.element_thresholds(grads, [], [], q_lo, q_hi, cfg.scope == "global")
        if thresholds[:, 3].any():
            return FirstOrderRecord(masks=[], nonfinite=True)
        per_tensor = thresholds[:, :2].expand(len(grads), 2).contiguous()
        reuse = reuse or [None] * len(kl_grads)
        bits = []
        for i, g in zip(index, grads, strict=True):
            old = reuse[i]
            fits = isinstance(old, torch.Tensor) and old.dtype == torch.uint8 and old.numel() == (g.numel() + 7) // 8
            bits.append(old if fits else torch.empty((g.numel() + 7) // 8, dtype=torch.uint8))
        ops.first_order_mask_(grads, per_tensor, bits)
        for i, b in zip(index, bits, strict=True):
            masks[i] = b
        return FirstOrderRecord(masks=masks, nonfinite=False)

    def step(self, batch: StepBatch, cfg: RoseConfig) -> StepResult:
        n = len(batch.params)
        hypers = batch.hypers
        next_steps = (torch.stack(batch.state_steps).to(torch.float64) + 1).tolist() if n else []
        pooled = [
            batch.eligible[i] and next_steps[i] > hypers[i].warmup_steps and batch.params[i].numel() > 0
            for i in range(n)
        ]
        nonempty = [i for i in range(n) if batch.params[i].numel() > 0]
        uses_second = cfg.mode in ("second", "ensemble")
        mask_second = [1.0] * n
        element_second = [False] * n
        bounds = [(math.nan, math.nan)] * n
        grad_sums = None

        # SCORE (+ SELECT): every gradient is read once here, which is also the finiteness check.
        if uses_second and cfg.granularity == "element":
            second = [i for i in range(n) if pooled[i]]
            others = [i for i in nonempty if not pooled[i]]
            if others and not torch.isfinite(ops.sumsq([batch.grads[i] for i in others])).all():
                return StepResult(nonfinite=True)
            if second:
                q_lo, q_hi = cfg.quantiles
                thresholds = ops.element_thresholds(
                    [batch.grads[i] for i in second],
                    [batch.exp_avgs[i] for i in second],
                    [hypers[i].scale for i in second],
                    q_lo,
                    q_hi,
                    cfg.scope == "global",
                )
                if thresholds[:, 3].any():
                    return StepResult(nonfinite=True)
                rows = thresholds[:, :2].expand(len(second), 2).tolist()
                for i, (lo, hi) in zip(second, rows, strict=True):
                    element_second[i] = True
                    bounds[i] = (lo, hi)
        elif nonempty:
            grad_sums = ops.sumsq([batch.grads[i] for i in nonempty])
            if not torch.isfinite(grad_sums).all():
                return StepResult(nonfinite=True)
            if uses_second:
                self._tensor_second_order(batch, cfg, pooled, nonempty, grad_sums, mask_second)

        # UPDATE: one call for every tensor.
        w_first, w_second = {
            "off": (0.0, 1.0),
            "second": (0.0, 1.0),
            "first": (1.0, 0.0),
            "ensemble": (cfg.gamma, 1.0 - cfg.gamma),
        }[cfg.mode]
        first = batch.first_order
        first_masks: list[torch.Tensor | None] = [None] * n
        rows = []
        for i in range(n):
            h = hypers[i]
            w1, w2, mu1 = 0.0, 1.0, 1.0
            if batch.eligible[i] and cfg.mode != "off":
                w1, w2 = w_first, w_second
                recorded = first[i] if first is not None else None
                if isinstance(recorded, torch.Tensor):
                    first_masks[i] = recorded
                elif recorded is not None:
                    mu1 = recorded
            lo, hi = bounds[i]
            rows.append(
                (h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, float(h.correct_bias), float(h.warmup_steps),
                 w1, mu1, w2, mask_second[i], float(element_second[i]), lo, hi, h.scale)
            )
        table = torch.tensor(rows, dtype=torch.float64).reshape(n, len(ops.UPDATE_COLUMNS))
        out = ops.masked_adamw_(
            batch.params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.state_steps, first_masks, table
        )
        kept_sum, m_sumsq = out[:, 0].tolist(), out[:, 1].tolist()
        kept = [k / p.numel() if p.numel() else 1.0 for k, p in zip(kept_sum, batch.params, strict=True)]
        return StepResult(nonfinite=False, kept=kept, exp_avg_sumsq=m_sumsq)

    @staticmethod
    def _tensor_second_order(batch, cfg, pooled, nonempty, grad_sums, mask_second):
        """Tensor-granularity second-order masks from ||g|| and ||m|| (the latter cached by the update)."""
        position = {i: j for j, i in enumerate(nonempty)}
        candidates = [i for i in nonempty if pooled[i]]
        if not candidates:
            return
        cached = batch.exp_avg_sumsq or [None] * len(batch.params)
        missing = [i for i in candidates if cached[i] is None]
        m_sums = dict(zip(candidates, [cached[i] for i in candidates], strict=True))
        if missing:
            for i, value in zip(missing, ops.sumsq([batch.exp_avgs[i] for i in missing]).tolist(), strict=True):
                m_sums[i] = value
        g_all = grad_sums.tolist()
        defined, scores = [], []
        for i in candidates:
            score = second_order_score(math.sqrt(g_all[position[i]]), math.sqrt(m_sums[i]), batch.hypers[i].scale)
            if score is not None:  # undefined: kept, and left out of the pool
                scores.append(score)
                defined.append(i)
        masks = _tensor_pool_masks(torch.tensor(scores, dtype=torch.float64), cfg)
        for i, mu in zip(defined, masks, strict=True):
            mask_second[i] = mu
