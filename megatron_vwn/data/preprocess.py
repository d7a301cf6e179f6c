"""Text -> Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Each input document becomes exactly one *sequence* in the indexed dataset, with the tokenizer's
end-of-document id appended. That one-to-one mapping matters downstream: Megatron's GPT dataset
splits train/validation/test by sequence index (``data.split``), so with one sequence per
document the split is a document-level split and no document straddles train and validation.
The EOD token is what lets ``GPTDataset`` pack documents back to back into fixed-length samples
while the model still sees where one ends.

The same code serves three callers: Python (:func:`preprocess_files`,
:func:`write_indexed_dataset`), the ``megatron-vwn preprocess`` subcommand
(:func:`add_preprocess_arguments` / :func:`run_preprocess`) and ``tools/preprocess_data.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.data.readers import DocumentError, iter_documents_from_files
from megatron_vwn.data.tokenizer import SentencePieceFile, open_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

ENCODE_BATCH = 256
"""Documents handed to SentencePiece per call (it encodes a batch on ``workers`` threads)."""


@dataclass
class PreprocessResult:
    """What was written, for logs and tests."""

    output_prefix: str
    tokenizer_model: str
    documents: int
    tokens: int
    """Tokens written, EOD tokens included."""


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded(tokenizer, documents: Iterable[str], workers: int) -> Iterator[list[int]]:
    """Token ids of each document, in order, encoded a batch at a time on ``workers`` threads:
    SentencePiece's, or the ``tokenizers`` library's Rust thread pool (``RAYON_NUM_THREADS``;
    that pool is built on its first parallel use, so the first ``workers`` > 1 of a process
    sets its size)."""
    if isinstance(tokenizer, SentencePieceFile):
        for batch in _batched(documents, ENCODE_BATCH):
            yield from tokenizer.encode_batch(batch, threads=workers)
        return
    os.environ.setdefault("RAYON_NUM_THREADS", str(workers))
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"
    for batch in _batched(documents, ENCODE_BATCH):
        yield from tokenizer.encode_batch(batch)


def write_indexed_dataset(
    documents: Iterable[str], output_prefix: str, tokenizer_model: str, workers: int = 1,
    eod_token: str | None = None,
) -> PreprocessResult:
    """Tokenize ``documents`` and write ``OUTPUT_PREFIX.bin`` / ``.idx``.

    Tokens are stored as uint16 when the vocabulary fits (as Megatron-LM does), else int32. The
    files are written under temporary names and renamed at the end (``.idx`` last), so an
    interrupted run never leaves a pair that looks complete.

    Tokenization uses SentencePiece directly (``encode`` of a batch on ``workers`` threads,
    order preserved); it gives the same ids as the Megatron tokenizer's ``tokenize``, which
    calls the same ``encode``, without importing Megatron-Core. A Hugging Face tokenizer encodes
    batches on ``workers`` of its library's threads (order preserved), with the ids training's
    :class:`~megatron_vwn.data.hf_tokenizer.HFTokenizer` gives.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tokenizer = open_tokenizer(tokenizer_model, eod_token)
    eod = tokenizer.eod
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    output_prefix = os.path.abspath(output_prefix)
    os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
    bin_path, idx_path = f"{output_prefix}.bin", f"{output_prefix}.idx"
    suffix = f".tmp-{os.getpid()}"

    builder = IndexedDatasetBuilder(bin_path + suffix, dtype=dtype)
    num_docs = num_tokens = 0
    try:
        for ids in _encoded(tokenizer, documents, max(1, workers)):
            ids.append(eod)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            num_docs += 1
            num_tokens += len(ids)
        builder.finalize(idx_path + suffix)
        if num_docs == 0:
            raise DocumentError("no non-empty documents in the input")
        os.replace(bin_path + suffix, bin_path)
        os.replace(idx_path + suffix, idx_path)
    finally:
        for leftover in (bin_path + suffix, idx_path + suffix):
            if os.path.exists(leftover):
                os.remove(leftover)
    logger.info("wrote %s.{bin,idx}: %d documents, %d tokens", output_prefix, num_docs,
                num_tokens)
    return PreprocessResult(output_prefix, os.path.abspath(tokenizer_model), num_docs, num_tokens)


def preprocess_files(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_model: str | None = None,
    *,
    train_vocab_size: int | None = None,
    json_key: str = "text",
    split_paragraphs: bool = False,
    workers: int = 1,
    eod_token: str | None = None,
) -> PreprocessResult:
    """Preprocess input files into one indexed dataset, training a tokenizer first if asked.

    Args:
        inputs: ``.txt`` / ``.jsonl`` files, optionally ``.gz``; documents keep file order.
        output_prefix: where ``.bin`` / ``.idx`` go.
        tokenizer_model: an existing SentencePiece ``.model`` or Hugging Face ``tokenizer.json``
            (or its directory); with ``train_vocab_size`` it is
            where the new model is written instead (default ``OUTPUT_PREFIX.model``).
        train_vocab_size: train a BPE tokenizer of this size on the same inputs first.
        json_key: the text key in ``.jsonl`` inputs.
        split_paragraphs: in ``.txt`` inputs, one document per blank-line paragraph.
        workers: encoding threads.
        eod_token: Hugging Face tokenizers: the end-of-document token (default: its eos).
    """
    def documents() -> Iterator[str]:
        return iter_documents_from_files(
            inputs, json_key=json_key, split_paragraphs=split_paragraphs
        )

    if train_vocab_size is not None:
        model_path = tokenizer_model or f"{os.path.abspath(output_prefix)}.model"
        if not model_path.endswith(".model"):
            raise ValueError(f"tokenizer model path must end in .model, got {model_path}")
        tokenizer_model = train_tokenizer(documents(), model_path[: -len(".model")],
                                          train_vocab_size)
    if tokenizer_model is None:
        raise ValueError("give a tokenizer model or a vocabulary size to train one")
    return write_indexed_dataset(documents(), output_prefix, tokenizer_model, workers=workers,
                                 eod_token=eod_token)


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``preprocess`` flags (named like Megatron-LM's ``tools/preprocess_data.py``)."""
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="input files: .txt (one document per file, or per paragraph with "
                             "--split-paragraphs) or .jsonl (one document per line); .gz ok")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="write PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer-model", metavar="MODEL",
                        help="SentencePiece .model or Hugging Face tokenizer.json (or a "
                             "directory holding one) to tokenize with; with --train-tokenizer, "
                             "where to write the new model (default PREFIX.model)")
    parser.add_argument("--eod-token", metavar="TOKEN",
                        help="Hugging Face tokenizers: the end-of-document token appended to "
                             "each document (default: its eos, else <|endoftext|>)")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="train a SentencePiece BPE tokenizer on the inputs first")
    parser.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                        help="vocabulary size for --train-tokenizer (default 4096)")
    parser.add_argument("--json-key", default="text", metavar="KEY",
                        help="text key in .jsonl inputs (default 'text')")
    parser.add_argument("--split-paragraphs", action="store_true",
                        help="in .txt inputs, make every blank-line separated paragraph a "
                             "document instead of the whole file")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="encoding threads (default 1)")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    for i, path in enumerate(args.input):
        if not os.path.isfile(path):
            raise ConfigError(f"--input[{i}] ({path!r}): no such file")
    if args.workers < 1:
        raise ConfigError(f"--workers ({args.workers}) must be >= 1")
    if args.train_tokenizer:
        if args.vocab_size < 300:
            raise ConfigError(f"--vocab-size ({args.vocab_size}) must be >= 300")
        if args.tokenizer_model and not args.tokenizer_model.endswith(".model"):
            raise ConfigError(
                f"--tokenizer-model ({args.tokenizer_model!r}) must end in .model when "
                f"--train-tokenizer writes it"
            )
    elif not args.tokenizer_model:
        raise ConfigError("--tokenizer-model is required unless --train-tokenizer is given")
    elif not os.path.exists(args.tokenizer_model):
        raise ConfigError(f"--tokenizer-model ({args.tokenizer_model!r}): no such file")


def run_preprocess(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (0).

    Bad flags and unreadable inputs raise :class:`ConfigError` naming the flag (the CLI prints
    it and exits 2).
    """
    _check_arguments(args)
    model = args.tokenizer_model
    if args.train_tokenizer:
        model = model or f"{os.path.abspath(args.output_prefix)}.model"
    try:
        result = preprocess_files(
            args.input,
            args.output_prefix,
            model,
            train_vocab_size=args.vocab_size if args.train_tokenizer else None,
            json_key=args.json_key,
            split_paragraphs=args.split_paragraphs,
            workers=args.workers,
            eod_token=args.eod_token,
        )
    except DocumentError as err:
        raise ConfigError(f"--input: {err}") from err
    except ValueError as err:
        flag = "--vocab-size" if args.train_tokenizer else "--tokenizer-model"
        value = args.vocab_size if args.train_tokenizer else model
        raise ConfigError(f"{flag} ({value!r}): {err}") from err
    logger.info(
        "preprocessed %d documents (%d tokens) into %s.{bin,idx} with tokenizer %s",
        result.documents, result.tokens, result.output_prefix, result.tokenizer_model,
    )
    return 0
