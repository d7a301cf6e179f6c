#!/usr/bin/env python
"""Text files -> Megatron indexed dataset; a thin script around ``megatron-vwn preprocess``.

Kept under the name Megatron-LM users look for. Examples::

    python tools/preprocess_data.py --input book.txt notes.jsonl.gz \\
        --output-prefix data/mix --train-tokenizer --vocab-size 4096
    python tools/preprocess_data.py --input more.jsonl --output-prefix data/more \\
        --tokenizer-model data/mix.model --workers 4
"""

from __future__ import annotations

import sys

from megatron_vwn.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["preprocess", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
