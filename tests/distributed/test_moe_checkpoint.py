"""Checkpoints of mixture-of-experts runs (docs/moe.md): an MoE + VWN run at EP=2 stopped at N
and resumed to 2N reproduces the straight run row for row, MoE metrics included (bit-exact on
CPU fp32: the router's expert bias, which steers every routing decision, must come back
exactly); its checkpoint loads at EP=1 on one rank and at PP=2 (experts resharded) with the same
logits within 1e-5 relative."""

from __future__ import annotations

import torch

from megatron_vwn.checkpoint.files import iter_dir_name
from tests.distributed.checkpoint_helpers import (
    COMPARED,
    assert_logits_close,
    logits_of,
    rows,
    tracker,
    train,
)

N = 3
# DeepSeek-style routing (sigmoid scores, aux-loss-free expert bias moving fast enough to
# change choices within the run, a sequence aux loss) under 2x virtual width, experts over 2
# ranks.
MOE_VWN = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=64",
           "model.moe.router_score=sigmoid", "model.moe.expert_bias=true",
           "model.moe.expert_bias_update_rate=1e-2", "model.moe.aux_loss=seq_aux_loss",
           "model.vwn.m=2", "model.vwn.n=4"]
MOE_KEYS = ("moe_aux_loss", "moe_load_imbalance_per_layer", "moe_expert_bias_abs")


def _compared(run_rows: list[dict]) -> list[tuple]:
    return [tuple(r.get(k) for k in (*COMPARED, *MOE_KEYS)) for r in run_rows]


def test_moe_vwn_resume_is_bit_exact_and_reshards_experts(tmp_path, data_cache):
    straight = tmp_path / "straight"
    train(straight, 2, [f"train.iters={2 * N}", *MOE_VWN, "parallel.expert=2"], data_cache,
          logits=tmp_path / "ep2.pt")
    expected = _compared(rows(straight))
    assert [r["moe_expert_bias_abs"] for r in rows(straight) if r["split"] == "train"][-1] > 0

    resumed = tmp_path / "resumed"
    train(resumed, 2, [f"train.iters={N}", *MOE_VWN, "parallel.expert=2"], data_cache)
    assert tracker(resumed) == N
    outputs = train(resumed, 2, [f"train.iters={2 * N}", *MOE_VWN, "parallel.expert=2"],
                    data_cache)
    assert f"at iteration {N}" in outputs[0]
    assert _compared(rows(resumed)) == expected

    checkpoint = straight / "checkpoints" / iter_dir_name(2 * N)
    reference = torch.load(tmp_path / "ep2.pt")
    for nproc, layout in ((1, []), (2, ["parallel.pipeline=2"])):
        out = tmp_path / f"logits-{nproc}.pt"
        logits_of(checkpoint, out, nproc, [*MOE_VWN, *layout], data_cache,
                  tmp_path / f"work-{nproc}")
        assert_logits_close(torch.load(out), reference)
