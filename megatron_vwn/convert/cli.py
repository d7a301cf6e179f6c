"""``megatron-vwn convert``: the argument parser and handlers (see docs/convert.md).

    megatron-vwn convert hf RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype fp32|bf16] [--verify]
        [--format auto|llama|mixtral|vwn] [--max-shard-size 2GB] [--tokenizer PATH | --no-tokenizer]
    megatron-vwn convert from-hf HF_DIR OUT_DIR [key=value ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging

from megatron_vwn.config.errors import ConfigError


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    hf = actions.add_parser(
        "hf", help="a checkpoint -> a Hugging Face model directory",
        description="Export a megatron-vwn checkpoint (written at any TP/PP layout) as a Hugging "
                    "Face model: LlamaForCausalLM for the backbone, VWNForCausalLM "
                    "(trust_remote_code) for virtual width; tokenizer included.")
    hf.add_argument("source", help="a run directory, its checkpoints directory or an iter_* dir")
    hf.add_argument("out_dir", help="new (or empty) output directory")
    hf.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="dtype of the written weights (default fp32)")
    hf.add_argument("--format", choices=("auto", "llama", "mixtral", "vwn"), default="auto",
                    help="auto: llama for the backbone (m = n = 1), vwn otherwise; vwn also "
                         "takes a backbone (to use its MTP heads)")
    hf.add_argument("--max-shard-size", default="2GB",
                    help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    tokenizer = hf.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", default=None,
                           help="SentencePiece .model or Hugging Face tokenizer.json or its "
                                "directory (default: the run's data.tokenizer_model, "
                                "or the bundled corpus's tokenizer)")
    tokenizer.add_argument("--no-tokenizer", action="store_true",
                           help="write the model without tokenizer files")
    hf.add_argument("--verify", action="store_true",
                    help="run the Megatron and the HF model on the same text; fail if the "
                         "largest logit difference exceeds 1e-4")
    hf.add_argument("--text", default=None, help="text for --verify (default: a fixed passage)")

    back = actions.add_parser(
        "from-hf", help="a Hugging Face Llama -> a Megatron checkpoint to start a run from",
        description="Import a Hugging Face LlamaForCausalLM (safetensors) as a weights-only "
                    "megatron-vwn checkpoint in OUT_DIR/checkpoints. key=value overrides set "
                    "the target model (e.g. model.vwn.m=8 model.vwn.n=32 model.mtp.num_layers=1;"
                    " parallel.tensor=N pads the vocabulary for a TP=N run).")
    back.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    back.add_argument("out_dir", help="new (or empty) output directory")
    back.add_argument("overrides", nargs="*", metavar="key=value")


def run_convert(ns: argparse.Namespace) -> int:
    import torch

    if torch.cuda.is_available():
        return _rerun_on_cpu()
    missing = [m for m in ("transformers", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"megatron-vwn convert needs {' and '.join(missing)}: "
                          f"pip install 'megatron-vwn[hf]' (or -e '.[hf]')")
    from megatron_vwn.log import setup_logging

    setup_logging(rank=0)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    if ns.action == "hf":
        return _export(ns)
    return _import(ns)


def _rerun_on_cpu() -> int:
    """Conversion runs on the CPU (one process, fp32). CUDA was seen before this command could
    hide it, so run the same command again with no visible GPU."""
    import os
    import subprocess
    import sys

    argv = sys.argv[1:]
    if "convert" not in argv or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        raise ConfigError("megatron-vwn convert runs on the CPU: set CUDA_VISIBLE_DEVICES= "
                          "and run it again")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.call([sys.executable, "-m", "megatron_vwn.cli", *argv], env=env)


def _export(ns: argparse.Namespace) -> int:
    from megatron_vwn.convert.export import describe, export_checkpoint
    from megatron_vwn.convert.safetensors_io import parse_size
    from megatron_vwn.convert.verify import DEFAULT_TEXT, check_parity
    from megatron_vwn.data.hf_tokenizer import stay_offline

    stay_offline()  # everything is local: no Hub look-up (nor its retries) from transformers

    try:
        shard_bytes = parse_size(ns.max_shard_size)
    except ValueError as exc:
        raise ConfigError(f"--max-shard-size: {exc}") from None
    result = export_checkpoint(ns.source, ns.out_dir, fmt=ns.format, dtype=ns.dtype,
                               max_shard_bytes=shard_bytes, tokenizer=ns.tokenizer,
                               with_tokenizer=not ns.no_tokenizer)
    print(describe(result))
    if ns.verify:
        report = check_parity(result, text=ns.text or DEFAULT_TEXT, dtype=ns.dtype)
        print(f"verify: {report.describe()} (tolerance 1e-4): OK")
    return 0


def _import(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_vwn.convert.importer import describe_import, import_hf_llama
    from megatron_vwn.data.hf_tokenizer import stay_offline

    stay_offline()

    bad = [item for item in ns.overrides if "=" not in item]
    if bad:
        raise ConfigError(f"override {bad[0]!r} must look like section.key=value")
    path, report = import_hf_llama(Path(ns.hf_dir), Path(ns.out_dir), ns.overrides)
    print(describe_import(path, report))
    return 0
