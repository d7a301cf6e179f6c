"""Mixture-of-experts layouts must reproduce the single-process run (docs/moe.md).

The same seed, data and config at EP=2, EP=2 with TP=2+SP (expert-TP 1 on two ranks; expert-TP 2
on four), EP=2 with PP=2, and DP=2 with the distributed optimizer give the first iterations'
losses (MTP depths included) within 1e-5 relative, the same gradients after one step, the same
load-balancing and z-losses, the same per-layer expert loads and bit-identical expert biases.
The plain MoE backbone, a DeepSeek-style one (first layer dense, shared expert, sigmoid router,
aux-loss-free expert bias, sequence aux loss), MoE + VWN 8x + MTP, and mHC and AltUp over MoE
each meet several layouts, so every parallel dimension meets MoE and every width member meets
it once at least.

Top-k routing is discontinuous: the routers compute in fp64 (``model.moe.router_dtype``) and
the reference run asserts that no token's k-th and (k+1)-th selection scores were closer than
:data:`MARGIN`, so reduction-order noise of another layout cannot flip an expert choice.

Configurations run batched, one launch per world size (``moe_parity_worker.py``): rank start-up,
not the steps, is what costs on 2 cores.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.launcher import run_ranks, selected_params

WORKER = "tests/distributed/moe_parity_worker.py"

# Two layers (PP=2 puts one on each stage), sequences of 16: few routing decisions, so a margin
# far above fp32 noise holds for all of them.
BASE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.seq_length=16",
    "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=5e-3",
    "logging.wandb=off", "logging.interval=1", "data.split=90,10,0", "train.iters=3",
    "train.warmup_iters=0", "train.clip_grad=1e9", "train.eval_interval=0",
]
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=64",
       "model.moe.router_dtype=fp64", "model.moe.aux_loss_coeff=1e-2",
       "model.moe.z_loss_coeff=1e-3"]
MODELS = {
    "moe": MOE,
    "deepseek": [*MOE, "model.moe.dense_layers=1", "model.moe.shared_expert_ffn_hidden_size=64",
                 "model.moe.router_score=sigmoid", "model.moe.expert_bias=true",
                 "model.moe.expert_bias_update_rate=1e-2", "model.moe.aux_loss=seq_aux_loss"],
    "vwn8x_mtp": [*MOE, "model.vwn.m=8", "model.vwn.n=64", "model.mtp.num_layers=1",
                  "model.mtp.loss_weight=0.3"],
    "mhc4": [*MOE, "model.vwn.connection=mhc", "model.vwn.n=4"],
    "altup2": [*MOE, "model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=false"],
}
LAYOUTS = {
    "ep2": (2, ["parallel.expert=2"]),
    "ep2_tp2_sp": (2, ["parallel.expert=2", "parallel.tensor=2", "parallel.sequence_parallel=true",
                       "parallel.expert_tensor=1"]),
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true"]),
    "ep2_pp2": (4, ["parallel.expert=2", "parallel.pipeline=2"]),
    "ep2_tp2_sp_etp2": (4, ["parallel.expert=2", "parallel.tensor=2",
                            "parallel.sequence_parallel=true"]),
}
CASES = [
    ("moe", "ep2"), ("moe", "ep2_tp2_sp"), ("moe", "dp2_distopt"), ("moe", "ep2_pp2"),
    ("moe", "ep2_tp2_sp_etp2"),
    ("deepseek", "ep2"), ("deepseek", "ep2_tp2_sp"), ("deepseek", "ep2_pp2"),
    ("vwn8x_mtp", "ep2"), ("vwn8x_mtp", "ep2_tp2_sp"), ("vwn8x_mtp", "dp2_distopt"),
    ("vwn8x_mtp", "ep2_pp2"),
    ("mhc4", "ep2_tp2_sp"), ("altup2", "ep2_pp2"),
]
# The distributed optimizer leaves each rank only its shard of the reduced gradients.
SHARDED_GRADS = {"dp2_distopt"}
MARGIN = 1e-6
"""Smallest allowed gap between a token's k-th and (k+1)-th selection score in the reference.
Router inputs are RMS-normalised (entries O(1), D = 64) and router weights O(0.02): a logit is a
sum of 64 products of size ~0.02, and a different reduction order upstream moves it by a few
fp32 ulps of the hidden state times the weight norm, ~1e-8 here; 1e-6 is 100x that."""
# As in test_parity.py: mHC's bias and gate gradients are sums of nearly cancelling per-token
# terms, compared at 1e-5 of the model's largest gradient.
CANCELLING_GRADS = ("_connection.bias", "_connection.gate")


def _launch(tmp_path, data_cache, nproc: int, cases: dict[str, list[str]]) -> dict:
    """Run ``cases`` (name -> overrides) in one launch of ``nproc`` ranks; per case, the
    rank results."""
    out = tmp_path / "out"
    out.mkdir()
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps({
        name: [*BASE, f"data.cache_dir={data_cache}", f"run.dir={tmp_path / name}", *overrides]
        for name, overrides in cases.items()}))
    run_ranks(nproc, [WORKER, str(out), str(spec)], timeout=1200, log_dir=tmp_path)
    return {name: [torch.load(out / name / f"rank{r}.pt") for r in range(nproc)]
            for name in cases}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, data_cache):
    """Every selected configuration, three launches at most: the references on one rank, then
    the two-rank and four-rank layouts."""
    selected = selected_params(request.session, "test_moe_layout_matches_single_process",
                               ("model", "layout"))
    results = {}
    references = {model: MODELS[model] for model in sorted({model for model, _ in selected})}
    results.update({(model, "single"): ranks for model, ranks in _launch(
        tmp_path_factory.mktemp("moe-ref"), data_cache, 1, references).items()})
    for nproc in sorted({nproc for nproc, _ in LAYOUTS.values()}):
        cases = {f"{model}-{layout}": [*MODELS[model], *LAYOUTS[layout][1]]
                 for model, layout in selected if LAYOUTS[layout][0] == nproc}
        if not cases:
            continue
        launched = _launch(tmp_path_factory.mktemp(f"moe-{nproc}"), data_cache, nproc, cases)
        results.update({tuple(name.split("-")): ranks for name, ranks in launched.items()})
    return results


def _merged(ranks: list[dict]) -> dict:
    """Rank 0's losses and metrics; gradients and expert biases from every rank (EP and PP
    ranks hold different experts and layers)."""
    grads, biases = {}, {}
    for rank in ranks:
        grads.update(rank["grads"])
        biases.update(rank["expert_bias"])
    return {**ranks[0], "grads": grads, "expert_bias": biases}


@pytest.mark.parametrize("model,layout", CASES, ids=[f"{m}-{lay}" for m, lay in CASES])
def test_moe_layout_matches_single_process(model, layout, runs):
    ref, got = _merged(runs[(model, "single")]), _merged(runs[(model, layout)])
    assert ref["margin"] > MARGIN, f"a top-k choice within {ref['margin']:.1e}: may flip"
    assert ref["losses"][0] > 1.0 and ref["losses"][-1] < ref["losses"][0]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["mtp_losses"]), torch.tensor(ref["mtp_losses"]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]),
                               rtol=1e-4, atol=0)
    # Routing is identical: per-layer loads are integer counts, equal exactly; the aux and
    # z-losses are fp32/fp64 sums in another order.
    for ref_step, step in zip(ref["moe"], got["moe"], strict=True):
        assert step["moe_load_imbalance_per_layer"] == ref_step["moe_load_imbalance_per_layer"]
        for key in ("moe_aux_loss", "moe_z_loss"):
            assert step[key] == pytest.approx(ref_step[key], rel=1e-5), key
        assert ref_step["moe_aux_loss"] > 0.5 and ref_step["moe_z_loss"] > 0
        assert step.get("moe_expert_bias_abs") == ref_step.get("moe_expert_bias_abs")
    assert got["expert_bias"].keys() == ref["expert_bias"].keys()
    for layer, bias in ref["expert_bias"].items():
        assert torch.equal(got["expert_bias"][layer], bias), f"expert bias of layer {layer}"
    if model == "deepseek":
        assert ref["expert_bias"] and all(b.abs().sum() > 0 for b in ref["expert_bias"].values())
    if layout in SHARDED_GRADS:
        return
    assert got["grads"].keys() == ref["grads"].keys()
    assert any(".experts.local_experts.3." in name for name in ref["grads"])
    model_scale = max(g.abs().max().item() for g in ref["grads"].values())
    for name, expected in ref["grads"].items():
        scale = model_scale if name.endswith(CANCELLING_GRADS) else expected.abs().max().item()
        torch.testing.assert_close(got["grads"][name], expected, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")
