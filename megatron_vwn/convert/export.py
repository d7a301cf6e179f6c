"""``megatron-vwn convert hf``: a checkpoint (any TP/PP layout) -> a Hugging Face model directory.

    load (megatron_io) -> key map + transforms (maps, keymap) -> config.json,
    generation_config.json, safetensors shards + index, tokenizer -> optional parity check

Three formats: ``llama`` (stock ``LlamaForCausalLM``; the backbone only, ``m = n = 1``),
``mixtral`` (stock ``MixtralForCausalLM``; a plain MoE backbone, docs/moe.md) and ``vwn``
(``VWNForCausalLM``, its self-contained ``configuration_vwn.py`` / ``modeling_vwn.py`` copied in
and named by ``auto_map``; any model, the backbone included). ``auto`` picks ``llama``
for the backbone, ``mixtral`` for a plain MoE backbone, ``vwn`` otherwise (every other MoE
model too: the remote-code class has MoE). Multi-token-prediction heads are exported
in all: inside the ``vwn`` model (``mtp.{k}.*``), or beside the Llama / Mixtral files in
``mtp_heads.safetensors``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_vwn.compat.mcore import MTP_INNER_LAYER
from megatron_vwn.config import Config
from megatron_vwn.config.errors import ConfigError
from megatron_vwn.convert.keymap import to_hf
from megatron_vwn.convert.maps import MapShape, llama_rules, vwn_rules
from megatron_vwn.convert.megatron_io import LoadedModel, load_checkpoint, read_saved_run
from megatron_vwn.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES, save_sharded
from megatron_vwn.model.width.altup import active_block
from megatron_vwn.model.width.registry import members

logger = logging.getLogger(__name__)

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
REMOTE_FILES = ("configuration_vwn.py", "modeling_vwn.py")
MEMBERS_FILE = "vwn_members.py"
MTP_SIDECAR = "mtp_heads.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    vocab_size: int
    files: list[str] = field(default_factory=list)
    loaded: LoadedModel | None = None
    tokenizer_model: str | None = None


def resolve_tokenizer(cfg: Config, explicit: str | None) -> str | None:
    """The run's tokenizer (SentencePiece ``.model`` or Hugging Face ``tokenizer.json`` / its
    directory): ``explicit``, ``data.tokenizer_model``, or the bundled corpus's tokenizer (rebuilt
    byte-identically in the cache if it is gone); None if unknown."""
    from megatron_vwn.data.tokenizer import open_tokenizer

    if explicit:
        open_tokenizer(explicit, cfg.data.eod_token)
        return explicit
    if cfg.data.tokenizer_model and Path(cfg.data.tokenizer_model).exists():
        return cfg.data.tokenizer_model
    if not cfg.data.paths and not cfg.data.tokenizer_model:
        from megatron_vwn.data.datasets import prepare_data

        data = cfg.data
        if data.cache_dir and not Path(data.cache_dir).is_dir():
            data.cache_dir = None  # the run's cache is gone: the default cache gives the same
        return prepare_data(data).tokenizer_model
    return None


def mixtral_mismatch(cfg: Config) -> list[str]:
    """Why an MoE model is not a stock Mixtral (empty when it is): Mixtral has every layer MoE
    with one expert width, top-k-then-softmax routing, no shared expert, no expert bias and no
    dropped tokens, and no virtual width."""
    moe = cfg.model.moe
    reasons = [f"model.moe.{key}={value}" for key, value, plain in (
        ("dense_layers", moe.dense_layers, 0),
        ("shared_expert_ffn_hidden_size", moe.shared_expert_ffn_hidden_size, 0),
        ("router_score", moe.router_score, "softmax"),
        ("expert_bias", moe.expert_bias, False),
        ("capacity_factor", moe.capacity_factor, None)) if value != plain]
    if cfg.model.vwn.enabled:
        reasons.append(f"model.vwn.connection={cfg.model.vwn.connection} "
                       f"(m={cfg.model.vwn.m}, n={cfg.model.vwn.n})")
    return reasons


def choose_format(cfg: Config, requested: str) -> str:
    """The format ``requested`` resolves to for ``cfg`` (``auto`` picked), or a
    :class:`ConfigError` saying why the model cannot be written in it."""
    fmt = _format(cfg, requested)
    if fmt == "vwn":
        _require_reference(cfg)
    return fmt


def _format(cfg: Config, requested: str) -> str:
    backbone = not cfg.model.vwn.enabled
    if cfg.model.moe.enabled:
        reasons = mixtral_mismatch(cfg)
        if requested == "auto":
            return "vwn" if reasons else "mixtral"
        if requested == "mixtral" and reasons:
            raise ConfigError(
                f"--format mixtral needs a plain Mixtral-shaped MoE; this model has "
                f"{', '.join(reasons)}: use --format vwn (or auto)")
        if requested == "llama":
            raise ConfigError("--format llama cannot hold a mixture-of-experts model: use "
                              "--format mixtral, vwn or auto")
        return requested
    if requested == "mixtral":
        raise ConfigError("--format mixtral needs a mixture-of-experts model "
                          "(model.moe.num_experts > 0): use --format auto, llama or vwn")
    if requested == "auto":
        return "llama" if backbone else "vwn"
    if requested == "llama" and not backbone:
        raise ConfigError(
            f"--format llama needs the backbone (model.vwn.m = n = 1); this model has "
            f"connection={cfg.model.vwn.connection}, m={cfg.model.vwn.m}, n={cfg.model.vwn.n}: "
            f"use --format vwn (or auto)")
    return requested


def llama_config(loaded: LoadedModel, dtype: str, token_ids: dict):
    """``LlamaConfig`` of the backbone."""
    from transformers import LlamaConfig

    model = loaded.cfg.model
    return LlamaConfig(
        vocab_size=loaded.vocab_size, hidden_size=model.hidden_size,
        intermediate_size=model.ffn_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.query_groups,
        head_dim=model.hidden_size // model.num_attention_heads, hidden_act="silu",
        max_position_embeddings=model.seq_length, rms_norm_eps=model.norm_epsilon,
        initializer_range=model.init_method_std, tie_word_embeddings=model.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
        attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"],
        dtype=str(DTYPES[dtype]).replace("torch.", ""), **token_ids,
    )


def mixtral_config(loaded: LoadedModel, dtype: str, token_ids: dict):
    """``MixtralConfig`` of a plain MoE backbone (:func:`mixtral_mismatch` is empty)."""
    from transformers import MixtralConfig

    model = loaded.cfg.model
    config = MixtralConfig(
        vocab_size=loaded.vocab_size, hidden_size=model.hidden_size,
        intermediate_size=model.moe.expert_ffn_size(model.ffn_size),
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups,
        head_dim=model.hidden_size // model.num_attention_heads, hidden_act="silu",
        max_position_embeddings=model.seq_length, rms_norm_eps=model.norm_epsilon,
        initializer_range=model.init_method_std, tie_word_embeddings=model.tie_embeddings,
        rope_theta=float(model.rotary_base), sliding_window=None,
        num_local_experts=model.moe.num_experts, num_experts_per_tok=model.moe.top_k,
        router_aux_loss_coef=model.moe.aux_loss_coeff if model.moe.aux_loss != "none" else 0.0,
        architectures=["MixtralForCausalLM"], dtype=str(DTYPES[dtype]).replace("torch.", ""),
        **token_ids,
    )
    config.rope_parameters = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    return config


def vwn_config(loaded: LoadedModel, dtype: str, token_ids: dict):
    """``VWNConfig`` of any model (the backbone as ``vwn_connection = none``)."""
    from megatron_vwn.convert.remote.configuration_vwn import VWNConfig

    model = loaded.cfg.model
    vwn = model.vwn
    connection = _connections(loaded.model.decoder.layers[0])[0] if vwn.enabled else None
    shape = loaded.model.decoder.final_layernorm.vwn if vwn.enabled else None
    mtp = getattr(loaded.model, "mtp", None)
    mtp_layers = [getattr(layer, MTP_INNER_LAYER) for layer in mtp.layers] if mtp else []
    config = VWNConfig(
        vocab_size=loaded.vocab_size, hidden_size=model.hidden_size,
        intermediate_size=model.ffn_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.query_groups,
        head_dim=model.hidden_size // model.num_attention_heads,
        rms_norm_eps=model.norm_epsilon, rope_theta=float(model.rotary_base),
        max_position_embeddings=model.seq_length, initializer_range=model.init_method_std,
        tie_word_embeddings=model.tie_embeddings,
        vwn_connection=vwn.connection if vwn.enabled else "none",
        vwn_m=vwn.m if vwn.enabled else 1, vwn_n=vwn.n if vwn.enabled else 1,
        vwn_embedding=vwn.resolved_embedding, vwn_dynamic=vwn.dynamic,
        vwn_group_norm=vwn.use_group_norm,
        vwn_tau=float(getattr(connection, "tau", 1.0)),
        **(vwn.member.hf_config(vwn) if vwn.enabled else {}),
        ghc_norm_eps=float(vwn.norm_epsilon),
        vwn_reduce=shape.reduce if shape is not None else "none",
        mhc_sinkhorn_iters=vwn.mhc.sinkhorn_iters,
        altup_active=_layer_connection_blocks(loaded.model.decoder.layers),
        altup_mtp_active=_layer_connection_blocks(mtp_layers),
        altup_exit_block=active_block(shape, shape.num_layers - 1) if shape is not None else 0,
        num_mtp_layers=model.mtp.num_layers,
        moe_num_experts=model.moe.num_experts, moe_top_k=model.moe.top_k,
        moe_intermediate_size=model.moe.expert_ffn_size(model.ffn_size),
        moe_shared_intermediate_size=model.moe.shared_expert_ffn_hidden_size,
        moe_dense_layers=model.moe.dense_layers, moe_router_score=model.moe.router_score,
        moe_expert_bias=model.moe.expert_bias,
        architectures=["VWNForCausalLM"], dtype=str(DTYPES[dtype]).replace("torch.", ""),
        **token_ids,
    )
    config.auto_map = {"AutoConfig": "configuration_vwn.VWNConfig",
                       "AutoModelForCausalLM": "modeling_vwn.VWNForCausalLM"}
    return config


def reference_files() -> list[Path]:
    """Every registered member's reference module (``vwn_members.py`` imports them)."""
    files = {Path(member.reference.__file__): None for member in members()
             if member.reference is not None}  # GHC, HC and Frac share theirs
    return list(files)


def members_source() -> str:
    """``vwn_members.py``: every registered member that has a reference module, as
    ``modeling_vwn.py`` looks it up by ``vwn_connection``: ``(the reference's hf_connection, it
    wraps the whole layer, the layer's module names for it in slot order)``. The imports are
    static lines because transformers copies a remote file's relative imports by reading them."""
    exportable = [member for member in members() if member.reference is not None]
    stems = sorted({Path(member.reference.__file__).stem for member in exportable})
    lines = ['"""The width members this export carries (written by megatron-vwn convert hf',
             'from its registry): vwn_connection -> (builder, wraps_layer, module names)."""', ""]
    lines += [f"from .{stem} import hf_connection as {stem}" for stem in stems]
    lines += ["", "MEMBERS = {"]
    for member in exportable:
        stem = Path(member.reference.__file__).stem
        names = tuple(member.hf_slots().values())
        lines.append(f"    {member.name!r}: ({stem}, {member.wraps_layer!r}, {names!r}),")
    return "\n".join([*lines, "}", ""])


def _require_reference(cfg: Config) -> None:
    """A width member without a reference module has no HF remote class to run it."""
    vwn = cfg.model.vwn
    if vwn.enabled and vwn.member.reference is None:
        raise ConfigError(
            f"--format vwn needs the width member's reference module (WidthMember.reference, "
            f"docs/width_family.md); model.vwn.connection={vwn.connection} has none, so it "
            f"cannot be exported")


def _connections(layer) -> list:
    """A layer's width-connection modules in slot order (none for a stock layer)."""
    return layer.connections() if hasattr(layer, "connection_slots") else []


def _layer_connection_blocks(layers) -> list[int]:
    """The block each layer-wrapping connection computes (AltUp's ``active``), in layer order."""
    return [layer.connections()[0].active for layer in layers
            if hasattr(layer, "connection_slots") and layer.wraps_layer]


def _staging_dir(out_dir: Path) -> Path:
    """A fresh sibling directory to write into; renamed to ``out_dir`` once complete, so an
    interrupted export never leaves a half-written model under the final name."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"output directory {out_dir} is not empty; give a new or empty one")
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked before writing)
    staging.rename(out_dir)


def export_loaded(loaded: LoadedModel, out_dir: str | Path, *, fmt: str = "auto",
                  dtype: str = "fp32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  tokenizer_model: str | None = None) -> ExportResult:
    """Write ``loaded`` (a single-process model) as an HF model directory."""
    from transformers import GenerationConfig

    from megatron_vwn.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

    out_dir = Path(out_dir)
    fmt = choose_format(loaded.cfg, fmt)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype ({dtype}) must be one of {sorted(DTYPES)}")
    final_dir, out_dir = out_dir, _staging_dir(out_dir)

    token_ids = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    if tokenizer_model is not None:
        from megatron_vwn.convert.tokenizer import write_hf_tokenizer, write_hf_tokenizer_json
        from megatron_vwn.data.hf_tokenizer import is_hf_tokenizer

        if is_hf_tokenizer(tokenizer_model):
            token_ids = write_hf_tokenizer_json(tokenizer_model, out_dir,
                                                loaded.cfg.data.eod_token,
                                                loaded.cfg.model.seq_length)
        else:
            token_ids = write_hf_tokenizer(tokenizer_model, out_dir,
                                           loaded.cfg.model.seq_length)

    shape = MapShape.of(loaded.cfg.model, loaded.vocab_size, loaded.padded_vocab_size)
    rules = vwn_rules(shape) if fmt == "vwn" else llama_rules(shape)
    tensors = {name: tensor.detach().to(DTYPES[dtype])
               for name, tensor in to_hf(loaded.model.state_dict(), rules).items()}
    sidecar = {}
    if fmt in ("llama", "mixtral"):
        sidecar = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("mtp.")]}
        make_config = llama_config if fmt == "llama" else mixtral_config
        config = make_config(loaded, dtype, token_ids)
    else:
        config = vwn_config(loaded, dtype, token_ids)
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / name, out_dir / name)
        for reference in reference_files():
            shutil.copyfile(reference, out_dir / reference.name)
        (out_dir / MEMBERS_FILE).write_text(members_source())
    config.save_pretrained(out_dir)
    GenerationConfig(**token_ids).save_pretrained(out_dir)
    files = save_sharded(tensors, out_dir, max_shard_bytes)
    if sidecar:
        from safetensors.torch import save_file

        save_file(sidecar, str(out_dir / MTP_SIDECAR), metadata={
            "format": "pt", "num_mtp_layers": str(loaded.cfg.model.mtp.num_layers),
            "names": "VWNForCausalLM.mtp (vwn_connection=none); see megatron-vwn docs/convert.md",
        })
        files.append(MTP_SIDECAR)
    _publish(out_dir, final_dir)
    out_dir = final_dir
    logger.info("wrote %s (%s, %s, %d tensors in %d file(s), vocabulary %d)", out_dir, fmt,
                dtype, len(tensors) + len(sidecar), len(files), loaded.vocab_size)
    return ExportResult(out_dir=out_dir, format=fmt, vocab_size=loaded.vocab_size, files=files,
                        loaded=loaded, tokenizer_model=tokenizer_model)


def export_checkpoint(source: str | Path, out_dir: str | Path, *, fmt: str = "auto",
                      dtype: str = "fp32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      tokenizer: str | None = None, with_tokenizer: bool = True) -> ExportResult:
    """Load ``source`` (run dir, checkpoints dir or ``iter_*`` dir) and export it."""
    from megatron_vwn.config.loader import from_dict
    from megatron_vwn.convert.tokenizer import tokenizer_vocab_size

    _, saved = read_saved_run(source)
    saved_cfg = from_dict(saved.config)
    choose_format(saved_cfg, fmt)  # refuse llama for a VWN model before loading anything
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise ConfigError(f"output directory {out_dir} is not empty; give a new or empty one")
    tokenizer_model = resolve_tokenizer(saved_cfg, tokenizer) if with_tokenizer else None
    if with_tokenizer and tokenizer_model is None:
        raise ConfigError(
            f"cannot find the tokenizer of {source} (data.tokenizer_model "
            f"{saved_cfg.data.tokenizer_model!r} is not a file): pass --tokenizer PATH, "
            f"or --no-tokenizer to export the weights only")
    tokenizer_vocab = (tokenizer_vocab_size(tokenizer_model, saved_cfg.data.eod_token)
                       if tokenizer_model else None)
    loaded = load_checkpoint(source, tokenizer_vocab=tokenizer_vocab)
    return export_loaded(loaded, out_dir, fmt=fmt, dtype=dtype, max_shard_bytes=max_shard_bytes,
                         tokenizer_model=tokenizer_model)


def describe(result: ExportResult) -> str:
    loaded = result.loaded
    how = ("AutoModelForCausalLM.from_pretrained(OUT)" if result.format != "vwn"
           else "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)")
    source = f"{loaded.path} (iteration {loaded.iteration}, saved at {loaded.saved_layout})" \
        if loaded and loaded.path else "model"
    return (f"exported {source}\n  -> {result.out_dir} as {result.format} "
            f"({len(result.files)} weight file(s), vocabulary {result.vocab_size})\n"
            f"  load with {how}" + ("; AutoTokenizer.from_pretrained(OUT)"
                                    if result.tokenizer_model else ""))


def read_config_json(out_dir: Path) -> dict:
    return json.loads((out_dir / "config.json").read_text())
