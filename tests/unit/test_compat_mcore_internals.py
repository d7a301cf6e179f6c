"""Each private Megatron-Core member ``compat/mcore_internals.py`` uses still means what we use
it for: its parameters by name, that the stock code still calls it, and what it does on a tiny
input (docs/compat.md)."""

from __future__ import annotations

import inspect
import queue

import pytest
import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_vwn.compat.mcore_internals import (
    LAYER_FORWARD_KEYWORDS,
    MTPLayerWithInputMix,
    install_embedding,
    loading_present_states_only,
    use_in_process_results_queue,
)
from megatron_vwn.config import load_config
from megatron_vwn.model.builder import build_model

VOCAB = 64
SHAPE = ["model.num_layers=1", "model.hidden_size=16", "model.num_attention_heads=2",
         "model.num_query_groups=2", "model.ffn_hidden_size=32", "model.seq_length=4"]


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize("method", sorted(LAYER_FORWARD_KEYWORDS))
def test_layer_forward_pieces_take_the_keywords_we_pass(method):
    parameters = _parameters(getattr(TransformerLayer, method))
    assert parameters[:2] == ["self", "hidden_states"]
    missing = [k for k in LAYER_FORWARD_KEYWORDS[method] if k not in parameters]
    assert not missing, f"TransformerLayer.{method} no longer takes {missing}"
    # forward_mlp passes inference_context by position: it must stay the second argument.
    assert method != "_forward_mlp" or parameters[2] == "inference_context"


def test_stock_layer_forward_is_built_from_the_pieces():
    # VWNTransformerLayer.forward replaces the stock forward by the same two calls around its
    # connections; test_compat_identity_layer.py checks that the two make the stock forward.
    source = inspect.getsource(TransformerLayer.forward)
    assert "self._forward_attention(" in source and "self._forward_mlp(" in source


def test_mtp_layer_mixes_its_inputs_through_concat_embeddings():
    assert _parameters(MultiTokenPredictionLayer._concat_embeddings) == [
        "self", "hidden_states", "decoder_input"]
    assert "self._concat_embeddings(hidden_states,decoder_input)" in "".join(
        inspect.getsource(MultiTokenPredictionLayer).split())

    class Mix(MTPLayerWithInputMix):
        def __init__(self):  # no Megatron state: only the routing is under test
            torch.nn.Module.__init__(self)

        def mix_inputs(self, hidden_states, decoder_input):
            return hidden_states - decoder_input

    out = Mix()._concat_embeddings(torch.tensor([3.0]), torch.tensor([1.0]))
    assert out.tolist() == [2.0]


def test_an_installed_embedding_is_what_the_model_embeds_with(single_process):
    (model,) = build_model(load_config(None, [*SHAPE, "model.tie_embeddings=true"]), VOCAB)
    assert "self.embedding(input_ids=input_ids, position_ids=position_ids)" in inspect.getsource(
        GPTModel)
    stock = model.embedding

    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = torch.nn.Embedding(VOCAB, 16)  # its own table, tagged below

        def forward(self, input_ids, position_ids):
            return 2 * stock(input_ids=input_ids, position_ids=position_ids)

    tokens = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(4).unsqueeze(0)
    new = Doubled()
    with torch.no_grad():
        before = model(tokens, positions, None)
        install_embedding(model, new)
        after = model(tokens, positions, None)
    assert model.embedding is new
    assert not torch.allclose(before, after)  # the model embeds with the new module
    # Re-tagged: the new table is the (tied) embedding-or-output weight, flagged as such.
    weight = model.shared_embedding_or_output_weight()
    assert weight is new.word_embeddings.weight
    assert weight.is_embedding_or_output_parameter and weight.zero_out_wgrad


def test_a_synchronous_save_collects_results_in_a_plain_queue(monkeypatch):
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    use_in_process_results_queue()
    # The writer takes its results queue from this getter (private in 0.16, public from 0.19),
    # which must hand ours back.
    getter = next(name for name in ("get_write_results_queue", "_get_write_results_queue")
                  if hasattr(filesystem_async, name))
    assert isinstance(getattr(filesystem_async, getter)(), queue.Queue)
    assert f"{getter}()" in inspect.getsource(filesystem_async.FileSystemWriterAsync)


class _FakeAdam:
    """A distributed optimizer's inner PyTorch Adam: one parameter, its state with ``step``."""

    def __init__(self):
        self.param = torch.zeros(3)
        self.param_groups = [{"params": [self.param]}]
        self.state = {self.param: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3),
                                   "exp_avg_sq": torch.zeros(3)}}


def test_loading_sets_only_the_states_the_checkpoint_has():
    assert _parameters(DistributedOptimizer._set_main_param_and_optimizer_states) == [
        "self", "model_param", "tensors"]
    for caller in ("load_parameter_state_from_fs_model_space",):
        assert "self._set_main_param_and_optimizer_states(" in inspect.getsource(
            getattr(DistributedOptimizer, caller))

    model_param = torch.zeros(3)
    opt = DistributedOptimizer.__new__(DistributedOptimizer)
    opt.optimizer = _FakeAdam()
    opt.model_param_group_index_map = {model_param: (0, 0)}
    with loading_present_states_only([opt]):
        opt._set_main_param_and_optimizer_states(
            model_param, {"param": torch.ones(3), "exp_avg": torch.full((3,), 2.0)})
    assert opt.optimizer.param.tolist() == [1.0] * 3
    state = opt.optimizer.state[opt.optimizer.param]
    assert state["exp_avg"].tolist() == [2.0] * 3 and state["step"].item() == 5.0
    # Afterwards the class's own method is back.
    assert "_set_main_param_and_optimizer_states" not in vars(opt)
