"""The one build path (megatron_vwn/training/build.py, docs/training_loop.md): what eval, profile
and convert build is what training builds, and a bare build allocates no training state."""

from __future__ import annotations

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel

from megatron_vwn.config import load_config
from megatron_vwn.training.build import build_model_parts

SHAPE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.seq_length=16"]
VOCAB = 128


@pytest.mark.parametrize("extra", [[], ["model.vwn.m=2", "model.vwn.n=4"]],
                         ids=["backbone", "vwn"])
def test_eval_and_train_builds_hold_the_same_parameters(single_process, extra):
    cfg = load_config(None, [*SHAPE, *extra])
    train = build_model_parts(cfg, VOCAB, ddp=True, optimizer=True)
    bare = build_model_parts(cfg, VOCAB, ddp=False, optimizer=False)
    trained = dict(train.modules[0].named_parameters())
    evaluated = dict(bare.modules[0].named_parameters())
    assert trained.keys() == evaluated.keys()
    for name, param in trained.items():
        assert torch.equal(param, evaluated[name]), name
    assert isinstance(train.model[0], DistributedDataParallel)
    assert train.model[0].module is train.modules[0]
    assert train.optimizer is not None and train.scheduler is not None
    assert train.feeds_data == bare.feeds_data == [True]


def test_bare_build_allocates_no_training_state(single_process):
    cfg = load_config(None, SHAPE)
    parts = build_model_parts(cfg, VOCAB, ddp=False, optimizer=False)
    assert parts.optimizer is None and parts.scheduler is None
    assert parts.model is parts.modules
    assert not any(isinstance(chunk, DistributedDataParallel) for chunk in parts.model)
    for param in parts.modules[0].parameters():
        assert param.grad is None and not hasattr(param, "main_grad")
    config = parts.modules[0].config
    assert config.finalize_model_grads_func is None and config.grad_scale_func is None


def test_an_optimizer_needs_the_ddp_wrapper(single_process):
    with pytest.raises(ValueError, match="ddp=True"):
        build_model_parts(load_config(None, SHAPE), VOCAB, ddp=False, optimizer=True)


def test_load_weights_fills_bare_chunks_and_refuses_a_model_that_does_not_fit(single_process,
                                                                              tmp_path):
    from megatron_vwn.checkpoint.errors import CheckpointError
    from megatron_vwn.checkpoint.weights import load_weights
    from megatron_vwn.convert.megatron_io import save_weights_checkpoint

    cfg = load_config(None, [*SHAPE, "train.seed=1"])
    (source,) = build_model_parts(cfg, VOCAB, ddp=False, optimizer=False).modules
    path = save_weights_checkpoint(source, cfg, VOCAB, tmp_path)
    other = load_config(None, [*SHAPE, "train.seed=2"])
    (target,) = build_model_parts(other, VOCAB, ddp=False, optimizer=False).modules
    assert not torch.equal(target.output_layer.weight, source.output_layer.weight)
    saved = load_weights([target], path, other.model, VOCAB)
    assert saved.state.iteration == 0 and saved.padded_vocab_size == VOCAB
    for (name, loaded), expected in zip(target.state_dict().items(),
                                        source.state_dict().values(), strict=True):
        if isinstance(loaded, torch.Tensor):
            assert torch.equal(loaded, expected), name
    wider = load_config(None, [*SHAPE, "model.ffn_hidden_size=96"])
    (misfit,) = build_model_parts(wider, VOCAB, ddp=False, optimizer=False).modules
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        load_weights([misfit], path, wider.model, VOCAB)
