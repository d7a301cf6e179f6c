"""Throughput of ``megatron-vwn preprocess`` (documents and tokens per second) per worker count.

    python scripts/bench_preprocess.py --input data/benchmark/benchmark.jsonl.gz \
        --tokenizer-model data/benchmark/tokenizer.model [--workers 1 2 4] [--markdown]

Each run writes the indexed files to a temporary directory (removed) and is timed end to end:
reading and decompressing the input, encoding, writing. The rows go in docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from megatron_vwn.data.hf_tokenizer import is_hf_tokenizer
from megatron_vwn.data.preprocess import preprocess_files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    kind = "Hugging Face" if is_hf_tokenizer(args.tokenizer_model) else "SentencePiece"
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            tick = time.perf_counter()
            result = preprocess_files(args.input, os.path.join(tmp, "out"), args.tokenizer_model,
                                      workers=workers)
            seconds = time.perf_counter() - tick
        docs, tokens = result.documents / seconds, result.tokens / seconds
        if args.markdown:
            print(f"| {kind} | {workers} | {result.documents} | {result.tokens} | {seconds:.1f} "
                  f"| {docs:.0f} | {tokens / 1e3:.0f}k |")
        else:
            print(f"{kind} workers={workers}: {result.documents} documents, {result.tokens} "
                  f"tokens in {seconds:.1f} s: {docs:.0f} docs/s, {tokens:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
