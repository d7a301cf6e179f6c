"""SentencePiece BPE: train a model deterministically, load it as a Megatron tokenizer.

Design choices, and why:

- **Reproducible.** One training thread, no sentence sampling or shuffling, the model written
  from memory (so no file name is baked into it): the same text and vocabulary size give a
  byte-identical ``.model`` file. That keeps cache keys and experiments comparable. (With more
  than one thread SentencePiece's BPE can break ties differently.)
- **Lossless.** Identity normalisation, extra whitespace kept, byte fallback for unseen
  characters and ``"\\n"`` as its own piece: ``detokenize(tokenize(text)) == text`` for ordinary
  text, including line breaks, so a model can learn layout and nothing in the data is replaced
  by ``<unk>``.
- **Fixed special ids.** ``<pad>=0``, ``<unk>=1``, ``<s>=2``, ``</s>=3``. ``</s>`` is the
  end-of-document (EOD) token the preprocessing appends and Megatron's ``GPTDataset`` reads as
  ``tokenizer.eod``; the pad id is distinct from it, so Megatron's check for a pad id that
  collides with EOD stays quiet and real EOD tokens are never masked as padding.

:func:`load_tokenizer` returns Megatron-Core's own SentencePiece tokenizer
(``megatron.core.tokenizers``), which is what ``GPTDatasetConfig(tokenizer=...)`` expects: the
dataset uses ``.eod``, ``.pad`` and ``.vocab_size`` (token dtype), and the object's
``unique_identifiers`` in its cache hash.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Union

from megatron_vwn.data.readers import iter_documents

logger = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NEWLINE = "\n"
TRAINING_CHUNK_CHARS = 8192
"""Documents are cut (at line ends) into training sentences of at most this many characters."""
TRAINING_SEED = 1234

TextsOrFiles = Union[str, "os.PathLike[str]", Iterable[Union[str, "os.PathLike[str]"]]]


def _is_path(item: object) -> bool:
    if isinstance(item, os.PathLike):
        return True
    return (
        isinstance(item, str) and "\n" not in item and len(item) < 4096 and os.path.isfile(item)
    )


def _iter_texts(text_iter_or_files: TextsOrFiles, json_key: str) -> Iterator[str]:
    if isinstance(text_iter_or_files, (str, os.PathLike)):
        text_iter_or_files = [text_iter_or_files]
    for item in text_iter_or_files:
        if _is_path(item):
            yield from iter_documents(item, json_key=json_key)
        elif isinstance(item, str):
            yield item
        else:
            raise TypeError(f"expected document text or a file path, got {type(item).__name__}")


def _training_chunks(document: str, limit: int = TRAINING_CHUNK_CHARS) -> Iterator[str]:
    """Cut a document into training sentences that keep their line breaks.

    SentencePiece trains on "sentences" and skips over-long ones; cutting at line ends keeps
    ``"\\n"`` inside the text the trainer sees (so the statistics match what encoding sees),
    and very long lines are cut at a space.
    """
    buffer: list[str] = []
    size = 0
    for line in document.splitlines(keepends=True):
        while len(line) > limit:
            cut = line.rfind(" ", 0, limit)
            cut = limit if cut <= 0 else cut
            if buffer:
                yield "".join(buffer)
                buffer, size = [], 0
            yield line[:cut]
            line = line[cut:]
        if size + len(line) > limit and buffer:
            yield "".join(buffer)
            buffer, size = [], 0
        buffer.append(line)
        size += len(line)
    if buffer:
        yield "".join(buffer)


def train_tokenizer(
    text_iter_or_files: TextsOrFiles,
    model_prefix: str,
    vocab_size: int,
    *,
    json_key: str = "text",
    num_threads: int = 1,
) -> str:
    """Train a SentencePiece BPE model and write ``MODEL_PREFIX.model`` (and ``.vocab``).

    Args:
        text_iter_or_files: document texts (an iterable of ``str``), or paths of input files in
            any format :mod:`megatron_vwn.data.readers` reads (``.txt``, ``.jsonl``, ``.gz``),
            or a mix. A ``str`` is taken as a path only when such a file exists.
        model_prefix: output path without ``.model``; parent directories are created.
        vocab_size: total pieces, special and byte pieces included (at least 300).
        json_key: the text key in ``.jsonl`` inputs.
        num_threads: trainer threads; only 1 guarantees byte-identical models.

    Returns:
        The path of the written ``.model`` file.
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError(f"vocab_size ({vocab_size}) must be >= 300 (261 pieces are reserved)")
    model_path = f"{model_prefix}.model"
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)

    def sentences() -> Iterator[str]:
        for document in _iter_texts(text_iter_or_files, json_key):
            yield from _training_chunks(document)

    spm.set_random_generator_seed(TRAINING_SEED)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=writer,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=[NEWLINE],
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=4 * TRAINING_CHUNK_CHARS + 16,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece could not train a {vocab_size}-piece BPE model from this text "
            f"(too little text for the vocabulary?): {err}"
        ) from err

    model_bytes = writer.getvalue()
    _atomic_write(model_path, model_bytes)
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab_lines = (
        f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n"
        for i in range(processor.get_piece_size())
    )
    _atomic_write(f"{model_prefix}.vocab", "".join(vocab_lines).encode("utf-8"))
    logger.info("trained a %d-piece SentencePiece BPE model: %s", vocab_size, model_path)
    return model_path


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as stream:
        stream.write(data)
    os.replace(tmp, path)


def check_tokenizer_model(model_path: str) -> object:
    """Open a ``.model`` with plain SentencePiece and check it can close documents.

    Returns the ``SentencePieceProcessor``. Raises ``FileNotFoundError`` or ``ValueError``.
    """
    import sentencepiece as spm

    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"no SentencePiece model at {model_path}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(model_path)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{model_path} is neither a SentencePiece model nor a Hugging Face "
                         f"tokenizer.json (or a directory holding one): {err}") from err
    if processor.eos_id() < 0:
        raise ValueError(
            f"{model_path} has no end-of-sentence piece; one is needed as the end-of-document "
            f"token (train with eos_id >= 0, e.g. megatron_vwn.data.tokenizer.train_tokenizer)"
        )
    return processor


class SentencePieceFile:
    """A checked SentencePiece model with the interface :class:`~megatron_vwn.data.hf_tokenizer.
    HFTokenizer` has for preprocessing (``vocab_size``, ``eod``, ``encode_batch``)."""

    def __init__(self, processor):
        self.processor = processor
        self.vocab_size = processor.get_piece_size()
        self.eod = processor.eos_id()

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=max(1, threads))


def open_tokenizer(path: str, eod_token: str | None = None):
    """A SentencePiece model or a Hugging Face tokenizer, by what the file holds.

    Raises ``FileNotFoundError`` or ``ValueError`` (one line, for the caller to name its key).
    """
    from megatron_vwn.data.hf_tokenizer import HF_FILE, HFTokenizer, is_hf_tokenizer

    if is_hf_tokenizer(path):
        return HFTokenizer(path, eod_token)
    if os.path.isdir(path):
        raise ValueError(f"directory {path} holds no Hugging Face {HF_FILE}")
    if eod_token:
        raise ValueError(f"data.eod_token ({eod_token!r}) applies to Hugging Face tokenizers; a "
                         f"SentencePiece model ends documents with its own eos: unset it")
    return SentencePieceFile(check_tokenizer_model(path))


def load_tokenizer(model_path: str, eod_token: str | None = None):
    """Load a SentencePiece model as a Megatron-Core tokenizer for ``GPTDatasetConfig``; a
    Hugging Face ``tokenizer.json`` (or its directory) as :class:`HFTokenizer`, the same
    interface.

    The object is a ``megatron.core.tokenizers.MegatronTokenizerBase`` with ``.vocab_size``,
    ``.eod`` (the model's ``</s>``), ``.pad``, ``.tokenize(str) -> list[int]`` and
    ``.detokenize(ids) -> str``. The path is made absolute because Megatron hashes it into the
    names of its cached sample indices.
    """
    model_path = os.path.abspath(os.path.expanduser(model_path))
    tokenizer = open_tokenizer(model_path, eod_token)
    if not isinstance(tokenizer, SentencePieceFile):
        return tokenizer
    from megatron.core.tokenizers import MegatronTokenizer

    metadata = {"library": "sentencepiece", "model_type": "gpt"}
    tokenizer = MegatronTokenizer.from_pretrained(model_path, metadata_path=metadata)
    if tokenizer.eod == tokenizer.pad:
        raise ValueError(f"{model_path}: pad id equals the end-of-document id {tokenizer.eod}")
    return tokenizer
