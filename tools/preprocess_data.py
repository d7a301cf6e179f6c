#!/usr/bin/env python
"""Text files -> Megatron indexed dataset; a thin script around ``megatron-vwn preprocess``.

Kept under the name Megatron-LM users look for. Examples::

    python tools/preprocess_data.py --input book.txt notes.jsonl.gz \\
        --output-prefix data/mix --train-tokenizer --vocab-size 4096
    python tools/preprocess_data.py --input more.jsonl --output-prefix data/more \\
        --tokenizer-model data/mix.model --workers 4
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.data.preprocess import add_preprocess_arguments, run_preprocess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_preprocess_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_preprocess(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
