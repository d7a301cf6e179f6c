"""The interaction metrics are the same in every parallel layout.

A short run logs its ``split: "analysis"`` row (AGOP and W^T W AOFE ratios and energies) under
TP=2+SP, PP=2, TP2xPP2, PP=2 x VPP=2 (the interleaved schedule) and DP=2 (each rank probes half
the held-out batch), and with virtual width under TP2xPP2; each must equal the
single-process row within 1e-5 relative. The learning rate is tiny so the one training step
before the measurement cannot make the layouts' weights drift apart (that is the parity suite's
job); what is compared is the measurement itself.
"""

from __future__ import annotations

import json

import pytest

from tests.distributed.launcher import SMALL_RUN, run_ranks

RUN = [*SMALL_RUN, "train.iters=1", "train.lr=1e-6", "train.min_lr=0", "train.warmup_iters=0",
       "train.eval_interval=0", "checkpoint.save_interval=0", "analysis.interaction_interval=1",
       "analysis.probes=8", "analysis.batches=1", "analysis.seed=5"]
LAYOUTS = {
    "tp2_sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"]),
    "pp2_vpp2": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "dp2": (2, []),
}
MODELS = {"backbone": [], "vwn_2_4": ["model.vwn.m=2", "model.vwn.n=4"]}
CASES = [("backbone", layout) for layout in LAYOUTS] + [("vwn_2_4", "tp2_pp2")]
KEYS = ("aofe_ratio_agop", "aofe_ratio_wtw", "aofe_agop", "aofe_wtw")


def _analysis_row(tmp_path, data_cache, nproc: int, overrides: list[str]) -> dict:
    run_dir = tmp_path / "run"
    run_ranks(nproc, ["-m", "megatron_vwn", "train", "tiny", *RUN, f"data.cache_dir={data_cache}",
                      f"run.dir={run_dir}", *overrides], log_dir=tmp_path)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["split"] == "analysis"]
    return row


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_cache):
    cache = {}

    def get(model: str) -> dict:
        if model not in cache:
            cache[model] = _analysis_row(tmp_path_factory.mktemp(f"ref-{model}"), data_cache, 1,
                                         MODELS[model])
        return cache[model]

    return get


@pytest.mark.parametrize("model,layout", CASES, ids=[f"{m}-{lay}" for m, lay in CASES])
def test_interaction_metrics_match_single_process(model, layout, references, tmp_path,
                                                  data_cache):
    nproc, overrides = LAYOUTS[layout]
    ref = references(model)
    row = _analysis_row(tmp_path, data_cache, nproc, [*MODELS[model], *overrides])
    assert ref["analysis_sequences"] == row["analysis_sequences"] == 8  # one global batch
    assert 0.0 < ref["aofe_ratio_agop"] < 1.0 and 0.0 < ref["aofe_ratio_wtw"] < 1.0
    for key in KEYS:
        assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=0), key
