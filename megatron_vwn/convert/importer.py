"""``megatron-vwn convert from-hf``: a Hugging Face Llama or Mixtral checkpoint -> a Megatron
checkpoint.

    HF config.json -> model section (+ key=value overrides, e.g. model.vwn.*, model.mtp.*)
    -> the model a run would build (initialised from train.seed) -> the Llama key map inverted
    -> backbone tensors copied in -> a weights-only checkpoint (megatron_io)

A run starts from it with ``checkpoint.load=OUT checkpoint.weights_only=true`` and the model
section of ``OUT/checkpoints/iter_0000000/config.yaml`` (use that file as the run's config).
With virtual width or MTP heads the backbone tensors are *taken* (attention, MLP, their norms,
the final RMSNorm, the LM head, the token table or its first ``D`` columns) and every other
parameter keeps the initialisation training gives it (docs/convert.md lists them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from megatron_vwn.config import Config
from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.loader import from_dict, parse_override
from megatron_vwn.convert.keymap import to_megatron
from megatron_vwn.convert.maps import MapShape, llama_rules
from megatron_vwn.convert.megatron_io import (
    build_single_model,
    save_weights_checkpoint,
    single_process_config,
)
from megatron_vwn.convert.safetensors_io import load_safetensors_dir

logger = logging.getLogger(__name__)

EMBEDDING = "embedding.word_embeddings.weight"


def _rope_theta(hf: dict) -> int:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if scaling or rope_type not in ("default", None):
        raise ConfigError(f"RoPE scaling ({scaling or params}) is not supported; megatron-vwn "
                          f"uses plain RoPE (model.rotary_base)")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if not theta.is_integer():
        raise ConfigError(f"rope_theta ({theta}) must be an integer (model.rotary_base)")
    return int(theta)


def llama_model_section(hf: dict) -> dict:
    """``model`` config keys of a ``LlamaForCausalLM`` or ``MixtralForCausalLM``
    ``config.json``; refuses what our backbone cannot express."""
    if hf.get("model_type") not in ("llama", "mixtral"):
        raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}; only 'llama' "
                          f"(LlamaForCausalLM) and 'mixtral' (MixtralForCausalLM) are supported")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (need 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention_bias / mlp_bias (need none)")
    if hf.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim={hf['head_dim']} (need hidden_size / num_attention_heads)")
    if hf.get("sliding_window") not in (None, 0):
        problems.append(f"sliding_window={hf['sliding_window']} (need none: full attention)")
    if problems:
        raise ConfigError(f"cannot import this {hf['model_type']}: " + "; ".join(problems))
    moe = {}
    if hf["model_type"] == "mixtral":  # every layer MoE, top-k then softmax (docs/moe.md)
        moe = {"moe": {"num_experts": hf["num_local_experts"],
                       "top_k": hf["num_experts_per_tok"],
                       "ffn_hidden_size": hf["intermediate_size"],
                       "aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0))}}
    return {
        **moe,
        "num_layers": hf["num_hidden_layers"], "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "ffn_hidden_size": hf["intermediate_size"],
        "seq_length": min(int(hf.get("max_position_embeddings", 2048)), 4096),
        "vocab_size": hf["vocab_size"],
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "rotary_base": _rope_theta(hf),
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-5)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
    }


def import_config(hf_dir: Path, overrides: list[str]) -> Config:
    """The run config of the imported model: HF shape, then ``key=value`` overrides."""
    hf = json.loads((hf_dir / "config.json").read_text())
    raw: dict = {"model": llama_model_section(hf)}
    tokenizer = hf_dir / "tokenizer.model"
    if tokenizer.is_file():
        raw["data"] = {"tokenizer_model": str(tokenizer.resolve())}
    elif (hf_dir / "tokenizer.json").is_file():  # the folder: its tokenizer_config names the eos
        raw["data"] = {"tokenizer_model": str(hf_dir.resolve())}
    elif not any(item.startswith("data.tokenizer_model=") for item in overrides):
        raise ConfigError(
            f"{hf_dir} has no tokenizer file (no tokenizer.model, no tokenizer.json): give "
            f"data.tokenizer_model=PATH, the tokenizer whose ids this model was trained on "
            f"(training on another tokenizer's ids would learn the wrong tokens)")
    for item in overrides:
        key, value = parse_override(item)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    cfg = from_dict(raw)
    cfg.model.validate()
    return cfg


def _check_tokenizer(cfg: Config) -> None:
    """The tokenizer the run will use opens, and its ids fit the model's vocabulary."""
    from megatron_vwn.data.tokenizer import open_tokenizer

    path = cfg.data.tokenizer_model
    try:
        vocab = open_tokenizer(path, cfg.data.eod_token).vocab_size
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.tokenizer_model ({path!r}): {exc}") from None
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer_model ({path!r}) has {vocab} ids, more than the "
                          f"model's vocabulary ({cfg.model.vocab_size}): not this model's "
                          f"tokenizer")


def _take(target: torch.Tensor, source: torch.Tensor, name: str) -> str:
    """Copy ``source`` into ``target``: whole, or (a wide table) into its first columns."""
    if target.shape == source.shape:
        target.copy_(source)
        return "all"
    if name == EMBEDDING and target.shape[0] == source.shape[0] \
            and target.shape[1] > source.shape[1]:
        target[:, : source.shape[1]].copy_(source)
        return f"first {source.shape[1]} of {target.shape[1]} columns"
    raise ConfigError(f"{name}: checkpoint tensor {tuple(source.shape)} does not fit the model's "
                      f"{tuple(target.shape)}")


@torch.no_grad()
def import_hf_llama(hf_dir: str | Path, out_dir: str | Path,
                    overrides: list[str] | None = None) -> tuple[Path, dict[str, str]]:
    """Write ``out_dir/checkpoints/iter_0000000`` from the Llama in ``hf_dir``.

    Returns the checkpoint path and, per Megatron parameter, what was taken ("all", "first D
    of D' columns") or "initialised" (new in the target model).
    """
    from megatron_vwn.config import validate
    from megatron_vwn.model.builder import padded_vocab_size

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"output directory {out_dir} is not empty; give a new or empty one")
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{hf_dir} has no config.json (expected a Hugging Face model directory)")
    cfg = import_config(hf_dir, list(overrides or []))
    validate(cfg)
    _check_tokenizer(cfg)
    padded = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by,
                               cfg.parallel.tensor)
    model = build_single_model(single_process_config(cfg), padded)
    shape = MapShape.of(cfg.model, cfg.model.vocab_size, padded)
    hf_state = mixtral_published_names(load_safetensors_dir(hf_dir))
    if cfg.model.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # a tied copy some writers keep
    backbone_names = [n for n in _backbone_names(cfg) if not n.startswith("mtp.")]
    backbone = to_megatron(hf_state, llama_rules(shape), backbone_names)
    params = dict(model.named_parameters())
    vwn = cfg.model.vwn.enabled
    report = {}
    for name, tensor in backbone.items():
        target = name
        if vwn and name == "decoder.final_layernorm.weight":
            target = "decoder.final_layernorm.norm.weight"
        report[target] = _take(params[target].data, tensor.to(params[target].dtype), target)
    for name in params:
        report.setdefault(name, "initialised")
    path = save_weights_checkpoint(model, cfg, padded, out_dir)
    new = sorted(n for n, how in report.items() if how == "initialised")
    logger.info("imported %d backbone tensors from %s; %d parameters keep their training init%s",
                len(backbone), hf_dir, len(new), f" ({', '.join(new[:4])}, ...)" if new else "")
    return path, report


def mixtral_published_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral experts under their published names (``block_sparse_moe.experts.{e}.w1/w2/w3``,
    ``block_sparse_moe.gate``), also when a writer stored transformers 5's fused layout
    (``mlp.experts.gate_up_proj`` ``[E, 2F, D]``, ``mlp.experts.down_proj`` ``[E, D, F]``,
    ``mlp.gate``)."""
    out = {}
    for name, tensor in hf_state.items():
        prefix, _, rest = name.partition(".mlp.")
        if rest == "experts.gate_up_proj":
            for e, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                out[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = gate
                out[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = up
        elif rest == "experts.down_proj":
            for e, down in enumerate(tensor):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = down
        elif rest == "gate.weight":
            out[f"{prefix}.block_sparse_moe.gate.weight"] = tensor
        else:
            out[name] = tensor
    return out


def _backbone_names(cfg: Config) -> list[str]:
    """Megatron names of the backbone (``m = n = 1``, no MTP) with this shape; MoE layers hold
    the router and every expert."""
    model = cfg.model
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    if not model.tie_embeddings:
        names.append("output_layer.weight")
    mlp = ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    if model.moe.enabled:
        mlp = ["mlp.router.weight"] + [f"mlp.experts.local_experts.{e}.{linear}.weight"
                                       for e in range(model.moe.num_experts)
                                       for linear in ("linear_fc1", "linear_fc2")]
    for i in range(model.num_layers):
        prefix = f"decoder.layers.{i}."
        names += [prefix + s for s in (
            "input_layernorm.weight", "self_attention.linear_qkv.weight",
            "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", *mlp)]
    return names


def describe_import(path: Path, report: dict[str, str]) -> str:
    taken = sum(1 for how in report.values() if how != "initialised")
    new = sorted(n for n, how in report.items() if how == "initialised")
    partial = {n: how for n, how in report.items() if how not in ("all", "initialised")}
    lines = [f"wrote {path} ({taken} parameters from the Hugging Face model"
             + (f", {len(new)} initialised as in training" if new else "") + ")"]
    lines += [f"  {name}: {how}" for name, how in partial.items()]
    run_dir = path.parent.parent
    lines.append(f"start a run from it: megatron-vwn train {path / 'config.yaml'} "
                 f"checkpoint.load={run_dir} checkpoint.weights_only=true run.dir=...")
    return "\n".join(lines)
