"""``megatron-vwn eval``: the held-out set scores what the training loop logged (and the same at
TP=2, the checkpoint resharded); a text file scores what a plain forward of the loaded model
gives on the same token windows; bits per byte follow a hand count of the text's bytes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from megatron_vwn.tools.eval_cli import bits_per_byte

RUN = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.seq_length=32",
    "train.micro_batch_size=2", "train.global_batch_size=8", "train.iters=10",
    "train.eval_interval=5", "train.eval_iters=2", "logging.wandb=off", "logging.interval=5",
    "data.split=90,10,0",
]
# Bytes by hand: "The river ran quietly past the old mill." is 33 ASCII letters and punctuation
# and 7 spaces (40), then a space (1), "é" (2 in UTF-8), "€" (3) and the newline (1): 47.
TEXT = "The river ran quietly past the old mill. é€\n"
TEXT_BYTES = 47


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "megatron_vwn", *args], env=env,
                          capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("eval") / "run"
    _cli("train", *RUN, f"data.cache_dir={data_cache}", f"run.dir={run}")
    return run


def test_valid_scores_what_the_training_loop_logged(run_dir, data_cache):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    logged = [r for r in rows if r["split"] == "valid"][-1]
    assert logged["iteration"] == 10
    result = _json(_cli("eval", str(run_dir), "--valid", "--json",
                        f"data.cache_dir={data_cache}"))
    assert result["loss"] == logged["lm_loss"]
    assert result["tokens"] == 2 * 8 * 32  # eval_iters x global batch x seq, nothing masked
    resharded = _json(_cli("eval", str(run_dir / "checkpoints"), "--valid", "--json",
                           "--nproc", "2", "parallel.tensor=2", f"data.cache_dir={data_cache}"))
    assert resharded["loss"] == pytest.approx(logged["lm_loss"], rel=1e-5)


REFERENCE = """
import json, sys, torch
from megatron_vwn.convert.megatron_io import load_checkpoint
from megatron_vwn.data.datasets import prepare_data
from megatron_vwn.data.tokenizer import load_tokenizer
loaded = load_checkpoint(sys.argv[1])
cfg = loaded.cfg
cfg.data.cache_dir = sys.argv[3]
tokenizer = load_tokenizer(prepare_data(cfg.data).tokenizer_model)
seq = int(sys.argv[4])
stream = tokenizer.tokenize(open(sys.argv[2]).read()) + [tokenizer.eod]
nats, count = 0.0, 0
with torch.no_grad():
    for start in range(0, len(stream) - 1, seq):
        window = torch.tensor(stream[start:start + seq + 1])
        inputs, targets = window[:-1][None], window[1:]
        logits = loaded.model(inputs, torch.arange(inputs.shape[1])[None], None)
        nats += torch.nn.functional.cross_entropy(
            logits[0, :len(targets)].double(), targets, reduction="sum").item()
        count += len(targets)
print(json.dumps({"tokens": count, "loss": nats / count, "stream": len(stream)}))
"""


def test_text_scores_a_plain_forward_and_bits_per_byte_count_bytes(run_dir, data_cache,
                                                                   tmp_path):
    assert len(TEXT.encode("utf-8")) == TEXT_BYTES
    text = tmp_path / "small.txt"
    text.write_text(TEXT, encoding="utf-8")
    seq = 8  # several windows, the last one partial
    result = _json(_cli("eval", str(run_dir), "--text", str(text), "--seq", str(seq), "--json",
                        f"data.cache_dir={data_cache}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(run_dir), str(text), data_cache,
                           str(seq)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reference["stream"] % seq != 1  # the last window is partial: padding is exercised
    assert result["tokens"] == reference["tokens"] == reference["stream"] - 1
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert result["bytes"] == TEXT_BYTES
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["tokens"] / math.log(2) / TEXT_BYTES, rel=1e-12)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))


def test_bits_per_byte_by_hand():
    # 10 tokens at ln 2 nats each carry 10 bits; over 5 bytes that is 2 bits per byte
    assert bits_per_byte(math.log(2), 10, 5) == pytest.approx(2.0)
    assert bits_per_byte(math.log(4), 3, 12) == pytest.approx(0.5)
