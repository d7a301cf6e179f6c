"""Width slots renamed (``attention_ghc`` / ``mlp_ghc`` / ``altup`` -> ``attention_connection``
/ ``mlp_connection`` / ``layer_connection``): checkpoints written before still load, under
their old keys, and nothing else is invented (``checkpoint/legacy_keys.py``).

The fixtures in ``tests/data/checkpoints_pre_slot_rename`` were written by the code before the
rename (its README.md); the resume with their optimizer state is in
``tests/distributed/test_checkpoint_slot_rename.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

import megatron_vwn.config  # noqa: F401  (the config imports the members before the registry)
from megatron_vwn.checkpoint.errors import CheckpointError
from megatron_vwn.checkpoint.legacy_keys import (
    legacy_candidates,
    map_legacy_keys,
    stored_keys,
)
from megatron_vwn.model.width import registry
from megatron_vwn.model.width.registry import (
    LAYER_SLOTS,
    SUBLAYER_SLOTS,
    WidthMember,
    legacy_slot_names,
    member_of,
)

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "checkpoints_pre_slot_rename"
CASES = ("ghc", "mhc", "altup")
OLD_SLOTS = {"ghc": ("attention_ghc", "mlp_ghc"), "mhc": ("attention_ghc", "mlp_ghc"),
             "altup": ("altup",)}
RENAMES = {"attention_connection": ("attention_ghc",), "mlp_connection": ("mlp_ghc",),
           "layer_connection": ("altup",)}


def checkpoint_dir(case: str) -> Path:
    return FIXTURES / case / "checkpoints" / "iter_0000002"


def _tensor(key: str) -> ShardedTensor:
    return ShardedTensor.from_rank_offsets(key, torch.zeros(2))


# --------------------------------------------------------------- the members' slot names


def test_members_use_the_neutral_slots_and_keep_their_hf_names():
    for name in ("ghc", "hc", "frac", "mhc"):
        member = member_of(name)
        assert member.slots == SUBLAYER_SLOTS == ("attention_connection", "mlp_connection")
        assert member.hf_slots() == {"attention_connection": "attn_ghc",
                                     "mlp_connection": "mlp_ghc"}
        assert member.legacy_slots == {"attention_connection": "attention_ghc",
                                       "mlp_connection": "mlp_ghc"}
    altup = member_of("altup")
    assert altup.slots == LAYER_SLOTS == ("layer_connection",)
    assert altup.hf_slots() == {"layer_connection": "altup"}
    assert altup.legacy_slots == {"layer_connection": "altup"}
    assert legacy_slot_names() == RENAMES
    for member in registry.members():
        assert set(member.legacy_slots) <= set(member.slots)


def test_a_new_member_gets_the_default_slots_of_its_kind_and_no_legacy_names():
    class Sublayer(WidthMember):
        name = "sublayer_test"

    class Layer(WidthMember):
        name = "layer_test"
        wraps_layer = True

    class Named(WidthMember):
        name = "named_test"
        wraps_layer = True
        slots = ("mine",)

    assert Sublayer.slots == SUBLAYER_SLOTS and Layer.slots == LAYER_SLOTS
    assert Named.slots == ("mine",)
    assert Layer().hf_slots() == {"layer_connection": "layer_connection"}
    assert Sublayer.legacy_slots == Layer.legacy_slots == {}


def test_renamed_slots_draw_their_initial_values_as_before():
    """The layout-invariant init seeds by parameter name: renamed slots seed with the old one,
    so a fresh run draws the same model as before the rename."""
    from megatron_vwn.model.layout import _seed_for

    for new, old in (("decoder.layers.3.attention_connection.proj",
                      "decoder.layers.3.attention_ghc.proj"),
                     ("decoder.layers.0.mlp_connection.gate", "decoder.layers.0.mlp_ghc.gate"),
                     ("decoder.layers.1.layer_connection.router", "decoder.layers.1.altup.router")):
        assert _seed_for(1234, new) == _seed_for(1234, old)
    assert _seed_for(1234, "decoder.layers.0.mlp.linear_fc1.weight") != _seed_for(
        1234, "decoder.layers.0.mlp.linear_fc2.weight")


# --------------------------------------------------------------- the key mapping


def test_legacy_candidates_replace_one_slot_component():
    assert legacy_candidates("decoder.layers.attention_connection.proj", RENAMES) == [
        "decoder.layers.attention_ghc.proj"]
    assert legacy_candidates("optimizer.state.exp_avg.decoder.layers.layer_connection.router",
                             RENAMES) == [
        "optimizer.state.exp_avg.decoder.layers.altup.router"]
    assert legacy_candidates("decoder.layers.mlp.linear_fc1.weight", RENAMES) == []
    # a component, not a substring
    assert legacy_candidates("decoder.layers.attention_connection_x.proj", RENAMES) == []


def test_only_keys_stored_under_the_old_name_alone_are_mapped():
    model = _tensor("decoder.layers.attention_connection.proj")
    optim = _tensor("optimizer.state.exp_avg.decoder.layers.mlp_connection.proj")
    current = _tensor("decoder.layers.layer_connection.router")  # stored under its own name
    other = _tensor("decoder.layers.mlp.linear_fc1.weight")
    obj = ShardedObject("decoder.layers.attention_connection._extra_state", None, (1,), (0,))
    state = {"model": {"a": model, "b": [current, other], "c": obj}, "optimizer": {"d": optim}}
    stored = {"decoder.layers.attention_ghc.proj",
              "optimizer.state.exp_avg.decoder.layers.mlp_ghc.proj",
              "decoder.layers.layer_connection.router", "decoder.layers.altup.router",
              "decoder.layers.mlp.linear_fc1.weight", "decoder.layers.attention_ghc._extra_state"}
    mapped = map_legacy_keys(state, stored, RENAMES)
    assert mapped == {
        "decoder.layers.attention_connection.proj": "decoder.layers.attention_ghc.proj",
        "optimizer.state.exp_avg.decoder.layers.mlp_connection.proj":
            "optimizer.state.exp_avg.decoder.layers.mlp_ghc.proj",
        "decoder.layers.attention_connection._extra_state":
            "decoder.layers.attention_ghc._extra_state",
    }
    assert model.key == "decoder.layers.attention_ghc.proj"
    assert optim.key == "optimizer.state.exp_avg.decoder.layers.mlp_ghc.proj"
    assert obj.key == "decoder.layers.attention_ghc._extra_state"
    assert current.key == "decoder.layers.layer_connection.router"  # new name wins
    assert other.key == "decoder.layers.mlp.linear_fc1.weight"
    assert state["model"]["a"] is model  # the structure (what load_state_dict sees) is kept


def test_a_key_stored_under_neither_name_is_left_alone():
    tensor = _tensor("decoder.layers.attention_connection.proj")
    state = {"model": {"a": tensor}}
    stored = {"decoder.layers.attention_ghc.norm_weight", "decoder.layers.mlp_ghc.proj"}
    assert map_legacy_keys(state, stored, RENAMES) == {}
    assert tensor.key == "decoder.layers.attention_connection.proj"


def test_the_fixtures_hold_only_the_old_slot_names():
    for case in CASES:
        keys = stored_keys(checkpoint_dir(case))
        parts = {part for key in keys for part in key.split(".")}
        assert set(OLD_SLOTS[case]) <= parts
        assert not parts & set(RENAMES), case
        assert any(k.startswith("optimizer.state.exp_avg.") and OLD_SLOTS[case][0] in k
                   for k in keys)  # the distributed optimizer's state embeds them


# --------------------------------------------------------------- the old checkpoints load


def _old_key(name: str, case: str) -> str:
    """``decoder.layers.0.attention_connection.proj`` -> the checkpoint's stacked old key
    ``decoder.layers.attention_ghc.proj`` (with the layer index)."""
    parts = name.split(".")
    new_slots = LAYER_SLOTS if case == "altup" else SUBLAYER_SLOTS
    renamed = [dict(zip(new_slots, OLD_SLOTS[case], strict=True)).get(p, p) for p in parts]
    return ".".join(renamed)


@pytest.mark.parametrize("case", CASES)
def test_old_checkpoint_loads_its_weights_and_logits(case, single_process):
    """The convert / eval path (``load_weights`` at TP = PP = 1, one rank; the fixture was
    written at DP2): every parameter equals the checkpoint's value under its old key, and the
    logits equal those the old code wrote."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    from megatron_vwn.convert.megatron_io import load_checkpoint
    from tests.distributed.checkpoint_worker import fixed_batch

    loaded = load_checkpoint(FIXTURES / case / "checkpoints")
    stored = load_plain_tensors(str(checkpoint_dir(case)))
    slots = LAYER_SLOTS if case == "altup" else SUBLAYER_SLOTS
    compared = 0
    for name, param in loaded.model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"] and parts[3] in slots:
            key = _old_key(".".join(parts[:2] + parts[3:]), case)
            torch.testing.assert_close(param.detach(), stored[key][int(parts[2])], rtol=0,
                                       atol=0)
            compared += 1
    assert compared >= 2 * len(slots)  # two layers, every slot
    batch = fixed_batch(loaded.padded_vocab_size, 1, loaded.cfg.model.seq_length)
    with torch.no_grad():
        logits = loaded.model(batch["tokens"], batch["position_ids"], None)
    expected = torch.load(FIXTURES / case / "logits.pt")
    # Equal weights through the same fp32 forward, possibly on another CPU's kernels than the
    # machine that wrote the fixture: docs/parity_cases.md's loss tolerance.
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_a_slot_the_checkpoint_holds_under_neither_name_is_the_usual_missing_key(
        single_process):
    """A GHC model's keys asked of the AltUp checkpoint: neither the new nor the old GHC slot
    names are there, so nothing is mapped and the load fails as before, naming the key."""
    from megatron_vwn.checkpoint.state import model_sharded_state_dict, sharding_metadata
    from megatron_vwn.checkpoint.weights import load_sharded
    from megatron_vwn.convert.megatron_io import (
        build_single_model,
        read_saved_run,
        single_process_config,
    )

    _, saved = read_saved_run(checkpoint_dir("ghc"))
    model = build_single_model(single_process_config(saved.config), saved.padded_vocab_size)
    state = model_sharded_state_dict([model], sharding_metadata(False))
    with pytest.raises(CheckpointError, match="could not be loaded") as error:
        load_sharded(state, checkpoint_dir("altup"))
    assert ("KeyError: \"decoder.layers.attention_connection.static_read from model not in "
            "state dict") in str(error.value)
    keys = {item.key for item in state["model"].values()
            if isinstance(item, ShardedTensor)}
    assert "decoder.layers.attention_connection.proj" in keys  # not renamed to a made-up key
