"""``rose_kernels.clip_grad_norm_``: gradient clipping that also serves RoseAdamW's next step.

The clipping of a training loop reads every gradient once to find the total norm. Done with the
fused backends' multi-tensor ``sumsq`` (per-tensor sums of squares in float64), the same read gives
what ``RoseAdamW.step()`` would otherwise read the gradients again for: the finiteness verdict, and
the per-tensor ``||g||^2`` of the tensor-granularity second-order score. With ``optimizer=`` they are
handed to the optimizer, scaled by the square of the clip coefficient.

The contract (docs/semantics.md section 6): the sums serve the optimizer's very next ``step()``,
and only for gradients that are still the tensors that were clipped, unchanged (the tensor's
identity and version counter are checked, as for the cached ``||exp_avg||^2``); ``zero_grad()``
drops them; any other gradient is read by the step as usual.
"""

from __future__ import annotations

import torch

from rose_kernels import backends
from rose_kernels.optim import RoseAdamW


def _sumsq_op(device: torch.device, backend_name: str):
    return backends.resolve(backend_name, device).sumsq_op()


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, *,
                    optimizer=None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (same arguments and result: the total norm before clipping,
    gradients scaled in place by ``min(1, max_norm / (total + 1e-6))``), computed with one fused read.

    ``optimizer``: a :class:`~rose_kernels.RoseAdamW` whose next ``step()`` takes the sums of squares
    (times the squared clip coefficient) and the finiteness verdict from here instead of reading the
    gradients again. Falls back to torch's function, without the hand-off, for other norms, sparse,
    sharded (DTensor) or multi-device gradients and where no fused backend runs."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    with_grads = [p for p in params if p.grad is not None]
    if not with_grads:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
    grads = [p.grad for p in with_grads]
    devices = {g.device for g in grads}
    plain = all(type(g) is torch.Tensor and g.layout == torch.strided for g in grads)
    backend_name = optimizer.backend if isinstance(optimizer, RoseAdamW) else "auto"
    op = _sumsq_op(grads[0].device, backend_name) if plain and len(devices) == 1 else None
    if float(norm_type) != 2.0 or op is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
    sums = op([g if g.is_contiguous() else g.contiguous() for g in grads])  # float64 [n], one read
    total = sums.sum().sqrt()
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it cannot "
            "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    # As torch: the norm and the coefficient in the gradients' (promoted) type, clamped to 1.
    norm_dtype = grads[0].dtype
    for g in grads[1:]:
        norm_dtype = torch.promote_types(norm_dtype, g.dtype)
    total_norm = total.to(norm_dtype)
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, group in by_dtype.items():
        torch._foreach_mul_(group, coef.to(dtype))
    if optimizer is not None and isinstance(optimizer, RoseAdamW):
        scaled = sums * coef.to(torch.float64).square()
        optimizer.offer_grad_sumsq(with_grads, scaled)
    return total_norm
