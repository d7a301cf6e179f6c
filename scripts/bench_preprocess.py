"""Throughput of ``megatron-vwn preprocess`` (documents and tokens per second) per worker count.

    python scripts/bench_preprocess.py --input data/benchmark/benchmark.jsonl.gz \
        --tokenizer-model data/benchmark/tokenizer.model [--workers 1 2 4] [--markdown]

Each worker count runs in a fresh process (the ``tokenizers`` thread pool is sized once per
process), writes the indexed files to a temporary directory (removed) and is timed end to end
after the imports: reading and decompressing the input, encoding, writing. The rows go in
docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from megatron_vwn.data.hf_tokenizer import is_hf_tokenizer
from megatron_vwn.data.preprocess import preprocess_files


def measure(inputs: list[str], tokenizer_model: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        result = preprocess_files(inputs, os.path.join(tmp, "out"), tokenizer_model,
                                  workers=workers)
        seconds = time.perf_counter() - tick
    return {"workers": workers, "documents": result.documents, "tokens": result.tokens,
            "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one count
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.input, args.tokenizer_model, args.workers[0])))
        return 0
    kind = "Hugging Face" if is_hf_tokenizer(args.tokenizer_model) else "SentencePiece"
    for workers in args.workers:
        child = subprocess.run([sys.executable, __file__, "--one", "--input", *args.input,
                                "--tokenizer-model", args.tokenizer_model,
                                "--workers", str(workers)],
                               check=True, capture_output=True, text=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
        docs, tokens = r["documents"] / r["seconds"], r["tokens"] / r["seconds"]
        if args.markdown:
            print(f"| {kind} | {workers} | {r['documents']} | {r['tokens']} | "
                  f"{r['seconds']:.1f} | {docs:.0f} | {tokens / 1e3:.0f}k |")
        else:
            print(f"{kind} workers={workers}: {r['documents']} documents, {r['tokens']} tokens "
                  f"in {r['seconds']:.1f} s: {docs:.0f} docs/s, {tokens:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
