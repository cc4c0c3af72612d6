"""ROSE under data parallelism on the CPU: a training step under FSDP2 (``fully_shard``) next to the
same step under DDP, 2 processes (gloo, one thread each), on all-MiniLM-L6-v2; and the communication
RoseAdamW adds per step, counted, next to the data-parallel engine's own.

Each process builds one DDP copy and one FSDP2 copy of the model per configuration, and their steps
alternate (DDP, FSDP2, DDP, ...) so that both see the same machine load; medians over the rounds,
rank 0's clock (every step ends in collectives, so the ranks keep step). The training step is
forward (two dropout passes in the two-pass modes), backward(s), ``record_first_order()``,
``step()``; DDP's two-pass step runs under ``no_sync()`` and averages both backward passes with
``average_gradients_`` (rose_kernels/distributed.py), FSDP2 reduce-scatters both itself.

Communication is counted by wrapping ``torch.distributed.all_reduce`` while ``record_first_order``
and ``step`` run (calls and payload bytes); the engine's per backward pass is computed from the
parameter count (DDP: an all-reduce of every gradient; FSDP2: a reduce-scatter of every gradient
and an all-gather of every parameter in the forward and again in the backward pass).

    python bench/bench_distributed.py [--rounds 8] [--batch-size 16] [--max-length 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rose_kernels import RoseAdamW, rose_param_groups
from rose_kernels.distributed import average_gradients_
from rose_kernels.train.step import rose_losses
from rose_kernels.types import uses_first_order

CONFIGS = [
    dict(mode="torch", granularity="-"),  # torch.optim.AdamW (foreach): the engines' own cost
    dict(mode="off", granularity="tensor"),
    dict(mode="second", granularity="tensor"),
    dict(mode="second", granularity="element"),
    dict(mode="ensemble", granularity="element"),
]
TARGET = 1.3  # FSDP2 step / DDP step


def _label(cfg: dict) -> str:
    return "torch AdamW (foreach)" if cfg["mode"] == "torch" else f"RoseAdamW {cfg['mode']}/{cfg['granularity']}"


class _CountedAllReduce:
    """Counts the all-reduces (and their payload bytes) issued inside ``with counter:``, and the
    seconds spent there."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0
        self._original = dist.all_reduce

    def __enter__(self):
        self._started = time.perf_counter()
        def counted(tensor, *args, **kwargs):
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original
        self.seconds += time.perf_counter() - self._started
        return False


def _model(seed: int):
    from rose_kernels.train.model import load_model

    model, _ = load_model(None, 2, seed)
    return model


def _inputs(batch: int, length: int, vocab: int, seed: int, rank: int, world: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, length), generator=gen)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    return {"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows])}, labels[rows]


def _step(kind, net, model, opt, counter, inputs, labels, cfg, world):
    two_pass = uses_first_order(cfg["mode"])
    mode = "off" if cfg["mode"] == "torch" else cfg["mode"]
    params = [p for p in model.parameters() if p.requires_grad]
    sync = net.no_sync() if kind == "ddp" and two_pass else contextlib.nullcontext()
    with sync:
        loss, loss_kl, _ = rose_losses(net, inputs, labels, mode)
        if two_pass:
            (loss_kl * world).backward(retain_graph=True)
            if kind == "ddp":
                eligible = [p for g in opt.param_groups if g["rose"] for p in g["params"] if p.requires_grad]
                with counter:  # ROSE's own: DDP averages only one backward pass per forward
                    average_gradients_(eligible)
            with counter:
                opt.record_first_order()
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if kind == "ddp" and two_pass:
            average_gradients_(params)  # the task gradients: what DDP would have done
    with counter:
        opt.step()
    opt.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, store: str, out: str, args: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = []
        for cfg in CONFIGS:
            runs = {}
            for kind in ("ddp", "fsdp"):
                model = _model(args["seed"])
                model.train()
                if kind == "ddp":
                    net = torch.nn.parallel.DistributedDataParallel(model)
                else:
                    for block in model.bert.encoder.layer:
                        fully_shard(block, mesh=mesh)
                    net = fully_shard(model, mesh=mesh)
                groups = rose_param_groups(model, 0.01)
                if cfg["mode"] == "torch":
                    opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, foreach=True)
                else:
                    opt = RoseAdamW(groups, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, **cfg)
                runs[kind] = (net, model, opt, _CountedAllReduce(), [])
            inputs, labels = _inputs(args["batch_size"], args["max_length"], 30000, args["seed"], rank, world)
            for round_ in range(args["warmup"] + args["rounds"]):
                for kind, (net, model, opt, counter, times) in runs.items():
                    if round_ == args["warmup"]:
                        counter.calls = counter.bytes = 0
                        counter.seconds = 0.0
                    dist.barrier()
                    started = time.perf_counter()
                    _step(kind, net, model, opt, counter, inputs, labels, cfg, world)
                    if round_ >= args["warmup"]:
                        times.append(time.perf_counter() - started)
            params = sum(p.numel() for p in runs["ddp"][1].parameters())
            entry = {"config": _label(cfg), "params": params}
            for kind, (_, _, _, counter, times) in runs.items():
                entry[kind] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                               "rose_all_reduces_per_step": counter.calls / args["rounds"],
                               "rose_bytes_per_step": counter.bytes / args["rounds"],
                               "optimizer_s_per_step": counter.seconds / args["rounds"]}
            entry["fsdp_over_ddp"] = entry["fsdp"]["median_s"] / entry["ddp"]["median_s"]
            results.append(entry)
            del runs
        if rank == 0:
            Path(out).write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(rounds: int = 8, batch_size: int = 16, max_length: int = 64, warmup: int = 2, seed: int = 0,
        world: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        args = dict(rounds=rounds, batch_size=batch_size, max_length=max_length, warmup=warmup, seed=seed)
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), out, args), nprocs=world, join=True)
        results = json.loads(Path(out).read_text())
    return {"world": world, "batch_size": batch_size, "max_length": max_length, "rounds": rounds,
            "torch": torch.__version__, "results": results}


def table(report: dict) -> str:
    lines = [
        f"{report['world']} processes (gloo, 1 thread each), all-MiniLM-L6-v2, global batch {report['batch_size']} x "
        f"{report['max_length']} tokens, median of {report['rounds']} alternating steps (min-max). Optimizer: "
        "seconds per step inside `record_first_order()` + `step()` (+ the KL gradients' average under DDP).",
        "",
        "| optimizer | DDP step (s) | FSDP2 step (s) | FSDP2 / DDP | optimizer, DDP (s) | optimizer, FSDP2 (s) | "
        "ROSE all-reduces per step, FSDP2 | ROSE bytes per step, FSDP2 | ROSE bytes per step, DDP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["results"]:
        d, f = e["ddp"], e["fsdp"]
        rose = not e["config"].startswith("torch")
        lines.append(
            f"| {e['config']} | {d['median_s']:.3f} ({d['min_s']:.3f}-{d['max_s']:.3f}) | {f['median_s']:.3f} "
            f"({f['min_s']:.3f}-{f['max_s']:.3f}) | {e['fsdp_over_ddp']:.2f}x | {d['optimizer_s_per_step']:.3f} | "
            f"{f['optimizer_s_per_step']:.3f} | {f['rose_all_reduces_per_step']:g} | "
            f"{f['rose_bytes_per_step']:,.0f} | {d['rose_bytes_per_step']:,.0f} |" if rose else
            f"| {e['config']} | {d['median_s']:.3f} ({d['min_s']:.3f}-{d['max_s']:.3f}) | {f['median_s']:.3f} "
            f"({f['min_s']:.3f}-{f['max_s']:.3f}) | {e['fsdp_over_ddp']:.2f}x | {d['optimizer_s_per_step']:.3f} | "
            f"{f['optimizer_s_per_step']:.3f} | - | - | - |")
    params = report["results"][0]["params"]
    lines += [
        "",
        f"Engine traffic per backward pass ({params / 1e6:.1f}M float32 parameters, computed): DDP all-reduces "
        f"{4 * params / 1e6:.0f} MB of gradients; FSDP2 reduce-scatters {4 * params / 1e6:.0f} MB of gradients and "
        f"all-gathers {4 * params / 1e6:.0f} MB of parameters in the forward and again in the backward pass.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    report = run(args.rounds, args.batch_size, args.max_length)
    text = table(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    (out / f"distributed-cpu-{stamp}.json").write_text(json.dumps(report, indent=1))
    (out / f"distributed-cpu-{stamp}.md").write_text(f"# ROSE under DDP and FSDP2 (CPU), {stamp}\n\n{text}\n")


if __name__ == "__main__":
    main()
