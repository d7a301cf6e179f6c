"""Studies: offline readers of finished or running runs and sweeps (the width report, the
depth-width shape study's plan and report). They read run directories through
:mod:`megatron_vwn.runs` only (docs/runs.md)."""
