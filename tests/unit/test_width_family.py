"""mHC and AltUp against their defining equations and initialisation properties
(docs/methods.md §2.1 and 3; docs/width_family.md)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vwn.config import load_config
from megatron_vwn.model.accounting import count_params
from megatron_vwn.model.width.altup import AltUp
from megatron_vwn.model.width.altup_reference import AltUpReference
from megatron_vwn.model.width.mhc import MHC
from megatron_vwn.model.width.mhc_reference import MHCReference, sinkhorn
from megatron_vwn.model.width.vwn import VWNTransformerLayer
from tests.unit.connection_check import assert_same_connection, read_write
from tests.unit.test_vwn import VOCAB, _batch, _cfg, _logits, _model

MHC4 = ["model.vwn.connection=mhc", "model.vwn.n=4"]
ALTUP2 = ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=false"]
RECYCLED2 = [*ALTUP2, "model.vwn.embedding=replicated"]


def _copy_layers(wide, base):
    """The backbone's weights into every parameter of ``wide`` with the same name and shape."""
    base_state = base.state_dict()
    with torch.no_grad():
        for name, param in wide.named_parameters():
            if name in base_state and base_state[name].shape == param.shape:
                param.copy_(base_state[name])


# mHC ----------------------------------------------------------------------------------------

def test_sinkhorn_is_doubly_stochastic():
    """20 iterations on logits of the size mHC sees near init (bias 0, dynamic part well
    under 1): rows and columns sum to 1 within 1e-6."""
    torch.manual_seed(0)
    logits = torch.randn(256, 4, 4, dtype=torch.float64) * 0.5
    out = sinkhorn(logits, 20)
    assert (out > 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(256, 4, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(out.sum(-2), torch.ones(256, 4, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    # Too few iterations are visibly not doubly stochastic: the test can fail.
    assert (sinkhorn(logits, 1).sum(-1) - 1).abs().max() > 1e-3


def _hand_sinkhorn(matrix: list[list[float]], iters: int) -> list[list[float]]:
    m = [[math.exp(v) for v in row] for row in matrix]
    for _ in range(iters):
        m = [[v / sum(row) for v in row] for row in m]
        cols = [sum(m[i][j] for i in range(len(m))) for j in range(len(m))]
        m = [[m[i][j] / cols[j] for j in range(len(m))] for i in range(len(m))]
    return m


def test_mhc_layer_update_matches_hand_computation():
    """Two tokens, n = 2 streams of width D = 3, every parameter set by hand; the update
    ``x' = H_res x + H_post^T F(H_pre x)`` computed with Python floats."""
    n, d = 2, 3
    mhc = MHC(n, d, sinkhorn_iters=5, identity_bias=1.0, dtype=torch.float64)
    torch.manual_seed(1)
    with torch.no_grad():
        mhc.proj.normal_(0.0, 0.5)
        mhc.norm_weight.copy_(torch.linspace(0.5, 1.5, n * d))
        mhc.gate.copy_(torch.tensor([0.3, -0.2, 0.7]))
        mhc.bias.copy_(torch.tensor([0.1, -0.4, 0.2, 0.0, 1.0, -0.5, 0.3, 0.8]))
    hidden = torch.randn(2, 1, n * d, dtype=torch.float64)  # [s=2, b=1, n*D]

    def sublayer(x):  # any function of the D-wide input
        return torch.tanh(x) * 2 + 1

    x, saved = mhc.read(hidden)
    out = mhc.write(sublayer(x), saved)

    proj, g, a, bias = (mhc.proj.tolist(), mhc.norm_weight.tolist(), mhc.gate.tolist(),
                        mhc.bias.tolist())
    for t in range(2):
        flat = hidden[t, 0].tolist()
        rms = math.sqrt(sum(v * v for v in flat) / len(flat) + mhc.eps)
        normed = [flat[k] / rms * g[k] for k in range(n * d)]
        logit = [sum(normed[k] * proj[k][c] for k in range(n * d)) for c in range(2 * n + n * n)]
        pre = [1 / (1 + math.exp(-(a[0] * logit[i] + bias[i]))) for i in range(n)]
        res = _hand_sinkhorn([[a[2] * logit[2 * n + i * n + j] + bias[2 * n + i * n + j]
                               for j in range(n)] for i in range(n)], 5)
        post = [2 / (1 + math.exp(-(a[1] * logit[n + i] + bias[n + i]))) for i in range(n)]
        streams = [flat[i * d:(i + 1) * d] for i in range(n)]
        x_in = [sum(pre[j] * streams[j][k] for j in range(n)) for k in range(d)]
        f = [math.tanh(v) * 2 + 1 for v in x_in]
        expected = [sum(res[i][j] * streams[j][k] for j in range(n)) + post[i] * f[k]
                    for i in range(n) for k in range(d)]
        torch.testing.assert_close(out[t, 0], torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)


def test_mhc_static_mappings_come_from_the_biases():
    mhc = MHC(3, 4, dynamic=False, identity_bias=2.0)
    assert {name for name, _ in mhc.named_parameters()} == {"bias"}
    pre, post, res = mhc.mappings(torch.randn(5, 3, 4))
    torch.testing.assert_close(pre, torch.full((5, 3), 1 / 3))
    torch.testing.assert_close(post, torch.ones(5, 3))
    torch.testing.assert_close(res.sum(-1), torch.ones(5, 3))
    assert (res.diagonal(dim1=-2, dim2=-1) > 0.7).all()  # near the identity (bias 2 vs 0)


def _mhc_vs_backbone(*overrides):
    base = _model()
    wide = _model(*MHC4, *overrides)
    _copy_layers(wide, base)
    tokens, positions = _batch()
    return _logits(base, tokens, positions), _logits(wide, tokens, positions), wide


def test_mhc_with_zero_gates_is_the_backbone(single_process):
    """Equal streams and alpha = 0: H_pre = 1/n, H_res doubly stochastic and H_post = 1, so
    every stream is the backbone's residual stream (any identity_bias)."""
    for bias in ("0", "3"):
        base, wide, model = _mhc_vs_backbone("model.vwn.mhc.gate_init=0",
                                             f"model.vwn.mhc.identity_bias={bias}")
        assert all(isinstance(layer, VWNTransformerLayer) for layer in model.decoder.layers)
        torch.testing.assert_close(wide, base, rtol=1e-5, atol=1e-5)


def test_mhc_at_init_stays_close_to_the_backbone(single_process):
    """The bound this repository promises: at init (alpha = 0.01, phi ~ N(0, 0.02)) the logits
    differ from the backbone's by less than 1% of their largest magnitude."""
    base, wide, _ = _mhc_vs_backbone()
    gap = (wide - base).abs().max()
    assert gap < 1e-2 * base.abs().max()
    assert gap > 0  # the dynamic part is live at init


def test_mhc_recompute_gives_the_same_gradients(single_process):
    tokens, positions = _batch()
    grads = []
    for flag in ("false", "true"):
        model = _model(*MHC4, f"model.vwn.recompute_coefficients={flag}")
        model(tokens, positions, None, labels=tokens).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    assert grads[0]["decoder.layers.0.attention_connection.gate"].abs().sum() > 0


# AltUp --------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks,active", [(2, 1), (3, 2), (3, 0)])
def test_altup_predict_compute_correct_matches_hand_computation(blocks, active):
    d = 2
    altup = AltUp(blocks, d, active, dtype=torch.float64)
    torch.manual_seed(blocks + active)
    with torch.no_grad():
        altup.predict_delta.normal_(0.0, 0.3)
        altup.correct_delta.normal_(0.0, 0.3)
    hidden = torch.randn(2, 1, blocks * d, dtype=torch.float64)  # two tokens

    def layer(x):
        return x + torch.sin(x)  # any layer, residual included

    x, saved = altup.read(hidden)
    out = altup.write(layer(x), saved)

    p = (torch.eye(blocks, dtype=torch.float64) + altup.predict_delta).tolist()
    g = (1 + altup.correct_delta).tolist()
    for t in range(2):
        xs = [hidden[t, 0, j * d:(j + 1) * d].tolist() for j in range(blocks)]
        pred = [[sum(p[i][j] * xs[j][k] for j in range(blocks)) for k in range(d)]
                for i in range(blocks)]
        computed = [v + math.sin(v) for v in xs[active]]  # x~ = L(x_{j*}): the actual block
        expected = [pred[i][k] + g[i] * (computed[k] - pred[active][k])
                    for i in range(blocks) for k in range(d)]
        torch.testing.assert_close(out[t, 0], torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)


def test_altup_at_init_passes_inactive_blocks_and_updates_the_active_one():
    altup = AltUp(3, 4, active=1)
    hidden = torch.randn(5, 2, 12)
    x, saved = altup.read(hidden)
    torch.testing.assert_close(x, hidden[..., 4:8])
    y = torch.randn(5, 2, 4)
    out = altup.write(y, saved).reshape(5, 2, 3, 4)
    # y_i = x_i + (y - x_{j*}): every block receives the active block's innovation.
    torch.testing.assert_close(out, hidden.reshape(5, 2, 3, 4) + (y - x).unsqueeze(2))


@pytest.mark.parametrize("overrides", [
    RECYCLED2,
    [*RECYCLED2, "model.vwn.altup.reduce=mean"],
    [*RECYCLED2, "model.vwn.altup.reduce=active"],
    [*RECYCLED2, "model.vwn.altup.selection=same", "model.vwn.n=3"],
], ids=["sum", "mean", "active", "same_k3"])
def test_recycled_altup_at_init_gives_the_backbone_logits(single_process, overrides):
    # sum hands K x the backbone's final state to the final RMSNorm, which normalises it away
    # up to its epsilon (large against the tiny init-time residual stream): make it negligible.
    eps = "model.norm_epsilon=1e-12"
    base = _model(eps)
    wide = _model(*overrides, eps)
    _copy_layers(wide, base)  # the replicated D table has the backbone's name and shape
    tokens, positions = _batch()
    torch.testing.assert_close(_logits(wide, tokens, positions), _logits(base, tokens, positions),
                               rtol=1e-5, atol=1e-5)


def test_altup_wide_table_with_equal_blocks_gives_the_backbone_logits(single_process):
    base = _model()
    wide = _model(*ALTUP2, "model.vwn.altup.reduce=mean")
    _copy_layers(wide, base)
    d = base.config.hidden_size
    with torch.no_grad():
        table = wide.embedding.word_embeddings.weight  # [V, 2D]
        assert table.shape[-1] == 2 * d
        table.copy_(base.embedding.word_embeddings.weight.repeat(1, 2))
    tokens, positions = _batch()
    torch.testing.assert_close(_logits(wide, tokens, positions), _logits(base, tokens, positions),
                               rtol=1e-5, atol=1e-5)
    # Distinct blocks (the wide table's own init) give a different model.
    fresh = _model(*ALTUP2, "model.vwn.altup.reduce=mean")
    _copy_layers(fresh, base)
    gap = (_logits(fresh, tokens, positions) - _logits(base, tokens, positions)).abs().max()
    assert gap > 1e-3


def test_altup_alternates_the_computed_block(single_process):
    model = _model(*ALTUP2)
    assert [layer.layer_connection.active for layer in model.decoder.layers] == [0, 1, 0]
    same = _model(*ALTUP2, "model.vwn.altup.selection=same")
    assert [layer.layer_connection.active for layer in same.decoder.layers] == [0, 0, 0]


# Accounting, decay tags -----------------------------------------------------------------------

@pytest.mark.parametrize("vwn", [
    MHC4, [*MHC4, "model.vwn.dynamic=false"], [*MHC4, "model.tie_embeddings=true"],
    ALTUP2, RECYCLED2, [*RECYCLED2, "model.tie_embeddings=true"],
], ids=["mhc4", "mhc4_static", "mhc4_tied", "altup2", "recycled2", "recycled2_tied"])
def test_param_counts_match_the_built_model(single_process, vwn):
    cfg = _cfg(*vwn)
    model = _model(*vwn)
    counts = count_params(cfg.model, VOCAB)
    assert counts.total == sum(p.numel() for p in model.parameters())
    table = model.embedding.word_embeddings.weight.numel()
    untied = 0 if cfg.model.tie_embeddings else model.output_layer.weight.numel()
    assert counts.embedding == table + untied


def test_recycled_altup_adds_k_squared_plus_k_parameters_per_layer(single_process):
    base = sum(p.numel() for p in _model().parameters())
    recycled = sum(p.numel() for p in _model(*RECYCLED2).parameters())
    assert recycled - base == 3 * (2 * 2 + 2)


def test_new_members_decay_tags(single_process):
    mhc = _model(*MHC4).decoder.layers[0].attention_connection
    for name in ("bias", "gate", "norm_weight"):
        assert getattr(getattr(mhc, name), "no_weight_decay", False), name
    assert not getattr(mhc.proj, "no_weight_decay", False)
    altup = _model(*ALTUP2).decoder.layers[0].layer_connection
    assert altup.predict_delta.no_weight_decay and altup.correct_delta.no_weight_decay


def test_shapes_and_embeddings_of_the_new_members(single_process):
    tokens, positions = _batch()
    d = load_config(None, ["model.hidden_size=32"]).model.hidden_size
    recycled = _model(*RECYCLED2)
    emb = recycled.embedding(tokens, positions)
    assert emb.shape[-1] == 2 * d
    torch.testing.assert_close(emb[..., d:], emb[..., :d])
    assert recycled.embedding.word_embeddings.weight.shape[-1] == d
    mhc = _model(*MHC4)
    assert mhc.embedding.word_embeddings.weight.shape[-1] == d
    assert mhc.decoder.final_layernorm.reduce is None


@pytest.mark.parametrize("name", [f"{group}/{size}_{variant}" for size in
                                  ("tiny", "gpt_350m", "gpt_1p3b")
                                  for group, variant in (("mhc", "mhc4"), ("altup", "altup2"),
                                                         ("altup", "altup4"),
                                                         ("altup", "recycled2"),
                                                         ("altup", "altup4_dynamic"))])
def test_shipped_family_configs_are_valid(name):
    from megatron_vwn.config import validate

    cfg = load_config(name)
    validate(cfg, cfg.parallel.tensor * cfg.parallel.pipeline)
    assert cfg.model.vwn.enabled and cfg.model.vwn.connection in ("mhc", "altup")
    assert count_params(cfg.model, 32000).other > 0


# Gemma 3n's dynamic AltUp -----------------------------------------------------------------------

DYNAMIC2 = ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=true"]


@pytest.mark.parametrize("blocks,active", [(2, 0), (3, 1)])
def test_dynamic_altup_matches_hand_computation(blocks, active):
    d = 4
    altup = AltUp(blocks, d, active, dynamic=True, dtype=torch.float64).eval()
    torch.manual_seed(blocks)
    with torch.no_grad():
        altup.router.normal_(0.0, 3.0)
        altup.router_norm.uniform_(0.5, 1.5)
        altup.predict_coefs.normal_(0.0, 0.5)
        altup.correct_coefs.normal_(0.0, 0.5)
    hidden = torch.randn(2, 1, blocks * d, dtype=torch.float64)

    def layer(x):
        return x + torch.sin(x)

    x, saved = altup.read(hidden)
    out = altup.write(layer(x), saved)

    w_r, g_r = altup.router.tolist(), altup.router_norm.tolist()
    big_c, small_c = altup.predict_coefs.tolist(), altup.correct_coefs.tolist()

    def route(v):
        rms = math.sqrt(sum(u * u for u in v) / d + altup.eps)
        normed = [v[k] / rms * g_r[k] / d for k in range(d)]
        return [math.tanh(sum(w_r[i][k] * normed[k] for k in range(d))) for i in range(blocks)]

    for t in range(2):
        xs = [hidden[t, 0, j * d:(j + 1) * d].tolist() for j in range(blocks)]
        r = route(xs[active])
        coef = [sum(big_c[q][c] * r[c] for c in range(blocks)) for q in range(blocks * blocks)]
        pred = [[xs[i][k] + sum(coef[i * blocks + j] * xs[j][k] for j in range(blocks))
                 for k in range(d)] for i in range(blocks)]
        computed = [v + math.sin(v) for v in pred[active]]  # the layer runs on x^_{j*}
        r2 = route(computed)
        gain = [1 + sum(small_c[i][c] * r2[c] for c in range(blocks)) for i in range(blocks)]
        expected = [pred[i][k] + gain[i] * (computed[k] - pred[active][k])
                    for i in range(blocks) for k in range(d)]
        torch.testing.assert_close(out[t, 0], torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)


def test_dynamic_altup_clips_its_coefficients_in_training_only():
    altup = AltUp(2, 4, 0, dynamic=True, dtype=torch.float64)
    hidden = torch.randn(3, 1, 8, dtype=torch.float64)
    clipped = AltUp(2, 4, 0, dynamic=True, dtype=torch.float64)
    with torch.no_grad():
        altup.router.copy_(clipped.router)
        altup.predict_coefs.fill_(500.0)
        clipped.predict_coefs.fill_(120.0)
    train_out = altup.train().read(hidden)[1]
    torch.testing.assert_close(train_out, clipped.read(hidden)[1])
    assert not torch.allclose(altup.eval().read(hidden)[1], train_out)


def test_dynamic_altup_block_zero_follows_the_backbone_at_init(single_process):
    """Gemma's layout (selection=same, block 0 computed by every layer) at init: C = c = 0, so
    block 0 is the backbone's residual stream whatever the projected streams hold; reading it
    out (reduce=active) gives the backbone's logits. Streams 1..K-1 start as RMS-matched
    projections of the embedding."""
    base = _model()
    wide = _model(*DYNAMIC2, "model.vwn.altup.selection=same", "model.vwn.altup.reduce=active")
    _copy_layers(wide, base)
    tokens, positions = _batch()
    torch.testing.assert_close(_logits(wide, tokens, positions), _logits(base, tokens, positions),
                               rtol=1e-5, atol=1e-5)
    streams = wide.embedding(tokens, positions).reshape(8, 2, 2, -1)
    rms = streams.square().mean(-1).sqrt()
    torch.testing.assert_close(rms[..., 1], rms[..., 0], rtol=1e-5, atol=0)
    assert (streams[..., 1, :] - streams[..., 0, :]).abs().max() > 1e-3


@pytest.mark.parametrize("vwn", [DYNAMIC2, [*DYNAMIC2, "model.vwn.n=3"]], ids=["k2", "k3"])
def test_dynamic_altup_param_counts_match_the_built_model(single_process, vwn):
    cfg = _cfg(*vwn)
    model = _model(*vwn)
    assert count_params(cfg.model, VOCAB).total == sum(p.numel() for p in model.parameters())
    assert model.decoder.final_layernorm.altup_unembed_projections.shape[0] == cfg.model.vwn.n - 1


def test_embedding_auto_resolves_per_member_and_old_spellings_keep_their_meaning():
    from megatron_vwn.config.schema import VwnConfig

    assert VwnConfig(m=2, n=4).resolved_embedding == "wide"  # ghc: auto is the old default
    assert VwnConfig(m=2, n=4, embedding="wide").resolved_embedding == "wide"
    assert VwnConfig(m=2, n=2).resolved_embedding == "none"
    # HC replicated its embedding whatever the key said; old resolved configs say "wide".
    assert VwnConfig(connection="hc", n=4, embedding="wide").resolved_embedding == "replicated"
    assert VwnConfig(connection="mhc", n=4).resolved_embedding == "replicated"
    assert VwnConfig(connection="altup", n=2, dynamic=False).resolved_embedding == "wide"
    assert VwnConfig(connection="altup", n=2, dynamic=True).resolved_embedding == "projected"


@pytest.mark.parametrize("member", [
    ["model.vwn.m=2", "model.vwn.n=4"],
    ["model.vwn.connection=mhc", "model.vwn.n=4"],
    ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=true"],  # the router's norm
])
def test_norm_epsilon_reaches_every_connection(member):
    """``model.vwn.norm_epsilon`` (default 1e-6, the value that was hard-coded) is the epsilon
    of each member's own norm; a non-positive one is refused naming the key."""
    from megatron_vwn.config import ConfigError, load_config
    from megatron_vwn.model.width.shape import VWNShape

    for overrides, eps in (([], 1e-6), (["model.vwn.norm_epsilon=1e-5"], 1e-5)):
        cfg = load_config(None, [*member, *overrides])
        shape = VWNShape.from_config(cfg.model.vwn, cfg.model.hidden_size)
        module = shape.make_connection(0, torch.float32)
        assert module.eps == eps
    with pytest.raises(ConfigError, match="model.vwn.norm_epsilon"):
        load_config(None, [*member, "model.vwn.norm_epsilon=0"]).model.vwn.validate(128)


# The training modules against the members' reference modules (the HF export's equations) ----

def _reference_of(module):
    """The member's reference module (``*_reference.py``) on ``module``'s own parameters."""
    if isinstance(module, MHC):
        reference = MHCReference(module.n, module.hidden, dynamic=module.dynamic,
                                 sinkhorn_iters=module.sinkhorn_iters, eps=module.eps)
    else:
        reference = AltUpReference(module.blocks, module.hidden, module.active,
                                   dynamic=module.dynamic, eps=module.eps)
    for name, param in module.named_parameters():
        setattr(reference, name, param)  # shared: gradients land on the module's parameters
    return reference


@pytest.mark.parametrize("case", ["mhc", "mhc_static", "altup", "altup_dynamic"])
def test_training_module_matches_the_reference_module(case):
    """Forward and every gradient in float64 (both compute in float64 there, so only the
    operation order differs): the training module is the reference's equations."""
    torch.manual_seed(0)
    n, d = 3, 4
    if case.startswith("mhc"):
        module = MHC(n, d, dynamic=case == "mhc", identity_bias=0.5, dtype=torch.float64)
    else:
        module = AltUp(n, d, active=1, dynamic=case == "altup_dynamic", dtype=torch.float64)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    hidden = torch.randn(5, 2, n * d, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 2, d, dtype=torch.float64, requires_grad=True)
    grad_x, grad_out = torch.randn(5, 2, d, dtype=torch.float64), torch.randn_like(hidden)
    assert_same_connection(lambda m, h, x: read_write(_reference_of(m), h, x), module, hidden,
                           z, grad_x, grad_out)
