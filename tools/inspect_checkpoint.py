#!/usr/bin/env python
"""Print what a checkpoint holds; a thin script around ``megatron-vwn checkpoint inspect``.

Iteration, the TP/PP/DP layout it was written at, the resolved config, every parameter's global
shape, dtype and bytes, and the optimizer state's size. Examples::

    python tools/inspect_checkpoint.py runs/tiny                      # latest checkpoint of a run
    python tools/inspect_checkpoint.py runs/tiny/checkpoints/iter_0000200 --json
"""

from __future__ import annotations

import sys

from megatron_vwn.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["checkpoint", "inspect", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
