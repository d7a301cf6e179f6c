"""Configuration of ``VWNForCausalLM``: a Llama-style decoder with a virtual-width residual stream.

Written by ``megatron-vwn convert hf`` next to the weights; needs only ``transformers``.
See ``modeling_vwn.py`` for the mathematics and docs/convert.md in megatron-vwn for the key map.
"""

from transformers import PretrainedConfig


class VWNConfig(PretrainedConfig):
    """Backbone (Llama names) plus the virtual-width layout.

    Virtual width: ``vwn_connection`` names a width member the export carries (``vwn_members.py``
    beside the model code: ``ghc`` (Virtual Width Networks), ``hc`` (hyper-connections,
    ``m = 1``), ``frac`` (frac-connections, ``n = m``), ``mhc``, ``altup``) or is ``none`` (the
    plain pre-norm residual backbone; used to carry a backbone's multi-token-prediction heads).
    ``vwn_m`` (fraction rate) and ``vwn_n`` (slots) give the segment width ``d_b = D / m`` and the
    wide state ``D' = n * d_b``. ``vwn_embedding``: ``wide`` (a ``V x D'`` table) or
    ``factorized`` (``V x D`` then ``D -> D'``); HC replicates a ``V x D`` table ``n`` times.
    ``vwn_group_norm``: GroupNorm (groups of width ``D``) before the reduce ``D' -> D``.
    ``vwn_dynamic``: token-dependent GHC coefficients; ``vwn_tau`` their tanh temperature;
    ``vwn_scalar_scales``: HC's scalar dynamic scales instead of elementwise matrices;
    ``ghc_norm_eps``: epsilon of the per-segment RMSNorm of the coefficient path.
    ``mhc`` (manifold-constrained hyper-connections, ``m = 1``, ``n`` streams):
    ``mhc_sinkhorn_iters`` Sinkhorn iterations. ``altup`` (alternating updates, ``m = 1``,
    ``n = K`` blocks):
    ``altup_active`` the block each decoder layer computes, ``altup_mtp_active`` the same for the
    MTP depths; ``vwn_dynamic`` selects Gemma 3n's router variant there. ``vwn_embedding`` is
    also ``replicated`` (the ``D`` table copied ``n`` times), ``projected`` (Gemma 3n: learned
    RMS-matched projections) or ``none``. ``vwn_reduce``: ``ghc`` (GroupNorm + reduce), ``sum``,
    ``mean``, ``active`` (``altup_exit_block``) or ``none``.
    ``num_mtp_layers``: multi-token-prediction depths stored with the model (unused by
    ``forward``; see ``VWNForCausalLM.mtp_logits``).
    """

    model_type = "vwn"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int = 1408,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        vwn_connection: str = "ghc",
        vwn_m: int = 1,
        vwn_n: int = 1,
        vwn_embedding: str = "wide",
        vwn_dynamic: bool = True,
        vwn_group_norm: bool = False,
        vwn_tau: float = 1.0,
        vwn_scalar_scales: bool = False,
        ghc_norm_eps: float = 1e-6,
        vwn_reduce: str = "none",
        mhc_sinkhorn_iters: int = 20,
        altup_active: list | None = None,
        altup_mtp_active: list | None = None,
        altup_exit_block: int = 0,
        num_mtp_layers: int = 0,
        moe_num_experts: int = 0,
        moe_top_k: int = 2,
        moe_intermediate_size: int | None = None,
        moe_shared_intermediate_size: int = 0,
        moe_dense_layers: int = 0,
        moe_router_score: str = "softmax",
        moe_expert_bias: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.vwn_connection = vwn_connection
        self.vwn_m = vwn_m
        self.vwn_n = vwn_n
        self.vwn_embedding = vwn_embedding
        self.vwn_dynamic = vwn_dynamic
        self.vwn_group_norm = vwn_group_norm
        self.vwn_tau = vwn_tau
        self.vwn_scalar_scales = vwn_scalar_scales
        self.ghc_norm_eps = ghc_norm_eps
        self.vwn_reduce = vwn_reduce
        self.mhc_sinkhorn_iters = mhc_sinkhorn_iters
        self.altup_active = list(altup_active or [])
        self.altup_mtp_active = list(altup_mtp_active or [])
        self.altup_exit_block = altup_exit_block
        self.num_mtp_layers = num_mtp_layers
        # mixture of experts: 0 experts = dense MLPs; layers from moe_dense_layers on (and the
        # MTP layers) are MoE
        self.moe_num_experts = moe_num_experts
        self.moe_top_k = moe_top_k
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.moe_shared_intermediate_size = moe_shared_intermediate_size
        self.moe_dense_layers = moe_dense_layers
        self.moe_router_score = moe_router_score
        self.moe_expert_bias = moe_expert_bias
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        if hidden_size % vwn_m or vwn_n < vwn_m:
            raise ValueError(f"need vwn_m | hidden_size and vwn_n >= vwn_m (got m={vwn_m}, "
                             f"n={vwn_n}, hidden_size={hidden_size})")
        if moe_router_score not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router_score ({moe_router_score!r}) must be softmax or sigmoid")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` (MTP layers follow the decoder's) has an MoE MLP."""
        return self.moe_num_experts > 0 and layer_idx >= self.moe_dense_layers

    @property
    def has_width(self) -> bool:
        """A width member's wide state (``vwn_connection`` is not ``none``, the backbone)."""
        return self.vwn_connection != "none"

    @property
    def segment_width(self) -> int:
        """d_b = D / m."""
        return self.hidden_size // self.vwn_m

    @property
    def wide_size(self) -> int:
        """D' = n * d_b (D for the plain backbone)."""
        return self.vwn_n * self.segment_width
