"""Private Megatron-Core members megatron-vwn calls, overrides or replaces (docs/compat.md).

Each has no public equivalent in the supported releases (0.16.1 to 0.19.2); each is named here
only, and ``tests/unit/test_compat_mcore_internals.py`` checks what we rely on (its parameter
names, that the stock code still calls it, what it does on a tiny input), so an upstream change
fails there instead of deep inside a training step.

* ``TransformerLayer._forward_attention`` / ``_forward_mlp``: the two halves of the stock
  layer's forward, which ``VWNTransformerLayer`` calls around its connections
  (:func:`forward_attention`, :func:`forward_mlp`, keywords :data:`LAYER_FORWARD_KEYWORDS`).
* ``MultiTokenPredictionLayer._concat_embeddings``: how an MTP layer mixes the shifted-token
  embedding with the previous depth's state; :class:`MTPLayerWithInputMix` routes it to a public
  method, ``mix_inputs``, that subclasses define.
* ``GPTModel.embedding`` replaced after construction (:func:`install_embedding`): the model
  builds its stock embedding; VWN's wide one replaces it, and
  ``setup_embeddings_and_output_layer`` re-tags it (tied output weights, MTP across stages).
* ``filesystem_async._results_queue`` (:func:`use_in_process_results_queue`): the writer results
  queue of a synchronous save.
* ``DistributedOptimizer._set_main_param_and_optimizer_states``
  (:func:`loading_present_states_only`): a load with PyTorch's Adam.
"""

from __future__ import annotations

import contextlib
import queue
from functools import partial

import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer

__all__ = ["LAYER_FORWARD_KEYWORDS", "forward_attention", "forward_mlp", "MTPLayerWithInputMix",
           "install_embedding", "use_in_process_results_queue", "loading_present_states_only"]

LAYER_FORWARD_KEYWORDS = {
    "_forward_attention": ("attention_mask", "rotary_pos_emb", "inference_context",
                           "packed_seq_params", "padding_mask"),
    "_forward_mlp": ("inference_context", "padding_mask"),
}
"""Keywords ``VWNTransformerLayer`` passes to the stock layer's forward pieces."""


def forward_attention(layer, hidden_states: torch.Tensor, *args, **kwargs):
    """The stock layer's input norm, self-attention and its bias-dropout(-add):
    ``(output, context)``. With the spec's residual add removed the output is the sublayer's."""
    return layer._forward_attention(hidden_states, *args, **kwargs)


def forward_mlp(layer, hidden_states: torch.Tensor, inference_context=None, padding_mask=None):
    """The stock layer's pre-MLP norm, MLP (dense or MoE) and its bias-dropout(-add)."""
    return layer._forward_mlp(hidden_states, inference_context, padding_mask=padding_mask)


class MTPLayerWithInputMix(MultiTokenPredictionLayer):
    """Megatron's MTP layer whose embedding/state mix is the subclass's ``mix_inputs``."""

    def mix_inputs(self, hidden_states: torch.Tensor, decoder_input: torch.Tensor):
        """``[s, b, *]`` state of the previous depth and shifted-token embedding -> layer input."""
        raise NotImplementedError

    def _concat_embeddings(self, hidden_states: torch.Tensor, decoder_input: torch.Tensor):
        return self.mix_inputs(hidden_states, decoder_input)


def install_embedding(model, embedding: torch.nn.Module | None) -> None:
    """Give a built ``GPTModel`` ``embedding`` (None: keep its own) and re-tag the embedding and
    output weights (shared-embedding flags, the tied or MTP copies' synchronisation)."""
    if embedding is not None:
        model.embedding = embedding
    model.setup_embeddings_and_output_layer()


def use_in_process_results_queue() -> None:
    """A synchronous save collects its writer results in this process, so a plain queue does.

    Megatron-Core otherwise starts a spawn-type ``multiprocessing.Manager`` for that queue: a
    helper process that needs the ``__main__`` guard in every entry script, costs an interpreter
    start per rank, and dies on the SIGTERM a scheduler sends to the whole job, which would break
    the save that the signal asks for. Only for synchronous saves.
    """
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _set_present_states(opt, model_param, tensors: dict) -> None:
    group_index, group_order = opt.model_param_group_index_map[model_param]
    main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
    destination = {"param": main_param, **opt.optimizer.state[main_param]}
    for key, value in tensors.items():
        destination[key].copy_(value)


@contextlib.contextmanager
def loading_present_states_only(optimizers: list):
    """While open, the distributed ``optimizers`` copy each loaded parameter state only into the
    keys the loaded state has (Megatron-Core 0.16 with PyTorch's Adam copies into every key of
    the Adam state, ``step`` included, which the loaded tensors lack: a ``KeyError``)."""
    for opt in optimizers:
        opt._set_main_param_and_optimizer_states = partial(_set_present_states, opt)
    try:
        yield
    finally:
        for opt in optimizers:
            del opt._set_main_param_and_optimizer_states
