"""nonfinite="unchecked": torch.optim.AdamW's behaviour (no check, no guarantee) for users whose
clipping or GradScaler already checks; in mode off (and first's step) it saves the read that looks.

On finite gradients it gives exactly what the checked policies give, on every backend; mode off
with a NaN gradient moves the parameters as torch's AdamW does (NaN where it is NaN); the step of
mode off reads the gradients only in the update (a spy on the op family's sumsq)."""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE

from rose_kernels import RoseAdamW, functional
from rose_kernels.backends import fused

CPU = torch.device("cpu")
SIZES = (70_001, 3, 4096)  # a multi-chunk tensor (64 Ki-element chunks), a tiny one, a block's worth


def _params(seed: int, device=CPU, sizes=SIZES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in sizes]


def _run(seed: int, backend: str, mode: str, granularity: str, nonfinite: str, steps: int = 4, *, nan_at=None,
         device=CPU):
    params = _params(seed, device)
    opt = RoseAdamW(params, lr=1e-2, mode=mode, granularity=granularity, backend=backend, nonfinite=nonfinite,
                    warmup_steps=1)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
        if nan_at is not None and step == nan_at:
            grads[0][7] = float("nan")
        if mode in ("first", "ensemble"):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.record_first_order()
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(("mode", "granularity"), [("off", "tensor"), ("second", "tensor"), ("second", "element"),
                                                   ("first", "element"), ("ensemble", "tensor")])
def test_unchecked_equals_checked_on_finite_gradients(seed, backend, mode, granularity):
    checked, _ = _run(seed, backend, mode, granularity, "raise")
    unchecked, opt = _run(seed, backend, mode, granularity, "unchecked")
    for a, b in zip(checked, unchecked, strict=True):
        assert torch.equal(a, b), f"seed={seed} {backend} {mode}/{granularity}"
    assert opt.skipped_steps == 0


def test_unchecked_on_triton(seed):
    pytest.importorskip("triton")
    checked, _ = _run(seed, "triton", "off", "tensor", "skip", steps=2, device=TRITON_DEVICE)
    unchecked, _ = _run(seed, "triton", "off", "tensor", "unchecked", steps=2, device=TRITON_DEVICE)
    for a, b in zip(checked, unchecked, strict=True):
        assert torch.equal(a, b), f"seed={seed}"


def test_off_unchecked_lets_a_nan_through_as_torch_adamw_does(seed):
    """The fused step equals the oracle's with the NaN let through; NaN lands where torch's AdamW
    puts it (the moments of that element, then the element)."""
    fused_params, opt = _run(seed, "cpu", "off", "tensor", "unchecked", nan_at=2)
    reference_params, _ = _run(seed, "reference", "off", "tensor", "unchecked", nan_at=2)
    torch_params = _params(seed)
    torch_opt = torch.optim.AdamW(torch_params, lr=1e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in torch_params]
        if step == 2:
            grads[0][7] = float("nan")
        for p, g in zip(torch_params, grads, strict=True):
            p.grad = g
        torch_opt.step()
    assert opt.skipped_steps == 0
    assert torch.isnan(fused_params[0][7]), f"seed={seed}"
    for a, b, c in zip(fused_params, reference_params, torch_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True, msg=lambda m: f"seed={seed}: {m}")
        assert torch.equal(torch.isnan(a), torch.isnan(c)), f"seed={seed}"


def test_off_unchecked_does_not_read_the_gradients_before_the_update(seed, monkeypatch):
    real = fused.native_ops()
    sumsq_calls = []

    def sumsq(tensors):
        sumsq_calls.append(len(tensors))
        return real.sumsq(tensors)

    namespace = type(real)(**{**vars(real), "sumsq": sumsq})
    monkeypatch.setattr(fused.CpuBackend, "ops", lambda self: namespace)
    _run(seed, "cpu", "off", "tensor", "unchecked")
    assert sumsq_calls == [], f"seed={seed}: the unchecked step read the gradients first ({sumsq_calls})"
    _run(seed, "cpu", "off", "tensor", "raise")
    assert sumsq_calls, "the checked step is expected to look"


def test_functional_unchecked_and_bad_policies(seed):
    params = _params(seed)
    grads = [torch.full_like(p, float("inf")) for p in params]
    moments = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    result = functional.rose_adamw([p.data for p in params], grads, moments, [torch.zeros_like(p) for p in params],
                                   steps, mode="off", backend="cpu", nonfinite="unchecked")
    assert result.nonfinite is False and all(s.item() == 1 for s in steps), f"seed={seed}"
    with pytest.raises(ValueError, match="nonfinite"):
        functional.rose_adamw([p.data for p in params], grads, moments, moments, steps, backend="cpu",
                              nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite"):
        RoseAdamW(params, nonfinite="never")


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("mode", ["second", "first", "ensemble"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_element_selection_on_a_nonfinite_pool_keeps_the_other_pools(seed, backend, mode, bad):
    """No guarantee for the tensor whose gradients are not finite, but the step completes (no hang,
    no crash in the selection) and every other tensor's per-tensor pool is untouched by it: those
    tensors end exactly as in a run whose bad tensor had finite gradients."""
    sizes = SIZES
    if backend == "triton":
        pytest.importorskip("triton")
        sizes = (5_003, 3, 1_000)  # interpreted: ~1 ms per program instance
    device = TRITON_DEVICE if backend == "triton" else CPU

    def run(poison: bool):
        params = _params(seed, device, sizes)
        opt = RoseAdamW(params, lr=1e-2, mode=mode, granularity="element", backend=backend, nonfinite="unchecked",
                        warmup_steps=0)
        gen = torch.Generator().manual_seed(seed + 2)
        for step in range(3):
            kl = [torch.randn(p.shape, generator=gen).to(device) for p in params]
            grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
            if poison and step == 1:
                kl[0][5:1500:7] = bad
                grads[0][11:3000:5] = bad
            if mode in ("first", "ensemble"):
                for p, g in zip(params, kl, strict=True):
                    p.grad = g
                opt.record_first_order()
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
        return params, opt

    clean, _ = run(False)
    poisoned, opt = run(True)
    assert opt.skipped_steps == 0
    for i, (a, b) in enumerate(zip(clean[1:], poisoned[1:], strict=True), start=1):
        assert torch.equal(a, b), f"seed={seed} {backend} {mode} bad={bad}: params[{i}] changed"
