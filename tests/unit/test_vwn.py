"""Virtual Width Networks against their defining equations (docs/methods.md §1-2)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_vwn.config import load_config
from megatron_vwn.model.accounting import count_params
from megatron_vwn.model.builder import build_model, build_transformer_config
from megatron_vwn.model.width.ghc import GHC, GHCInit, hc_init, vwn_init
from megatron_vwn.model.width.ghc_reference import GHCReference
from megatron_vwn.model.width.vwn import VWNTransformerLayer
from tests.unit.connection_check import assert_same_connection, read_write

VOCAB = 256
SHAPE = ["model.num_layers=3", "model.hidden_size=32", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.seq_length=8"]


def _cfg(*overrides):
    return load_config(None, [*SHAPE, *overrides])


def _model(*overrides):
    (model,) = build_model(_cfg(*overrides), VOCAB)
    return model


def _batch(seed=0, b=2, s=8):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)
    return tokens, positions


def _logits(model, tokens, positions):
    return model(tokens, positions, None)  # [b, s, V]


# 1. m = n = 1 is the stock model -------------------------------------------------------------

def test_backbone_is_the_stock_gpt_model(single_process):
    ours = _model()
    assert type(ours) is GPTModel
    assert all(type(layer) is TransformerLayer for layer in ours.decoder.layers)
    cfg = _cfg()
    stock = GPTModel(config=build_transformer_config(cfg),
                     transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=VOCAB, max_sequence_length=8, position_embedding_type="rope")
    assert ours.state_dict().keys() == stock.state_dict().keys()
    stock.load_state_dict(ours.state_dict())
    tokens, positions = _batch()
    mask = torch.triu(torch.ones(8, 8, dtype=torch.bool), 1).view(1, 1, 8, 8)
    torch.testing.assert_close(_logits(ours, tokens, positions),
                               stock(tokens, positions, mask), rtol=1e-5, atol=1e-5)


# 2. Initialisation property -----------------------------------------------------------------

def _copy_backbone_weights(wide, base):
    """Same layer weights; the first D dims of the (wide or factorized) embedding are the
    backbone's embedding."""
    base_state = base.state_dict()
    with torch.no_grad():
        for name, param in wide.named_parameters():
            if name in base_state and base_state[name].shape == param.shape:
                param.copy_(base_state[name])
        table = wide.embedding.word_embeddings.weight
        table[:, : base.config.hidden_size].copy_(base.embedding.word_embeddings.weight)


def _record_residuals(model, wide: bool):
    """Residual stream after every sublayer: [after attention, after MLP] per layer."""
    states = []
    if wide:
        for layer in model.decoder.layers:
            for ghc in (layer.attention_connection, layer.mlp_connection):
                original = ghc.write

                def write(output, saved, original=original):
                    out = original(output, saved)
                    states.append(out.detach().clone())
                    return out

                ghc.write = write
    else:
        for layer in model.decoder.layers:
            def attn_hook(module, args, kwargs, output, layer=layer):
                layer._attn_out = output[0]

            def pre_hook(module, args, kwargs):
                module._input = args[0] if args else kwargs["hidden_states"]

            def post_hook(module, args, kwargs, output):
                states.append((module._input + module._attn_out).detach().clone())
                states.append(output[0].detach().clone())

            layer.self_attention.register_forward_hook(attn_hook, with_kwargs=True)
            layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
            layer.register_forward_hook(post_hook, with_kwargs=True)
    return states


@pytest.mark.parametrize("vwn", [
    ["model.vwn.m=2", "model.vwn.n=4"],
    ["model.vwn.m=2", "model.vwn.n=3"],
    ["model.vwn.m=4", "model.vwn.n=32"],
    ["model.vwn.m=2", "model.vwn.n=4", "model.vwn.embedding=factorized"],
])
def test_first_D_dims_follow_the_backbone_at_init(single_process, vwn):
    base = _model()
    wide = _model(*vwn)
    _copy_backbone_weights(wide, base)  # factorized: W_expand = [I; G] passes the table through
    tokens, positions = _batch()
    base_states = _record_residuals(base, wide=False)
    wide_states = _record_residuals(wide, wide=True)
    base(tokens, positions, None)
    wide(tokens, positions, None)
    assert len(base_states) == len(wide_states) == 6
    d = base.config.hidden_size
    for k, (b, w) in enumerate(zip(base_states, wide_states, strict=True)):
        assert w.shape[-1] > d
        torch.testing.assert_close(w[..., :d], b, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=k: f"sublayer {k}: {m}")


# 3 (see tests/distributed/test_parity.py) ----------------------------------------------------
# 4. Static vs dynamic, HC, Frac ------------------------------------------------------------

def test_static_equals_dynamic_at_init_and_differs_after_a_step(single_process):
    dynamic = _model("model.vwn.m=2", "model.vwn.n=4")
    static = _model("model.vwn.m=2", "model.vwn.n=4", "model.vwn.dynamic=false")
    static_state = static.state_dict()
    static.load_state_dict({k: v for k, v in dynamic.state_dict().items() if k in static_state})
    tokens, positions = _batch()
    torch.testing.assert_close(_logits(dynamic, tokens, positions),
                               _logits(static, tokens, positions), rtol=0, atol=0)
    for model in (dynamic, static):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(tokens, positions, None, labels=tokens).mean().backward()
        opt.step()
    gap = (_logits(dynamic, tokens, positions) - _logits(static, tokens, positions)).abs().max()
    assert gap > 1e-4
    assert dynamic.decoder.layers[0].attention_connection.proj.abs().sum() > 0


def test_hc_reads_stream_k_mod_n_and_replicates_the_embedding(single_process):
    n = 4
    model = _model("model.vwn.connection=hc", "model.vwn.m=1", f"model.vwn.n={n}")
    d = model.config.hidden_size
    for index, layer in enumerate(model.decoder.layers):
        for k, ghc in ((2 * index, layer.attention_connection),
                       (2 * index + 1, layer.mlp_connection)):
            expected = torch.zeros(n, 1)
            expected[k % n] = 1
            torch.testing.assert_close(ghc.static_read.detach(), expected)
            streams = torch.randn(3, 2, n * d)
            x, _ = ghc.read(streams)
            torch.testing.assert_close(x, streams[..., (k % n) * d:(k % n + 1) * d])
    tokens, positions = _batch()
    embedded = model.embedding(tokens, positions)
    assert embedded.shape[-1] == n * d
    for i in range(1, n):
        torch.testing.assert_close(embedded[..., i * d:(i + 1) * d], embedded[..., :d])
    assert model.decoder.final_layernorm.reduce is None  # HC reduces by summing the streams


def test_frac_splits_instead_of_replicating(single_process):
    model = _model("model.vwn.connection=frac", "model.vwn.m=4", "model.vwn.n=4")
    d = model.config.hidden_size
    tokens, positions = _batch()
    assert model.embedding(tokens, positions).shape[-1] == d  # D' = D: four fractions of D/4
    ghc = model.decoder.layers[0].attention_connection
    assert (ghc.m, ghc.n, ghc.d_b) == (4, 4, d // 4)
    for matrix in (ghc.static_read, ghc.static_carry, ghc.static_write):
        torch.testing.assert_close(matrix.detach(), torch.eye(4))
    state = torch.randn(3, 2, d)
    x, saved = ghc.read(state)
    torch.testing.assert_close(x, state)  # reads all fractions, i.e. the whole state
    z = torch.randn(3, 2, d)
    torch.testing.assert_close(ghc.write(z, saved), state + z)  # fraction j gets block j
    assert model.decoder.final_layernorm.reduce is None


# 5. Hand-computed GHC on a 2-token example ---------------------------------------------------

def test_ghc_matches_hand_computation():
    torch.manual_seed(0)
    m, n, d_b = 2, 3, 4
    init = GHCInit(read=torch.randn(n, m), carry=torch.randn(n, n), write=torch.randn(m, n),
                   tau=2.0)
    ghc = GHC(m, n, d_b, init, dynamic=True, eps=1e-6)
    with torch.no_grad():
        ghc.norm_weight.copy_(torch.rand(d_b) + 0.5)
        ghc.proj.copy_(torch.randn(d_b, 2 * m + n))
        ghc.scale_a.copy_(torch.randn(n, m + n))
        ghc.scale_b.copy_(torch.randn(n, m))
    hidden = torch.randn(2, 1, n * d_b)  # two tokens, [s, b, D']
    z = torch.randn(2, 1, m * d_b)
    x, saved = ghc.read(hidden)
    out = ghc.write(z, saved)

    A = torch.cat([init.read, init.carry], 1)
    for t in range(2):
        H = hidden[t, 0].reshape(n, d_b)
        Hn = H / torch.sqrt((H ** 2).mean(-1, keepdim=True) + 1e-6) * ghc.norm_weight
        C = torch.tanh(Hn @ ghc.proj / 2.0)
        A_t = ghc.scale_a * C[:, : m + n] + A  # row i from segment i
        B_t = (ghc.scale_b * C[:, m + n:]).T + init.write  # [m, n]
        X = A_t[:, :m].T @ H  # [m, d_b]
        Z = z[t, 0].reshape(m, d_b)
        H_new = B_t.T @ Z + A_t[:, m:].T @ H
        torch.testing.assert_close(x[t, 0], X.reshape(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[t, 0], H_new.reshape(-1), rtol=1e-5, atol=1e-6)


def _ghc_reference(ghc: GHC, hidden: torch.Tensor, z: torch.Tensor):
    """GHC straight from its equations (the member's reference module, the HF export's GHC) on
    ``ghc``'s own parameters, differentiated by autograd."""
    reference = GHCReference(ghc.m, ghc.n, ghc.d_b, dynamic=ghc.dynamic, tau=ghc.tau,
                             eps=ghc.eps)
    for name, param in ghc.named_parameters():
        setattr(reference, name, param)  # shared: gradients land on ghc's parameters
    return read_write(reference, hidden, z)


@pytest.mark.parametrize("case", ["vwn_2_3", "vwn_4_8", "hc_1_4", "random_3_5", "recompute"])
def test_ghc_backward_matches_autograd_of_the_equations(case):
    """The hand-written backward of the fused GHC against autograd of the equations, in
    float64: input, sublayer-output and every parameter gradient."""
    kind, m, n = (case.split("_") + ["2", "3"])[:3] if case != "recompute" else ("vwn", "2", "6")
    m, n, d_b = int(m), int(n), 8
    torch.manual_seed(0)
    init = {"vwn": vwn_init(m, n, d_b), "hc": hc_init(n, 1),
            "random": GHCInit(read=torch.randn(n, m), carry=torch.randn(n, n),
                              write=torch.randn(m, n), tau=1.5)}[kind]
    ghc = GHC(m, n, d_b, init, recompute_coefficients=case == "recompute", dtype=torch.float64)
    with torch.no_grad():
        for p in ghc.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    hidden = torch.randn(5, 2, n * d_b, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 2, m * d_b, dtype=torch.float64, requires_grad=True)
    grad_x, grad_out = torch.randn_like(z), torch.randn_like(hidden)

    assert_same_connection(_ghc_reference, ghc, hidden, z, grad_x, grad_out)


def test_ghc_gradients_stay_finite_for_a_zero_segment_and_in_bf16():
    m, n, d_b = 2, 4, 16
    ghc = GHC(m, n, d_b, vwn_init(m, n, d_b))
    with torch.no_grad():
        ghc.proj.normal_(0, 0.5)
    hidden = torch.randn(3, 1, n * d_b)
    hidden[1, 0, d_b:2 * d_b] = 0  # one segment of one token is exactly zero
    hidden.requires_grad_(True)
    x, saved = ghc.read(hidden)
    ghc.write(x * 2, saved).sum().backward()
    assert torch.isfinite(hidden.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ghc.parameters())

    half = GHC(m, n, d_b, vwn_init(m, n, d_b), dtype=torch.bfloat16)
    half.load_state_dict(ghc.state_dict())
    wide = hidden.detach().bfloat16().requires_grad_(True)
    x16, saved = half.read(wide)
    out16 = half.write(x16 * 2, saved)
    assert x16.dtype == out16.dtype == torch.bfloat16
    out16.float().sum().backward()
    assert wide.grad.dtype == torch.bfloat16 and half.proj.grad.dtype == torch.bfloat16
    x32, saved = ghc.read(hidden.detach())
    torch.testing.assert_close(out16.float(), ghc.write(x32 * 2, saved), rtol=3e-2, atol=3e-2)


def test_vwn_init_matrices():
    init = vwn_init(2, 6, 16)
    assert init.tau == 4.0
    torch.testing.assert_close(init.read, torch.cat([torch.eye(2), torch.zeros(4, 2)]))
    torch.testing.assert_close(init.carry, torch.eye(6))
    expected = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1]], dtype=torch.float)
    torch.testing.assert_close(init.write, expected)  # slot j receives block j mod m
    hc = hc_init(4, 6)
    assert hc.scalar_scales and hc.scale == 0.01 and hc.tau == 1.0
    torch.testing.assert_close(hc.write, torch.ones(1, 4))


# Accounting and structure ------------------------------------------------------------------

@pytest.mark.parametrize("vwn", [
    ["model.vwn.m=2", "model.vwn.n=3"],
    ["model.vwn.m=2", "model.vwn.n=4"],
    ["model.vwn.m=2", "model.vwn.n=4", "model.vwn.embedding=factorized",
     "model.tie_embeddings=true"],
    ["model.vwn.m=2", "model.vwn.n=4", "model.vwn.dynamic=false"],
    ["model.vwn.connection=hc", "model.vwn.n=4"],
    ["model.vwn.connection=frac", "model.vwn.m=4", "model.vwn.n=4"],
])
def test_param_counts_match_the_built_model(single_process, vwn):
    cfg = _cfg(*vwn)
    model = _model(*vwn)
    assert all(isinstance(layer, VWNTransformerLayer) for layer in model.decoder.layers)
    counts = count_params(cfg.model, VOCAB)
    assert counts.total == sum(p.numel() for p in model.parameters())
    table = model.embedding.word_embeddings.weight.numel()
    untied = 0 if cfg.model.tie_embeddings else model.output_layer.weight.numel()
    assert counts.embedding == table + untied


def test_no_weight_decay_tags(single_process):
    layer = _model("model.vwn.m=2", "model.vwn.n=4").decoder.layers[0]
    ghc = layer.attention_connection
    for name in ("static_read", "static_carry", "static_write", "scale_a", "scale_b",
                 "norm_weight"):
        assert getattr(getattr(ghc, name), "no_weight_decay", False), name
    assert not getattr(ghc.proj, "no_weight_decay", False)


def test_recompute_coefficients_gives_the_same_gradients(single_process):
    tokens, positions = _batch()
    grads = []
    for flag in ("false", "true"):
        model = _model("model.vwn.m=2", "model.vwn.n=4",
                       f"model.vwn.recompute_coefficients={flag}")
        torch.manual_seed(7)
        with torch.no_grad():  # make the dynamic path non-trivial
            for layer in model.decoder.layers:
                layer.attention_connection.proj.normal_(0, 0.5)
        model(tokens, positions, None, labels=tokens).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "ghc" in n})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
