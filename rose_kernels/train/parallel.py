"""``rose-train --distributed {ddp,fsdp}``: the data-parallel side of the trainer (under ``torchrun``).

Each rank reads its rows of every global batch (contiguous slices of each micro-batch); the losses
are weighted so that the ranks' averaged gradients are those of the global batch:

- ``ddp``: the model is wrapped in ``DistributedDataParallel``. Modes ``off`` and ``second``
  let DDP average the gradients (synchronising only the last micro-batch of a step). The two-pass
  modes run every micro-batch under ``no_sync()`` and average by hand, once per step, the task
  gradients and the KL gradients (:func:`rose_kernels.distributed.average_tensors_`): DDP
  synchronises one backward pass per forward, and ROSE's step has two.
- ``fsdp``: every transformer block and the root are sharded with FSDP2 (``fully_shard``); FSDP2
  reduce-scatters (averages) the gradients of every backward pass, the KL pass's included, and
  RoseAdamW makes its scores global over the shards (rose_kernels/backends/sharded.py).

Metrics, the saved model and the checkpoint's metadata are written by rank 0; under ``fsdp`` the
model and optimizer state are saved with ``torch.distributed.checkpoint``, each rank its shard
(rose_kernels/train/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rose_kernels.train.config import KINDS, TrainError


@dataclass
class Parallel:
    """This process's place in the job (``kind="none"``: one process, nothing distributed)."""

    kind: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # the process group was made here, and is destroyed here

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @classmethod
    def start(cls, kind: str, device_name: str) -> Parallel:
        """Joins the job ``torchrun`` started (its RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables):
        ``gloo`` on the CPU, ``nccl`` on CUDA."""
        if kind == "none":
            return cls()
        if kind not in KINDS:
            raise TrainError(f"--distributed must be one of {', '.join(KINDS)}, got {kind!r}")
        if not dist.is_available():
            raise TrainError("--distributed: this torch build has no torch.distributed")
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise TrainError(f"--distributed {kind} runs under torchrun, e.g. "
                             f"torchrun --nproc-per-node 2 -m rose_kernels.train --distributed {kind} ...")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        owns = not dist.is_initialized()
        if owns:
            cuda = device_name != "cpu" and torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(kind, dist.get_rank(), dist.get_world_size(), local_rank, owns)

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.active else device

    def rows(self, indices: list[int]) -> list[int]:
        """This rank's contiguous share of one micro-batch."""
        n = len(indices)
        return indices[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module the training step calls: DDP's wrapper, or the model sharded in place by FSDP2."""
        if self.kind == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world,))
            for module in _blocks(model):
                fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    def no_sync(self, model: torch.nn.Module, last: bool, two_pass: bool):
        """DDP: skip the gradient all-reduce of this micro-batch (all of them in the two-pass modes,
        which average by hand)."""
        if self.kind == "ddp" and (two_pass or not last):
            return model.no_sync()
        return contextlib.nullcontext()

    def average_by_hand(self, two_pass: bool) -> bool:
        return self.kind == "ddp" and two_pass

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer (the members of its ModuleLists), sharded one by one
    so that only one block is gathered at a time."""
    return [m for module in model.modules() if isinstance(module, torch.nn.ModuleList) for m in module]


def full_model_state(model: torch.nn.Module, parallel: Parallel) -> dict | None:
    """The whole state dict of ``model`` (the module itself, not DDP's wrapper) on rank 0, on the
    CPU under fsdp; None on the other ranks (a collective under fsdp)."""
    if parallel.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if parallel.main else None
    return model.state_dict() if parallel.main else None

