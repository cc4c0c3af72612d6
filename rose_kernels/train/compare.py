"""``rose-train --compare off,second,ensemble --seeds 3``: every mode trained on the same data, split
and seeds, side by side.

Each (mode, seed) is an ordinary rose-train run in ``OUTPUT_DIR/<mode>-seed<seed>/`` (its own
checkpoints, metrics and model), so an interrupted comparison resumes run by run with ``--resume``:
finished runs are read back, an interrupted one continues from its checkpoint, the rest start.
The comparison itself is written to ``OUTPUT_DIR``:

- ``comparison.json``: every run's metrics, and per mode the mean, standard deviation (over seeds,
  n - 1 in the denominator) and values of each metric, with the difference of means to ``off``;
- ``comparison.md``: the same as a table, each difference marked when it lies inside the seeds'
  noise (within two standard errors of the difference of the means, or a single seed);
- ``comparison.png``: clean accuracy against accuracy under the attack, one point per seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

from rose_kernels.train.checkpoint import CHECKPOINT, atomic_write_text
from rose_kernels.train.config import TrainConfig, TrainError
from rose_kernels.train.loop import train
from rose_kernels.types import MODES

# (key in comparison.json, label, path in a run's metrics.json, higher is better)
METRICS = [
    ("clean_accuracy", "clean accuracy", ("clean_accuracy",), True),
    ("adv_accuracy", "AdvGLUE accuracy", ("adv_accuracy",), True),
    ("accuracy_under_attack", "accuracy under charlevel attack", ("attack", "accuracy_under_attack"), True),
    ("attack_success_rate", "attack success rate", ("attack", "success_rate"), False),
    ("queries_per_success", "queries per successful attack", ("attack", "queries_per_success"), True),
    ("words_changed_per_success", "words changed per successful attack", ("attack", "words_changed_per_success"),
     True),
    ("seconds_per_step", "seconds per step", ("seconds_per_step",), False),
    ("final_kept", "kept fraction, last step", ("final_kept",), None),
]


def parse_modes(text: str) -> list[str]:
    """``--compare off,second``: the modes, distinct, each one of rose_kernels.types.MODES."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad or len(set(modes)) != len(modes):
        raise TrainError(f"--compare takes distinct modes among {', '.join(MODES)}, e.g. off,second; got {text!r}")
    return modes


def _value(metrics: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return float(metrics) if isinstance(metrics, int | float) else None


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "values": values}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per mode and metric: mean, std and values over the seeds; differences of means to ``off``."""
    modes = {}
    for mode, metrics_list in runs.items():
        per_metric = {}
        for key, _, path, _ in METRICS:
            values = [v for v in (_value(m, path) for m in metrics_list) if v is not None]
            if values:
                per_metric[key] = _stats(values)
        modes[mode] = per_metric
    if "off" in modes:
        for mode, per_metric in modes.items():
            for key, stats in per_metric.items():
                base = modes["off"].get(key)
                if base is None or mode == "off":
                    continue
                stats["diff_to_off"] = stats["mean"] - base["mean"]
                if stats["std"] is None or base["std"] is None:
                    stats["inside_seed_noise"] = True  # one seed: no measure of the noise at all
                    continue
                # Two standard errors of the difference of the means (Welch): about a 95% interval
                # when the seeds' results are normal, wider in truth with only a few seeds.
                error = math.sqrt(stats["std"] ** 2 / len(stats["values"]) + base["std"] ** 2 / len(base["values"]))
                stats["inside_seed_noise"] = abs(stats["diff_to_off"]) <= 2 * error
    return modes


def to_markdown(summary: dict, seeds: list[int]) -> str:
    modes = list(summary)
    lines = [f"mean ± std over seeds {', '.join(map(str, seeds))}; (difference to `off`; * inside the seeds' noise: "
             "within two standard errors of the difference, or a single seed)", "",
             "| metric | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for key, label, _, _ in METRICS:
        if not any(key in summary[m] for m in modes):
            continue
        cells = []
        for mode in modes:
            stats = summary[mode].get(key)
            if stats is None:
                cells.append("-")
                continue
            digits = 3
            cell = f"{stats['mean']:.{digits}f}"
            if stats["std"] is not None:
                cell += f" ± {stats['std']:.{digits}f}"
            if "diff_to_off" in stats:
                cell += f" ({stats['diff_to_off']:+.{digits}f}{'*' if stats['inside_seed_noise'] else ''})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Clean accuracy against accuracy under the attack, one point per seed, one colour per mode."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10"]
    for i, (mode, metrics_list) in enumerate(runs.items()):
        points = [(_value(m, ("clean_accuracy",)), _value(m, ("attack", "accuracy_under_attack")))
                  for m in metrics_list]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if points:
            ax.scatter([x for x, _ in points], [y for _, y in points], label=mode, color=cmap(i), s=36, alpha=0.85)
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("accuracy under charlevel attack")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compare(cfg: TrainConfig, modes: list[str], seeds: list[int], *, log: Callable[[str], None] = print,
            progress: bool = True) -> dict:
    """Trains (or resumes, or reads back) every (mode, seed) run and writes the comparison."""
    out = Path(cfg.output_dir)
    if not cfg.resume and out.exists() and any(out.iterdir()):
        raise TrainError(f"{out} already holds a comparison: pass --resume to continue it, or another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for mode in modes:
        for seed in seeds:
            run_dir = out / f"{mode}-seed{seed}"
            metrics_file = run_dir / "metrics.json"
            if metrics_file.is_file():
                log(f"compare: {run_dir.name} is done; its metrics are read back")
                runs[mode].append(json.loads(metrics_file.read_text()))
                continue
            resume = (run_dir / CHECKPOINT).is_file()
            log(f"compare: {run_dir.name}: {'resuming' if resume else 'training'}")
            run_cfg = dataclasses.replace(cfg, mode=mode, seed=seed, output_dir=str(run_dir), resume=resume)
            runs[mode].append(train(run_cfg, log=log, progress=progress))
    summary = summarize(runs)
    report = {"modes": modes, "seeds": seeds, "summary": summary,
              "runs": {mode: [{"seed": s, **m} for s, m in zip(seeds, ms, strict=True)] for mode, ms in runs.items()},
              "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("mode", "seed", "resume")}}
    atomic_write_text(json.dumps(report, indent=1), out / "comparison.json")
    table = to_markdown(summary, seeds)
    atomic_write_text(f"# rose-train --compare {','.join(modes)} --seeds {len(seeds)}\n\n{table}\n",
                      out / "comparison.md")
    plot(runs, out / "comparison.png", f"{', '.join(modes)}: {len(seeds)} seed{'s' if len(seeds) > 1 else ''} each")
    log("\n" + table)
    return report
