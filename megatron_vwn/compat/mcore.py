"""What differs between the Megatron-Core releases megatron-vwn supports (0.16.1 to 0.19.2).

Every version difference lives here, found by feature (a field, a signature), not by version
number, so a release in between or after works where its API does:

* ``GPTModel``: 0.19 deprecates it in favour of ``HybridModel``, whose stack splits attention
  and MLP into separate layers (``"*-*-"`` patterns) with other parameter names. VWN wraps both
  sublayers of one ``TransformerLayer`` (and checkpoints name them so), so we stay on
  ``GPTModel``, which 0.19 still ships and fixes; this is the one import of it.
* MTP layer submodules: 0.19 renamed ``transformer_layer`` to ``mtp_model_layer`` (the field and
  the module attribute). :func:`mtp_layer_submodules` builds either; checkpoints always use the
  0.16 name (:func:`canonical_checkpoint_keys`), so a run saved under one release resumes,
  reshards and converts under the other.
* Checkpoint format: after 0.16 the common (non-sharded) state moved from ``common.pt`` into the
  torch_dist files. Newer releases read both; 0.16 reads only ``common.pt``
  (:data:`READS_EMBEDDED_COMMON_STATE`), so ``checkpoint.state.load_common_state_dict`` names
  the problem instead of failing inside Megatron. A checkpoint saved under 0.16 resumes under
  0.19, not the reverse.
* MoE router without Transformer Engine: 0.16.1's ``moe_utils`` imports ``te_general_gemm`` only
  when TE imports, yet its router GEMM tests the name for ``None`` on every forward, so without TE
  (CPU, or a GPU image without it) the first MoE step is a ``NameError``.
  :func:`define_missing_te_gemm` defines it as ``None``, the value the router's plain matmul path
  expects; a release that defines the name is left alone. It runs when this module is
  imported, which every model build does.
* MoE losses under sequence parallelism: with ``calculate_per_token_loss`` (ours) 0.16.1's
  router multiplies the load-balancing and z-losses by the token count of the *sequence shard*
  it routes, where the gradient normalisation divides by the micro-batch's whole token count:
  under TP > 1 with SP their gradients come out 1/TP of the single-process ones (the parity
  test sees the router weight's gradient off by half at TP=2). 0.19 fixed it (it multiplies by
  ``tp_cp_group.size()`` there): the fix is recognised in the router's source.
  :func:`moe_loss_coeff_factor` gives the factor our coefficients are multiplied by before
  Megatron-Core sees them (1 where fixed); the logged values divide by the same coefficient, so
  they are unaffected.
* MoE aux-loss logging: the routers add each layer's load-balancing and z-loss into a global
  tracker that Megatron-LM's training loop reads and clears (0.16: a dict,
  ``moe_utils.get_moe_layer_wise_logging_tracker``; 0.19: ``moe_logging.MoEMetricsTracker``,
  the dict only a copy); :func:`moe_aux_losses` and :func:`clear_moe_aux_losses` do that for
  ours on either.
"""

from __future__ import annotations

import dataclasses
import re

from megatron.core.dist_checkpointing import serialization
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayerSubmodules

__all__ = ["GPTModel", "MTP_INNER_LAYER", "RECOMPUTE_MODULES", "RECOMPUTE_NEEDS_TE",
           "READS_EMBEDDED_COMMON_STATE", "mtp_layer_submodules", "canonical_checkpoint_keys",
           "define_missing_te_gemm", "moe_aux_losses", "clear_moe_aux_losses",
           "moe_loss_coeff_factor"]


def _router_scales_losses_by_full_sequence() -> bool:
    """Whether this release's router already multiplies its per-token aux loss by the TP x CP
    size (the fix of the 1/TP gradient under sequence parallelism)."""
    import inspect

    from megatron.core.transformer.moe.router import TopKRouter

    source = inspect.getsource(TopKRouter.attach_and_log_load_balancing_loss)
    return "tp_cp_group.size()" in source


def moe_loss_coeff_factor(tensor_parallel: int, sequence_parallel: bool) -> int:
    """What the aux- and z-loss coefficients are multiplied by so their gradients equal the
    single-process ones (see the module docstring)."""
    if not sequence_parallel or _router_scales_losses_by_full_sequence():
        return 1
    return tensor_parallel


def _moe_metrics_tracker():
    """0.19's tracker object, or None where the routers log into 0.16's dict."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return None
    return get_moe_metrics_tracker()


def moe_aux_losses() -> dict:
    """``{name: per-layer values}`` the routers of this rank logged since the last clear
    (``load_balancing_loss``, ``seq_load_balancing_loss``, ``z_loss``; each without its
    coefficient, summed over micro-batches)."""
    tracker = _moe_metrics_tracker()
    if tracker is not None:
        return {name: entry.values.detach() for name, entry in tracker.metrics.items()}
    legacy = moe_utils.get_moe_layer_wise_logging_tracker()
    return {name: entry["values"].detach() for name, entry in legacy.items()}


def clear_moe_aux_losses(forget_layers: bool = False) -> None:
    """Zero the tracked values; ``forget_layers`` also drops the per-name arrays, which the
    tracker sizes once, on first use, to the layer count of the model then running (so a new
    model in the same process, with more layers, starts clean)."""
    tracker = _moe_metrics_tracker()
    if tracker is not None:
        if forget_layers:
            tracker.metrics.clear()
        else:
            tracker.clear()
    elif forget_layers:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
    else:
        moe_utils.clear_aux_losses_tracker()


_MTP_FIELDS = {f.name for f in dataclasses.fields(MultiTokenPredictionLayerSubmodules)}
MTP_INNER_LAYER = "mtp_model_layer" if "mtp_model_layer" in _MTP_FIELDS else "transformer_layer"
"""Attribute (and submodule field) of an MTP layer that holds its transformer layer."""

RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")
"""``recompute_modules`` of selective recompute that apply to this project's dense layers and that
every supported release accepts (``tests/unit/test_mcore_compat.py`` checks)."""



def _norm_checkpoint_calls_te() -> bool:
    """Megatron-Core 0.16's ``CheckpointWithoutOutput()`` (the norms' recompute) sets ``fp8 =
    (fp8 is not None)``, true for its default ``False``, and then calls Transformer Engine's
    ``FP8GlobalStateManager``: a ``NameError`` without TE. Found by that flag, not the version."""
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    return bool(CheckpointWithoutOutput().fp8)


RECOMPUTE_NEEDS_TE = ("layernorm",) if _norm_checkpoint_calls_te() else ()
"""Modules whose selective recompute needs Transformer Engine on this release."""

CANONICAL_MTP_INNER_LAYER = "transformer_layer"
"""The name checkpoints use for it, whatever the release (0.16's)."""

def define_missing_te_gemm() -> None:
    """Give the MoE router's ``te_general_gemm`` the value ``None`` where TE did not define it
    (any device: see the module docstring)."""
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


define_missing_te_gemm()


def mtp_layer_submodules(*, enorm, hnorm, eh_proj, layer, layer_norm):
    """``MultiTokenPredictionLayerSubmodules`` with ``layer`` as its transformer layer."""
    return MultiTokenPredictionLayerSubmodules(enorm=enorm, hnorm=hnorm, eh_proj=eh_proj,
                                               layer_norm=layer_norm, **{MTP_INNER_LAYER: layer})


_INNER_KEY = re.compile(rf"^(.*mtp\.layers\.\d+\.){MTP_INNER_LAYER}\.")


def canonical_checkpoint_keys(sharded_state_dict: dict) -> dict:
    """Rename, in place, the checkpoint keys of MTP inner layers to the canonical name.

    Only the keys the tensors are stored under change (``ShardedTensor.key`` and friends); the
    dictionary keys, which ``load_state_dict`` matches to module attributes, stay as they are.
    A no-op on releases that already use the canonical name.
    """
    if MTP_INNER_LAYER == CANONICAL_MTP_INNER_LAYER:
        return sharded_state_dict
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    replacement = rf"\g<1>{CANONICAL_MTP_INNER_LAYER}."

    def rename(item):
        key = getattr(item, "key", None)
        if isinstance(key, str):
            item.key = _INNER_KEY.sub(replacement, key)
        return item

    dict_list_map_inplace(rename, sharded_state_dict)
    return sharded_state_dict


READS_EMBEDDED_COMMON_STATE = hasattr(serialization, "_legacy_common_state_exists")
"""Whether this release reads checkpoints that keep the common state inside the torch_dist files."""

