"""The CLI as a user runs it: training happens, the loss falls, the run directory keeps its
contract (config.yaml, metrics.jsonl rows with their keys, logs, offline wandb)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

TRAIN_KEYS = {"iteration", "split", "consumed_tokens", "lm_loss", "lr", "grad_norm",
              "iter_time_s", "tokens_per_s"}


def _train(tmp_path, data_cache, *args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": ""}
    env.pop("WANDB_MODE")
    cmd = [sys.executable, "-m", "megatron_vwn", "train", *args,
           f"data.cache_dir={data_cache}", f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    return proc, rows


def test_default_run_trains_and_writes_its_run_directory(tmp_path, data_cache):
    proc, rows = _train(tmp_path, data_cache, "tiny", "train.iters=60", "train.eval_interval=30",
                        "train.eval_iters=2", "logging.interval=10", "logging.wandb=offline",
                        "logging.tensorboard=on")
    run = tmp_path / "run"
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    assert [r["iteration"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert [r["iteration"] for r in valid] == [30, 60]
    for row in train:
        assert TRAIN_KEYS <= row.keys()
        assert row["consumed_tokens"] == row["iteration"] * 16 * 128
        assert row["tokens_per_s"] > 0 and row["grad_norm"] > 0
    # ln(4096) = 8.32 at the start; 60 steps of the tiny model reach well below.
    assert train[0]["lm_loss"] > 6.5
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 1.0
    assert valid[-1]["lm_loss"] < 7.0

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["iters"] == 60 and resolved["model"]["hidden_size"] == 128
    log = (run / "logs" / "train.log").read_text()
    assert "parameters: total" in log and "eta" in log and "validation at iter 60" in log
    assert list((run / "wandb").glob("offline-run-*")), "offline wandb run missing"
    _assert_tensorboard_holds(run, rows)


def _assert_tensorboard_holds(run, rows) -> None:
    """The event file under run/tensorboard, read back, has every numeric key of every row."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    for split in ("train", "valid"):
        split_rows = [r for r in rows if r["split"] == split]
        keys = [k for k, v in split_rows[0].items()
                if k not in ("split", "iteration") and isinstance(v, (int, float))]
        assert {"lm_loss", "consumed_tokens"} <= set(keys)
        if split == "train":
            assert {"lr", "grad_norm", "tokens_per_s", "tflops_per_s_per_rank"} <= set(keys)
        for key in keys:
            scalars = events.Scalars(f"{split}/{key}")
            assert [s.step for s in scalars] == [r["iteration"] for r in split_rows]
            assert [s.value for s in scalars] == pytest.approx(
                [float(r[key]) for r in split_rows], rel=1e-6)  # stored as float32


def test_nproc_launches_tensor_parallel_ranks(tmp_path, data_cache):
    proc, rows = _train(tmp_path, data_cache, "train.iters=4", "train.eval_interval=0",
                        "logging.interval=2", "logging.wandb=off", "parallel.tensor=2",
                        "parallel.sequence_parallel=true", "--nproc", "2")
    assert [r["iteration"] for r in rows] == [2, 4]
    assert "tensor 2 x pipeline 1" in proc.stdout


def test_tiny_8x_trains_at_tp2_and_pp2(tmp_path, data_cache):
    """The 8x VWN config trains through the CLI under tensor (with SP) and pipeline parallelism."""
    for layout in (["parallel.tensor=2", "parallel.sequence_parallel=true"],
                   ["parallel.pipeline=2"]):
        out = tmp_path / layout[0].split("=")[0]
        _, rows = _train(out, data_cache, "vwn/tiny_8x", "train.iters=8", "train.eval_interval=0",
                         "train.warmup_iters=2", "logging.interval=4", "logging.wandb=off",
                         "checkpoint.save_interval=0", *layout, "--nproc", "2")
        assert [r["iteration"] for r in rows] == [4, 8]
        assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] < 8.5


def test_hugging_face_tokenizer_trains_and_exports(tmp_path, data_cache):
    """A byte-level BPE tokenizer.json directory (trained here with `tokenizers`) as
    data.tokenizer_model: the bundled corpus is encoded with it, training pads its vocabulary,
    and `convert hf --verify` carries it so AutoTokenizer gives the ids training saw."""
    from transformers import AutoTokenizer

    from megatron_vwn.data.hf_tokenizer import HFTokenizer
    from tests.unit.test_hf_tokenizer import TEXTS, train_byte_level_bpe

    tokenizer_dir = tmp_path / "tok"
    train_byte_level_bpe(tokenizer_dir, vocab_size=300)
    proc, rows = _train(tmp_path, data_cache, "tiny", "train.iters=2", "train.eval_interval=0",
                        "logging.interval=1", "logging.wandb=off", "model.num_layers=2",
                        f"data.tokenizer_model={tokenizer_dir}")
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[0]["lm_loss"] > 5.0  # about ln(300)
    out = tmp_path / "export"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    convert = subprocess.run([sys.executable, "-m", "megatron_vwn", "convert", "hf",
                              str(tmp_path / "run"), str(out), "--verify"], env=env,
                             capture_output=True, text=True, timeout=600, start_new_session=True)
    assert convert.returncode == 0, convert.stdout[-3000:] + convert.stderr[-3000:]
    assert "tokenizer ids match training's" in convert.stdout
    exported, training = AutoTokenizer.from_pretrained(str(out)), HFTokenizer(tokenizer_dir)
    assert exported(TEXTS[1])["input_ids"] == training.tokenize(TEXTS[1])
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == training.eod
