"""A deterministic black-box character-level adversarial attack (TextBugger / DeepWordBug style).

The model is only seen through ``predict_proba(batch) -> [len(batch), num_labels]`` probabilities, so the
attack works for any classifier. It is used to report accuracy under attack and attack success rate.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rose_kernels.train.data import Example

Pair = tuple[str, str | None]
PredictProba = Callable[[list[Pair]], torch.Tensor]
Edit = Callable[[str, random.Random], str | None]

_KEYBOARD_ROWS = ("1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm")
_LOOKALIKES = {"o": "0", "l": "1", "a": "@", "e": "3", "s": "$", "i": "1"}
# Edits can be no-ops or duplicates (e.g. swapping "oo"), so several draws per wanted candidate are allowed.
_DRAWS_PER_CANDIDATE = 10
# max_words * n is often meant to be exact (0.1 * 30 = 3.0000000000000004 in floating point).
_BUDGET_SLACK = 1e-9


def _keyboard_neighbours() -> dict[str, str]:
    """Keys touching each key on a QWERTY keyboard (each row sits about half a key right of the one above)."""
    table = {}
    for row_index, row in enumerate(_KEYBOARD_ROWS):
        for col, key in enumerate(row):
            touching = []
            for other_row, cols in (
                (row_index, (col - 1, col + 1)),
                (row_index - 1, (col, col + 1)),
                (row_index + 1, (col - 1, col)),
            ):
                if 0 <= other_row < len(_KEYBOARD_ROWS):
                    keys = _KEYBOARD_ROWS[other_row]
                    touching += [keys[c] for c in cols if 0 <= c < len(keys)]
            table[key] = "".join(sorted(touching))
    return table


_KEYBOARD = _keyboard_neighbours()


@dataclass
class AttackConfig:
    max_words: float = 0.25  # edit budget: at most ceil(max_words * number of words) words perturbed (at least 1)
    max_candidates: int = 8  # character edits tried per word
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.max_words, int | float) and math.isfinite(self.max_words) and self.max_words >= 0):
            raise ValueError(f"max_words must be a finite number >= 0, got {self.max_words!r}")
        if isinstance(self.max_candidates, bool) or not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise ValueError(f"max_candidates must be an int >= 1, got {self.max_candidates!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def budget(self, num_words: int) -> int:
        return max(1, math.ceil(self.max_words * num_words - _BUDGET_SLACK))


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass
class AttackOutcome:
    index: int  # position in the input list
    original: Example
    adversarial: Example  # == original when nothing was changed
    original_correct: bool  # the clean prediction was right
    success: bool  # originally correct and now wrong
    queries: int  # number of texts scored for this example
    words_changed: int


@dataclass
class AttackResult:
    accuracy_under_attack: float  # still correct after the attack, over all examples (originally wrong count as wrong)
    success_rate: float  # successes / originally-correct examples (0.0 when none were correct)
    clean_accuracy: float
    examples: int
    outcomes: list[AttackOutcome]

    def summary(self, show: int = 5) -> dict:
        """The rates, mean queries and words changed, and up to ``show`` successful attacks; JSON-serialisable."""
        n = len(self.outcomes)
        samples = []
        for outcome in self.outcomes:
            if len(samples) >= show:
                break
            if not outcome.success:
                continue
            sample = {
                "index": outcome.index,
                "original": outcome.original.text,
                "adversarial": outcome.adversarial.text,
            }
            if outcome.original.text_pair is not None:
                sample["original_pair"] = outcome.original.text_pair
                sample["adversarial_pair"] = outcome.adversarial.text_pair
            samples.append(sample)
        return {
            "accuracy_under_attack": float(self.accuracy_under_attack),
            "success_rate": float(self.success_rate),
            "clean_accuracy": float(self.clean_accuracy),
            "examples": int(self.examples),
            "mean_queries": sum(o.queries for o in self.outcomes) / n if n else 0.0,
            "mean_words_changed": sum(o.words_changed for o in self.outcomes) / n if n else 0.0,
            # per successful attack: what it took to flip a prediction (0.0 when none succeeded)
            "queries_per_success": _mean([o.queries for o in self.outcomes if o.success]),
            "words_changed_per_success": _mean([o.words_changed for o in self.outcomes if o.success]),
            "samples": samples,
        }


def charlevel_attack(
    predict_proba: PredictProba,
    examples: Sequence[Example],
    config: AttackConfig | None = None,
    *,
    progress: Callable[[int], object] | None = None,
) -> AttackResult:
    """Attacks every example; ``progress(1)`` is called after each one (e.g. ``tqdm.update``)."""
    config = config if config is not None else AttackConfig()
    outcomes = []
    for index, example in enumerate(examples):
        outcomes.append(_attack_example(predict_proba, example, index, config))
        if progress is not None:
            progress(1)
    n = len(outcomes)
    correct = sum(o.original_correct for o in outcomes)
    successes = sum(o.success for o in outcomes)
    return AttackResult(
        accuracy_under_attack=(correct - successes) / n if n else 0.0,
        success_rate=successes / correct if correct else 0.0,
        clean_accuracy=correct / n if n else 0.0,
        examples=n,
        outcomes=outcomes,
    )


def _attack_example(predict_proba: PredictProba, example: Example, index: int, config: AttackConfig) -> AttackOutcome:
    label = example.label
    clean = _score(predict_proba, [(example.text, example.text_pair)], label)[0]
    queries = 1
    if _argmax(clean) != label:
        return AttackOutcome(index, example, example, False, False, queries, 0)

    words, num_text_words = _split(example)
    has_pair = example.text_pair is not None
    strength = _label_strength(clean, label)

    targets = [i for i, word in enumerate(words) if _attackable(word)]
    order = []
    if targets:
        without_word = [
            _join(words[:i] + words[i + 1 :], num_text_words - (i < num_text_words), has_pair) for i in targets
        ]
        probs = _score(predict_proba, without_word, label)
        queries += len(without_word)
        # The clean strength is common to all, so the weakest text without word i marks the most important word.
        remaining = [_label_strength(row, label) for row in probs]
        order = [i for _, i in sorted(zip(remaining, targets, strict=True))]

    budget = config.budget(len(words))
    current = list(words)
    words_changed = 0
    flipped = False
    for i in order:
        if flipped or words_changed >= budget:
            break
        candidates = _perturbations(words[i], _word_rng(config.seed, example, i), config.max_candidates)
        if not candidates:
            continue
        batch = [
            _join(current[:i] + [candidate] + current[i + 1 :], num_text_words, has_pair) for candidate in candidates
        ]
        probs = _score(predict_proba, batch, label)
        queries += len(batch)
        # A candidate that already changes the prediction wins even if another lowers the true label more
        # (possible with more than two labels): flipping the prediction is the goal.
        best = min(
            range(len(candidates)), key=lambda k: (_argmax(probs[k]) == label, _label_strength(probs[k], label), k)
        )
        best_flips = _argmax(probs[best]) != label
        if not best_flips and _label_strength(probs[best], label) >= strength:
            continue
        current[i] = candidates[best]
        strength = _label_strength(probs[best], label)
        words_changed += 1
        flipped = best_flips

    adversarial = example
    if words_changed:
        text, text_pair = _join(current, num_text_words, has_pair)
        adversarial = Example(text=text, text_pair=text_pair, label=label)
    return AttackOutcome(index, example, adversarial, True, flipped, queries, words_changed)


def _score(predict_proba: PredictProba, batch: list[Pair], label: int) -> list[list[float]]:
    probs = torch.as_tensor(predict_proba(batch))
    if probs.dim() != 2 or probs.shape[0] != len(batch):
        raise ValueError(
            f"predict_proba must return [batch, num_labels] probabilities; got shape {tuple(probs.shape)} "
            f"for a batch of {len(batch)}"
        )
    if not 0 <= label < probs.shape[1]:
        raise ValueError(f"label {label} is out of range for {probs.shape[1]} labels")
    # Python floats in float64: comparisons and argmax ties then behave the same on every device and dtype.
    return probs.detach().to("cpu", torch.float64).tolist()


def _label_strength(row: list[float], label: int) -> tuple[float, float]:
    """How strongly ``row`` predicts ``label``: its probability, then minus the other labels' total.

    A confident model's true-label probability rounds to exactly 1.0 (float32 softmax with a logit gap above
    ~17), hiding any progress; the other labels' small probabilities keep their precision, so they break ties.
    """
    return row[label], -math.fsum(p for k, p in enumerate(row) if k != label)


def _argmax(row: list[float]) -> int:
    return max(range(len(row)), key=lambda k: (row[k], -k))


def _split(example: Example) -> tuple[list[str], int]:
    """The words of text and text_pair, indexed jointly, and how many of them belong to text."""
    words = example.text.split()
    num_text_words = len(words)
    if example.text_pair is not None:
        words += example.text_pair.split()
    return words, num_text_words


def _join(words: list[str], num_text_words: int, has_pair: bool) -> Pair:
    text = " ".join(words[:num_text_words])
    return text, (" ".join(words[num_text_words:]) if has_pair else None)


def _attackable(word: str) -> bool:
    return len(word) >= 2 and any(c.isalnum() for c in word)


def _word_rng(seed: int, example: Example, word_index: int) -> random.Random:
    """A generator for one word of one example, keyed by the example's content rather than its position.

    Keying by content keeps an example's outcome unchanged when other examples are added or reordered; a
    cryptographic digest is used because Python's built-in str hash is salted per process.
    """
    key = repr((seed, example.text, example.text_pair, word_index)).encode()
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


def _swap_inner(word: str, rng: random.Random) -> str | None:
    if len(word) < 4:
        return None
    i = rng.randrange(1, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def _delete_inner(word: str, rng: random.Random) -> str | None:
    if len(word) < 3:
        return None
    i = rng.randrange(1, len(word) - 1)
    return word[:i] + word[i + 1 :]


def _substitute(word: str, rng: random.Random, table: dict[str, str]) -> str | None:
    positions = [i for i, char in enumerate(word) if char.lower() in table]
    if not positions:
        return None
    i = rng.choice(positions)
    replacement = rng.choice(table[word[i].lower()])
    if word[i].isupper():
        replacement = replacement.upper()
    return word[:i] + replacement + word[i + 1 :]


def _insert_letter(word: str, rng: random.Random) -> str | None:
    i = rng.randrange(1, len(word))
    return word[:i] + rng.choice(string.ascii_lowercase) + word[i:]


_EDITS: tuple[Edit, ...] = (
    _swap_inner,
    functools.partial(_substitute, table=_KEYBOARD),
    functools.partial(_substitute, table=_LOOKALIKES),
    _delete_inner,
    _insert_letter,
)


def _perturbations(word: str, rng: random.Random, limit: int) -> list[str]:
    """Up to ``limit`` distinct single-edit variants of ``word``, cycling through the edit kinds."""
    edits = list(_EDITS)
    # Without the shuffle a small limit would only ever try the first edit kinds.
    rng.shuffle(edits)
    found: list[str] = []
    for draw in range(limit * _DRAWS_PER_CANDIDATE):
        if len(found) >= limit:
            break
        candidate = edits[draw % len(edits)](word, rng)
        if candidate is not None and candidate != word and candidate not in found:
            found.append(candidate)
    return found
