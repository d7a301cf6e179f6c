"""A checkpoint whose model shape contradicts the config is refused with every difference;
keys that cannot change a shape, and unset keys that resolve to the same size, are not."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_vwn.checkpoint.compat import PADDED_VOCAB, check_model_fits, shape_differences
from megatron_vwn.checkpoint.compat import resolved_model_dict as resolved
from megatron_vwn.checkpoint.errors import CheckpointError
from megatron_vwn.config import ConfigError, load_config
from megatron_vwn.config.schema import ModelConfig


def saved(model: ModelConfig) -> dict:
    return dataclasses.asdict(model)


def test_same_model_fits():
    model = ModelConfig()
    check_model_fits("ckpt", saved(model), 4096, model, 4096)


def test_non_shape_keys_and_resolved_defaults_fit():
    old = ModelConfig(num_attention_heads=4, num_query_groups=None, ffn_hidden_size=None)
    new = dataclasses.replace(old, num_query_groups=4, ffn_hidden_size=old.ffn_size,
                              hidden_dropout=0.1, init_method_std=0.01, seq_length=256,
                              transformer_impl="local", vocab_size=4000)
    check_model_fits("ckpt", saved(old), 4096, new, 4096)


def test_every_shape_difference_is_listed():
    old = ModelConfig(hidden_size=64, num_layers=2)
    new = dataclasses.replace(old, hidden_size=128, num_layers=4, tie_embeddings=True)
    with pytest.raises(CheckpointError) as info:
        check_model_fits("runs/x/checkpoints/iter_0000006", saved(old), 4096, new, 4160)
    message = str(info.value)
    assert message.startswith("checkpoint runs/x/checkpoints/iter_0000006 does not fit")
    for expected in ("model.hidden_size: checkpoint 64, config 128",
                     "model.num_layers: checkpoint 2, config 4",
                     "model.tie_embeddings: checkpoint False, config True",
                     f"{PADDED_VOCAB}: checkpoint 4096, config 4160"):
        assert expected in message
    assert "\n" not in message


def test_nested_sections_are_compared_key_by_key():
    # Sections added later (model.vwn, model.mtp, ...) are covered without a change: every
    # nested key is flattened and compared, and a key only one side has is listed too.
    old = {"hidden_size": 64, "extra": {"m": 2, "connection": "ghc"}}
    new = {"hidden_size": 64, "extra": {"m": 4, "connection": "ghc", "n": 2}}
    assert shape_differences(resolved(old, None), resolved(new, None)) == [
        "model.extra.m: checkpoint 2, config 4",
        "model.extra.n: checkpoint absent, config 2",
    ]


def test_checkpoint_config_keys_and_refusals():
    cfg = load_config(None, ["checkpoint.save_interval=50", "checkpoint.keep_last=3",
                             "checkpoint.resume=never", "checkpoint.load=/ckpt",
                             "checkpoint.weights_only=true"])
    assert (cfg.checkpoint.save_interval, cfg.checkpoint.keep_last) == (50, 3)
    cfg.checkpoint.validate()
    defaults = load_config(None, []).checkpoint
    assert (defaults.save_interval, defaults.resume, defaults.load, defaults.async_save) == (
        0, "auto", None, None)
    with pytest.raises(ConfigError, match="checkpoint.weights_only=true needs checkpoint.load"):
        load_config(None, ["checkpoint.weights_only=true"]).checkpoint.validate()
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        load_config(None, ["checkpoint.resume=sometimes"])
    with pytest.raises(ConfigError, match=r"checkpoint.keep_last \(0\) must be > 0"):
        load_config(None, ["checkpoint.keep_last=0"]).checkpoint.validate()
