"""``megatron-vwn profile``: DeepSpeed's FLOPs profiler on the built model agrees with
``model/accounting.py`` within 5% (forward FLOPs per token; accounting's training FLOPs / 3) for
the backbone, VWN 2x and 8x, MTP and MoE models (the whole model, and the MTP heads' share alone),
and names the parts a reader looks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _profile(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_BUILD_OPS": "0"}
    proc = subprocess.run([sys.executable, "-m", "megatron_vwn", "profile", *args, "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config,extra", [
    ("tiny", []), ("vwn/tiny_2x", []), ("vwn/tiny_8x", []), ("mtp/tiny_mtp1", []),
    ("vwn/tiny_8x", ["model.mtp.num_layers=1"]),
    # mixture of experts (docs/moe.md): active FLOPs (router, top-k and shared experts)
    ("moe/tiny_deepseek", []), ("moe/tiny_8x", []),
])
def test_profiler_flops_match_the_accounting(config, extra):
    result = _profile(config, "model.num_layers=2", *extra)
    assert result["ratio"] == pytest.approx(1.0, abs=0.05)
    rows = {row["name"]: row for row in result["rows"]}
    for part in ("embedding", "decoder.layers.1.self_attention", "decoder.layers.1.mlp",
                 "output_layer"):
        assert part in rows
    # the top-level parts add up to the whole (less the few ops GPTModel.forward does itself)
    parts = sum(row["flops"] for name, row in rows.items() if name.count(".") == 0)
    assert 0 <= result["total_flops"] - parts < 1e-4 * result["total_flops"]
    if "vwn" in config:
        assert rows["decoder.layers.1.ghc"]["flops"] > 0
        assert rows["decoder.final_layernorm.reduce"]["flops"] > 0
    if "mtp" in config or extra:
        head = rows["output_layer"]["flops"]  # two passes: main and the MTP depth
        assert result["mtp_flops"] == rows["mtp"]["flops"] + head // 2
        mtp_per_token = result["mtp_flops"] / result["tokens"]
        assert mtp_per_token / result["accounting_mtp_forward_per_token"] == pytest.approx(
            1.0, abs=0.05)
    else:
        assert result["mtp_flops"] == 0
