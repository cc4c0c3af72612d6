"""``rose-train``'s training loop: set a run up, step it, checkpoint it, hand it to the report.

A run is a pure function of its configuration: the data order comes from generators seeded by
(seed, epoch), dropout from the global torch generator whose state every checkpoint saves, and
the CPU kernels are deterministic. So a run killed at any point and resumed from its last
checkpoint ends with the same weights and metrics as one that was never interrupted
(checkpoint.py writes and reads the checkpoints, step.py holds the optimizer step, report.py the
evaluation and the files a finished run writes).

The loop does not wait for the device at every step: the step's loss stays a device tensor, and
the losses of the steps since the last log point are read to the host in one go, together with the
optimizer's kept fractions, every ``log_steps`` steps, at the last step and right before each
checkpoint (so a checkpoint's history is complete and a resumed run logs at the same steps).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import rose_kernels
from rose_kernels.distributed import average_tensors_
from rose_kernels.train import data as data_mod
from rose_kernels.train.checkpoint import RunState, open_run, restore_checkpoint, save_checkpoint
from rose_kernels.train.config import TrainConfig, TrainError
from rose_kernels.train.model import batch_of, load_model
from rose_kernels.train.optimizer import build_optimizer
from rose_kernels.train.parallel import Parallel, full_model_state
from rose_kernels.train.report import evaluate_run, layer_kept, summary_table, write_run
from rose_kernels.train.step import FirstOrderScores, train_step
from rose_kernels.types import uses_first_order


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device here")
    return device


def load_corpus(cfg: TrainConfig) -> data_mod.Corpus:
    """The run's data: ``--train-file`` (and ``--eval-file``), ``--dataset``, or Rotten Tomatoes."""
    columns = dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column)
    if cfg.train_file:
        return data_mod.load_files(cfg.train_file, cfg.eval_file, **columns)
    if cfg.dataset:
        return data_mod.load_hub(cfg.dataset, **columns)
    return data_mod.load_rotten_tomatoes()


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of ``--warmup-steps``: linear up over ``warmup`` steps, then down to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def _batch_on(tokenizer, examples, max_length: int, device: torch.device):
    """``batch_of`` built on the host and copied without waiting: a plain ``.to("cuda")`` from pageable
    memory synchronises the stream, i.e. waits for all the work queued before it (the previous step)."""
    if device.type != "cuda":
        return batch_of(tokenizer, examples, max_length, device)
    inputs, labels = batch_of(tokenizer, examples, max_length, torch.device("cpu"))

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True)  # pinned blocks are kept until their copy is done

    return {k: move(v) for k, v in inputs.items()}, move(labels)


@dataclass
class Run:
    """One training run, set up: what its steps read, and its :class:`RunState` (what they change).

    ``pending``: the ``(step, lr, 0-d loss on the device)`` of the steps since the last log point."""

    cfg: TrainConfig
    parallel: Parallel
    device: torch.device
    corpus: data_mod.Corpus
    tokenizer: Any
    net: torch.nn.Module  # what the step calls (DDP's wrapper, or the model); state.model holds the parameters
    first: FirstOrderScores | None  # the KL gradients, in the modes with a first-order part
    sizes: dict[str, int]  # parameter name -> number of elements
    total: int  # optimizer steps of the run
    state: RunState
    pending: list[tuple[int, float, torch.Tensor]] = field(default_factory=list)
    bar: Any = None  # tqdm progress bar, or None

    @property
    def per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.corpus.train) / self.per_step)


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Runs (or resumes) a training run; returns the metrics written to ``metrics.json``.

    Under ``--distributed`` (one process per rank, started by torchrun) every rank calls this; rank 0
    logs, evaluates and writes metrics, the model and the checkpoint's metadata, and returns the
    metrics; the other ranks return ``{}``."""
    parallel = Parallel.start(cfg.distributed, cfg.device)
    try:
        metrics = _train(cfg, parallel, log if parallel.main else (lambda _: None), progress and parallel.main)
        # Every rank tears its group down together: a gloo rank that destroyed its group while
        # rank 0 still wrote the model and metrics was seen to abort ("terminate called without
        # an active exception"). Not on an error: the other ranks may never get here.
        parallel.barrier()
        return metrics
    finally:
        parallel.close()


def _train(cfg: TrainConfig, parallel: Parallel, log: Callable[[str], None], progress: bool) -> dict:
    cfg, saved = open_run(cfg, log)
    cfg.check()
    device = parallel.device(resolve_device(cfg.device))
    if cfg.precision == "fp16" and device.type != "cuda":
        raise TrainError("--precision fp16 needs a CUDA device (use bf16 on the CPU)")
    parallel.barrier()  # every rank has checked the output directory before rank 0 writes to it

    corpus = load_corpus(cfg)
    adv_examples = data_mod.load_advglue(cfg.adv_file, cfg.adv_task, corpus.labels) if cfg.adv_file else None
    run = set_up(cfg, parallel, device, corpus)
    if saved is not None:
        restore_checkpoint(saved, cfg, run.state, parallel, device, log)
    if parallel.main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    parallel.barrier()
    if saved is None:
        save_checkpoint(cfg, run.state, parallel, device)  # step 0: a run killed before its first save can resume
    log(_describe(run))
    if progress:
        from tqdm import tqdm

        run.bar = tqdm(total=run.total, initial=run.state.step, desc="rose-train", unit="step", dynamic_ncols=True)
    run_steps(run)
    if run.bar is not None:
        run.bar.close()
    return finish(run, adv_examples, log=log, progress=progress)


def set_up(cfg: TrainConfig, parallel: Parallel, device: torch.device, corpus: data_mod.Corpus) -> Run:
    """The model (on ``device``, seeded), its optimizer, schedule and scaler, at step 0."""
    model, tokenizer = load_model(cfg.model, len(corpus.labels), cfg.seed)
    model.to(device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    net = parallel.wrap(model, device)
    optimizer = build_optimizer(model, **cfg.optimizer_options())
    sizes = {n: p.numel() for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"], strict=True)}
    total = math.ceil(len(corpus.train) / (cfg.batch_size * cfg.grad_accum)) * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg.warmup_steps, total))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    first = None
    if uses_first_order(cfg.mode):
        first = FirstOrderScores(optimizer, via_backward=parallel.kind == "fsdp",
                                 average=average_tensors_ if parallel.average_by_hand(True) else None)
    state = RunState(model, optimizer, scheduler, scaler)
    return Run(cfg, parallel, device, corpus, tokenizer, net, first, sizes, total, state)


def _describe(run: Run) -> str:
    cfg, parallel, optimizer = run.cfg, run.parallel, run.state.optimizer
    return (f"rose-train: {run.corpus.source}: {len(run.corpus.train)} train / {len(run.corpus.eval)} eval examples, "
            f"{len(run.corpus.labels)} labels; {sum(run.sizes.values()) / 1e6:.1f}M params; mode={cfg.mode} "
            f"granularity={cfg.granularity} [{cfg.lower:g}, {cfg.upper:g}]; {run.total} steps of {run.per_step} on "
            f"{run.device}{f' x {parallel.world} ranks ({parallel.kind})' if parallel.active else ''}; "
            f"backend={optimizer.backend_for([next(run.state.model.parameters())]).name}")


# Per-step values are kept on the device until a log point (every --log-steps steps, the last step,
# and right before each checkpoint), where the pending losses are read in one go and
# optimizer.mask_stats() is read once: mask_stats is read at log points only, so the history
# entries of the steps in between carry the kept fractions of the log point's step, named in their
# "kept_at_step". The log points depend on the step number only, so a resumed run logs at the same
# steps (and writes the same history) as an uninterrupted one. Under --distributed a log point is a
# collective (the losses are added over the ranks, the kept fractions too).


def run_steps(run: Run) -> None:
    """Steps the run from ``run.state.step`` to ``run.total``, logging and checkpointing on the way."""
    cfg, state = run.cfg, run.state
    run.net.train()
    while state.step < run.total:
        started = time.perf_counter()
        loss_sum = _step(run)
        state.scheduler.step()
        state.step += 1
        run.pending.append((state.step, state.scheduler.get_last_lr()[0], loss_sum))  # the lr: a host number
        save = state.step % cfg.save_steps == 0 or state.step == run.total
        if save or state.step % cfg.log_steps == 0:
            flush(run)  # before a save, so that the checkpoint holds the history of every step up to it
        state.train_seconds += time.perf_counter() - started  # a flush waits for the queued steps: counted here
        if run.bar is not None:
            run.bar.update(1)
        if save:
            save_checkpoint(cfg, state, run.parallel, run.device)


def _step(run: Run) -> torch.Tensor:
    """The optimizer step after ``run.state.step``: its micro-batches, this rank's rows of them."""
    cfg, parallel = run.cfg, run.parallel
    epoch, within = divmod(run.state.step, run.steps_per_epoch)
    order = torch.randperm(len(run.corpus.train), generator=torch.Generator().manual_seed(cfg.seed * 1009 + epoch))
    first_index = within * run.per_step
    micro = [order[first_index + a * cfg.batch_size: first_index + (a + 1) * cfg.batch_size].tolist()
             for a in range(cfg.grad_accum)]
    # Under --distributed a micro-batch with fewer examples than ranks (the tail of an epoch) is
    # left out: a rank without rows cannot take part in the collectives of the backward pass.
    micro = [indices for indices in micro if len(indices) >= parallel.world]
    count = sum(len(indices) for indices in micro)
    batches = [_batch_on(run.tokenizer, [run.corpus.train[i] for i in parallel.rows(indices)], cfg.max_length,
                         run.device) for indices in micro]
    if not batches:
        return torch.zeros((), dtype=torch.float64, device=run.device)
    return train_step(run.net, run.state.optimizer, run.state.scaler, run.first, batches, cfg, parallel, count)


def flush(run: Run) -> None:
    """A log point: the pending steps' losses and the kept fractions read once, into the history."""
    if not run.pending:
        return
    losses = run.parallel.sum_(torch.stack([loss for _, _, loss in run.pending])).tolist()  # the one read of losses
    stats = run.state.optimizer.mask_stats()
    sizes = run.sizes
    layers = layer_kept(stats, sizes)
    kept = sum(stats[n] * sizes[n] for n in stats) / max(1, sum(sizes[n] for n in stats)) if stats else 1.0
    read_at = run.pending[-1][0]
    for (entry_step, lr, _), loss in zip(run.pending, losses, strict=True):
        run.state.history.append({"step": entry_step, "loss": loss, "lr": lr, "kept": kept, "layers": dict(layers),
                                  "kept_at_step": read_at})
    run.pending.clear()
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{losses[-1]:.4f}", kept=f"{kept:.3f}")


def finish(run: Run, adv_examples, *, log: Callable[[str], None], progress: bool) -> dict:
    """Rank 0 evaluates the trained model and writes the run's files; returns its metrics ({} elsewhere)."""
    cfg, parallel, state, corpus = run.cfg, run.parallel, run.state, run.corpus
    model = state.model
    full_state = full_model_state(model, parallel) if parallel.active else None  # a collective under fsdp
    if not parallel.main:
        return {}
    if parallel.kind == "fsdp":
        model, _ = load_model(cfg.model, len(corpus.labels), cfg.seed)
        model.load_state_dict(full_state)
        model.to(run.device)
    history = state.history
    metrics = evaluate_run(cfg, model, run.tokenizer, corpus, adv_examples, log=log, progress=progress)
    metrics.update(steps=state.step, seconds_per_step=state.train_seconds / max(1, state.step),
                   train_seconds=state.train_seconds, config=dataclasses.asdict(cfg),
                   rose_kernels=rose_kernels.__version__,
                   final_loss=history[-1]["loss"] if history else None,
                   final_kept=history[-1]["kept"] if history else None,
                   train_examples=len(corpus.train), eval_examples=len(corpus.eval), labels=corpus.labels,
                   device=str(run.device), torch=torch.__version__, ranks=parallel.world)
    write_run(cfg, model, run.tokenizer, corpus.labels, history, metrics)
    log(summary_table(metrics))
    return metrics
