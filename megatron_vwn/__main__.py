import sys

from megatron_vwn.cli import main

sys.exit(main())
