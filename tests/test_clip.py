"""rose_kernels.clip_grad_norm_: torch's clipping computed with one fused read, and its hand-off to
RoseAdamW's next step (the finiteness verdict and the tensor second-order ||g||^2): the step then
does not read the gradients for them, gives the result it gives after torch's clipping, and reads
them again whenever the hand-off does not apply (zero_grad(), a gradient changed or replaced after
clipping, a second step without clipping)."""

from __future__ import annotations

import pytest
import torch

import rose_kernels
from rose_kernels import RoseAdamW
from rose_kernels.backends import fused


def _problem(seed: int, dtype: torch.dtype, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 19), (1025,), (3, 5, 7), (1,), (0,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
    grads = [(scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype) for s in shapes]
    return params, grads


def _set(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipped / not clipped
def test_matches_torch_clip_grad_norm(seed, dtype, max_norm):
    params, grads = _problem(seed, dtype)
    _set(params, grads)
    mine = rose_kernels.clip_grad_norm_(params, max_norm)
    clipped = [p.grad.clone() for p in params]
    _set(params, grads)
    theirs = torch.nn.utils.clip_grad_norm_(params, max_norm)
    assert mine.dtype == theirs.dtype, (mine.dtype, theirs.dtype)
    tol = dict(rtol=1e-2, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(mine, theirs, **tol, msg=lambda m: f"seed={seed} {dtype} total norm: {m}")
    # bf16: the coefficient from the float64 sum and torch's from bf16 per-tensor norms may differ by
    # one bf16 ulp (2^-8 relative), and the product rounds once more: two ulps, 2^-7 ~ 0.8% each.
    for a, p in zip(clipped, params, strict=True):
        torch.testing.assert_close(a, p.grad, rtol=2e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-30,
                                   msg=lambda m: f"seed={seed} {dtype} max_norm={max_norm}: {m}")


class _SumsqSpy:
    """Counts the step's reads of the gradients through the op family's sumsq."""

    def __init__(self, monkeypatch):
        self.reads_of_grads = 0
        self.grads: list[torch.Tensor] = []
        real = fused.native_ops()
        spy = self

        def sumsq(tensors):
            if spy.grads and any(t.data_ptr() == g.data_ptr() for t in tensors for g in spy.grads if g.numel()):
                spy.reads_of_grads += 1
            return real.sumsq(tensors)

        namespace = type(real)(**{**vars(real), "sumsq": sumsq})
        monkeypatch.setattr(fused.CpuBackend, "ops", lambda self: namespace)


@pytest.mark.parametrize("mode", ["off", "second"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_step_takes_the_sums_and_gives_the_result_of_torch_clipping(seed, mode, dtype, monkeypatch):
    spy = _SumsqSpy(monkeypatch)
    runs = {}
    for clip in ("rose", "torch"):
        params, _ = _problem(seed, dtype)
        opt = RoseAdamW(params, lr=1e-2, mode=mode, lower=10.0, upper=70.0, weight_decay=0.01)
        for step in range(4):
            _, grads = _problem(seed + 1 + step, dtype, scale=3.0)
            _set(params, grads)
            spy.grads = [p.grad for p in params]
            before = spy.reads_of_grads
            if clip == "rose":
                rose_kernels.clip_grad_norm_(params, 1.0, optimizer=opt)
                spy.grads = [p.grad for p in params]
                before = spy.reads_of_grads
                opt.step()
                assert spy.reads_of_grads == before, f"seed={seed} step {step}: the step read the gradients again"
            else:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            opt.zero_grad()
        runs[clip] = ([p.detach().clone() for p in params], opt.mask_stats())
    (rose_params, rose_kept), (torch_params, torch_kept) = runs["rose"], runs["torch"]
    assert rose_kept == torch_kept, f"seed={seed}: masks {rose_kept} vs {torch_kept}"
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(rose_params, torch_params, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"seed={seed} {mode} {dtype}: {m}")


@pytest.mark.parametrize("change", ["zero_grad", "in_place", "replaced", "second_step"])
def test_the_hand_off_is_dropped_when_it_does_not_apply(seed, change, monkeypatch):
    spy = _SumsqSpy(monkeypatch)
    params, grads = _problem(seed, torch.float64)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = RoseAdamW(params, lr=1e-2, mode="second", lower=10.0, upper=70.0)
    reference = RoseAdamW(twin, lr=1e-2, mode="second", lower=10.0, upper=70.0)
    for step in range(2):
        _, grads = _problem(seed + 1 + step, torch.float64, scale=3.0)
        _set(params, grads)
        rose_kernels.clip_grad_norm_(params, 1.0, optimizer=opt)
        if change == "zero_grad" and step == 1:
            opt.zero_grad()
            _set(params, [2 * g for g in grads])
        elif change == "in_place" and step == 1:
            params[0].grad.mul_(-3.0)
        elif change == "replaced" and step == 1:
            params[0].grad = params[0].grad * 0.5
        for p, q in zip(params, twin, strict=True):
            q.grad = p.grad.clone()
        spy.grads = [p.grad for p in params]
        before = spy.reads_of_grads
        opt.step()
        reference.step()
        if step == 1 and change != "second_step":
            assert spy.reads_of_grads == before + 1, f"{change}: the step did not read the gradients again"
    if change == "second_step":
        for p, q in zip(params, twin, strict=True):
            q.grad = p.grad.clone()
        spy.grads = [p.grad for p in params]
        before = spy.reads_of_grads
        opt.step()  # no clipping before this one: the sums of the last clipping do not serve it
        reference.step()
        assert spy.reads_of_grads == before + 1
    assert opt.mask_stats() == reference.mask_stats(), f"seed={seed} {change}"
    for a, b in zip(params, twin, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"seed={seed} {change}: {m}")


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_nonfinite_gradient_is_caught_from_the_clipping_read(seed, nonfinite, monkeypatch):
    spy = _SumsqSpy(monkeypatch)
    params, grads = _problem(seed, torch.float32)
    grads[1][7] = float("nan")
    _set(params, grads)
    opt = RoseAdamW(params, mode="second", nonfinite=nonfinite)
    total = rose_kernels.clip_grad_norm_(params, 1.0, optimizer=opt)
    assert torch.isnan(total)
    with pytest.raises(RuntimeError, match="non-finite"):
        rose_kernels.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    spy.grads = [p.grad for p in params]
    before = [p.detach().clone() for p in params]
    if nonfinite == "raise":
        with pytest.raises(RuntimeError, match="non-finite"):
            opt.step()
    else:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            opt.step()
        assert opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True)) and not opt.state


def test_other_norms_and_no_gradients_fall_back_to_torch(seed):
    params, grads = _problem(seed, torch.float32)
    params, grads = params[:-1], grads[:-1]  # torch's infinity norm refuses an empty tensor
    _set(params, grads)
    opt = RoseAdamW(params)
    total = rose_kernels.clip_grad_norm_(params, 0.5, norm_type=float("inf"), optimizer=opt)
    _set(params, grads)
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(params, 0.5, norm_type=float("inf")))
    assert not opt._grad_sumsq  # no hand-off for another norm
    empty = [torch.nn.Parameter(torch.ones(2))]
    assert float(rose_kernels.clip_grad_norm_(empty, 1.0)) == 0.0
