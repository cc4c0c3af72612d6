"""The minimal ROSE trainer: ``rose-train``, ``rose-eval``, ``rose-landscape`` and ``RoseTrainer``.

Modules: data.py (corpora, files, AdvGLUE), model.py (classifier + tokenizer), step.py (the ROSE
training step), loop.py (training, checkpoints, resume), attack.py (charlevel attack),
landscape.py (loss surfaces), trainer.py (a transformers.Trainer subclass), cli.py.
"""

from __future__ import annotations

__all__ = ["RoseTrainer", "TrainConfig", "train"]


def __getattr__(name: str):
    # transformers is imported only when a trainer class is asked for.
    if name == "RoseTrainer":
        from rose_kernels.train.trainer import RoseTrainer

        return RoseTrainer
    if name in ("TrainConfig", "train"):
        from rose_kernels.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
