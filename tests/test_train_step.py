"""The training step of semantics.md section 7, piece by piece, on a tiny float64 BERT.

``divergence`` and the task loss against hand computations, the KL gradients summed over
micro-batches against one batch of the same examples with the same dropout masks, the recorded
first-order scores against the reference backend, one and two steps of rose-train's ``train_step``
against a plain-torch re-implementation of the step (masks and masked AdamW included), the GradScaler
path (KL gradients unscaled before recording, a KL overflow handled as a task overflow), and
RoseTrainer's training step.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import all_params, assert_optimizers_match, assert_snapshot_equal, snapshot, sync  # noqa: E402

from rose_kernels import RoseAdamW, rose_param_groups  # noqa: E402
from rose_kernels.train import step as step_mod  # noqa: E402
from rose_kernels.train.config import TrainConfig  # noqa: E402
from rose_kernels.train.optimizer import build_optimizer  # noqa: E402
from rose_kernels.train.step import FirstOrderScores, divergence, rose_losses, train_step  # noqa: E402
from rose_kernels.types import uses_first_order  # noqa: E402

VOCAB, LENGTH = 100, 8


def tiny_bert(seed: int, *, num_labels: int = 3, dtype: torch.dtype = torch.float64, hidden_dropout: float = 0.1,
              attention_dropout: float = 0.1) -> torch.nn.Module:
    """A random 2-layer BERT classifier (hidden 16), in training mode (dropout active)."""
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                                     hidden_dropout_prob=hidden_dropout, attention_probs_dropout_prob=attention_dropout,
                                     attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).to(dtype).train()


def make_batch(gen: torch.Generator, n: int, *, num_labels: int = 3, dtype: torch.dtype = torch.float64):
    """(inputs, labels): n random sequences of LENGTH tokens, each padded after a random length."""
    lengths = torch.randint(3, LENGTH + 1, (n, 1), generator=gen)
    attention_mask = (torch.arange(LENGTH) < lengths).long()
    input_ids = torch.randint(5, VOCAB, (n, LENGTH), generator=gen) * attention_mask
    if num_labels == 1:
        labels = torch.randn(n, generator=gen, dtype=dtype)
    else:
        labels = torch.randint(0, num_labels, (n,), generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def concat(batches):
    inputs = {k: torch.cat([b[0][k] for b in batches]) for k in batches[0][0]}
    return inputs, torch.cat([b[1] for b in batches])


# The hand computations, in float64.

def hand_log_softmax(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    shift = z.max(dim=-1, keepdim=True).values
    return z - shift - torch.log(torch.exp(z - shift).sum(dim=-1, keepdim=True))


def hand_cross_entropy(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean_i -log softmax(z_i)[y_i]."""
    return -hand_log_softmax(z)[torch.arange(len(labels)), labels].mean()


def hand_task_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if z.shape[-1] == 1:
        return ((z.double().squeeze(-1) - labels.double()) ** 2).mean()
    return hand_cross_entropy(z, labels)


def hand_divergence(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Section 2: L_KL = (sum_i KL(P2_i || P1_i) + KL(P1_i || P2_i)) / 4, KL(P || Q) = sum_c P_c (log P_c - log Q_c);
    the summed squared difference of the two outputs for a 1-output head."""
    if z1.shape[-1] == 1:
        return ((z1.double() - z2.double()) ** 2).sum()
    lp1, lp2 = hand_log_softmax(z1), hand_log_softmax(z2)
    kl_p2_p1 = (lp2.exp() * (lp2 - lp1)).sum()
    kl_p1_p2 = (lp1.exp() * (lp1 - lp2)).sum()
    return (kl_p2_p1 + kl_p1_p2) / 4


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, msg: str, *, rtol: float = 1e-10,
                   scale: float | None = None) -> None:
    """float64 agreement up to reordered sums: relative, with an absolute floor at ``scale`` (default: the
    tensor's largest magnitude; pass the largest of all gradients for one that is zero up to rounding,
    such as an attention key bias's)."""
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=rtol, atol=rtol * scale + 1e-300,
                               msg=lambda m: f"{msg}: {m}")


def is_eligible(name: str) -> bool:  # the release's rule, written out
    return "layer" in name and "weight" in name


# ------------------------------------------------------------------------------------------------
# (a) divergence, (d) the task loss over both dropout passes
# ------------------------------------------------------------------------------------------------


def test_divergence_is_the_symmetric_kl_of_section_2(seed):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 3
    z2 = z1 + torch.randn(6, 4, generator=gen, dtype=torch.float64)
    got, want = divergence(z1, z2), hand_divergence(z1, z2)
    assert got.dtype == torch.float64, f"seed={seed}: a float64 divergence was computed in {got.dtype}"
    assert math.isclose(got.item(), want.item(), rel_tol=1e-13), f"seed={seed}: {got.item()} vs {want.item()}"
    # Summed over the batch (not averaged), symmetric, zero for equal outputs.
    per_example = sum(hand_divergence(z1[i:i + 1], z2[i:i + 1]).item() for i in range(6))
    assert math.isclose(got.item(), per_example, rel_tol=1e-13), f"seed={seed}"
    assert math.isclose(divergence(z2, z1).item(), got.item(), rel_tol=1e-14), f"seed={seed}"
    assert abs(divergence(z1, z1).item()) < 1e-15, f"seed={seed}"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # computed in float32
        a, b = z1.to(dtype), z2.to(dtype)
        got = divergence(a, b)
        assert got.dtype == torch.float32, f"seed={seed} {dtype}"
        assert math.isclose(got.item(), hand_divergence(a, b).item(), rel_tol=1e-5), f"seed={seed} {dtype}"
    r1, r2 = z1[:, :1], z2[:, :1]  # 1-output head
    assert math.isclose(divergence(r1, r2).item(), hand_divergence(r1, r2).item(), rel_tol=1e-14), f"seed={seed}"


@pytest.mark.parametrize("mode, num_labels", [("ensemble", 3), ("first", 3), ("ensemble", 1), ("second", 3),
                                              ("off", 3)])
def test_task_loss_is_the_mean_of_both_dropout_passes(seed, mode, num_labels):
    model = tiny_bert(seed, num_labels=num_labels, hidden_dropout=0.3)
    inputs, labels = make_batch(torch.Generator().manual_seed(seed), 5, num_labels=num_labels)
    rng = torch.get_rng_state()
    loss, loss_kl, logits = rose_losses(model, inputs, labels, mode)
    after = torch.get_rng_state()
    torch.set_rng_state(rng)  # the same dropout masks, pass by pass
    with torch.no_grad():
        z1 = model(**inputs).logits
        after_one = torch.get_rng_state()
        z2 = model(**inputs).logits
    assert torch.equal(logits, z1), f"seed={seed}: the logits returned are not those of the first pass"
    assert loss.dtype == torch.float64, f"seed={seed}: a float64 model's loss was computed in {loss.dtype}"
    if uses_first_order(mode):
        assert torch.equal(after, torch.get_rng_state()), f"seed={seed}: not two forward passes"
        assert abs(hand_task_loss(z1, labels) - hand_task_loss(z2, labels)) > 1e-9, f"seed={seed}: dropout inactive"
        want = (hand_task_loss(z1, labels) + hand_task_loss(z2, labels)) / 2
        assert math.isclose(loss.item(), want.item(), rel_tol=1e-13), f"seed={seed}: {loss.item()} vs {want.item()}"
        want_kl = hand_divergence(z1, z2)
        assert math.isclose(loss_kl.item(), want_kl.item(), rel_tol=1e-11), (
            f"seed={seed}: {loss_kl.item()} vs {want_kl.item()}")
    else:
        assert loss_kl is None, f"seed={seed}"
        assert torch.equal(after, after_one), f"seed={seed}: mode {mode} ran more than one forward pass"
        want = hand_task_loss(z1, labels)
        assert math.isclose(loss.item(), want.item(), rel_tol=1e-13), f"seed={seed}: {loss.item()} vs {want.item()}"


# ------------------------------------------------------------------------------------------------
# (b) the KL gradients summed over micro-batches equal those of one batch
# ------------------------------------------------------------------------------------------------


class KeyedDropout(torch.nn.Module):
    """Dropout whose mask for an example depends only on (its tokens, which of the two passes, the site):
    a batch and its micro-batches then draw the same masks for the same examples."""

    def __init__(self, p: float, site: int, keys: dict):
        super().__init__()
        self.p, self.site, self.keys = p, site, keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        masks = []
        for row in self.keys["rows"]:
            gen = torch.Generator().manual_seed(hash((row, self.keys["pass"], self.site)) % 2**62)
            masks.append(torch.rand(x.shape[1:], generator=gen, dtype=torch.float64) >= self.p)
        return x * torch.stack(masks).to(x.dtype) / (1 - self.p)


def keyed_dropout_bert(seed: int) -> tuple[torch.nn.Module, dict]:
    model = tiny_bert(seed, hidden_dropout=0.2, attention_dropout=0.0)  # attention dropout is functional
    keys = {"rows": [], "pass": 0, "calls": 0}
    sites = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)
             and module.p > 0]
    assert len(sites) >= 5  # embeddings, 2 x (attention output, output), classifier
    for site, (name, module) in enumerate(sites):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, KeyedDropout(module.p, site, keys))

    def before_forward(module, args, kwargs):
        keys["rows"] = [tuple(r) for r in kwargs["input_ids"].tolist()]
        keys["pass"] = keys["calls"] % 2  # rose_losses runs pass 1 then pass 2 on each batch
        keys["calls"] += 1

    model.register_forward_pre_hook(before_forward, with_kwargs=True)
    return model, keys


@pytest.mark.parametrize("sizes", [(3, 2), (2, 4, 1)])
def test_kl_gradients_summed_over_micro_batches_equal_one_batch(seed, sizes):
    model, keys = keyed_dropout_bert(seed)
    optimizer = RoseAdamW(rose_param_groups(model), mode="ensemble")
    first = FirstOrderScores(optimizer)
    gen = torch.Generator().manual_seed(seed)
    micro = [make_batch(gen, n) for n in sizes]
    count = sum(sizes)
    kl_sum, loss_sum = 0.0, 0.0
    for inputs, labels in micro:  # what train_step does over --grad-accum micro-batches
        loss, loss_kl, _ = rose_losses(model, inputs, labels, "ensemble")
        first.add(loss_kl)
        (loss * (len(labels) / count)).backward()
        kl_sum, loss_sum = kl_sum + loss_kl.item(), loss_sum + loss.item() * len(labels) / count
    micro_task = {n: p.grad.clone() for n, p in model.named_parameters()}
    keys["calls"] = 0
    loss, loss_kl, _ = rose_losses(model, *concat(micro), "ensemble")
    assert loss_kl.item() > 0, f"seed={seed}: the two passes agree: dropout inactive"
    assert math.isclose(loss_kl.item(), kl_sum, rel_tol=1e-12), f"seed={seed}: {loss_kl.item()} vs {kl_sum}"
    assert math.isclose(loss.item(), loss_sum, rel_tol=1e-12), f"seed={seed}: {loss.item()} vs {loss_sum}"
    names = {p: n for n, p in model.named_parameters()}
    kl_grads = torch.autograd.grad(loss_kl, first.params, retain_graph=True)
    assert len(first.params) == 16 and all(is_eligible(names[p]) for p in first.params), f"seed={seed}"
    scale = max(float(g.abs().max()) for g in kl_grads)
    for p, got, want in zip(first.params, first.buffers, kl_grads, strict=True):
        assert want.abs().max() > 1e-6 * scale, f"seed={seed} {names[p]}: zero KL gradient"
        assert_close64(got, want, f"seed={seed} sizes={sizes} KL gradient of {names[p]}", scale=scale)
    task_grads = torch.autograd.grad(loss, list(model.parameters()))
    scale = max(float(g.abs().max()) for g in task_grads)
    for (name, _), want in zip(model.named_parameters(), task_grads, strict=True):
        assert_close64(micro_task[name], want, f"seed={seed} sizes={sizes} task gradient of {name}", scale=scale)


# ------------------------------------------------------------------------------------------------
# (c) the recorded scores equal the reference backend's
# ------------------------------------------------------------------------------------------------


def mask_as_bool(mask, numel: int) -> torch.Tensor | float:
    """A recorded first-order mask as a flat bool tensor (element) or a float (tensor)."""
    if not isinstance(mask, torch.Tensor):
        return float(mask)
    if mask.dtype == torch.uint8:  # the CPU kernels' 1-bit masks, least significant bit first
        return torch.from_numpy(np.unpackbits(mask.numpy(), bitorder="little")[:numel].astype(bool))
    return mask.reshape(-1).bool().clone()  # a copy: the optimizer reuses its mask buffers


@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_recorded_scores_match_the_reference_backend(seed, granularity):
    base = tiny_bert(seed, hidden_dropout=0.2)
    models = [base, copy.deepcopy(base)]
    opts = [RoseAdamW(rose_param_groups(m), lr=1e-3, mode="ensemble", granularity=granularity, upper=60.0,
                      backend=b) for m, b in zip(models, ("cpu", "reference"), strict=True)]
    firsts = [FirstOrderScores(o) for o in opts]
    gen = torch.Generator().manual_seed(seed)
    for t in (1, 2):
        micro = [make_batch(gen, 3), make_batch(gen, 2)]
        rng = torch.get_rng_state()
        for model, first in zip(models, firsts, strict=True):
            torch.set_rng_state(rng)
            for inputs, labels in micro:
                loss, loss_kl, _ = rose_losses(model, inputs, labels, "ensemble")
                first.add(loss_kl)
                (loss * (len(labels) / 5)).backward()
        for a, b in zip(firsts[0].buffers, firsts[1].buffers, strict=True):
            assert torch.equal(a, b), f"seed={seed} step {t}: the two copies computed different KL gradients"
        recorded = []
        for opt, first in zip(opts, firsts, strict=True):
            grads = [p.grad for p in first.params]
            values = [g.clone() for g in grads]
            first.record()
            assert first.buffers is None, f"seed={seed}"
            for p, g, v in zip(first.params, grads, values, strict=True):
                assert p.grad is g and torch.equal(g, v), f"seed={seed}: record() changed .grad"
            recorded.append([opt._first_order.get(p) for p in first.params])
        for p, a, b in zip(firsts[0].params, *recorded, strict=True):
            a, b = mask_as_bool(a, p.numel()), mask_as_bool(b, p.numel())
            if granularity == "tensor":
                assert a == b, f"seed={seed} step {t}: tensor mask {a} (cpu) vs {b} (reference)"
            else:
                assert torch.equal(a, b), f"seed={seed} step {t}: {int((a != b).sum())} element masks differ"
        if granularity == "tensor":
            kept = sum(mask_as_bool(m, 1) for m in recorded[1])
            assert 0 < kept < len(recorded[1]), f"seed={seed}: {kept} of {len(recorded[1])} kept: a trivial pool"
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert_optimizers_match(opts[0], opts[1], torch.float64, f"seed={seed} {granularity} step {t}")
        sync(opts[0], opts[1])


# ------------------------------------------------------------------------------------------------
# (e) rose-train's train_step against a plain-torch step
# ------------------------------------------------------------------------------------------------


def in_interval(scores: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Section 3: lo <= s <= hi, the thresholds torch.quantile's (linear interpolation) of the pool."""
    lo, hi = torch.quantile(scores, lower / 100), torch.quantile(scores, upper / 100)
    return (lo <= scores) & (scores <= hi)


class PlainRoseStep:
    """rose-train's step written out in plain torch: two dropout passes per micro-batch, the KL gradients
    of the eligible tensors, the task gradients of the share-weighted mean loss, clipping, the first- and
    second-order masks, their ensemble and the masked AdamW update (semantics.md sections 2-5, 7)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, betas=(0.9, 0.98), eps=1e-6):
        self.model, self.cfg, self.betas, self.eps = model, cfg, betas, eps
        self.m = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        self.v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        self.t = 0
        self.kept: dict[str, float] = {}

    def step(self, batches) -> float:
        cfg, (beta1, beta2) = self.cfg, self.betas
        named = dict(self.model.named_parameters())
        eligible = [n for n in named if is_eligible(n)]
        kl = {n: torch.zeros_like(named[n]) for n in eligible}
        task = {n: torch.zeros_like(p) for n, p in named.items()}
        count = sum(len(labels) for _, labels in batches)
        step_loss = 0.0
        for inputs, labels in batches:
            z1 = self.model(**inputs).logits
            z2 = self.model(**inputs).logits
            loss = (hand_cross_entropy(z1, labels) + hand_cross_entropy(z2, labels)) / 2
            for n, g in zip(eligible, torch.autograd.grad(hand_divergence(z1, z2), [named[n] for n in eligible],
                                                          retain_graph=True), strict=True):
                kl[n] += g
            for n, g in zip(named, torch.autograd.grad(loss * len(labels) / count, list(named.values())),
                            strict=True):
                task[n] += g
            step_loss += loss.item() * len(labels) / count
        total = torch.sqrt(sum((g ** 2).sum() for g in task.values()))
        coef = min(1.0, cfg.max_grad_norm / (float(total) + 1e-6))  # torch.nn.utils.clip_grad_norm_
        self.clipped = coef < 1.0
        grads = {n: g * coef for n, g in task.items()}
        self.t += 1
        c = 1 - beta1  # second_order_scale: 1 - beta1 by default
        if cfg.granularity == "tensor":
            s1 = torch.stack([kl[n].norm() for n in eligible])
            m1 = dict(zip(eligible, in_interval(s1, cfg.lower, cfg.upper).double(), strict=True))
            m2 = dict.fromkeys(eligible, torch.tensor(1.0, dtype=torch.float64))
            if self.t > 1:
                defined = [n for n in eligible if self.m[n].norm() > 0]
                s2 = torch.stack([(c * grads[n].norm() / self.m[n].norm() - 1).abs() for n in defined])
                m2.update(zip(defined, in_interval(s2, cfg.lower, cfg.upper).double(), strict=True))
        else:
            m1 = {n: in_interval(kl[n].abs().reshape(-1), cfg.lower, cfg.upper).view_as(kl[n]).double()
                  for n in eligible}
            m2 = {n: torch.ones_like(named[n]) for n in eligible}
            if self.t > 1:
                for n in eligible:
                    defined = self.m[n] != 0
                    s2 = (c * grads[n] / torch.where(defined, self.m[n], 1.0) - 1).abs()
                    keep = torch.ones_like(defined)
                    keep[defined] = in_interval(s2[defined], cfg.lower, cfg.upper)
                    m2[n] = keep.double()
        with torch.no_grad():
            for n, p in named.items():
                mu = (1 - cfg.gamma) * m2[n] + cfg.gamma * m1[n] if n in m1 else torch.tensor(1.0).double()
                if n in m1:
                    self.kept[n] = float(mu.mean()) if mu.dim() else float(mu)
                g = mu * grads[n] + (1 - mu) * self.m[n]
                self.m[n] = beta1 * self.m[n] + (1 - beta1) * g
                self.v[n] = beta2 * self.v[n] + (1 - beta2) * g * g
                step_size = cfg.lr * math.sqrt(1 - beta2 ** self.t) / (1 - beta1 ** self.t)
                p -= step_size * (mu * self.m[n]) / (self.v[n].sqrt() + self.eps)
                decay = 0.0 if n.endswith("bias") or "LayerNorm" in n else cfg.weight_decay
                p -= cfg.lr * decay * mu * p
        return step_loss


@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_train_step_matches_a_plain_torch_step(seed, granularity):
    # A low clip norm, to have the gradients clipped (the tiny model's norm is below 1).
    cfg = TrainConfig(mode="ensemble", granularity=granularity, lr=1e-2, max_grad_norm=0.02, backend="cpu")
    model = tiny_bert(seed, hidden_dropout=0.2, attention_dropout=0.1)
    plain_model = copy.deepcopy(model)
    optimizer = build_optimizer(model, **cfg.optimizer_options())
    first = FirstOrderScores(optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    plain = PlainRoseStep(plain_model, cfg)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    for t in (1, 2):
        batches = [make_batch(gen, 3), make_batch(gen, 2)]  # --grad-accum 2, a short last micro-batch
        rng = torch.get_rng_state()
        loss = train_step(model, optimizer, scaler, first, batches, cfg)
        torch.set_rng_state(rng)  # the same dropout masks, forward pass by forward pass
        want_loss = plain.step(batches)
        msg = f"seed={seed} {granularity} step {t}"
        assert plain.clipped, f"{msg}: the gradients were not clipped"
        assert math.isclose(loss.item(), want_loss, rel_tol=1e-12), f"{msg}: loss {loss.item()} vs {want_loss}"
        assert all(p.grad is None for p in model.parameters()), f"{msg}: gradients left behind"
        for (name, p), want in zip(model.named_parameters(), plain_model.parameters(), strict=True):
            # scale 1: the attention key biases' gradients are zero up to rounding (~1e-20), and so are their moves
            assert_close64(p, want, f"{msg}: {name}", rtol=1e-11, scale=1.0)
            assert not torch.equal(p, initial[name]), f"{msg}: {name} did not move"
        stats = optimizer.mask_stats()
        assert stats.keys() == plain.kept.keys(), msg
        for name in stats:
            assert math.isclose(stats[name], plain.kept[name], abs_tol=1e-12), (
                f"{msg}: kept fraction of {name}: {stats[name]} vs {plain.kept[name]}")
        assert any(v < 1 for v in stats.values()), f"{msg}: nothing was masked"


# ------------------------------------------------------------------------------------------------
# The GradScaler path: scaled KL gradients are unscaled before recording; their overflow skips the step
# ------------------------------------------------------------------------------------------------


def spy_records(optimizer: RoseAdamW, first: FirstOrderScores) -> list:
    """Records, at each record_first_order(), the KL gradients it was given and the masks it recorded."""
    seen = []
    record = optimizer.record_first_order

    def spy():
        grads = [None if p.grad is None else p.grad.clone() for p in first.params]
        record()
        seen.append((grads, [mask_as_bool(optimizer._first_order.get(p), p.numel()) for p in first.params]))

    optimizer.record_first_order = spy
    return seen


@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_scaled_kl_gradients_are_unscaled_before_recording(seed, granularity):
    cfg = TrainConfig(mode="ensemble", granularity=granularity, lr=1e-2, backend="cpu")
    base = tiny_bert(seed, dtype=torch.float32, hidden_dropout=0.2)
    gen = torch.Generator().manual_seed(seed)
    steps = [[make_batch(gen, 3), make_batch(gen, 2)] for _ in range(2)]
    rng = torch.get_rng_state()
    runs = []
    for scaler in (torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", init_scale=2.0**24)):
        model = copy.deepcopy(base)
        optimizer = build_optimizer(model, **cfg.optimizer_options())
        first = FirstOrderScores(optimizer)
        seen = spy_records(optimizer, first)
        torch.set_rng_state(rng)
        for batches in steps:
            train_step(model, optimizer, scaler, first, batches, cfg)
        runs.append((model, seen))
    assert scaler.get_scale() == 2.0**24, f"seed={seed}: the scale changed on a normal step"
    (plain_model, plain_seen), (scaled_model, scaled_seen) = runs
    assert len(plain_seen) == len(scaled_seen) == 2, f"seed={seed}"
    for t, ((g_plain, m_plain), (g_scaled, m_scaled)) in enumerate(zip(plain_seen, scaled_seen, strict=True), 1):
        for a, b in zip(g_plain, g_scaled, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7 * float(a.abs().max()),
                                       msg=lambda m, t=t: f"seed={seed} step {t}: KL gradient {m}")
        for a, b in zip(m_plain, m_scaled, strict=True):
            assert (a == b) if isinstance(a, float) else torch.equal(a, b), f"seed={seed} step {t}: masks differ"
    for (name, a), b in zip(plain_model.named_parameters(), scaled_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"seed={seed} {name}: {m}")


@pytest.mark.parametrize("overflow", ["kl", "task", "both"])
def test_an_overflow_skips_the_step_and_lowers_the_scale(seed, overflow, monkeypatch):
    """An overflow of the scaled KL backward is handled as one of the task backward: no parameter or
    optimizer state changes, the scale is backed off, and the next step runs normally."""
    cfg = TrainConfig(mode="ensemble", granularity="element", lr=1e-2, backend="cpu")
    model = tiny_bert(seed, dtype=torch.float32, hidden_dropout=0.2)
    optimizer = build_optimizer(model, **cfg.optimizer_options())
    first = FirstOrderScores(optimizer)
    scale = 2.0**40
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)  # grows after each good step
    gen = torch.Generator().manual_seed(seed)
    train_step(model, optimizer, scaler, first, [make_batch(gen, 3), make_batch(gen, 2)], cfg)
    assert scaler.get_scale() == 2 * scale, f"seed={seed}: the first step was skipped"
    before = snapshot(optimizer)
    # A loss 2**120 times larger: scaled by 2**41 its gradients exceed float32's 2**128 (inf or NaN),
    # while the other loss's scaled gradients stay far from it.
    big = 2.0**120
    divergence_, task_loss_ = step_mod.divergence, step_mod.task_loss
    if overflow in ("kl", "both"):
        monkeypatch.setattr(step_mod, "divergence", lambda z1, z2: divergence_(z1, z2) * big)
    if overflow in ("task", "both"):
        monkeypatch.setattr(step_mod, "task_loss", lambda z, y: task_loss_(z, y) * big)
    train_step(model, optimizer, scaler, first, [make_batch(gen, 3), make_batch(gen, 2)], cfg)
    assert_snapshot_equal(before, snapshot(optimizer), f"seed={seed} {overflow} overflow: the step was not skipped")
    assert scaler.get_scale() == scale, f"seed={seed} {overflow} overflow: scale {scaler.get_scale()}, not backed off"
    assert all(p.grad is None for p in model.parameters()), f"seed={seed}"
    assert first.buffers is None, f"seed={seed}: the KL buffers were not consumed"
    monkeypatch.undo()
    train_step(model, optimizer, scaler, first, [make_batch(gen, 3), make_batch(gen, 2)], cfg)
    moved = [i for i, (a, b) in enumerate(zip(before["params"], all_params(optimizer), strict=True))
             if not torch.equal(a, b)]
    assert moved, f"seed={seed}: the step after the overflow did not move the parameters"
    assert scaler.get_scale() == 2 * scale, f"seed={seed}"


# ------------------------------------------------------------------------------------------------
# RoseTrainer: the KL gradients it records and the gradients it trains on
# ------------------------------------------------------------------------------------------------


def test_rose_trainer_step_records_the_kl_gradients(seed, tmp_path):
    from rose_kernels.train import RoseTrainer

    model = tiny_bert(seed, hidden_dropout=0.2)
    plain = copy.deepcopy(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3,
                                          gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[],
                                          use_cpu=True, save_strategy="no", max_grad_norm=0.0)
    trainer = RoseTrainer(model=model, args=args, rose_mode="ensemble", rose_granularity="element",
                          rose_backend="cpu")
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 2
    gen = torch.Generator().manual_seed(seed)
    micro = [make_batch(gen, 3), make_batch(gen, 3)]
    rng = torch.get_rng_state()
    for inputs, labels in micro:
        trainer.training_step(model, {**inputs, "labels": labels})
    torch.set_rng_state(rng)
    named = dict(plain.named_parameters())
    eligible = [n for n in named if is_eligible(n)]
    kl = {n: torch.zeros_like(named[n]) for n in eligible}
    for inputs, labels in micro:
        z1, z2 = plain(**inputs).logits, plain(**inputs).logits
        loss = (hand_cross_entropy(z1, labels) + hand_cross_entropy(z2, labels)) / 2 / 2  # / gradient accumulation
        for n, g in zip(eligible, torch.autograd.grad(hand_divergence(z1, z2), [named[n] for n in eligible],
                                                      retain_graph=True), strict=True):
            kl[n] += g
        loss.backward()
    names = {p: n for n, p in model.named_parameters()}
    assert sorted(names[p] for p in trainer._first.params) == sorted(eligible), f"seed={seed}"
    kl_scale = max(float(g.abs().max()) for g in kl.values())
    for p, got in zip(trainer._first.params, trainer._first.buffers, strict=True):
        assert_close64(got, kl[names[p]], f"seed={seed} RoseTrainer KL gradient of {names[p]}", scale=kl_scale)
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for name, p in model.named_parameters():
        assert_close64(p.grad, named[name].grad, f"seed={seed} RoseTrainer task gradient of {name}", scale=scale)
    # The optimizer step records them (its pre-hook) from these buffers.
    rose = trainer.optimizer
    seen = spy_records(rose, trainer._first)
    rose.step()
    assert len(seen) == 1 and trainer._first.buffers is None, f"seed={seed}"
    for p, got in zip(trainer._first.params, seen[0][0], strict=True):
        assert_close64(got, kl[names[p]], f"seed={seed} recorded KL gradient of {names[p]}", scale=kl_scale)


# ------------------------------------------------------------------------------------------------
# One optimizer builder, one set of defaults, for rose-train and RoseTrainer
# ------------------------------------------------------------------------------------------------


def test_rose_train_and_rose_trainer_share_one_builder_and_its_defaults(tmp_path):
    import dataclasses
    import inspect

    from rose_kernels.train import RoseTrainer
    from rose_kernels.train.optimizer import DEFAULTS

    assert DEFAULTS.mode == "ensemble", "the trainer's default mode is the release's ensemble"
    assert inspect.signature(RoseAdamW).parameters["mode"].default == "second", "RoseAdamW keeps its own default"
    builder = inspect.signature(build_optimizer).parameters
    for name, value in dataclasses.asdict(DEFAULTS).items():
        assert builder[name].default == (tuple(value) if name == "betas" else value), name
    cfg = TrainConfig()
    for name, value in cfg.optimizer_options().items():
        assert value == getattr(DEFAULTS, name), name
    trainer_defaults = inspect.signature(RoseTrainer.__init__).parameters
    for name in ("mode", "granularity", "scope", "lower", "upper", "gamma", "backend"):
        assert trainer_defaults[f"rose_{name}"].default == getattr(DEFAULTS, name), name

    # rose-train's optimizer: the release's AdamW settings, as before the builder.
    model = tiny_bert(0)
    opt = build_optimizer(model, **cfg.optimizer_options())
    assert opt.rose.mode == "ensemble" and opt.rose.scope == "tensor"
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-6 and group["lr"] == 2e-4
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}
    assert [g["params"] for g in opt.param_groups] == [g["params"] for g in rose_param_groups(model, 0.01)]

    # RoseTrainer's: the same builder, with the TrainingArguments' AdamW settings.
    args = transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-5, adam_beta2=0.95,
                                          adam_epsilon=1e-7, weight_decay=0.1, report_to=[], use_cpu=True)
    trainer = RoseTrainer(model=model, args=args)
    rose = trainer.create_optimizer()
    group = rose.param_groups[0]
    assert isinstance(rose, RoseAdamW) and trainer._first is not None, "ensemble by default: two passes"
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-7 and group["lr"] == 3e-5
    assert {g["weight_decay"] for g in rose.param_groups} == {0.0, 0.1}
