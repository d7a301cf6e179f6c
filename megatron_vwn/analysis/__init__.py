"""Tools that run a model (held-out scoring, profiles), the ``shape`` command and the
interaction metrics of training. Offline readers of runs are in :mod:`megatron_vwn.studies`."""
