"""``megatron-vwn eval SRC (--text FILE | --valid) [--seq S] [--json] [--nproc N] [key=value ...]``

Scores text with a trained model. ``SRC`` is a run directory, its ``checkpoints`` directory or
one ``iter_*`` checkpoint. The model is built from the checkpoint's ``config.yaml`` at the layout
the overrides give (``parallel.tensor=2 --nproc 2``: the checkpoint reshards on load) by the
build path every command shares (bare chunks, no optimizer: docs/training_loop.md), and the
weights are loaded into it after the checkpoint's files are verified (``checkpoint/weights.py``).

``--text FILE``: a raw text file (one document) or a ``.jsonl`` file (one document per line, its
``--json-key`` field), tokenized with the run's tokenizer; every document ends with the
end-of-document token, as in training. The token stream is cut into ``S``-token samples (``S``:
``--seq``, default ``model.seq_length``) that overlap by one token, so every token but the first
is predicted exactly once (end-of-document predictions are scored unless
``data.eod_mask_loss``). ``--valid`` scores the run's held-out set instead: the first
``train.eval_iters`` global batches of the validation split, the tokens every ``valid`` row of
``metrics.jsonl`` scores under ``train.eval_mode=fixed``.

Prints the scored token count, the mean loss (nats per token), perplexity ``exp(loss)`` and bits
per byte ``loss x tokens / ln 2 / bytes`` (UTF-8 bytes of the documents; tokenizer-independent,
so runs with different tokenizers compare). ``--json``: one JSON object, the last line on
stdout, with ``tokens``, ``loss``, ``ppl``, ``bits_per_byte`` (and ``bytes``, ``mtp_loss_k``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("src", metavar="SRC", help="run directory, checkpoints directory or iter_* dir")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="raw text or .jsonl file to score")
    source.add_argument("--valid", action="store_true",
                        help="score the run's held-out set (first train.eval_iters batches)")
    p.add_argument("--json-key", default="text", help="field of a .jsonl line (default: text)")
    p.add_argument("--seq", type=int, default=None, metavar="S",
                   help="tokens per scored sample (default: the run's model.seq_length)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--nproc", type=int, default=None, help="start this many local ranks")
    p.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", metavar="key=value",
                   help="overrides of the run's config, e.g. parallel.tensor=2")
    p.set_defaults(run=run_eval)


@dataclass
class TextSamples:
    """A token stream cut into training-shaped samples (``[seq]`` each)."""

    samples: list[dict[str, torch.Tensor]]
    bytes: int
    """UTF-8 bytes of the documents."""


def read_documents(path: str, json_key: str = "text") -> list[str]:
    """A raw text file is one document; a ``.jsonl`` file one per line (its ``json_key``)."""
    from megatron_vwn.config.errors import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--text ({path}): no such file")
    text = file.read_text(encoding="utf-8")
    if file.suffix != ".jsonl":
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if json_key not in row:
                raise ConfigError(f"--text ({path}) line {number} has no {json_key!r} field "
                                  f"(set --json-key)")
            documents.append(row[json_key])
    return documents


def text_samples(documents: list[str], tokenizer, seq_length: int,
                 eod_mask_loss: bool = False) -> TextSamples:
    """Tokenize, end every document with EOD, and cut into ``seq_length`` samples overlapping by
    one token; the last is padded with masked positions."""
    stream: list[int] = []
    for document in documents:
        stream += list(tokenizer.tokenize(document)) + [tokenizer.eod]
    samples = []
    for start in range(0, max(len(stream) - 1, 0), seq_length):
        window = stream[start:start + seq_length + 1]
        scored = len(window) - 1
        pad = seq_length - scored
        tokens = torch.tensor(window[:-1] + [tokenizer.eod] * pad, dtype=torch.long)
        labels = torch.tensor(window[1:] + [tokenizer.eod] * pad, dtype=torch.long)
        loss_mask = torch.cat([torch.ones(scored), torch.zeros(pad)])
        if eod_mask_loss:
            loss_mask[labels == tokenizer.eod] = 0.0
        samples.append({"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                        "position_ids": torch.arange(seq_length, dtype=torch.long)})
    return TextSamples(samples, sum(len(d.encode("utf-8")) for d in documents))


def pad_to_batches(samples: list[dict], global_batch_size: int) -> list[dict]:
    """Append fully masked copies of the last sample up to a whole number of global batches
    (they add nothing to the token-weighted sums)."""
    missing = -len(samples) % global_batch_size
    blank = {**samples[-1], "loss_mask": torch.zeros_like(samples[-1]["loss_mask"])}
    return samples + [blank] * missing


def bits_per_byte(loss: float, tokens: int, num_bytes: int) -> float:
    """Mean nats per token over ``tokens`` -> bits per UTF-8 byte of the text."""
    return loss * tokens / math.log(2) / max(num_bytes, 1)


def eval_config(ns: argparse.Namespace):
    """The run's config from the checkpoint, with the user's overrides and what scoring needs;
    and the checkpoint directory."""
    from megatron_vwn.checkpoint.files import CONFIG_FILE
    from megatron_vwn.checkpoint.inspect import resolve_checkpoint_dir
    from megatron_vwn.config import load_config
    from megatron_vwn.config.errors import ConfigError

    checkpoint = resolve_checkpoint_dir(Path(ns.src))
    cfg = load_config(checkpoint / CONFIG_FILE, ns.args)
    if ns.seq is not None:
        if ns.seq < 1:
            raise ConfigError(f"--seq ({ns.seq}) must be >= 1")
        cfg.model.seq_length = ns.seq
    if ns.valid and not cfg.train.eval_interval:
        raise ConfigError("--valid: the run has no validation (train.eval_interval=0); "
                          "set train.eval_interval=1 to build its held-out set")
    cfg.checkpoint.load = None  # the weights come from SRC (checkpoint.weights)
    cfg.checkpoint.weights_only = False
    # The datasets are built for one training batch only (never read) and the held-out set.
    cfg.train.iters = 1
    cfg.train.warmup_iters = 0
    cfg.train.lr_decay_iters = None
    if not ns.valid:
        cfg.train.eval_interval = 0
    return cfg, checkpoint


def score(ns: argparse.Namespace, work_dir: str) -> dict:
    """Build the model on this rank, load the checkpoint, score; the result on every rank."""
    from megatron.core import parallel_state

    from megatron_vwn.checkpoint.weights import load_weights
    from megatron_vwn.config import validate
    from megatron_vwn.data.sampler import build_loader
    from megatron_vwn.log import setup_logging, silence_expected_warnings
    from megatron_vwn.parallel.distributed import destroy_distributed, initialize_distributed
    from megatron_vwn.parallel.env import resolve_dist_env
    from megatron_vwn.training.build import (
        Layout,
        build_loaders,
        build_model_parts,
        build_schedule,
        run_inputs,
    )
    from megatron_vwn.training.evaluation import evaluate

    cfg, checkpoint = eval_config(ns)
    dist = resolve_dist_env()
    validate(cfg, dist.world_size)
    layout = Layout.of(cfg, dist.world_size)
    inputs = run_inputs(cfg)
    initialize_distributed(cfg, dist)
    try:
        setup_logging(dist.rank, Path(work_dir) / "logs" / "eval.log")
        silence_expected_warnings()
        parts = build_model_parts(cfg, inputs.vocab_size, ddp=False, optimizer=False)
        load_weights(parts.modules, checkpoint, cfg.model, inputs.vocab_size)
        schedule = build_schedule(cfg, layout, inputs.tokenizer.eod)
        if ns.valid:
            held_out = build_loaders(cfg, inputs, layout, parts.feeds_data, consumed_train=0,
                                     consumed_valid=0).held_out
            losses, tokens = held_out.score(parts.model, schedule)
            num_bytes = None
        else:
            text = text_samples(read_documents(ns.text, ns.json_key), inputs.tokenizer,
                                cfg.model.seq_length, cfg.data.eod_mask_loss)
            samples = pad_to_batches(text.samples, cfg.train.global_batch_size)
            iterators = [
                build_loader(samples, cfg.train.micro_batch_size,
                             parallel_state.get_data_parallel_rank(),
                             layout.data_parallel) if feeds else None
                for feeds in parts.feeds_data
            ]
            losses, tokens = evaluate(parts.model, iterators, schedule,
                                      len(samples) // cfg.train.global_batch_size)
            num_bytes = text.bytes
    finally:
        destroy_distributed()
    loss = losses["lm_loss"]
    result = {"tokens": tokens, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
              "bits_per_byte": bits_per_byte(loss, tokens, num_bytes) if num_bytes else None,
              "bytes": num_bytes}
    result.update({k: v for k, v in losses.items() if k != "lm_loss"})
    return result


def _work_dir(ns: argparse.Namespace) -> contextlib.AbstractContextManager[str]:
    """The scratch directory (the evaluation's log, ``logs/eval.log``): ``--work-dir`` (given by
    ``--nproc``), a name every rank of an outside launcher agrees on, or a temporary one."""
    if ns.work_dir:
        return contextlib.nullcontext(ns.work_dir)
    env = os.environ
    if "MASTER_PORT" in env:
        return contextlib.nullcontext(os.path.join(
            tempfile.gettempdir(),
            f"megatron-vwn-eval-{env.get('MASTER_ADDR', 'local')}-{env['MASTER_PORT']}"))
    return tempfile.TemporaryDirectory(prefix="megatron-vwn-eval-")


def _launch(ns: argparse.Namespace) -> int:
    """``--nproc N``: the same command as N torchrun ranks sharing one scratch directory."""
    import subprocess

    from megatron_vwn.config.errors import ConfigError

    if ns.nproc < 1:
        raise ConfigError(f"--nproc ({ns.nproc}) must be >= 1")
    with tempfile.TemporaryDirectory(prefix="megatron-vwn-eval-") as work:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ns.nproc}", "-m", "megatron_vwn.cli", "eval", ns.src,
            *(["--text", ns.text, "--json-key", ns.json_key] if ns.text else ["--valid"]),
            *(["--seq", str(ns.seq)] if ns.seq is not None else []),
            *(["--json"] if ns.json else []), "--work-dir", work, *ns.args,
        ]
        return subprocess.call(command)


def run_eval(ns: argparse.Namespace) -> int:
    from megatron_vwn.parallel.env import resolve_dist_env, under_launcher

    if ns.nproc is not None and not under_launcher():
        return _launch(ns)
    # Logs go to stderr so that stdout carries only the result.
    with _work_dir(ns) as work_dir, contextlib.redirect_stdout(sys.stderr):
        result = score(ns, work_dir)
    if resolve_dist_env().rank != 0:
        return 0
    if ns.json:
        print(json.dumps(result))
    else:
        lines = [f"tokens          {result['tokens']}", f"loss            {result['loss']:.6f}",
                 f"perplexity      {result['ppl']:.4f}"]
        if result["bits_per_byte"] is not None:
            lines.append(f"bits per byte   {result['bits_per_byte']:.6f} "
                         f"({result['bytes']} bytes)")
        lines += [f"{k:<15} {v:.6f}" for k, v in result.items() if k.startswith("mtp_loss_")]
        print("\n".join(lines))
    return 0
