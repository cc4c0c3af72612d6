"""RoseAdamW on FSDP2 shards (``fully_shard``; 2 CPU processes, gloo) matches one process that sees the
global batch: float64 parameters to 1e-12 and identical kept masks, for every mode, granularity and
scope; the sharded exact select gives the very thresholds of the unsharded pools (float32, bfloat16
and float64 scores, ties, +inf, empty shards); a torch.distributed.checkpoint save at step k and a
resume, on 2 ranks or on 1, gives the result of an uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import CONFIGS, STEPS, _batches, _losses

import rose_kernels.ops
from rose_kernels import RoseAdamW, reference
from rose_kernels.types import uses_first_order

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
RESUME_AT = 2
RESUME_CONFIGS = [dict(mode="second", granularity="tensor", scope="tensor"),
                  dict(mode="ensemble", granularity="element", scope="global")]


class _Net(torch.nn.Module):
    """Two layers and a one-element temperature: the temperature's shard on rank 1 is empty, the
    head's bias (3 rows) splits unevenly."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))
        self.temperature = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.body(x) * self.temperature


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _Net().double()


def _init(rank: int, world: int, store_path: str):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    return init_device_mesh("cpu", (world,))


def _mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.body[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _optimizer(model, cfg):
    """Three groups: scored from the first step, scored after one warm-up step, and never scored."""
    first, second = model.body[0], model.body[2]
    groups = [{"params": [first.weight, model.temperature]},
              {"params": [second.weight, second.bias], "warmup_steps": 1},
              {"params": [first.bias], "rose": False}]
    return RoseAdamW(groups, lr=5e-2, lower=10.0, upper=70.0, weight_decay=0.01, **cfg)


class _Collectives:
    """Counts the all-reduces issued inside ``with self.counting(name):``, per name."""

    def __init__(self):
        self.counts: dict[str, list[int]] = {"record": [], "step": []}

    def counting(self, name: str):
        counts, original = self.counts[name], dist.all_reduce

        class _Scope:
            def __enter__(self):
                counts.append(0)

                def counted(*args, **kwargs):
                    counts[-1] += 1
                    return original(*args, **kwargs)

                dist.all_reduce = counted

            def __exit__(self, *exc):
                dist.all_reduce = original
                return False

        return _Scope()


def _train(model, opt, batches, cfg, rank=0, world=1, collectives: _Collectives | None = None):
    """ROSE steps on ``batches``; each rank takes its rows. FSDP2 reduce-scatters (averages) the
    gradients of every backward pass, the KL pass's included, so no explicit averaging is needed."""
    collectives = collectives or _Collectives()
    kept = []
    for x, y, noise in batches:
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        x, y, noise = x[rows], y[rows], noise[rows]
        opt.zero_grad()
        loss, kl = _losses(model, x, y, noise)
        if uses_first_order(cfg["mode"]):
            kl.backward(retain_graph=True)
            with collectives.counting("record"):
                opt.record_first_order()
            opt.zero_grad()
        loss.backward()
        with collectives.counting("step"):
            opt.step()
        kept.append(opt.mask_stats())  # a collective under sharding: every rank calls it
    return kept


def _full(model) -> list[list]:
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().tolist() for p in model.parameters()]


def _single(seed, cfg, batches=None):
    model = _model(seed)
    opt = _optimizer(model, cfg)
    kept = _train(model, opt, batches or _batches(seed), cfg)
    return [p.detach().clone() for p in model.parameters()], kept


def _compare(got: dict, params, kept, msg: str) -> None:
    want = json.loads(json.dumps(kept))  # keys and floats as the ranks wrote them
    assert got["kept"] == want, f"{msg}: kept fractions {got['kept']} vs one process {want}"
    for j, p in enumerate(params):
        torch.testing.assert_close(torch.tensor(got["params"][j], dtype=torch.float64), p, rtol=1e-12, atol=1e-14,
                                   msg=lambda m, j=j: f"{msg} param {j}: {m}")


# ---- every mode, granularity and scope ---------------------------------------------------------

def _fsdp_worker(rank: int, world: int, store_path: str, out_dir: str, seed: int) -> None:
    mesh = _init(rank, world, store_path)
    try:
        results = []
        for cfg in CONFIGS:
            model = _shard(_model(seed), mesh)
            opt = _optimizer(model, cfg)
            collectives = _Collectives()
            kept = _train(model, opt, _batches(seed), cfg, rank, world, collectives)
            results.append({"cfg": cfg, "params": _full(model), "kept": kept, "collectives": collectives.counts})
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.barrier()  # no rank leaves while another still talks to it (gloo aborts then)
    finally:
        dist.destroy_process_group()


def test_fsdp2_matches_one_process(seed, tmp_path):
    mp.spawn(_fsdp_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path), seed), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for i, cfg in enumerate(CONFIGS):
        params, kept = _single(seed, cfg)
        for r in range(WORLD):
            assert ranks[r][i]["cfg"] == cfg
            _compare(ranks[r][i], params, kept, f"seed={seed} rank {r} {cfg}")
        # What ROSE adds per step: one all-reduce of the per-tensor sums at tensor granularity; one
        # per radix pass (5 for float64 scores) at element granularity, for each order's selection.
        two_pass = uses_first_order(cfg["mode"])
        element = cfg["granularity"] == "element"
        want = {"record": [5 if element else 1] * STEPS if two_pass else [],
                "step": [5 if element and cfg["mode"] != "first" else 1] * STEPS}
        assert ranks[0][i]["collectives"] == want, f"{cfg}: {ranks[0][i]['collectives']} all-reduces, not {want}"


# ---- the sharded select alone: thresholds bit-identical to the whole pools ---------------------

def _pool_cases(seed: int):
    """Float32, bfloat16 and float64 tensors with ties, zeros (undefined second-order scores), an
    overflowing score (+inf) and a tensor of 3 elements (one shard empty on some ranks)."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        shapes = [(37, 5), (3,), (1000,), (2, 1)]
        grads, moments = [], []
        for shape in shapes:
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            m = torch.randn(shape, generator=gen, dtype=torch.float64)
            flat_g, flat_m = g.view(-1), m.view(-1)
            if flat_g.numel() > 10:
                flat_g[:7] = 0.5  # ties
                flat_m[:7] = 1.0
                flat_m[7:9] = 0.0  # undefined second-order scores
                flat_m[9] = 1e-300 if dtype == torch.float64 else 1e-40  # +inf score
            grads.append(g.to(dtype))
            moments.append(m.to(torch.float64 if dtype == torch.float64 else torch.float32))
        cases.append((grads, moments))
    mixed = (cases[0][0][:2] + cases[2][0][:2], cases[0][1][:2] + cases[2][1][:2])  # float32 and float64
    cases.append(mixed)
    return cases


def _quantiles_of(grads, moments, scales, pooled, q_lo, q_hi, global_pool, second: bool):
    """The oracle: reference scores of the whole tensors and reference.quantile over each pool."""
    pools = []
    for g, m, scale, p in zip(grads, moments, scales, pooled, strict=True):
        if not p:
            pools.append(torch.empty(0, dtype=torch.float64))
            continue
        if second:
            s, defined = reference.second_order_element_scores(g.reshape(-1), m.reshape(-1), scale)
            s = s[defined]
        else:
            s = reference.first_order_element_scores(g.reshape(-1))
        pools.append(s.to(torch.float64))
    if global_pool:
        pools = [torch.cat(pools)]
    return [(reference.quantile(p, q_lo), reference.quantile(p, q_hi), p.numel()) for p in pools]


# (q_lo, q_hi, global pool, second order, every tensor pooled but one / none pooled)
SELECT_SETTINGS = [(q_lo, q_hi, global_pool, second, True)
                   for q_lo, q_hi in ((0.0, 0.6), (0.1, 0.7), (0.0, 1.0), (0.33, 0.33))
                   for global_pool in (False, True) for second in (False, True)]
SELECT_SETTINGS += [(0.0, 0.6, False, True, False), (0.0, 0.6, True, False, False)]


def _pooled(count: int, some: bool) -> list[bool]:
    return [some and k != 1 for k in range(count)]  # tensor 1 in warm-up


def _shard_rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows of dim 0 as FSDP2 splits them (ceil-sized chunks; trailing ranks may get none)."""
    chunks = torch.chunk(t, world, dim=0)
    return chunks[rank].contiguous() if rank < len(chunks) else t[t.shape[0]:].contiguous()


def _select_worker(rank: int, world: int, store_path: str, out_dir: str, seed: int) -> None:
    from rose_kernels.backends.sharded import ShardedStep

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        out = []
        for grads, moments in _pool_cases(seed):
            scales = [0.1 + 0.05 * i for i in range(len(grads))]
            for q_lo, q_hi, global_pool, second, some in SELECT_SETTINGS:
                pooled = torch.tensor(_pooled(len(grads), some))
                sharding = ShardedStep(dist.group.WORLD, tuple(g.numel() for g in grads))
                table = sharding.element_thresholds(
                    rose_kernels.ops.element_thresholds, [_shard_rows(g, rank, world) for g in grads],
                    [_shard_rows(m, rank, world) for m in moments] if second else [],
                    torch.tensor(scales, dtype=torch.float64), pooled, q_lo, q_hi, global_pool)
                out.append({"table": table.tolist(), "collectives": sharding.collectives})
        with open(os.path.join(out_dir, f"select{rank}.json"), "w") as f:
            json.dump(out, f)
        dist.barrier()  # no rank leaves while another still talks to it (gloo aborts then)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_select_is_exact(seed, tmp_path, world):
    mp.spawn(_select_worker, args=(world, str(tmp_path / "store"), str(tmp_path), seed), nprocs=world, join=True)
    ranks = [json.loads((tmp_path / f"select{r}.json").read_text()) for r in range(world)]
    i = 0
    for grads, moments in _pool_cases(seed):
        scales = [0.1 + 0.05 * k for k in range(len(grads))]
        wide = any(g.dtype == torch.float64 for g in grads)
        for q_lo, q_hi, global_pool, second, some in SELECT_SETTINGS:
            pooled = _pooled(len(grads), some)
            want = _quantiles_of(grads, moments, scales, pooled, q_lo, q_hi, global_pool, second)
            msg = f"seed={seed} world={world} dtypes={[g.dtype for g in grads]} q=({q_lo}, {q_hi}) " \
                  f"global={global_pool} second={second}"
            for r in range(world):
                got = ranks[r][i]
                assert got == ranks[0][i], f"{msg}: ranks disagree"
                assert got["collectives"] == ((5 if wide else 3) if some else 1), msg
                for row, (lo, hi, count) in zip(got["table"], want, strict=True):
                    same = [(a == b) or (a != a and b != b) for a, b in ((row[0], lo), (row[1], hi))]
                    assert all(same) and row[2] == count and row[3] == 0, f"{msg}: {row[:4]} vs {(lo, hi, count)}"
            i += 1


def test_nonfinite_values_on_one_rank_and_unsupported_layouts(tmp_path):
    mp.spawn(_nonfinite_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"flag{r}.json").read_text()) for r in range(WORLD)]
    for r, got in enumerate(results):
        assert got["select_flags"] == [1.0, 1.0, 1.0], f"rank {r}: {got}"
        # A NaN gradient on rank 1 stops the step on both ranks, in every mode, before any change.
        assert got["steps"] == [["raised", True]] * 4, f"rank {r}: {got['steps']}"
        assert "does not run on sharded" in got["reference"]
        assert "some parameters are DTensors" in got["mixed"]


def _nonfinite_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    from rose_kernels.backends.sharded import ShardedStep

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        flags = []
        # A NaN on rank 1 only: in a pooled gradient, in an unpooled one, in a pooled moment.
        for where in ("pooled", "unpooled", "moment"):
            g = [torch.ones(4), torch.ones(4)]
            m = [torch.ones(4), torch.ones(4)]
            if rank == 1:
                {"pooled": g[0], "unpooled": g[1], "moment": m[0]}[where][2] = float("nan")
            sharding = ShardedStep(dist.group.WORLD, (8, 8))
            table = sharding.element_thresholds(rose_kernels.ops.element_thresholds, g, m,
                                                torch.tensor([0.1, 0.1], dtype=torch.float64),
                                                torch.tensor([True, False]), 0.0, 0.6, False)
            flags.append(table[0, 3].item())
        steps = []
        for cfg in (dict(mode="off"), dict(mode="second"), dict(mode="second", granularity="element"),
                    dict(mode="second", granularity="element", scope="global")):
            model = _shard(_model(0), _mesh(world))
            opt = _optimizer(model, cfg)
            before = _full(model)
            loss, _ = _losses(model, torch.ones(2, 6, dtype=torch.float64), torch.zeros(2, dtype=torch.int64),
                              torch.zeros(2, 6, dtype=torch.float64))
            loss.backward()
            if rank == 1:
                model.body[2].weight.grad.to_local()[0, 0] = float("nan")
            try:
                opt.step()
                outcome = "stepped"
            except RuntimeError:
                outcome = "raised"
            steps.append([outcome, _full(model) == before and not opt.state])
        model = _shard(_model(0), _mesh(world))
        try:
            model.temperature.grad = None
            opt = RoseAdamW(model.parameters(), backend="reference")
            _losses(model, torch.ones(2, 6, dtype=torch.float64), torch.zeros(2, dtype=torch.int64),
                    torch.zeros(2, 6, dtype=torch.float64))[0].backward()
            opt.step()
            reference_error = ""
        except RuntimeError as error:
            reference_error = str(error)
        try:
            opt = RoseAdamW([*model.parameters(), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))])
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.zeros_like(p)
            opt.step()
            mixed_error = ""
        except RuntimeError as error:
            mixed_error = str(error)
        with open(os.path.join(out_dir, f"flag{rank}.json"), "w") as f:
            json.dump({"select_flags": flags, "steps": steps, "reference": reference_error, "mixed": mixed_error}, f)
        dist.barrier()  # no rank leaves while another still talks to it (gloo aborts then)
    finally:
        dist.destroy_process_group()


# ---- torch.distributed.checkpoint: save at step k, resume on 2 ranks or on 1 --------------------

def _resume_worker(rank: int, world: int, store_path: str, out_dir: str, seed: int, phase: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = _init(rank, world, store_path)
    try:
        results = []
        for i, cfg in enumerate(RESUME_CONFIGS):
            batches = _batches(seed)
            model = _shard(_model(seed), mesh)
            opt = _optimizer(model, cfg)
            checkpoint = os.path.join(out_dir, f"checkpoint{i}")
            if phase == "save":
                _train(model, opt, batches[:RESUME_AT], cfg, rank, world)
                model_state, optim_state = get_state_dict(model, opt)
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
                continue
            opt.init_state()  # DCP fills an optimizer without state by a step(); ensemble refuses one
            model_state, optim_state = get_state_dict(model, opt)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=checkpoint)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            kept = _train(model, opt, batches[RESUME_AT:], cfg, rank, world)
            results.append({"cfg": cfg, "params": _full(model), "kept": kept})
        if phase != "save":
            with open(os.path.join(out_dir, f"{phase}{rank}.json"), "w") as f:
                json.dump(results, f)
        dist.barrier()  # no rank leaves while another still talks to it (gloo aborts then)
    finally:
        dist.destroy_process_group()


def test_dcp_resume_on_two_ranks_and_on_one(seed, tmp_path):
    mp.spawn(_resume_worker, args=(WORLD, str(tmp_path / "store0"), str(tmp_path), seed, "save"), nprocs=WORLD,
             join=True)
    mp.spawn(_resume_worker, args=(WORLD, str(tmp_path / "store1"), str(tmp_path), seed, "resume2_"), nprocs=WORLD,
             join=True)
    mp.spawn(_resume_worker, args=(1, str(tmp_path / "store2"), str(tmp_path), seed, "resume1_"), nprocs=1, join=True)
    runs = {"2 ranks": [f"resume2_{r}" for r in range(WORLD)], "1 rank": ["resume1_0"]}
    for i, cfg in enumerate(RESUME_CONFIGS):
        params, kept = _single(seed, cfg)
        for label, files in runs.items():
            for name in files:
                got = json.loads((tmp_path / f"{name}.json").read_text())[i]
                assert got["cfg"] == cfg
                got = {**got, "kept": got["kept"]}
                _compare({"params": got["params"], "kept": got["kept"]}, params, kept[RESUME_AT:],
                         f"seed={seed} resumed on {label} ({name}) at step {RESUME_AT} {cfg}")

