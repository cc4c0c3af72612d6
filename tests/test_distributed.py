"""RoseAdamW under DistributedDataParallel (2 CPU processes, gloo) matches one process that sees the
global batch: float64 parameters to 1e-12 and identical kept masks, for every mode, granularity and
scope. off/second use DDP's own gradient averaging; first/ensemble run the forward pass under
``no_sync()`` and average both backward passes with ``rose_kernels.distributed.average_gradients_``
(DDP synchronises one backward pass per forward, and ROSE's two-pass step has two)."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rose_kernels
from rose_kernels import RoseAdamW
from rose_kernels.types import uses_first_order

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
STEPS = 4
CONFIGS = [
    dict(mode=mode, granularity=granularity, scope=scope)
    for mode, (granularity, scope) in itertools.product(
        ("off", "first", "second", "ensemble"), (("tensor", "tensor"), ("element", "tensor"), ("element", "global"))
    )
    if not (mode == "off" and granularity == "element")
]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))
    return model.double()


def _batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        noise = 0.05 * torch.randn(8, 6, generator=gen, dtype=torch.float64)  # the "second pass"
        out.append((x, y, noise))
    return out


def _losses(model, x, y, noise):
    """Task loss and a KL between two passes (inputs perturbed instead of dropout: deterministic)."""
    logits = model(x)
    other = model(x + noise)
    kl = torch.nn.functional.kl_div(other.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    return torch.nn.functional.cross_entropy(logits, y), kl


def _run(model, batches, cfg, rank=None, world=1, ddp=None):
    """STEPS ROSE steps; under DDP each rank takes its rows of every global batch."""
    params = list(model.parameters())
    opt = RoseAdamW(params, lr=5e-2, lower=10.0, upper=70.0, backend="cpu", **cfg)
    two_pass = uses_first_order(cfg["mode"])
    net = ddp if ddp is not None else model
    kept = []
    for x, y, noise in batches:
        if rank is not None:
            rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            x, y, noise = x[rows], y[rows], noise[rows]
        opt.zero_grad()
        if two_pass:
            context = net.no_sync() if ddp is not None else _nothing()
            with context:
                loss, kl = _losses(net, x, y, noise)
                kl.backward(retain_graph=True)
                rose_kernels.distributed.average_gradients_(params)
                opt.record_first_order()
                opt.zero_grad()
                loss.backward()
                rose_kernels.distributed.average_gradients_(params)
        else:
            loss, _ = _losses(net, x, y, noise)
            loss.backward()
        opt.step()
        kept.append(opt.mask_stats())
    return [p.detach().clone() for p in params], kept


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _worker(rank: int, world: int, store_path: str, out_dir: str, seed: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = []
        for cfg in CONFIGS:
            model = _model(seed)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            params, kept = _run(model, _batches(seed), cfg, rank, world, ddp)
            results.append({"cfg": cfg, "params": [p.tolist() for p in params], "kept": kept})
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_ddp_matches_one_process(seed, tmp_path):
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path), seed), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for i, cfg in enumerate(CONFIGS):
        params, kept = _run(_model(seed), _batches(seed), cfg)
        for r in range(WORLD):
            got = ranks[r][i]
            assert got["cfg"] == cfg
            msg = f"seed={seed} rank {r} {cfg}"
            want = json.loads(json.dumps(kept))  # keys and floats as the ranks wrote them
            assert got["kept"] == want, f"{msg}: kept fractions {got['kept']} vs one process {want}"
            for j, p in enumerate(params):
                torch.testing.assert_close(torch.tensor(got["params"][j], dtype=torch.float64), p, rtol=1e-12,
                                           atol=1e-14, msg=lambda m, j=j, msg=msg: f"{msg} param {j}: {m}")


def test_average_gradients_is_a_no_op_without_a_process_group():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    rose_kernels.distributed.average_gradients_([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
