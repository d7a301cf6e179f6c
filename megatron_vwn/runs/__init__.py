"""The run directory contract: what a run directory and a sweep directory hold, who writes each
file and how to read it back (docs/runs.md).

:mod:`megatron_vwn.runs.rows` owns ``metrics.jsonl`` (its name, its rows, trimming on resume);
:mod:`megatron_vwn.runs.sweeps` owns the sweep manifests (``sweep.json``, ``shape_sweep.json``)
and where a manifest's runs live. Only the standard library and ``config.errors`` are imported,
so the writers (training, checkpoint) and the readers (studies, launch) share one definition.
"""
