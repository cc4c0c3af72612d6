"""``rose-train``'s checkpoints: what a run saves, how it is written, and how ``--resume`` reads it back.

A checkpoint (``OUTPUT_DIR/checkpoint.pt``) holds the run's configuration, its :class:`RunState`
(step, history, training time; the model, optimizer, scheduler and GradScaler state) and every
rank's random generators, so that a resumed run ends with the same weights and metrics as one
that was never interrupted. It is written to a temporary file and renamed over the old one
(:func:`atomic_save`), so a kill while writing leaves the previous checkpoint intact.

Under ``--distributed fsdp`` the model and optimizer state are sharded: each rank writes its shard
with ``torch.distributed.checkpoint`` (DCP) into ``OUTPUT_DIR/state-step<N>/``, which
``checkpoint.pt`` names (:func:`save_sharded`, :func:`load_sharded`).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import rose_kernels
from rose_kernels.optim import RoseAdamW
from rose_kernels.train.config import TrainConfig, TrainError
from rose_kernels.train.parallel import Parallel

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1


@dataclass
class RunState:
    """What a training run changes from step to step; a checkpoint saves all of it."""

    model: torch.nn.Module  # the module holding the parameters (not DDP's wrapper)
    optimizer: RoseAdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


def checkpoint_format(distributed: str) -> str:
    """How a run's checkpoint holds its model and optimizer state: ``sharded`` (DCP) or ``full``."""
    return "sharded" if distributed == "fsdp" else "full"


def rng_state(device: torch.device) -> dict:
    """This process's random generators: torch's (and CUDA's on a CUDA device), Python's, numpy's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restores what :func:`rng_state` returned."""
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
    """Writes ``text`` to a temporary file in the same directory and renames it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_sharded(model, optimizer, path: str) -> None:
    """Model and optimizer state with torch.distributed.checkpoint (each rank writes its shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    optimizer.init_state()  # a save before the first step: DCP would fill the state by a step()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)


def load_sharded(model, optimizer, path: str) -> None:
    """Loads what :func:`save_sharded` wrote, resharded to this job's ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer.init_state()  # DCP fills an optimizer without state by a step(), which two-pass modes refuse
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def open_run(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[TrainConfig, dict | None]:
    """The configuration to run and the checkpoint to resume from (None: a new run).

    ``--resume``: the run's own saved options, except where to run it (``--device``, ``--backend``,
    ``--distributed``, which may change as long as the checkpoint's format does not). A new run
    refuses an output directory that already holds one.
    """
    out = Path(cfg.output_dir)
    path = out / CHECKPOINT
    if not cfg.resume:
        if path.exists() or (out / "metrics.json").exists():
            raise TrainError(f"{out} already holds a run: pass --resume to continue it, or another --output-dir")
        return cfg, None
    if not path.is_file():
        raise TrainError(f"--resume: no checkpoint in {out}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a broken file is one line for the user
        raise TrainError(f"--resume: cannot read {path}: {error}") from None
    if saved.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"--resume: {path} is from an incompatible rose-train version")
    given = dataclasses.asdict(cfg)
    cfg = TrainConfig(**{**saved["config"], "resume": True, "output_dir": str(out)})
    for key in ("device", "backend", "distributed"):  # where to run may change; what to compute may not
        setattr(cfg, key, given[key])
    saved_kind = saved["config"].get("distributed", "none")
    if checkpoint_format(cfg.distributed) != checkpoint_format(saved_kind):
        raise TrainError(f"--resume: the run was saved with --distributed {saved_kind}; resume it with "
                         f"--distributed {'fsdp' if saved_kind == 'fsdp' else 'none or ddp'}")
    _remove_stale_temporaries(out, log)
    log(f"resuming {out} at step {saved['step']} (the run's own options are used)")
    return cfg, saved


def _remove_stale_temporaries(out: Path, log: Callable[[str], None]) -> None:
    """Removes the temporary files (``.<name>.tmp-<pid>``) that a process killed inside
    :func:`atomic_save` or :func:`atomic_write_text` left behind: a checkpoint's worth of disk each.
    Only those whose process is gone (another rank of this run may be writing its own)."""
    for tmp in out.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        log(f"removed {tmp.name}, left by an interrupted write")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_checkpoint(cfg: TrainConfig, state: RunState, parallel: Parallel, device: torch.device) -> None:
    """Writes ``OUTPUT_DIR/checkpoint.pt`` (a collective under ``--distributed``: every rank calls it)."""
    out = Path(cfg.output_dir)
    path = out / CHECKPOINT
    rng = parallel.gather_objects(rng_state(device))  # every rank's generators (its dropout draws)
    meta = {"version": CHECKPOINT_VERSION, "config": dataclasses.asdict(cfg), "step": state.step,
            "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
            "rng": rng if parallel.active else rng[0], "history": state.history,
            "train_seconds": state.train_seconds, "rose_kernels": rose_kernels.__version__}
    if checkpoint_format(cfg.distributed) == "sharded":
        # Each rank writes its shard into a new directory; the metadata naming it replaces the old
        # one atomically, and only then is the previous directory removed: a kill at any moment
        # leaves a complete checkpoint.
        name = f"state-step{state.step}"
        save_sharded(state.model, state.optimizer, str(out / name))
        parallel.barrier()
        if parallel.main:
            previous = torch.load(path, map_location="cpu", weights_only=False)["sharded_state"] \
                if path.exists() else None
            atomic_save({**meta, "sharded_state": name}, path)
            if previous and previous != name:
                shutil.rmtree(out / previous, ignore_errors=True)
    elif parallel.main:
        atomic_save({**meta, "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}, path)
    parallel.barrier()


def restore_checkpoint(saved: dict, cfg: TrainConfig, state: RunState, parallel: Parallel, device: torch.device,
                       log: Callable[[str], None]) -> None:
    """Loads a checkpoint :func:`open_run` read into ``state`` and this process's random generators."""
    if checkpoint_format(cfg.distributed) == "sharded":
        load_sharded(state.model, state.optimizer, str(Path(cfg.output_dir) / saved["sharded_state"]))
    else:
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    rng = saved["rng"]
    if isinstance(rng, list):  # one per rank
        if len(rng) != parallel.world:
            log(f"note: the run was saved by {len(rng)} ranks and resumes on {parallel.world}: dropout draws "
                "differ from an uninterrupted run")
        rng = rng[parallel.rank % len(rng)]
    set_rng_state(rng, device)
    state.step, state.history, state.train_seconds = saved["step"], saved["history"], saved["train_seconds"]
