"""A whole VWN model trained through the CLI with ``model.vwn.kernel=triton`` (Triton's CPU
interpreter here, compiled kernels on a GPU) reproduces the torch kernel's losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

RUN = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
       "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.seq_length=8",
       "model.vwn.m=2", "model.vwn.n=6", "train.micro_batch_size=2",
       "train.global_batch_size=2", "train.iters=3", "train.lr=1e-2", "train.warmup_iters=0",
       "train.eval_interval=0", "logging.interval=1", "logging.wandb=off",
       "checkpoint.save_interval=0"]


def _losses(tmp_path, data_cache, kernel: str) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # before Triton's first import in that process
    run = tmp_path / kernel
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_vwn", "train", *RUN, f"model.vwn.kernel={kernel}",
         f"data.cache_dir={data_cache}", f"run.dir={run}"],
        env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return [r["lm_loss"] for r in rows if r["split"] == "train"]


def test_triton_kernel_trains_like_the_torch_kernel(tmp_path, data_cache):
    torch_losses = _losses(tmp_path, data_cache, "torch")
    triton_losses = _losses(tmp_path, data_cache, "triton")
    assert len(torch_losses) == 3
    # After the first step the dynamic projection is non-zero, so steps 2-3 exercise it.
    assert torch_losses[2] != torch_losses[0]
    # The kernels differ only in the summation order of GHC's fp32 sums (tests/unit/
    # test_ghc_triton.py bounds each value by K * u32 against fp64 truth). The loss is a mean
    # over 16 tokens of a log-sum-exp over the vocabulary of what the model computes from
    # them, so a relative difference of the order of u32 per value moves it by the same order
    # (~1e-7 of 8.3); Adam passes a relative gradient difference on as lr times it per weight,
    # so after two updates the bound 1e-5 still leaves two orders of room (seen: 0, the losses
    # are identical to fp32 on the 2-core CI machine). A wrong kernel moves them by ~1e-2.
    for a, b in zip(triton_losses, torch_losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (triton_losses, torch_losses)
