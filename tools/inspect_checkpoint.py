#!/usr/bin/env python
"""Print what a checkpoint holds; a thin script around ``megatron-vwn checkpoint inspect``.

Iteration, the TP/PP/DP layout it was written at, the resolved config, every parameter's global
shape, dtype and bytes, and the optimizer state's size. Examples::

    python tools/inspect_checkpoint.py runs/tiny                      # latest checkpoint of a run
    python tools/inspect_checkpoint.py runs/tiny/checkpoints/iter_0000200 --json
"""

from __future__ import annotations

import argparse
import sys

from megatron_vwn.checkpoint.inspect import add_inspect_arguments, run_inspect
from megatron_vwn.config.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_inspect_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_inspect(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
