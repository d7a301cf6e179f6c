"""``python -m megatron_vwn``: the same entry point as the ``megatron-vwn`` script.

The guard matters: Megatron-Core's asynchronous checkpoint saver starts spawn-type helper
processes, which re-import ``__main__``.
"""

import sys

from megatron_vwn.cli import main

if __name__ == "__main__":
    sys.exit(main())
