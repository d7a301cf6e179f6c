"""A width layer whose connection is the identity is the stock ``TransformerLayer``.

``VWNTransformerLayer`` replaces the stock forward by ``read -> forward_attention -> write ->
read -> forward_mlp -> write`` (``compat/mcore_internals.py``) and removes the stock residual
adds from the spec. With ``read(H) = H`` and ``write(z, H) = H + z`` that is the stock forward
operation for operation (``H + z`` is the stock ``residual + z``, and IEEE addition commutes),
so the outputs and every gradient agree exactly, in float64 as in float32: a change of the stock
forward (a third piece, another residual) fails here.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from megatron.core.transformer.spec_utils import build_module

from megatron_vwn.config import load_config
from megatron_vwn.model.builder import build_transformer_config
from megatron_vwn.model.specs import backbone_layer_spec
from megatron_vwn.model.width.vwn import vwn_layer_spec

SEQ, BATCH, D = 8, 2, 32
SHAPE = ["model.num_layers=1", f"model.hidden_size={D}", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=64", f"model.seq_length={SEQ}"]


class IdentityConnection(torch.nn.Module):
    """``read(H) -> (H, H)``, ``write(z, H) -> H + z``: the stock residual as a connection."""

    def read(self, hidden):
        return hidden, hidden

    def write(self, output, hidden):
        return hidden + output


def _identity_shape():
    """What ``VWNTransformerLayer`` asks of its ``vwn`` argument, with identity connections."""
    return SimpleNamespace(wraps_layer=False,
                           member=SimpleNamespace(slots=("attention_id", "mlp_id")),
                           make_connection=lambda *args: IdentityConnection())


def _forward(layer, hidden, mask):
    h = hidden.detach().clone().requires_grad_(True)
    out, _ = layer(h, attention_mask=mask)
    out.square().sum().backward()
    return out.detach(), h.grad, {n: p.grad for n, p in layer.named_parameters()}


def test_identity_connection_layer_is_the_stock_layer(single_process):
    config = build_transformer_config(load_config(None, SHAPE))
    stock_spec = backbone_layer_spec("local")
    torch.manual_seed(0)
    stock = build_module(stock_spec, config=config, layer_number=1)
    wide = build_module(vwn_layer_spec(stock_spec, _identity_shape()), config=config,
                        layer_number=1)
    assert type(stock).forward is not type(wide).forward
    wide.load_state_dict(stock.state_dict())
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1).view(1, 1, SEQ, SEQ)
    hidden = torch.randn(SEQ, BATCH, D, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float64, torch.float32):
        want = _forward(stock.to(dtype), hidden.to(dtype), mask)
        got = _forward(wide.to(dtype), hidden.to(dtype), mask)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        assert got[2].keys() == want[2].keys()
        for name, grad in want[2].items():
            torch.testing.assert_close(got[2][name], grad, rtol=0, atol=0, msg=name)
        stock.zero_grad()
        wide.zero_grad()
