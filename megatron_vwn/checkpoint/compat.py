"""Does a checkpoint fit this run's model? Compare the resolved ``model`` sections.

Every key of ``model`` (nested sections such as ``model.vwn`` included, so keys added later are
covered without a change here) is compared, except the few that cannot change a parameter's
shape (:data:`NON_SHAPE_KEYS`). Two keys are compared by their resolved meaning: the vocabulary
as padded for the layout (``model.vocab_size`` unset takes the tokenizer's, and padding depends on
``make_vocab_size_divisible_by`` and TP), and unset ``num_query_groups`` / ``ffn_hidden_size``
by the values they resolve to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_vwn.checkpoint.errors import CheckpointError
from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.loader import from_dict
from megatron_vwn.config.schema import ModelConfig

NON_SHAPE_KEYS = frozenset({
    "hidden_dropout", "attention_dropout", "init_method_std", "transformer_impl",
    "seq_length", "rotary_base", "norm_epsilon",
    # replaced by the padded vocabulary actually built (see module docstring)
    "vocab_size", "make_vocab_size_divisible_by",
    # MoE training knobs: the same parameters, routed or balanced otherwise (docs/moe.md)
    "moe.router_dtype", "moe.aux_loss", "moe.aux_loss_coeff", "moe.z_loss_coeff",
    "moe.capacity_factor", "moe.expert_bias_update_rate",
})
"""``model`` keys that may differ between a checkpoint and the run that loads it."""

PADDED_VOCAB = "vocabulary (padded)"


def resolved_model_dict(model: dict | ModelConfig, padded_vocab: int | None) -> dict[str, Any]:
    """``model`` as flat dotted keys with resolved sizes, ready for comparison."""
    if isinstance(model, dict):
        try:
            model = from_dict(model, ModelConfig, "model.")
        except ConfigError:
            pass  # a key this version does not know: compare the raw values
    if isinstance(model, ModelConfig):
        flat = _flatten(dataclasses.asdict(model), "model.")
        flat["model.num_query_groups"] = model.query_groups
        flat["model.ffn_hidden_size"] = model.ffn_size
    else:
        flat = _flatten(model or {}, "model.")
    flat = {k: v for k, v in flat.items() if k.split(".", 1)[1] not in NON_SHAPE_KEYS}
    if padded_vocab is not None:
        flat[PADDED_VOCAB] = padded_vocab
    return flat


def _flatten(tree: dict, prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def shape_differences(saved: dict, current: dict) -> list[str]:
    """``key: checkpoint X, config Y`` for every key whose value differs (or exists on one side)."""
    missing = object()
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, missing), current.get(key, missing)
        if old != new:
            old_text = "absent" if old is missing else repr(old)
            new_text = "absent" if new is missing else repr(new)
            lines.append(f"{key}: checkpoint {old_text}, config {new_text}")
    return lines


def check_model_fits(
    path: str, saved_model: dict, saved_vocab: int | None, model: ModelConfig, vocab: int
) -> None:
    """Raise :class:`CheckpointError` listing every shape difference between checkpoint and
    config."""
    diffs = shape_differences(
        resolved_model_dict(saved_model, saved_vocab), resolved_model_dict(model, vocab)
    )
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} does not fit the configured model; differences: "
            + "; ".join(diffs)
        )
