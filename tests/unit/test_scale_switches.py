"""The recompute and FP8 switches as configuration: the TransformerConfig fields each setting
produces (checked by constructing Megatron-Core's TransformerConfig), and the refusals, one line
each, before any process group. Gradients under recompute: tests/distributed/
test_recompute_parity.py; FP8 on a GPU: tests/gpu/test_gpu.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from megatron_vwn.config import ConfigError, load_config, validate
from megatron_vwn.config.fp8 import fp8_fields
from megatron_vwn.config.recompute import recompute_fields

FOUR_LAYERS = ["model.num_layers=4"]


def _transformer_config(**fields):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                             use_cpu_initialization=True, **fields)


@pytest.mark.parametrize("overrides, expected", [
    ([], {}),
    (["train.recompute=selective"], {"recompute_granularity": "selective",
                                     "recompute_method": None, "recompute_num_layers": None,
                                     "recompute_modules": ["core_attn"]}),
    (["train.recompute=selective", "train.recompute_modules=[core_attn,mlp]"],
     {"recompute_granularity": "selective", "recompute_method": None,
      "recompute_num_layers": None, "recompute_modules": ["core_attn", "mlp"]}),
    (["train.recompute=full"], {"recompute_granularity": "full", "recompute_method": "uniform",
                                "recompute_num_layers": 1, "recompute_modules": ["core_attn"]}),
    (["train.recompute=full", "train.recompute_method=block", "parallel.pipeline=2"],
     {"recompute_granularity": "full", "recompute_method": "block",
      "recompute_num_layers": 2, "recompute_modules": ["core_attn"]}),  # all of the stage
    (["train.recompute=full", "train.recompute_num_layers=2"],
     {"recompute_granularity": "full", "recompute_method": "uniform",
      "recompute_num_layers": 2, "recompute_modules": ["core_attn"]}),
])
def test_recompute_maps_onto_megatron_core(overrides, expected):
    cfg = load_config(None, [*FOUR_LAYERS, *overrides])
    validate(cfg)
    fields = recompute_fields(cfg)
    assert fields == expected
    config = _transformer_config(**fields)  # Megatron-Core accepts them
    for key, value in fields.items():
        assert getattr(config, key) == value


def test_every_recompute_module_offered_is_accepted_by_megatron_core():
    from megatron_vwn.compat.mcore import RECOMPUTE_MODULES

    for module in RECOMPUTE_MODULES:
        config = _transformer_config(recompute_granularity="selective",
                                     recompute_modules=[module])
        assert config.recompute_modules == [module]


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
@pytest.mark.parametrize("first_last", [False, True])
def test_fp8_fields(recipe, first_last):
    train = load_config(None, ["train.precision=fp8", f"train.fp8_recipe={recipe}",
                               f"train.fp8_first_last_bf16={str(first_last).lower()}"]).train
    fields = fp8_fields(train)
    assert fields == {"fp8": "hybrid", "fp8_recipe": recipe, "first_last_layers_bf16": first_last}
    if first_last and recipe == "delayed":
        return  # refused by us (below) and by Megatron-Core
    config = _transformer_config(bf16=True, **fields)
    assert (config.fp8, config.fp8_recipe, config.first_last_layers_bf16) == (
        "hybrid", recipe, first_last)
    assert fp8_fields(load_config(None, ["train.precision=bf16"]).train) == {}


@pytest.mark.parametrize("overrides, message", [
    (["train.recompute_num_layers=2"],
     "train.recompute_num_layers does not apply to train.recompute=none"),
    (["train.recompute=selective", "train.recompute_method=block"],
     "train.recompute_method does not apply to train.recompute=selective"),
    (["train.recompute=full", "train.recompute_modules=[mlp]"],
     "train.recompute_modules does not apply to train.recompute=full"),
    (["train.recompute=selective", "train.recompute_modules=[attention]"],
     "train.recompute_modules (['attention']) must be a non-empty list of: core_attn"),
    (["train.recompute=full", "train.recompute_num_layers=3"],
     "train.recompute_num_layers (3) must be >= 1 and divide the layers of a pipeline stage (4"),
    (["train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=3",
      "parallel.pipeline=2"],
     "train.recompute_num_layers (3) must be >= 1 and be at most the layers of a pipeline "
     "stage (2"),
    (["train.recompute=full", "model.vwn.m=2", "model.vwn.n=4", "model.vwn.recompute=ghc"],
     "model.vwn.recompute (ghc) does nothing useful with train.recompute=full over every layer"),
    (["train.recompute=full", "model.vwn.connection=mhc", "model.vwn.n=4",
      "model.vwn.recompute_coefficients=true"],
     "model.vwn.recompute_coefficients (coefficients) does nothing useful"),
    (["train.recompute=full", "train.recompute_num_layers=2", "model.mtp.num_layers=1"],
     "train.recompute_num_layers (2) must be 1 with train.recompute_method=uniform and "
     "model.mtp.num_layers > 0"),
    (["train.fp8_first_last_bf16=true"], "train.fp8_first_last_bf16=true needs "
                                         "train.precision=fp8"),
    (["train.precision=fp8"], "train.precision=fp8 needs a CUDA GPU and Transformer Engine"),
])
def test_bad_switches_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, [*FOUR_LAYERS, *overrides]), world_size=2)
    assert str(err.value).startswith(message), str(err.value)


def test_block_recompute_of_some_layers_keeps_the_vwn_mode():
    """Layers that block recompute skips still use model.vwn.recompute: accepted."""
    validate(load_config(None, [*FOUR_LAYERS, "train.recompute=full",
                                "train.recompute_method=block", "train.recompute_num_layers=1",
                                "model.vwn.m=2", "model.vwn.n=4", "model.vwn.recompute=ghc"]))


def test_fp8_on_cpu_is_one_line_exit_2_before_any_process_group(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "megatron_vwn", "train", "train.precision=fp8",
                           f"run.dir={tmp_path / 'run'}"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "megatron-vwn: error: train.precision=fp8 needs a CUDA GPU and Transformer Engine")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                    reason="with Transformer Engine layernorm recompute is offered")
def test_layernorm_recompute_without_transformer_engine_is_refused():
    cfg = load_config(None, ["train.recompute=selective", "train.recompute_modules=[layernorm]"])
    with pytest.raises(ConfigError, match=r"must be a non-empty list of: core_attn, mlp "
                                          r"\(layernorm needs Transformer Engine"):
        validate(cfg)
