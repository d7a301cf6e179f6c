"""Config loading, overrides and every refusal, checked through the CLI as a user meets them."""

from __future__ import annotations

import pytest
import yaml

from megatron_vwn.cli import main
from megatron_vwn.config import ConfigError, load_config, validate


def _cli_error(capsys, *argv: str) -> str:
    """Run the CLI, expect exit status 2 with a single-line message, and no process group."""
    import torch.distributed

    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("megatron-vwn: error: ")
    assert not torch.distributed.is_initialized()
    return err


CASES = [
    (["model.hiden_size=64"], "unknown config key model.hiden_size"),
    (["optim.lr=1"], "unknown config key optim"),
    (["model.hidden_size=abc"], "model.hidden_size: expected int, got 'abc'"),
    (["train.lr=fast"], "train.lr: expected float"),
    (["model.transformer_impl=te"], "model.transformer_impl ('te') must be one of"),
    (["model.hidden_size=100", "model.num_attention_heads=3"],
     "model.hidden_size (100) must be divisible by model.num_attention_heads (3)"),
    (["parallel.tensor=3", "model.num_attention_heads=4"],
     "parallel.tensor (3) must divide model.num_attention_heads (4)"),
    (["parallel.tensor=4", "model.num_attention_heads=4", "model.num_query_groups=2"],
     "parallel.tensor (4) must divide model.num_query_groups (2)"),
    (["parallel.pipeline=3"], "model.num_layers (4) must be divisible by parallel.pipeline x "
                              "parallel.virtual_pipeline (3 x 1 = 3)"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=4"],
     "model.num_layers (4) must be divisible by parallel.pipeline x parallel.virtual_pipeline"),
    (["train.global_batch_size=12", "train.micro_batch_size=8"],
     "train.global_batch_size (12) must be divisible by train.micro_batch_size (8)"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true needs parallel.tensor"),
    (["train.min_lr=1", "train.lr=0.1"], "train.min_lr (1.0) must be <= train.lr (0.1)"),
    (["data.paths=[a, b]", "data.weights=[1]"], "data.weights has 1 entries but data.paths has 2"),
    (["train.eval_mode=moving"], "train.eval_mode ('moving') must be one of"),
    # virtual width (model.vwn.*)
    (["model.vwn.m=3", "model.vwn.n=6"], "model.vwn.m (3) must divide model.hidden_size (128)"),
    (["model.vwn.m=4", "model.vwn.n=2"], "model.vwn.n (2) must be >= model.vwn.m (4)"),
    (["model.vwn.m=2", "model.vwn.n=3", "model.vwn.group_norm=on"],
     "model.vwn.group_norm=on needs an integer r = n/m (got 3/2); allowed: auto, off"),
    (["model.vwn.m=2", "model.vwn.n=4", "parallel.tensor=4", "model.num_query_groups=4"],
     "parallel.tensor (4) must divide r = model.vwn.n / model.vwn.m (2) while the GroupNorm"),
    (["model.vwn.m=4", "model.vwn.n=5", "parallel.tensor=4", "model.hidden_size=36",
      "model.num_query_groups=4", "model.ffn_hidden_size=128"],
     "parallel.tensor (4) must divide the virtual width D' = model.vwn.n x model.hidden_size"),
    (["model.vwn.connection=hc", "model.vwn.m=2", "model.vwn.n=4"],
     "model.vwn.connection=hc needs model.vwn.m = 1 (got 2)"),
    (["model.vwn.connection=frac", "model.vwn.m=2", "model.vwn.n=4"],
     "model.vwn.connection=frac needs model.vwn.n = model.vwn.m (got m=2, n=4)"),
    (["model.vwn.m=2", "model.vwn.n=4", "model.tie_embeddings=true"],
     "model.tie_embeddings=true cannot tie the V x D' table of model.vwn.embedding=wide"),
    (["model.vwn.connection=ghcx"], "model.vwn.connection ('ghcx') must be one of"),
    # neural-interaction metrics (analysis.*)
    (["analysis.interaction_interval=-1"], "analysis.interaction_interval (-1) must be >= 0"),
    (["analysis.probes=0"], "analysis.probes (0) must be > 0"),
    (["analysis.batches=0"], "analysis.batches (0) must be > 0"),
    (["analysis.interaction_interval=5", "model.mtp.num_layers=1"],
     "analysis.interaction_interval > 0 needs model.mtp.num_layers=0"),
    # the rest of the family (docs/width_family.md)
    (["model.vwn.connection=mhc", "model.vwn.m=2", "model.vwn.n=4"],
     "model.vwn.connection=mhc needs model.vwn.m = 1 (got 2); n is the number of streams"),
    (["model.vwn.connection=altup", "model.vwn.m=2", "model.vwn.n=4", "model.vwn.dynamic=false"],
     "model.vwn.connection=altup needs model.vwn.m = 1 (got 2); n is K, the number of blocks"),
    (["model.vwn.connection=mhc", "model.vwn.n=4", "model.vwn.embedding=wide"],
     "model.vwn.embedding=wide does not go with model.vwn.connection=mhc; allowed: auto, "
     "replicated"),
    (["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.embedding=factorized",
      "model.vwn.dynamic=false"],
     "model.vwn.embedding=factorized does not go with model.vwn.connection=altup; allowed: "
     "auto, wide, replicated"),
    (["model.vwn.m=2", "model.vwn.n=4", "model.vwn.embedding=replicated"],
     "model.vwn.embedding=replicated does not go with model.vwn.connection=ghc; allowed: auto, "
     "wide, factorized"),
    (["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.embedding=wide",
      "model.vwn.dynamic=true"],
     "model.vwn.embedding=wide does not go with model.vwn.connection=altup and "
     "model.vwn.dynamic=true"),
    (["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=true",
      "model.mtp.num_layers=1", "parallel.pipeline=2"],
     "model.mtp.num_layers > 0 with parallel.pipeline > 1 needs the MTP stage's copy of the "
     "embedding kept in sync, which Megatron-Core does for the table only, not for dynamic"),
    (["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=false",
      "model.tie_embeddings=true"],
     "cannot tie the V x D' table of model.vwn.embedding=wide to the V x D output layer; use "
     "model.vwn.embedding=replicated or model.tie_embeddings=false"),
    (["model.vwn.connection=mhc", "model.vwn.n=4", "model.vwn.mhc.sinkhorn_iters=0"],
     "model.vwn.mhc.sinkhorn_iters (0) must be > 0"),
    (["model.vwn.connection=mhc", "model.vwn.n=4", "model.vwn.group_norm=on"],
     "model.vwn.group_norm=on applies to model.vwn.connection=ghc only (got mhc)"),
    (["model.vwn.altup.selection=odd"], "model.vwn.altup.selection ('odd') must be one of"),
    (["model.vwn.mhc.reduce=max"], "model.vwn.mhc.reduce ('max') must be one of"),
    (["model.vwn.connection=mhc", "model.vwn.n=4", "model.vwn.recompute=ghc"],
     "model.vwn.recompute=ghc applies to the GHC-style connections (ghc, hc, frac), not "
     "model.vwn.connection=mhc"),
    (["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.kernel=triton"],
     "model.vwn.kernel=triton applies to the GHC-style connections"),
    # faults (docs/reliability.md)
    (["train.nan_policy=ignore"], "train.nan_policy ('ignore') must be one of ['stop', 'skip']"),
    (["train.max_skipped_steps=0"], "train.max_skipped_steps (0) must be > 0"),
    (["parallel.timeout_s=0"], "parallel.timeout_s (0) must be > 0"),
    (["checkpoint.on_save_error=retry"],
     "checkpoint.on_save_error ('retry') must be one of ['stop', 'continue']"),
    (["debug.nan_at=[3, 0]"], "debug.nan_at[1] (0) must be > 0"),
    (["debug.save_error_at=x"], "debug.save_error_at: expected a list, got 'x'"),
    (["model.vwn.kernel=cuda"], "model.vwn.kernel ('cuda') must be one of"),
    (["model.vwn.recompute=all"], "model.vwn.recompute ('all') must be one of"),
]


@pytest.mark.parametrize("overrides,message", CASES)
def test_bad_config_is_one_line_naming_the_key(capsys, overrides, message):
    err = _cli_error(capsys, "train", *overrides, "--nproc", "1")
    assert message in err


def test_process_count_must_match_layout(capsys):
    err = _cli_error(capsys, "train", "parallel.tensor=2", "--nproc", "3")
    assert "number of processes (3) must be a multiple of parallel.tensor x" in err
    err = _cli_error(capsys, "train", "train.global_batch_size=8", "train.micro_batch_size=8",
                     "--nproc", "2")
    assert ("train.global_batch_size (8) must be divisible by train.micro_batch_size x "
            "data-parallel size (8 x 2 = 16)") in err


def test_missing_data_files(capsys, tmp_path):
    err = _cli_error(capsys, "train", f"data.paths=[{tmp_path}/nothing]",
                     f"data.tokenizer_model={tmp_path}/tok.model", "--nproc", "1")
    assert "data.paths[0]" in err
    err = _cli_error(capsys, "train", "no/such/config.yaml")
    assert "config file 'no/such/config.yaml' not found; shipped configs:" in err


def test_yaml_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"hidden_size": 96, "num_attention_heads": 6},
                                    "train": {"lr": 1}}))
    cfg = load_config(path, ["train.lr=2e-4", "train.min_lr=0", "data.weights=[1, 2]",
                             "data.paths=[x, y]"])
    assert cfg.model.hidden_size == 96 and cfg.model.num_attention_heads == 6
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.weights == [1.0, 2.0]
    validate(cfg, 1)


def test_shipped_configs_are_valid_at_their_layout():
    for name in ("tiny", "gpt_125m", "gpt_350m", "gpt_1p3b"):
        cfg = load_config(name)
        validate(cfg, cfg.parallel.tensor * cfg.parallel.pipeline)


def test_llama_ffn_rule_and_mha_default():
    cfg = load_config(None, ["model.hidden_size=768", "model.num_attention_heads=12"])
    assert cfg.model.ffn_size == 2048 and cfg.model.query_groups == 12
    with pytest.raises(ConfigError, match="model.num_query_groups .5. must divide"):
        validate(load_config(None, ["model.num_query_groups=5"]))
