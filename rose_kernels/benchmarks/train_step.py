"""One training step of the trainer (forward, backward, clipping, optimizer) with RoseAdamW against
the same loop with ``torch.optim.AdamW(fused=True)``, on all-MiniLM-L6-v2, batch 32, length 64.

Loops, timed round-robin (A B C ... A B C ...) in one process, medians with min/max:

- ``second``: one pass, task backward, RoseAdamW(second) vs torch fused AdamW, and vs RoseAdamW(off).
  The RoseAdamW loops clip with ``rose_kernels.clip_grad_norm_(..., optimizer=opt)``, as the trainer
  does (its read of the gradients serves the step); the torch loops with torch's clipping.
- ``first`` / ``ensemble``: the step of semantics.md section 7: two dropout passes, the KL
  gradients (``autograd.grad``, graph kept), ``record_first_order()``, the task backward. Compared
  with the same two-pass loop with torch fused AdamW (KL gradients taken and dropped), which is
  the work ROSE's first order asks of any implementation; and, for information, with a one-backward
  R-Drop loop (task loss + KL in a single backward), which is cheaper by one backward because it
  never needs the KL gradient on its own.

    python bench/bench_train_step.py [--rounds 8] [--batch-size 32] [--max-length 64] [--out DIR]
    rose-bench --suites train
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import rose_kernels
from rose_kernels import RoseAdamW, rose_param_groups
from rose_kernels.benchmarks import step as bench_step
from rose_kernels.train.data import load_rotten_tomatoes
from rose_kernels.train.model import batch_of, load_model
from rose_kernels.train.step import FirstOrderScores, divergence, rose_losses, task_loss

TARGET = 1.05


def make_loops(model, inputs, labels):
    params = [p for p in model.parameters() if p.requires_grad]

    def fused():
        return torch.optim.AdamW(rose_param_groups(model, 0.01), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, fused=True)

    def rose(mode):
        return RoseAdamW(rose_param_groups(model, 0.01), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, mode=mode)

    def clip(opt):
        # As the trainer: RoseAdamW takes the clipping's read of the gradients (rose_kernels/clip.py).
        if isinstance(opt, RoseAdamW):
            rose_kernels.clip_grad_norm_(params, 1.0, optimizer=opt)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)

    def one_pass(opt):
        def run():
            loss = task_loss(model(**inputs).logits, labels)
            loss.backward()
            clip(opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    def two_pass_rose(opt, mode):
        first = FirstOrderScores(opt)

        def run():
            loss, loss_kl, _ = rose_losses(model, inputs, labels, mode)
            first.add(loss_kl)
            loss.backward()
            first.record()
            clip(opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    # The KL gradients of the same (eligible) parameters RoseAdamW scores, taken and dropped.
    eligible = [p for g in rose_param_groups(model, 0.01) if g["rose"] for p in g["params"]]

    def two_pass_torch(opt):
        def run():
            loss, loss_kl, _ = rose_losses(model, inputs, labels, "ensemble")
            kept_aside = torch.autograd.grad(loss_kl, eligible, retain_graph=True, allow_unused=True)
            loss.backward()
            del kept_aside  # held as long as RoseAdamW holds its KL gradients
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    def rdrop(opt):
        def run():
            z1, z2 = model(**inputs).logits, model(**inputs).logits
            loss = (task_loss(z1, labels) + task_loss(z2, labels)) / 2 + divergence(z1, z2) / len(labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    return {
        "one pass, torch AdamW fused": one_pass(fused()),
        "one pass, RoseAdamW off": one_pass(rose("off")),
        "one pass, RoseAdamW second": one_pass(rose("second")),
        "two passes + KL grad, torch AdamW fused": two_pass_torch(fused()),
        "two passes + KL grad, RoseAdamW first": two_pass_rose(rose("first"), "first"),
        "two passes + KL grad, RoseAdamW ensemble": two_pass_rose(rose("ensemble"), "ensemble"),
        "R-Drop (one backward), torch AdamW fused": rdrop(fused()),
    }


COMPARISONS = [  # (configuration, baseline, target)
    ("one pass, RoseAdamW second", "one pass, torch AdamW fused", TARGET),
    ("one pass, RoseAdamW second", "one pass, RoseAdamW off", 1.03),
    ("two passes + KL grad, RoseAdamW first", "two passes + KL grad, torch AdamW fused", TARGET),
    ("two passes + KL grad, RoseAdamW ensemble", "two passes + KL grad, torch AdamW fused", TARGET),
    ("two passes + KL grad, RoseAdamW ensemble", "R-Drop (one backward), torch AdamW fused", None),
    ("two passes + KL grad, torch AdamW fused", "R-Drop (one backward), torch AdamW fused", None),
]


def run(rounds: int, batch_size: int, max_length: int) -> dict:
    corpus = load_rotten_tomatoes()
    model, tokenizer = load_model(None, 2, seed=0)
    model.train()
    # The longest training sentences: every batch is padded to max_length (the shape of the targets).
    examples = sorted(corpus.train, key=lambda e: -len(e.text))[:batch_size]
    inputs, labels = batch_of(tokenizer, examples, max_length, torch.device("cpu"))
    loops = make_loops(model, inputs, labels)
    times = {name: [] for name in loops}
    for loop in loops.values():  # warm-up: allocations, optimizer state
        loop()
        loop()
    for _ in range(rounds):
        for name, loop in loops.items():
            started = time.perf_counter()
            loop()
            times[name].append(time.perf_counter() - started)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [dict(name=k, median_s=med[k], min_s=min(v), max_s=max(v)) for k, v in times.items()]
    ratios = [dict(config=a, baseline=b, ratio=med[a] / med[b], target=t) for a, b, t in COMPARISONS]
    return dict(machine=bench_step.machine_info(), rounds=rounds, batch_size=batch_size,
                tokens=int(inputs["input_ids"].shape[1]), rows=rows, ratios=ratios)


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Trainer step, all-MiniLM-L6-v2, batch {report['batch_size']} x {report['tokens']} tokens",
             "", f"{m['date']}, {m['cpu']} ({m['cores']} cores, {m['torch_threads']} threads), torch {m['torch']}, "
             f"git {m['git']}; {report['rounds']} rounds, round-robin.", "",
             "| loop | median s (min-max) |", "|---|---|"]
    lines += [f"| {r['name']} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) |" for r in report["rows"]]
    lines += ["", "| configuration | against | ratio | target |", "|---|---|---|---|"]
    for r in report["ratios"]:
        target = f"<= {r['target']:.2f}x" if r["target"] else "(information)"
        lines.append(f"| {r['config']} | {r['baseline']} | {r['ratio']:.3f}x | {target} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=bench_step.RESULTS)
    args = parser.parse_args(argv)
    report = run(args.rounds, args.batch_size, args.max_length)
    text = to_markdown(report)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"train-step-{report['machine']['date'][:10]}"
        (args.out / f"{stem}.md").write_text(text + "\n")
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
