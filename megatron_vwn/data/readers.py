"""Read documents from the text formats the preprocessing accepts.

A *document* is the unit Megatron's ``split`` string assigns to train/validation/test and the
unit an end-of-document token closes, so how files map to documents matters:

- ``.jsonl``: one document per line, the text under a configurable key (default ``text``).
- ``.txt`` (or any other suffix): the whole file is one document, or, with
  ``split_paragraphs=True``, every blank-line separated paragraph is one document.
- a trailing ``.gz`` on either is decompressed on the fly.

Empty and whitespace-only documents are skipped: they would only contribute a lone EOD token.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import IO, Union

PathLike = Union[str, "os.PathLike[str]"]

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


class DocumentError(ValueError):
    """An input file cannot be read as documents (bad JSON, missing key, no documents)."""


def open_text(path: PathLike) -> IO[str]:
    """Open ``path`` as UTF-8 text, decompressing it when it ends in ``.gz``.

    Universal newlines are on, so Windows line ends become ``\n`` and a file gives the same
    tokens whichever platform wrote it.
    """
    path = os.fspath(path)
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _base_suffix(path: str) -> str:
    base = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(base)[1].lower()


def is_jsonl(path: PathLike) -> bool:
    """True when ``path`` (after an optional ``.gz``) is a JSON-lines file."""
    return _base_suffix(os.fspath(path)) in JSONL_SUFFIXES


def split_into_paragraphs(text: str) -> list[str]:
    """Split on blank lines (lines holding only whitespace), dropping empty paragraphs.

    Line breaks inside a paragraph are kept: they are part of the text the model should learn.
    """
    parts = (p.strip("\n") for p in _BLANK_LINES.split(text))
    return [p for p in parts if p.strip()]


def _iter_jsonl(path: str, json_key: str) -> Iterator[str]:
    with open_text(path) as stream:
        for line_no, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DocumentError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or json_key not in record:
                raise DocumentError(
                    f"{path}:{line_no}: expected a JSON object with key {json_key!r}"
                )
            text = record[json_key]
            if not isinstance(text, str):
                raise DocumentError(
                    f"{path}:{line_no}: {json_key!r} must be a string, got "
                    f"{type(text).__name__}"
                )
            if text.strip():
                yield text


def iter_documents(
    path: PathLike, json_key: str = "text", split_paragraphs: bool = False
) -> Iterator[str]:
    """Yield the non-empty documents of one input file, in file order.

    Raises :class:`DocumentError` for undecodable or malformed files, naming the file.
    """
    path = os.fspath(path)
    try:
        if is_jsonl(path):
            yield from _iter_jsonl(path, json_key)
            return
        with open_text(path) as stream:
            text = stream.read()
    except UnicodeDecodeError as err:
        raise DocumentError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except (OSError, EOFError) as err:
        raise DocumentError(f"{path}: cannot read ({err})") from err
    if split_paragraphs:
        yield from split_into_paragraphs(text)
    elif text.strip():
        yield text


def iter_documents_from_files(
    paths: Iterable[PathLike], json_key: str = "text", split_paragraphs: bool = False
) -> Iterator[str]:
    """Documents of several files, file after file (the order fixes document ids)."""
    for path in paths:
        yield from iter_documents(path, json_key=json_key, split_paragraphs=split_paragraphs)
