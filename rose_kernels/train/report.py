"""What a run reports: evaluation, the summary table, and the files a finished run writes.

- :func:`evaluate_run`: clean accuracy, AdvGLUE accuracy (``--adv-file``) and the charlevel attack
  (:func:`run_attack`), as in ``metrics.json`` (also what ``rose-eval`` computes);
- :func:`layer_kept`: the optimizer's kept fractions per layer, as in each ``history.json`` entry;
- :func:`write_run`: ``OUTPUT_DIR/model/`` (model, tokenizer, ``rose_labels.json``), ``history.json``,
  ``kept_fraction.png`` (:func:`plot_kept`) and ``metrics.json``;
- :func:`summary_table`: the metrics as the table ``rose-train`` and ``rose-eval`` print.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rose_kernels.train.checkpoint import atomic_write_text
from rose_kernels.train.config import TrainConfig
from rose_kernels.train.model import accuracy, predict_proba


def layer_of(name: str) -> str:
    """``encoder.layer.3.attention...`` -> ``layer 3``; the plot groups tensors by layer."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "layers", "h", "block") and parts[i + 1].isdigit():
            return f"layer {parts[i + 1]}"
    return "other"


def layer_order(layer: str) -> tuple[int, int]:
    """Sort key of :func:`layer_of`'s names: ``layer 0``, ``layer 1``, ..., then ``other``."""
    return (0, int(layer.split()[1])) if layer.startswith("layer ") else (1, 0)


def layer_kept(stats: dict[str, float], sizes: dict[str, int]) -> dict[str, float]:
    """Kept fraction per layer, weighted by tensor size."""
    totals: dict[str, list[float]] = {}
    for name, kept in stats.items():
        entry = totals.setdefault(layer_of(name), [0.0, 0.0])
        entry[0] += kept * sizes[name]
        entry[1] += sizes[name]
    return {layer: kept / n for layer, (kept, n) in sorted(totals.items(), key=lambda kv: layer_order(kv[0]))}


def plot_kept(history: list[dict], path: Path, title: str) -> None:
    """Kept fraction per layer over the training steps (what ROSE froze, where and when).

    Only the steps the kept fractions were read at are drawn (``kept_at_step == step``; the entries
    in between carry those of the next log point, see rose_kernels/train/loop.py).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    history = [h for h in history if h.get("kept_at_step", h["step"]) == h["step"]]
    steps = [h["step"] for h in history]
    layers = sorted({layer for h in history for layer in h["layers"]}, key=layer_order)
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


def evaluate_run(cfg: TrainConfig, model, tokenizer, corpus, adv_examples, *, log=print, progress=True) -> dict:
    """Clean accuracy on the corpus's evaluation split, AdvGLUE accuracy if ``adv_examples`` is not
    None, and the charlevel attack on the first ``cfg.attack_examples`` evaluation examples."""
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
    """The charlevel attack (rose_kernels/train/attack.py) on ``examples``; its summary."""
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


def write_run(cfg: TrainConfig, model, tokenizer, labels: list[str], history: list[dict], metrics: dict) -> None:
    """A finished run's files in ``cfg.output_dir``; ``metrics.json`` last (a run is done once it exists)."""
    out = Path(cfg.output_dir)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "rose_labels.json").write_text(json.dumps(labels))
    atomic_write_text(json.dumps(history), out / "history.json")
    if history:
        plot_kept(history, out / "kept_fraction.png", f"ROSE {cfg.mode}/{cfg.granularity} [{cfg.lower:g}, "
                  f"{cfg.upper:g}]: kept fraction per layer")
    atomic_write_text(json.dumps(metrics, indent=1), out / "metrics.json")


def summary_table(metrics: dict) -> str:
    """The metrics as a two-column text table (what rose-train and rose-eval print)."""
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
