"""Mixture-of-experts backbones (docs/moe.md): refusals, the built model against the accounting,
every width member around Megatron-Core's MoE layer, MTP heads on MoE, and the routing metrics
against a hand computation."""

from __future__ import annotations

import pytest
import torch

from megatron_vwn.config import load_config, validate
from megatron_vwn.model.accounting import count_params, flops_per_token, layer_params
from tests.unit.test_config import _cli_error
from tests.unit.test_vwn import VOCAB, _batch, _cfg

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=32"]

REFUSALS = [
    (["model.moe.top_k=4"], "model.moe.top_k (4) set while model.moe.num_experts=0 (dense MLPs)"),
    (["model.moe.num_experts=4", "model.moe.top_k=5"],
     "model.moe.top_k (5) must be <= model.moe.num_experts (4)"),
    (["model.moe.num_experts=6", "parallel.expert=4"],
     "parallel.expert (4) must divide model.moe.num_experts (6)"),
    (["parallel.expert=2"], "parallel.expert (2) needs model.moe.num_experts > 0"),
    (["model.moe.num_experts=4", "model.moe.expert_bias=true"],
     "model.moe.expert_bias=true needs model.moe.router_score=sigmoid (got softmax)"),
    (["model.moe.num_experts=4", "model.moe.dense_layers=4"],
     "model.moe.dense_layers (4) must be < model.num_layers (4)"),
    (["model.moe.num_experts=4", "model.moe.top_k=1"],
     "model.moe.top_k=1 with model.moe.router_score=softmax"),
    (["model.moe.num_experts=4", "parallel.tensor=2"],
     "model.moe.num_experts > 0 with parallel.tensor > 1 needs parallel.sequence_parallel=true"),
    (["model.moe.num_experts=4", "model.moe.ffn_hidden_size=33", "parallel.tensor=2",
      "parallel.sequence_parallel=true"],
     "parallel.expert_tensor (2; defaults to parallel.tensor) must divide the expert width"),
    (["model.moe.num_experts=4", "model.moe.router_score=top"],
     "model.moe.router_score ('top') must be one of ['softmax', 'sigmoid']"),
    (["model.moe.num_experts=4", "model.moe.capacity_factor=0"],
     "model.moe.capacity_factor (0.0) must be > 0"),
]


@pytest.mark.parametrize("overrides,message", REFUSALS)
def test_bad_moe_config_is_one_line_naming_the_key(capsys, overrides, message):
    err = _cli_error(capsys, "train", *overrides, "--nproc", "1")
    assert message in err


def test_world_must_fit_the_expert_layout(capsys):
    """Expert-TP (default TP) x EP x PP divides the world: EP=2 with TP=2 needs 4 ranks unless
    parallel.expert_tensor=1 (Megatron-Core 0.16.1's rule)."""
    layout = ["model.moe.num_experts=4", "parallel.expert=2", "parallel.tensor=2",
              "parallel.sequence_parallel=true", "train.global_batch_size=16"]
    err = _cli_error(capsys, "train", *layout, "--nproc", "2")
    assert ("the number of processes (2) must be a multiple of parallel.expert_tensor x "
            "parallel.expert x parallel.pipeline (2 x 2 x 1 = 4;") in err
    validate(load_config(None, [*layout, "parallel.expert_tensor=1"]), 2)
    validate(load_config(None, layout), 4)


@pytest.mark.parametrize("name", ["moe/tiny", "moe/tiny_deepseek", "moe/tiny_2x", "moe/tiny_8x",
                                  "moe/tiny_mhc4"])
def test_shipped_moe_configs_are_valid(name):
    cfg = load_config(name)
    validate(cfg, 1)
    counts = count_params(cfg.model, 4096)
    assert cfg.model.moe.num_experts == 8 and 0 < counts.active < counts.total


@pytest.mark.parametrize("name", ["moe/gpt_a0p8b", "moe/gpt_a0p8b_2x", "moe/gpt_a0p8b_8x",
                                  "moe/gpt_a0p8b_8x_mtp1", "moe/gpt_a0p8b_mhc4"])
def test_gpu_recipes_are_the_papers_smallest_moe_and_fit_8_to_64_gpus(name):
    cfg = load_config(name)
    for world in (8, 16, 64):
        validate(cfg, world)
    base = count_params(load_config("moe/gpt_a0p8b").model, 32000)
    assert 0.75e9 < base.active < 0.85e9 and base.total > 4e9  # MoE-A0.8B
    counts = count_params(cfg.model, 32000)  # the width members add around the same backbone
    assert counts.backbone - counts.inactive == base.backbone - base.inactive
    assert cfg.parallel.expert == 8 and cfg.parallel.etp == 1


def test_moe_width_sweep_dry_run(tmp_path, capsys, monkeypatch):
    """``slurm sweep moe/... --widths 1,2,4,8 --dry-run``: one sbatch line per width, the MoE
    keys held equal, nothing written."""
    from megatron_vwn.cli import main
    from megatron_vwn.launch.sweep import SweepSpec, plan_sweep

    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "sweep", "moe/gpt_a0p8b", "--widths", "1,2,4,8", "--nodes", "1",
                 "--nproc-per-node", "8", "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "sbatch" in line]
    assert [line.split("model.vwn.n=")[1].split()[0] for line in lines] == ["1", "16", "32", "64"]
    assert not any(tmp_path.iterdir()), "a dry run must not write anything"
    runs = plan_sweep(SweepSpec(config="moe/tiny", widths=[1, 8]), world_size=2)
    assert all("moe/tiny" == run.train_args[0] for run in runs)


def _build(*overrides):
    from megatron_vwn.model.builder import build_model

    (model,) = build_model(_cfg(*overrides), VOCAB)
    return model


def _moe_layers(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers]


def test_counts_match_built_moe_model(single_process):
    """Total and active parameters from the config equal the built model's (first layer dense,
    a shared expert); the FLOPs count the router, top-k experts and shared expert per token."""
    overrides = [*MOE, "model.moe.shared_expert_ffn_hidden_size=48", "model.moe.dense_layers=1"]
    model = _build(*overrides)
    assert _moe_layers(model) == [False, True, True]
    cfg = _cfg(*overrides).model
    counts = count_params(cfg, VOCAB)
    assert counts.total == sum(p.numel() for p in model.parameters())
    d, experts, width, shared = 32, 4, 32, 48
    expert = 3 * d * width
    assert counts.inactive == 2 * (experts - 2) * expert
    dense = layer_params(cfg)
    moe_active = dense - 3 * d * 64 + experts * d + 2 * expert + 3 * d * shared
    assert layer_params(cfg, moe_layer=True, active=True) == moe_active
    forward = 2 * ((dense - 2 * d) + 2 * (moe_active - 2 * d) + VOCAB * d) + 3 * 4 * 8 * d
    assert flops_per_token(cfg, VOCAB) == 3 * forward


WIDTH_MEMBERS = {
    "ghc_2x": ["model.vwn.m=2", "model.vwn.n=4"],
    "ghc_1p5x": ["model.vwn.m=2", "model.vwn.n=3"],
    "hc2": ["model.vwn.connection=hc", "model.vwn.n=2"],
    "frac2": ["model.vwn.connection=frac", "model.vwn.m=2", "model.vwn.n=2"],
    "mhc4": ["model.vwn.connection=mhc", "model.vwn.n=4"],
    "altup2": ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=false"],
    "altup2_dynamic": ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=true"],
}


@pytest.mark.parametrize("member", list(WIDTH_MEMBERS))
def test_width_members_wrap_the_moe_sublayer_and_train(single_process, member):
    """Each member's layer holds Megatron-Core's MoE layer as its MLP (sublayer members: the
    residual add removed, their connection writes it), the parameter count matches the
    accounting, and one step lowers the loss."""
    from megatron_vwn.model.width.vwn import VWNTransformerLayer

    overrides = [*MOE, *WIDTH_MEMBERS[member]]
    model = _build(*overrides)
    assert all(_moe_layers(model))
    assert all(isinstance(layer, VWNTransformerLayer) for layer in model.decoder.layers)
    assert count_params(_cfg(*overrides).model, VOCAB).total == sum(
        p.numel() for p in model.parameters())
    tokens, positions = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model(tokens, positions, None, labels=tokens).mean()
    before.backward()
    optimizer.step()
    after = model(tokens, positions, None, labels=tokens).mean()
    assert torch.isfinite(before) and after < before


@pytest.mark.parametrize("vwn", [[], ["model.vwn.m=2", "model.vwn.n=8"]], ids=["backbone", "8x"])
def test_mtp_layer_on_an_moe_backbone_is_moe(single_process, vwn):
    """Megatron-Core builds an MTP layer from the decoder's layer spec: on an MoE backbone its
    transformer layer is an MoE layer too (as DeepSeek-V3's MTP module)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_vwn.compat.mcore import MTP_INNER_LAYER
    from megatron_vwn.training.moe_metrics import MoEMonitor

    overrides = [*MOE, *vwn, "model.mtp.num_layers=1"]
    model = _build(*overrides)
    monitor = MoEMonitor([model], _cfg(*overrides).model, microbatches_per_step=1)
    inner = getattr(model.mtp.layers[0], MTP_INNER_LAYER)
    assert isinstance(inner.mlp, MoELayer)
    assert [row for row, _ in monitor.routers] == [0, 1, 2, 3]  # MTP: after the 3 decoders
    tokens, positions = _batch()
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    assert inner.mlp.router.weight.grad is not None
    row = monitor.collect(steps=1)
    assert len(row["moe_load_imbalance_per_layer"]) == 4 and row["moe_aux_loss"] > 0.5


def test_routing_metrics_match_a_hand_computation(single_process):
    """``moe_aux_loss`` (Switch: ``E / (k T^2) sum_i P_i f_i``), ``moe_z_loss`` (mean of
    ``logsumexp(logits)^2``) and ``moe_load_imbalance`` recomputed from each router's input and
    weight; with a capacity of 1 some routed pairs are dropped and counted."""
    from megatron_vwn.training.moe_metrics import MoEMonitor

    overrides = [*MOE, "model.moe.z_loss_coeff=1e-3", "model.moe.capacity_factor=1.0"]
    model = _build(*overrides)
    monitor = MoEMonitor([model], _cfg(*overrides).model, microbatches_per_step=1)
    inputs = []
    for _, router in monitor.routers:
        router.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0])))
    tokens, positions = _batch(b=4)
    model(tokens, positions, None, labels=tokens).sum().backward()
    row = monitor.collect(steps=1)

    aux, z, imbalance, kept = [], [], [], 0
    for router, x in inputs:
        logits = x.detach().reshape(-1, x.shape[-1]).double() @ router.weight.detach().double().T
        tokens_n, experts = logits.shape
        scores = logits.softmax(-1)
        chosen = torch.zeros_like(scores).scatter(1, logits.topk(2).indices, 1.0)
        per_expert = chosen.sum(0)
        aux.append(experts / (2 * tokens_n ** 2) * (scores.sum(0) * per_expert).sum())
        z.append((logits.logsumexp(-1) ** 2).mean())
        capacity = int(torch.ceil(torch.tensor(tokens_n * 2 / experts * 1.0)))
        kept += per_expert.clamp(max=capacity).sum().item()
        imbalance.append(per_expert.clamp(max=capacity).max() / per_expert.clamp(
            max=capacity).mean())
    assert row["moe_aux_loss"] == pytest.approx(torch.stack(aux).mean().item(), rel=1e-5)
    assert row["moe_z_loss"] == pytest.approx(torch.stack(z).mean().item(), rel=1e-5)
    assert row["moe_load_imbalance_per_layer"] == pytest.approx(
        [v.item() for v in imbalance], rel=1e-5)
    assert row["moe_load_imbalance"] == pytest.approx(max(v.item() for v in imbalance))
    assert row["moe_dropped_fraction"] == pytest.approx(1 - kept / (3 * 32 * 2))
    assert row["moe_dropped_fraction"] > 0
    assert monitor.collect(steps=1) == {}  # the window starts again


def test_expert_bias_moves_and_is_reported(single_process):
    """DeepSeek-V3's aux-loss-free bias: Megatron-Core's ``finalize_model_grads`` moves each
    expert's bias by the update rate against its load; the metric is the mean ``|b|``."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from megatron_vwn.training.moe_metrics import MoEMonitor

    overrides = [*MOE, "model.moe.router_score=sigmoid", "model.moe.expert_bias=true",
                 "model.moe.expert_bias_update_rate=0.01", "model.moe.aux_loss=none"]
    model = _build(*overrides)
    monitor = MoEMonitor([model], _cfg(*overrides).model, microbatches_per_step=1)
    tokens, positions = _batch(b=4)
    model(tokens, positions, None, labels=tokens).sum().backward()
    _update_router_expert_bias([model], model.config)
    row = monitor.collect(steps=1)
    assert row["moe_aux_loss"] == 0.0
    biases = torch.stack([router.expert_bias for _, router in monitor.routers])
    assert torch.isin(biases.abs(), torch.tensor([0.0, 0.01])).all()  # +-rate, or 0 if at mean
    assert (biases != 0).any()
    assert row["moe_expert_bias_abs"] == pytest.approx(biases.abs().mean().item())
