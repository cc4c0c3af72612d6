"""The minimal ROSE trainer: ``rose-train``, ``rose-eval``, ``rose-landscape`` and ``RoseTrainer``.

Modules, by concern:

- config.py: ``TrainConfig`` (every ``rose-train`` option) and ``TrainError`` (a bad option or state);
- optimizer.py: ``build_optimizer``, the one builder of RoseAdamW for rose-train and RoseTrainer,
  and its ``DEFAULTS`` (mode ``ensemble``);
- data.py (corpora, files, AdvGLUE), model.py (classifier + tokenizer);
- step.py: the ROSE training step (``rose_losses``, ``FirstOrderScores``, ``train_step``);
- loop.py: the training loop (``train``);
- checkpoint.py: checkpoints and ``--resume`` (RNG state, atomic writes, the sharded DCP path);
- report.py: evaluation, ``metrics.json``, ``history.json``, the kept-fraction plot, the summary table;
- parallel.py (``--distributed ddp/fsdp``), compare.py (``--compare``), attack.py (charlevel attack),
  landscape.py (loss surfaces), trainer.py (``RoseTrainer``, a transformers.Trainer subclass), cli.py.
"""

from __future__ import annotations

__all__ = ["RoseTrainer", "TrainConfig", "build_optimizer", "train"]


def __getattr__(name: str):
    # transformers is imported only when a trainer class is asked for.
    if name == "RoseTrainer":
        from rose_kernels.train.trainer import RoseTrainer

        return RoseTrainer
    if name == "TrainConfig":
        from rose_kernels.train.config import TrainConfig

        return TrainConfig
    if name == "build_optimizer":
        from rose_kernels.train.optimizer import build_optimizer

        return build_optimizer
    if name == "train":
        from rose_kernels.train.loop import train

        return train
    raise AttributeError(name)
