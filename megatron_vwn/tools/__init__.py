"""Commands that run a model or plan runs: held-out scoring (``eval``), the DeepSpeed profile
(``profile``) and the ``shape`` command. Offline readers of runs are in
:mod:`megatron_vwn.studies`; the layers are in docs/architecture.md."""
