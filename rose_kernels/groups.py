"""Param groups with the released code's eligibility rule."""

from __future__ import annotations

import torch

RULES = ("layer_weight", "all", "none")


def is_eligible(name: str, rule: str = "layer_weight") -> bool:
    """The released ROSE rule: the qualified name contains both "layer" and "weight" (case-sensitive).

    With Hugging Face BERT/RoBERTa names this selects the attention Q/K/V/output, intermediate and
    output dense weights and both LayerNorm gains of every encoder layer; biases, embeddings and
    the classifier head are never masked.
    """
    if rule == "layer_weight":
        return "layer" in name and "weight" in name
    if rule == "all":
        return True
    if rule == "none":
        return False
    raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")


def _no_decay(name: str) -> bool:
    lowered = name.lower()
    return name.endswith("bias") or "layernorm" in lowered or "layer_norm" in lowered or lowered.endswith("ln.weight")


def rose_param_groups(model: torch.nn.Module, weight_decay: float = 0.01, rule: str = "layer_weight") -> list[dict]:
    """Param groups for :class:`~rose_kernels.RoseAdamW`: (eligible or not) x (decay or not).

    Biases and LayerNorm weights get no weight decay, as in the released fine-tuning scripts.
    Each group carries ``param_names`` so that ``RoseAdamW.mask_stats()`` is keyed by name.
    Parameters with ``requires_grad=False`` are left out; empty groups are dropped.
    """
    buckets: dict[tuple[bool, bool], tuple[list, list]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (is_eligible(name, rule), _no_decay(name))
        params, names = buckets.setdefault(key, ([], []))
        params.append(p)
        names.append(name)
    groups = []
    for (eligible, no_decay), (params, names) in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        groups.append(
            {
                "params": params,
                "param_names": names,
                "rose": eligible,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        )
    return groups
