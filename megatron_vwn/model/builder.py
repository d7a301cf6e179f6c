"""Config -> Megatron-Core ``TransformerConfig`` -> ``GPTModel`` chunks.

This is the only module that imports ``GPTModel`` (deprecated upstream after 0.19 in favour of
``HybridModel``), so moving to the successor is one change here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vwn.compat.cpu import cpu_mode
from megatron_vwn.compat.mcore import GPTModel
from megatron_vwn.compat.mcore_internals import install_embedding
from megatron_vwn.config.fp8 import fp8_fields
from megatron_vwn.config.recompute import recompute_fields
from megatron_vwn.config.schema import Config
from megatron_vwn.model.layout import initialize_layout_invariant
from megatron_vwn.model.moe import tag_routers
from megatron_vwn.model.moe import transformer_config_fields as moe_fields
from megatron_vwn.model.mtp import MTPLossRecorder, chain_wide_states
from megatron_vwn.model.specs import model_specs, resolve_transformer_impl
from megatron_vwn.model.width.ghc_recompute import link_recompute_chain
from megatron_vwn.model.width.vwn import VWNShape
from megatron_vwn.model.width.vwn_io import VWNEmbedding


def compute_dtype(precision: str) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU; fp8 keeps bf16 weights (FP8 GEMMs are TE's)."""
    if precision == "auto":
        return torch.float32 if cpu_mode() else torch.bfloat16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[precision]


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Pad like Megatron-LM so every tensor-parallel rank holds an equal vocabulary slice."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def vwn_shape(cfg: Config) -> VWNShape | None:
    """The virtual-width layout, or None for the backbone (built as the exact stock model)."""
    if not cfg.model.vwn.enabled:
        return None
    return VWNShape.from_config(cfg.model.vwn, cfg.model.hidden_size,
                                num_layers=cfg.model.num_layers,
                                init_std=cfg.model.init_method_std)


def residual_width(cfg: Config) -> int:
    """Width of the tensors pipeline stages exchange: D, or D' with virtual width."""
    shape = vwn_shape(cfg)
    return shape.width if shape is not None else cfg.model.hidden_size


def build_transformer_config(cfg: Config) -> TransformerConfig:
    """Megatron-Core's config for our Llama-style backbone at the configured layout."""
    model, par = cfg.model, cfg.parallel
    dtype = compute_dtype(cfg.train.precision)
    on_cpu = cpu_mode()
    config = TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=par.tensor,
        pipeline_model_parallel_size=par.pipeline,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline if par.vpp > 1 else None,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # The loss is a token sum; schedules divide by the global token count.
        calculate_per_token_loss=True,
        use_cpu_initialization=on_cpu,
        # Fused kernels need CUDA (and apex / TE for some); plain PyTorch on CPU.
        bias_activation_fusion=not on_cpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Batched isend/irecv gives wrong results for the interleaved schedule on gloo.
        batch_p2p_comm=not on_cpu,
        deallocate_pipeline_outputs=True,
        # The interleaved schedule has no shape hook: wide states announce their shape.
        variable_seq_lengths=residual_width(cfg) != model.hidden_size and par.vpp > 1,
        moe_token_dispatcher_type="alltoall",  # allgather refuses variable_seq_lengths
        mtp_num_layers=model.mtp.num_layers or None,
        mtp_loss_scaling_factor=model.mtp.loss_weight,
        **recompute_fields(cfg),  # train.recompute*: docs/scale.md
        **fp8_fields(cfg.train),  # train.precision=fp8: docs/scale.md
        **moe_fields(cfg, resolve_transformer_impl(model.transformer_impl)),
    )
    shape = vwn_shape(cfg)
    if shape is not None and shape.output_init_scale != 1.0:
        base_init, factor = config.output_layer_init_method, shape.output_init_scale

        def scaled_output_init(weight: torch.Tensor) -> None:
            base_init(weight)
            weight.data.mul_(factor)

        config.output_layer_init_method = scaled_output_init
    return config


def build_model_chunk(
    cfg: Config, config: TransformerConfig, vocab_size: int, vp_stage: int | None = None
) -> GPTModel:
    """One (virtual) pipeline stage of the backbone."""
    impl = resolve_transformer_impl(cfg.model.transformer_impl)
    vpp = cfg.parallel.vpp > 1
    shape = vwn_shape(cfg)
    block, mtp = model_specs(config, impl, vwn=shape, vp_stage=vp_stage if vpp else None)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block,
        mtp_block_spec=mtp,
        vocab_size=vocab_size,
        max_sequence_length=cfg.model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(not vpp, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(not vpp, vp_stage=vp_stage),
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
        vp_stage=vp_stage if vpp else None,
    )
    if shape is not None:
        install_embedding(model, VWNEmbedding(config, shape, vocab_size, cfg.model.seq_length)
                          if model.pre_process or model.mtp_process else None)
        chain_wide_states(model)
        link_recompute_chain(model)
    tag_routers(model)
    if model.mtp_process:
        model.compute_language_model_loss = MTPLossRecorder(
            model.compute_language_model_loss, cfg.model.mtp.num_layers
        )
    return model


def build_model(cfg: Config, vocab_size: int) -> list[GPTModel]:
    """All model chunks this rank holds (one, or ``virtual_pipeline`` of them), initialised.

    On CPU the weights are re-drawn per global parameter name so every parallel layout starts
    from the same model (see :mod:`megatron_vwn.model.layout`).
    """
    config = build_transformer_config(cfg)
    stages = range(cfg.parallel.vpp) if cfg.parallel.vpp > 1 else [None]
    chunks = [build_model_chunk(cfg, config, vocab_size, vp_stage) for vp_stage in stages]
    if config.use_cpu_initialization:
        initialize_layout_invariant(chunks, cfg.train.seed)
    if not cpu_mode():
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks
