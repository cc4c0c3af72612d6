"""The character-level attack against toy classifiers whose behaviour under edits is known exactly."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rose_kernels.train.attack import AttackConfig, AttackResult, charlevel_attack
from rose_kernels.train.data import Example

POSITIVE = ("good", "great")
NEGATIVE = ("bad",)
# No single character edit turns one of these into a keyword, so only keyword edits can move the toy classifier.
FILLERS = ("the", "movie", "plot", "actors", "film", "was", "and", "story", "really", "a", ",", "!")
WEIGHT = 2.0
# A neutral text leans to label 0, so k positive and k negative keywords are classified 0.
BIAS = -0.5


def keyword_logit(text: str | None) -> float:
    words = (text or "").split()
    return WEIGHT * (sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)) + BIAS


class KeywordClassifier:
    """P(label 1) rises with exact occurrences of "good"/"great" and falls with "bad"; records every call."""

    def __init__(self, *, read_pair: bool = False, scale: float = 1.0, dtype: torch.dtype = torch.float64):
        self.read_pair, self.scale, self.dtype = read_pair, scale, dtype
        self.calls: list[list[tuple[str, str | None]]] = []

    def probabilities(self, batch) -> torch.Tensor:
        logits = [keyword_logit(pair if self.read_pair else text) * self.scale for text, pair in batch]
        logits = torch.tensor(logits, dtype=self.dtype)
        return torch.softmax(torch.stack([torch.zeros_like(logits), logits], dim=1), dim=1)

    def __call__(self, batch):
        assert isinstance(batch, list) and batch, "the attack must score non-empty lists of candidates"
        self.calls.append(list(batch))
        return self.probabilities(batch)

    def predict(self, example: Example) -> int:
        """The label of one example, without counting it among the attack's calls."""
        return int(self.probabilities([(example.text, example.text_pair)]).argmax(dim=1)[0])

    @property
    def texts_scored(self) -> int:
        return sum(len(batch) for batch in self.calls)


def constant_classifier(batch):
    return torch.tensor([[0.3, 0.7]] * len(batch), dtype=torch.float32)


def one_edit_apart(original: str, edited: str) -> bool:
    """Whether one adjacent swap, substitution, deletion or insertion turns original into edited."""
    if original == edited:
        return False
    if len(original) == len(edited):
        diff = [i for i, (a, b) in enumerate(zip(original, edited, strict=True)) if a != b]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and original[diff[0]] == edited[diff[1]]
            and original[diff[1]] == edited[diff[0]]
        )
    shorter, longer = sorted((original, edited), key=len)
    return len(longer) == len(shorter) + 1 and any(longer[:i] + longer[i + 1 :] == shorter for i in range(len(longer)))


def random_positive_example(rng: random.Random) -> Example:
    """A label-1 sentence: more positive than negative keywords, among fillers."""
    n_pos = rng.randint(1, 4)
    words = [rng.choice(POSITIVE) for _ in range(n_pos)]
    words += list(NEGATIVE) * rng.randint(0, n_pos - 1)
    words += [rng.choice(FILLERS) for _ in range(rng.randint(0, 8))]
    rng.shuffle(words)
    return Example(text=" ".join(words), text_pair=None, label=1)


def check_result_consistent(result: AttackResult, model: KeywordClassifier, msg: str) -> None:
    """The rates agree with the outcomes, and the adversarial texts really are (mis)classified as reported."""
    n = len(result.outcomes)
    assert result.examples == n, msg
    assert [o.index for o in result.outcomes] == list(range(n)), msg
    still_right = 0
    for o in result.outcomes:
        assert o.success == (o.original_correct and model.predict(o.adversarial) != o.original.label), msg
        assert (o.adversarial == o.original) == (o.words_changed == 0), msg
        still_right += o.original_correct and not o.success
    correct = sum(o.original_correct for o in result.outcomes)
    assert result.clean_accuracy == pytest.approx(correct / n), msg
    assert result.accuracy_under_attack == pytest.approx(still_right / n), msg
    expected_rate = sum(o.success for o in result.outcomes) / correct if correct else 0.0
    assert result.success_rate == pytest.approx(expected_rate), msg


def test_flips_keyword_sentence_by_editing_the_keywords():
    model = KeywordClassifier()
    example = Example(text="good great movie", text_pair=None, label=1)
    result = charlevel_attack(model, [example], AttackConfig(max_words=1.0))
    outcome = result.outcomes[0]

    assert outcome.original_correct and outcome.success
    assert result.success_rate == 1.0 and result.accuracy_under_attack == 0.0 and result.clean_accuracy == 1.0
    # Both keywords must go (one left still reads as positive); "movie" is never worth editing.
    assert outcome.words_changed == 2
    adv_words = outcome.adversarial.text.split()
    assert len(adv_words) == 3 and adv_words[2] == "movie"
    for original, edited in zip(("good", "great"), adv_words[:2], strict=True):
        assert one_edit_apart(original, edited), (original, edited)
    assert model.predict(outcome.adversarial) == 0
    assert outcome.adversarial.text_pair is None and outcome.adversarial.label == 1
    assert outcome.queries == model.texts_scored


def test_random_keyword_sentences(seed):
    rng = random.Random(seed)
    examples = [random_positive_example(rng) for _ in range(25)]
    config = AttackConfig(max_words=rng.choice((0.0, 0.2, 0.34, 0.5, 1.0)), max_candidates=rng.randint(1, 8), seed=seed)
    model = KeywordClassifier()
    result = charlevel_attack(model, examples, config)
    msg = f"seed={seed} config={config}"

    check_result_consistent(result, model, msg)
    assert sum(o.queries for o in result.outcomes) == model.texts_scored, msg
    for o in result.outcomes:
        words = o.original.text.split()
        where = f"{msg} example={o.original.text!r} -> {o.adversarial.text!r}"
        assert o.original_correct, where
        budget = max(1, math.ceil(config.max_words * len(words) - 1e-9))
        positives = [i for i, w in enumerate(words) if w in POSITIVE]
        needed = len(positives) - sum(w in NEGATIVE for w in words)
        # Every edit of a positive keyword lowers P(1) by the same amount and importance ties break by position,
        # so the attack edits exactly the first positive keywords until the label flips or the budget runs out.
        assert o.words_changed == min(needed, budget), where
        assert o.success == (needed <= budget), where
        adv_words = o.adversarial.text.split()
        assert len(adv_words) == len(words), where
        changed = [i for i, (a, b) in enumerate(zip(words, adv_words, strict=True)) if a != b]
        assert changed == positives[: o.words_changed], where
        for i in changed:
            assert one_edit_apart(words[i], adv_words[i]), f"{where} word {i}"


def test_constant_classifier_cannot_be_attacked(seed):
    rng = random.Random(seed)
    examples = [Example(random_positive_example(rng).text, None, label=rng.randint(0, 1)) for _ in range(12)]
    result = charlevel_attack(constant_classifier, examples, AttackConfig(seed=seed))
    msg = f"seed={seed}"

    assert result.success_rate == 0.0, msg
    assert result.accuracy_under_attack == result.clean_accuracy, msg
    assert result.clean_accuracy == sum(e.label == 1 for e in examples) / len(examples), msg
    for o in result.outcomes:
        assert o.adversarial == o.original and o.words_changed == 0 and not o.success, msg


def test_misclassified_examples_are_not_attacked():
    model = KeywordClassifier()
    wrong = Example(text="good great movie", text_pair=None, label=0)
    right = Example(text="a good movie", text_pair=None, label=1)
    result = charlevel_attack(model, [wrong, right], AttackConfig(max_words=1.0))
    bad, good = result.outcomes

    assert not bad.original_correct and not bad.success
    assert bad.queries == 1 and bad.words_changed == 0 and bad.adversarial == wrong
    assert good.original_correct and good.success
    assert result.clean_accuracy == 0.5 and result.success_rate == 1.0 and result.accuracy_under_attack == 0.0
    check_result_consistent(result, model, "")


def test_no_attackable_words():
    # Single characters and punctuation cannot be edited meaningfully, so nothing beyond the clean score is asked.
    example = Example(text="a , . ! ?", text_pair="b --", label=0)
    model = KeywordClassifier()
    outcome = charlevel_attack(model, [example]).outcomes[0]
    assert outcome.original_correct and not outcome.success
    assert outcome.queries == 1 and outcome.words_changed == 0 and outcome.adversarial == example


def test_deterministic_and_independent_of_other_examples(seed):
    rng = random.Random(seed)
    examples = [random_positive_example(rng) for _ in range(8)]
    others = [random_positive_example(rng) for _ in range(5)]
    config = AttackConfig(max_words=0.5, max_candidates=3, seed=seed)
    msg = f"seed={seed}"

    first = charlevel_attack(KeywordClassifier(), examples, config)
    again = charlevel_attack(KeywordClassifier(), examples, config)
    assert first == again, msg

    shifted = charlevel_attack(KeywordClassifier(), others + examples, config).outcomes[len(others) :]
    for alone, among in zip(first.outcomes, shifted, strict=True):
        assert among.index == alone.index + len(others), msg
        assert (among.adversarial, among.success, among.queries, among.words_changed) == (
            alone.adversarial,
            alone.success,
            alone.queries,
            alone.words_changed,
        ), msg


def test_seed_changes_the_edits():
    example = Example(text="a great film", text_pair=None, label=1)
    adversarial = {
        charlevel_attack(KeywordClassifier(), [example], AttackConfig(max_candidates=1, seed=s)).outcomes[0].adversarial
        for s in range(10)
    }
    assert len(adversarial) > 1


def test_sentence_pair_words_are_attacked_and_pairs_kept():
    model = KeywordClassifier(read_pair=True)
    examples = [
        Example(text="good great good", text_pair="the story was great", label=1),
        Example(text="a premise", text_pair=None, label=0),
    ]
    result = charlevel_attack(model, examples, AttackConfig(max_words=0.25))
    paired, single = result.outcomes

    assert paired.success and paired.words_changed == 1
    # The model reads only the pair: the premise's keywords are unimportant and stay untouched.
    assert paired.adversarial.text == "good great good"
    adv_pair = paired.adversarial.text_pair.split()
    assert adv_pair[:3] == ["the", "story", "was"] and one_edit_apart("great", adv_pair[3])
    assert single.adversarial.text_pair is None
    check_result_consistent(result, model, "")


def test_word_budget():
    model = KeywordClassifier()
    example = Example(text=" ".join(["good"] * 30), text_pair=None, label=1)
    # 0.1 * 30 is 3.0000000000000004 in floating point; the budget must still be 3.
    assert charlevel_attack(model, [example], AttackConfig(max_words=0.1)).outcomes[0].words_changed == 3
    assert charlevel_attack(model, [example], AttackConfig(max_words=0.0)).outcomes[0].words_changed == 1
    assert charlevel_attack(model, [example], AttackConfig(max_words=0.11)).outcomes[0].words_changed == 4


def test_saturated_probabilities_still_guide_the_attack():
    # Logit gaps of ~50 make float32 P(true label) exactly 1.0 before and after each edit; only the other
    # label's tiny probability shows that editing a keyword helps.
    model = KeywordClassifier(scale=10.0, dtype=torch.float32)
    example = Example(text="good great good great story", text_pair=None, label=1)
    assert model.probabilities([(example.text, None)])[0, 1].item() == 1.0
    outcome = charlevel_attack(model, [example], AttackConfig(max_words=1.0)).outcomes[0]
    assert outcome.success and outcome.words_changed == 4
    assert outcome.adversarial.text.split()[4] == "story"


def test_candidates_are_scored_in_batches(seed):
    rng = random.Random(seed)
    examples = [random_positive_example(rng) for _ in range(10)]
    config = AttackConfig(max_words=1.0, max_candidates=5, seed=seed)
    model = KeywordClassifier()
    result = charlevel_attack(model, examples, config)
    msg = f"seed={seed}"

    # One clean call, one leave-one-out call and at most one call per word tried; each candidate call holds
    # at most max_candidates texts.
    max_calls = sum(2 + len(o.original.text.split()) for o in result.outcomes)
    assert len(model.calls) <= max_calls, msg
    assert sum(o.queries for o in result.outcomes) == model.texts_scored, msg
    assert max(len(batch) for batch in model.calls) <= max(
        config.max_candidates, max(len(e.text.split()) for e in examples)
    )


def test_progress_is_called_once_per_example():
    ticks = []
    examples = [Example("good movie", None, 1), Example("bad movie", None, 1), Example("plot", None, 0)]
    charlevel_attack(KeywordClassifier(), examples, progress=ticks.append)
    assert ticks == [1, 1, 1]


def test_summary_is_json_serialisable():
    examples = [
        Example("good movie", None, 1),
        Example("a good film", "great", 1),
        Example("bad film", None, 1),
        Example("plot", None, 0),
    ]
    result = charlevel_attack(KeywordClassifier(), examples, AttackConfig(max_words=1.0))
    summary = json.loads(json.dumps(result.summary(show=1)))

    for key in ("accuracy_under_attack", "success_rate", "clean_accuracy", "examples"):
        assert key in summary
    assert summary["examples"] == 4 and summary["clean_accuracy"] == 0.75
    assert summary["mean_queries"] == pytest.approx(sum(o.queries for o in result.outcomes) / 4)
    assert len(summary["samples"]) == 1
    assert summary["samples"][0]["original"] == "good movie"
    assert json.dumps(charlevel_attack(KeywordClassifier(), []).summary())


def test_empty_input():
    result = charlevel_attack(KeywordClassifier(), [])
    assert (result.examples, result.accuracy_under_attack, result.success_rate, result.clean_accuracy) == (0, 0, 0, 0)


@pytest.mark.parametrize("kwargs", [{"max_words": -0.1}, {"max_words": math.nan}, {"max_candidates": 0}, {"seed": 1.5}])
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        AttackConfig(**kwargs)


def test_bad_predictor_output():
    example = Example("good movie", None, 1)
    with pytest.raises(ValueError, match="shape"):
        charlevel_attack(lambda batch: torch.ones(len(batch) + 1, 2) / 2, [example])
    with pytest.raises(ValueError, match="out of range"):
        charlevel_attack(constant_classifier, [Example("good movie", None, 2)])
