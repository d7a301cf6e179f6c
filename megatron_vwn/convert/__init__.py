"""Hugging Face export and import (docs/convert.md).

* :mod:`.megatron_io`: a checkpoint at any TP/PP layout -> one single-process model (and a
  weights-only checkpoint back);
* :mod:`.keymap` (rules, typed transforms) and :mod:`.maps` (the Llama and VWN key maps);
* :mod:`.export` (``convert hf``), :mod:`.tokenizer`, :mod:`.safetensors_io`, :mod:`.verify`;
* :mod:`.importer` (``convert from-hf``);
* ``remote/``: ``configuration_vwn.py`` / ``modeling_vwn.py``, copied into every ``vwn`` export
  (torch + transformers only; they never import megatron_vwn).

Everything here imports transformers / safetensors lazily, so the package loads without the
``hf`` extra.
"""
