"""``backend="reference"``: the oracle (``rose_kernels.reference``) driven through the backend contract.

Runs anywhere torch runs, one tensor at a time; results are host values. It does not step DTensor
shards (its quantiles would be the shard's, not the tensor's).
"""

from __future__ import annotations

import torch

from rose_kernels import reference as oracle
from rose_kernels.backends.base import Backend
from rose_kernels.types import FirstOrderRecord, RoseConfig, StepBatch, StepResult


class ReferenceBackend(Backend):
    name = "reference"

    def supports_device(self, device: torch.device) -> bool:
        return True

    def record_first_order(
        self, kl_grads: list[torch.Tensor], state_steps: list[torch.Tensor | None], warmup_steps: list[int],
        cfg: RoseConfig, *, reuse: list | None = None, workspace: dict | None = None, sharding=None,
    ) -> FirstOrderRecord:
        if sharding is not None:
            raise RuntimeError("the reference backend does not run on sharded (DTensor) parameters")
        scored = oracle.scored_on_host(state_steps, warmup_steps)
        if cfg.checks_finite and not all(torch.isfinite(g).all() for g in kl_grads):
            return FirstOrderRecord(masks=[], nonfinite=True)
        units = []
        for i, (g, is_scored) in enumerate(zip(kl_grads, scored, strict=True)):
            if not is_scored:
                continue
            if cfg.element:
                scores = oracle.first_order_element_scores(g)
                units.append(oracle.Unit(i, scores, torch.ones_like(scores, dtype=torch.bool), None))
            else:
                units.append(oracle.Unit(i, None, None, oracle.first_order_tensor_score(g)))
        masks = oracle.select(units, cfg)
        return FirstOrderRecord(masks=[masks.get(i) for i in range(len(kl_grads))], nonfinite=False)

    def step(self, batch: StepBatch, cfg: RoseConfig) -> StepResult:
        if batch.sharding is not None:
            raise RuntimeError("the reference backend does not run on sharded (DTensor) parameters")
        if cfg.checks_finite and not all(torch.isfinite(g).all() for g in batch.grads):
            return StepResult(nonfinite=True)
        next_steps = [s.item() + 1 for s in batch.state_steps]
        pooled = [batch.eligible[i] and next_steps[i] > h.warmup_steps for i, h in enumerate(batch.hypers)]
        second = self._second_order_masks(batch, cfg, pooled) if cfg.uses_second_order else {}
        kept = []
        for i, h in enumerate(batch.hypers):
            param = batch.params[i]
            mu: float | torch.Tensor = 1.0
            if pooled[i] and cfg.mode != "off":
                recorded = batch.first_order[i] if batch.first_order is not None else None
                mu = oracle.combined_mask(cfg, recorded, second.get(i), param)
            batch.state_steps[i].add_(1)
            oracle.masked_adamw_update(
                param, batch.grads[i], batch.exp_avgs[i], batch.exp_avg_sqs[i], step=next_steps[i], mu=mu,
                lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps, weight_decay=h.weight_decay,
                correct_bias=h.correct_bias,
            )
            if param.numel() == 0:
                kept.append(1.0)  # nothing to mask
            elif isinstance(mu, torch.Tensor):
                kept.append(mu.to(torch.float64).sum().item() / param.numel())
            else:
                kept.append(mu)
        return StepResult(nonfinite=False, kept=kept)

    @staticmethod
    def _second_order_masks(batch: StepBatch, cfg: RoseConfig, pooled: list[bool]) -> dict:
        units = []
        for i, h in enumerate(batch.hypers):
            if not pooled[i]:
                continue
            if cfg.element:
                scores, defined = oracle.second_order_element_scores(batch.grads[i], batch.exp_avgs[i], h.scale)
                units.append(oracle.Unit(i, scores, defined, None))
            else:
                score = oracle.second_order_tensor_score(batch.grads[i], batch.exp_avgs[i], h.scale)
                units.append(oracle.Unit(i, None, None, score))
        return oracle.select(units, cfg)
