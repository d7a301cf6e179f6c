"""Multi-token prediction: Megatron-Core's MTP for the backbone, the VWN-aware heads, targets
t+1+k and the loss mask (docs/methods.md §1.5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_vwn.compat.mcore import MTP_INNER_LAYER
from megatron_vwn.config import load_config
from megatron_vwn.model.builder import build_model, build_transformer_config
from megatron_vwn.model.mtp import BlockLinear, VWNMultiTokenPredictionLayer
from megatron_vwn.training.step import loss_func, mtp_loss_mask

VOCAB = 128
SEQ = 16
SHAPE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=64", f"model.seq_length={SEQ}"]


@pytest.fixture(autouse=True)
def fresh_mtp_tracker():
    """GPTModel logs MTP losses into a process-global tracker sized by the first model's K."""
    MTPLossLoggingHelper.tracker.clear()
    yield


def _cfg(*overrides):
    return load_config(None, [*SHAPE, *overrides])


def _batch(b=2):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (b, SEQ + 1), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(b, -1)
    loss_mask = torch.ones(b, SEQ)
    loss_mask[1, -3:] = 0  # padding at the end of the second sequence
    return tokens[:, :-1], tokens[:, 1:], positions, loss_mask


@pytest.mark.parametrize("depths", [1, 2])
def test_backbone_mtp_is_megatron_mtp(single_process, depths):
    cfg = _cfg(f"model.mtp.num_layers={depths}", "model.mtp.loss_weight=0.3")
    (ours,) = build_model(cfg, VOCAB)
    config = build_transformer_config(cfg)
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    stock = GPTModel(config=config, transformer_layer_spec=layer, vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="rope",
                     mtp_block_spec=get_gpt_mtp_block_spec(config, layer, False))
    assert ours.state_dict().keys() == stock.state_dict().keys()
    stock.load_state_dict(ours.state_dict())
    tokens, labels, positions, loss_mask = _batch()
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1).view(1, 1, SEQ, SEQ)
    losses = []
    for model, attn_mask in ((ours, None), (stock, mask)):
        loss = model(tokens, positions, attn_mask, labels=labels, loss_mask=loss_mask)
        (loss * loss_mask).sum().backward()  # MTP gradients ride along (MTPLossAutoScaler)
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    stock_params = dict(stock.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, stock_params[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert any("mtp" in n and p.grad.abs().sum() > 0 for n, p in ours.named_parameters())


def test_depth_k_predicts_token_t_plus_1_plus_k(single_process):
    """The recorded depth-k loss is the cross entropy of depth k's logits against labels
    shifted by k, i.e. token t+1+k."""
    (model,) = build_model(_cfg("model.mtp.num_layers=2"), VOCAB)
    logits_seen = []
    # Clone: Megatron's cross entropy works in place on the logits it is given.
    model.output_layer.register_forward_hook(
        lambda m, a, k, out: logits_seen.append(out[0].detach().clone()), with_kwargs=True
    )
    tokens, labels, positions, loss_mask = _batch()
    model(tokens, positions, None, labels=labels, loss_mask=loss_mask)
    recorded = model.compute_language_model_loss.take()
    assert len(recorded) == 2 and len(logits_seen) == 3  # depth 1, depth 2, main
    for depth in (1, 2):
        logits = logits_seen[depth - 1]  # [s, b, V]
        target = torch.roll(labels, -depth, dims=1)  # labels[i + k] = token t+1+k
        manual = F.cross_entropy(logits.permute(1, 2, 0).float(), target, reduction="none")
        valid = slice(0, SEQ - depth)  # beyond the sequence end nothing is predicted
        torch.testing.assert_close(recorded[depth - 1][:, valid], manual[:, valid],
                                   rtol=1e-5, atol=1e-5)


def test_loss_mask_respects_document_and_sequence_ends():
    eod = 7
    labels = torch.tensor([[1, 2, eod, 4, 5, 6, 8, 9]])
    loss_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.float)  # last two: padding
    mask = mtp_loss_mask(loss_mask, labels, depths=1, eod=eod)
    # Position 3's depth-1 target is labels[3] (after the EOD at 2): only position 2 predicts
    # across the end of document (target labels[3] while labels[2] = EOD).
    depth_losses = [torch.arange(8, dtype=torch.float).view(1, 8)]
    output = torch.zeros(1, 8)
    _, _, report = loss_func(loss_mask, mask, depth_losses, output)
    kept = torch.tensor([[1, 1, 0, 1, 1, 0, 0, 0]], dtype=torch.float)
    # depth-1 position i is kept iff loss_mask[i+1] and labels[i] != EOD, and i+1 < s
    assert report["mtp_loss_1"][1].item() == kept.sum().item()
    assert report["mtp_loss_1"][0].item() == (depth_losses[0] * kept).sum().item()
    two = mtp_loss_mask(loss_mask, labels, depths=2, eod=eod)
    rolled = torch.roll(two, -2, dims=1)
    rolled[:, -2:] = 0
    # depth 2 at position i targets labels[i+2]; crossing iff EOD in labels[i], labels[i+1]
    for i in range(8):
        crosses = eod in labels[0, i:i + 2].tolist()
        if rolled[0, i] > 0:
            assert not crosses and loss_mask[0, i + 2] > 0


@pytest.mark.parametrize("depths", [1, 2])
def test_vwn_mtp_heads_are_wide_and_get_gradients(single_process, depths):
    cfg = _cfg("model.vwn.m=2", "model.vwn.n=8", f"model.mtp.num_layers={depths}")
    (model,) = build_model(cfg, VOCAB)
    layers = model.mtp.layers
    assert all(isinstance(layer, VWNMultiTokenPredictionLayer) for layer in layers)
    head = layers[0]
    assert isinstance(head.eh_proj, BlockLinear)
    assert head.eh_proj.weight.shape == (16, 32)  # 2 d_b -> d_b, shared by the 8 segments
    assert head.enorm.weight.shape == head.hnorm.weight.shape == (8 * 16,)  # D' = 128
    assert head.final_layernorm.reduce is not None
    tokens, labels, positions, loss_mask = _batch()
    loss = model(tokens, positions, None, labels=labels, loss_mask=loss_mask)
    loss.sum().backward()
    for layer in layers:
        assert layer.eh_proj.weight.grad.abs().sum() > 0
        ghc = getattr(layer, MTP_INNER_LAYER).attention_connection
        assert ghc.proj.grad.abs().sum() > 0 and ghc.static_carry.grad.abs().sum() > 0
    assert len(model.compute_language_model_loss.take()) == depths
