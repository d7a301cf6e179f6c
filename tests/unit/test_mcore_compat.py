"""The Megatron-Core version layer: the installed release offers what ``compat/mcore.py`` says.

These run on whichever release is installed (0.16.1 on the locked set, 0.19.2 on CI's newest
leg), so an upstream rename fails here with its name instead of inside a training step.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer

from megatron_vwn.checkpoint.errors import CheckpointError
from megatron_vwn.checkpoint.state import load_common_state_dict
from megatron_vwn.compat import mcore as mcore_compat
from megatron_vwn.compat.mcore import (
    CANONICAL_MTP_INNER_LAYER,
    MTP_INNER_LAYER,
    canonical_checkpoint_keys,
    mtp_layer_submodules,
)


def test_mtp_submodules_name_the_inner_layer():
    submodules = mtp_layer_submodules(enorm="e", hnorm="h", eh_proj="p", layer="L",
                                      layer_norm="n")
    assert getattr(submodules, MTP_INNER_LAYER) == "L"
    assert (submodules.enorm, submodules.hnorm, submodules.eh_proj, submodules.layer_norm) == (
        "e", "h", "p", "n")
    # The layer keeps it under the same attribute name.
    assert MTP_INNER_LAYER in inspect.getsource(MultiTokenPredictionLayer.__init__)


def _sharded(key: str) -> ShardedTensor:
    return ShardedTensor.from_rank_offsets(key, torch.zeros(2))


def test_checkpoint_keys_use_the_canonical_inner_layer_name():
    inner = f"mtp.layers.1.{MTP_INNER_LAYER}.mlp.linear_fc1.weight"
    state = {"model": {inner: _sharded(inner),
                       "decoder.layers.0.mlp.linear_fc1.weight":
                           _sharded("decoder.layers.0.mlp.linear_fc1.weight")}}
    canonical_checkpoint_keys(state)
    assert state["model"][inner].key == (
        f"mtp.layers.1.{CANONICAL_MTP_INNER_LAYER}.mlp.linear_fc1.weight")
    assert list(state["model"]) == [inner, "decoder.layers.0.mlp.linear_fc1.weight"]
    assert state["model"]["decoder.layers.0.mlp.linear_fc1.weight"].key == (
        "decoder.layers.0.mlp.linear_fc1.weight")


def test_gpt_model_takes_what_the_builder_passes():
    """The one ``GPTModel`` import: its constructor still takes every argument
    ``model/builder.py`` passes, by name, and it still is a (non-hybrid) decoder of
    ``TransformerLayer``s, whose sublayers VWN wraps."""
    parameters = inspect.signature(mcore_compat.GPTModel.__init__).parameters
    passed = ("config", "transformer_layer_spec", "mtp_block_spec", "vocab_size",
              "max_sequence_length", "pre_process", "post_process",
              "share_embeddings_and_output_weights", "position_embedding_type", "rotary_base",
              "vp_stage")
    assert [name for name in passed if name not in parameters] == []
    assert "TransformerBlock(" in inspect.getsource(mcore_compat.GPTModel.__init__)


@pytest.mark.skipif(not mcore_compat.READS_EMBEDDED_COMMON_STATE,
                    reason="this release reads only common.pt")
def test_the_embedded_common_state_probe_means_what_we_read_it_as(tmp_path):
    from megatron.core.dist_checkpointing import serialization

    # A release that has it looks for the separate common.pt file (0.16's format) beside the
    # torch_dist files, and reads the embedded state otherwise.
    probe = serialization._legacy_common_state_exists
    assert not probe(str(tmp_path))
    (tmp_path / "common.pt").write_bytes(b"")
    assert probe(str(tmp_path))


@pytest.mark.skipif(mcore_compat.READS_EMBEDDED_COMMON_STATE,
                    reason="this release reads both checkpoint formats")
def test_a_newer_format_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / ".metadata").write_bytes(b"")  # torch_dist files, no common.pt (0.19's format)
    with pytest.raises(CheckpointError, match=r"written by a newer Megatron-Core .* reads only "
                                              r"common\.pt"):
        load_common_state_dict(tmp_path)


def test_moe_router_gemm_runs_without_transformer_engine(monkeypatch):
    """Without TE, 0.16.1's router GEMM reads a name only TE defines; after
    ``define_missing_te_gemm`` (run when ``mcore_compat`` is imported, on CPU and GPU alike) it
    takes the plain matmul path."""
    from megatron.core.transformer.moe import moe_utils

    if getattr(moe_utils, "HAVE_TE", False):
        pytest.skip("Transformer Engine defines te_general_gemm itself")
    monkeypatch.delattr(moe_utils, "te_general_gemm", raising=False)
    mcore_compat.define_missing_te_gemm()
    assert moe_utils.te_general_gemm is None
    inp, weight = torch.randn(5, 8), torch.randn(4, 8)
    logits = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
    torch.testing.assert_close(logits, inp @ weight.T)
