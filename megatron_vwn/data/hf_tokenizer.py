"""Hugging Face tokenizers beside SentencePiece: one way to open either (docs/data.md).

``data.tokenizer_model``, ``preprocess --tokenizer-model`` and ``convert hf --tokenizer`` take a
SentencePiece ``.model``, a Hugging Face ``tokenizer.json`` or a directory holding one (Llama 3,
Qwen, OLMo: byte-level BPE); the kind is read from the file, never from its name.
``tokenizer.json`` is loaded with the ``tokenizers`` library straight from disk, so nothing
asks the Hub; the Hugging Face offline switches are set anyway for the ``transformers`` calls
of the export.

Documents are encoded without special tokens (no BOS; as for SentencePiece) and closed by the
end-of-document (EOD) token: ``data.eod_token`` when given, else the ``eos_token`` of a
``tokenizer_config.json`` beside the ``tokenizer.json``, else ``<|endoftext|>``; else refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
DEFAULT_EOD = "<|endoftext|>"
_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def stay_offline() -> None:
    """No Hub look-up (and no 30-second retry loop) from ``transformers``/``huggingface_hub``."""
    for key in _OFFLINE:
        os.environ.setdefault(key, "1")


def hf_tokenizer_file(path: str | os.PathLike) -> Path | None:
    """The ``tokenizer.json`` that ``path`` names (itself, or inside a directory), or None when
    ``path`` is not a Hugging Face tokenizer."""
    path = Path(path)
    if path.is_dir():
        return hf_tokenizer_file(path / HF_FILE) if (path / HF_FILE).is_file() else None
    try:
        with open(path, "rb") as stream:
            if stream.read(1).lstrip() not in (b"{", b""):
                return None
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return path if isinstance(spec, dict) and "model" in spec else None


def is_hf_tokenizer(path: str | os.PathLike) -> bool:
    return hf_tokenizer_file(path) is not None


def _configured_eos(tokenizer_file: Path) -> str | None:
    config = tokenizer_file.parent / HF_CONFIG
    if not config.is_file():
        return None
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


class HFTokenizer:
    """A ``tokenizer.json`` with the attributes Megatron-Core's datasets and our trainer use
    (``vocab_size``, ``eod``, ``pad``, ``tokenize``, ``detokenize``), like its SentencePiece
    tokenizer."""

    library = "tokenizers"

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        from tokenizers import Tokenizer

        file = hf_tokenizer_file(path)
        if file is None:
            raise ValueError(f"{path} is not a Hugging Face {HF_FILE} (or a directory holding one)")
        self.path = str(file.resolve())
        try:
            self._tokenizer = Tokenizer.from_file(self.path)
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise ValueError(f"{self.path} is not a usable {HF_FILE}: {exc}") from None
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        candidates = [eod_token] if eod_token else [_configured_eos(file), DEFAULT_EOD]
        for name in filter(None, candidates):
            if self._tokenizer.token_to_id(name) is not None:
                self.eod_token, self.eod = name, self._tokenizer.token_to_id(name)
                break
        else:
            what = (f"data.eod_token ({eod_token!r}) is not in its vocabulary" if eod_token else
                    f"it names no eos_token in a {HF_CONFIG} beside it and has no {DEFAULT_EOD}")
            raise ValueError(f"{path}: {what}; name its end-of-document token with "
                             f"data.eod_token (preprocess: --eod-token)")
        pad = self._tokenizer.token_to_id("<pad>")
        self.pad = pad if pad is not None and pad != self.eod else -1
        self.unique_identifiers = {"class": type(self).__name__, "path": self.path,
                                   "eod": self.eod}

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)
