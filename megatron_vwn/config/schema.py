"""The typed configuration tree.

Each sub-config is a dataclass that owns one concern (model shape, parallel layout, optimisation,
data, run directory, logging). The field names are a public contract: YAML files, dotted
command-line overrides (``train.lr=1e-3``), ``config.yaml`` in the run directory and later
issues all use them. Extend, never rename.

Checks that involve a single sub-config live in its ``validate`` method; checks that need several
sub-configs or the world size live in :mod:`megatron_vwn.config.validation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.switches import validate_schedule
from megatron_vwn.model.width.altup import AltUpConfig
from megatron_vwn.model.width.mhc import MhcConfig
from megatron_vwn.model.width.registry import WidthMember, member_of


def _positive(key: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} ({value}) must be {bound}")


def _check_triton_available() -> None:
    """``model.vwn.kernel=triton`` needs Triton, and a GPU or Triton's CPU interpreter."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        raise ConfigError("model.vwn.kernel=triton needs the triton package (the 'kernels' "
                          "extra), which is not installed; allowed here: auto, torch")
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("model.vwn.kernel=triton needs a CUDA device or TRITON_INTERPRET=1 "
                          "(Triton's CPU interpreter); allowed here: auto, torch")


@dataclass
class VwnConfig:
    """Virtual width and its family (docs/vwn.md, docs/width_family.md, docs/methods.md §1-3).

    ``m`` fraction rate, ``n`` expanded slots: segment width ``d_b = D / m``, virtual width
    ``D' = n * d_b``, factor ``r = n / m``. ``m = n = 1`` is the backbone, built as the stock
    model. ``connection`` picks the family member, a name in the registry
    (:mod:`megatron_vwn.model.width.registry`): ``ghc`` (VWN's generalized hyper-connections),
    ``hc`` (hyper-connections: ``m = 1``, ``n`` replicated streams), ``frac``
    (frac-connections: ``n = m``, the width split into fractions), ``mhc`` (manifold-constrained
    hyper-connections: ``m = 1``, ``n`` streams) or ``altup`` (alternating updates: ``m = 1``,
    ``n = K`` blocks, the whole layer computed on one block). The member validates the keys
    that concern it and resolves what depends on it (embedding, reduce, ``dynamic`` unset).
    """

    m: int = 1
    n: int = 1
    connection: str = "ghc"
    """A registered width member (ghc, hc, frac, mhc, altup)."""
    embedding: Literal["auto", "wide", "factorized", "replicated"] = "auto"
    """How the wide state starts. auto: wide for ghc and altup, replicated for hc and mhc.
    wide: a V x D' table (ghc, altup); factorized: a V x D table then D -> D' (ghc, tieable);
    replicated: the D-wide embedding copied n times (hc, mhc; altup: Recycled-AltUp). HC always
    replicates (wide is accepted as its old spelling); Frac needs no expansion (D' = D); dynamic
    altup (Gemma 3n) takes auto only: learned projections of the D-wide embedding."""
    dynamic: bool | None = None
    """Token-dependent coefficients on top of the static ones; false keeps static A, B only
    (mhc: mappings from the biases only). altup: true is Gemma 3n's router variant (projected
    streams at entry and exit), false the paper's static predict/correct. Unset: the member's
    paper (true for ghc, hc, frac, mhc; false for altup), resolved when the config is built, so
    the stored config (``config.yaml``, checkpoints) holds the value the model used."""
    group_norm: Literal["auto", "on", "off"] = "auto"
    """GroupNorm (groups of size D) before the reduce; auto: on for integer r, off otherwise."""
    recompute_coefficients: bool = False
    """Recompute the coefficient path (norm, GEMM, tanh) in backward instead of storing it
    (mhc: the mappings H_pre, H_post, H_res, Sinkhorn included). For GHC kept as an alias: true
    means ``recompute=coefficients`` unless ``recompute`` asks for more."""
    recompute: Literal["none", "coefficients", "ghc"] = "none"
    """What dynamic GHC keeps for backward (docs/gpu.md): ``none`` keeps the coefficient path;
    ``coefficients`` recomputes the GEMM output and tanh; ``ghc`` keeps only the wide state
    entering each layer (plus the D-wide sublayer outputs) and rebuilds coefficients, the
    mid-layer wide state and the final GroupNorm output in backward."""
    kernel: Literal["auto", "torch", "triton"] = "auto"
    """Dynamic GHC implementation: ``torch`` (the reference, any device), ``triton`` (fused
    kernels, docs/gpu.md; CUDA, or CPU under ``TRITON_INTERPRET=1``); ``auto`` = triton on CUDA
    when Triton imports, else torch."""
    output_init_scale: float | None = None
    """Multiplier on the init std of each sublayer's output projection; None: the preset's
    (1/sqrt(n) for hc, whose summed streams would otherwise grow the output n-fold; 1 otherwise)."""
    norm_epsilon: float = 1e-6
    """Epsilon of the width connections' own RMSNorms: GHC's per-segment norm of the
    coefficient path, mHC's norm of the flattened streams, dynamic AltUp's router norm (the
    exported HF config's ``ghc_norm_eps``)."""
    mhc: MhcConfig = field(default_factory=MhcConfig)
    altup: AltUpConfig = field(default_factory=AltUpConfig)

    def __post_init__(self) -> None:
        if self.dynamic is None:
            try:
                self.dynamic = member_of(self.connection).dynamic_default
            except ConfigError:
                pass  # an unknown connection: validate() names the allowed ones

    @property
    def member(self) -> WidthMember:
        """The registered member ``connection`` names."""
        return member_of(self.connection)

    @property
    def enabled(self) -> bool:
        return not (self.m == 1 and self.n == 1 and self.member.unit_width_is_backbone)

    @property
    def resolved_embedding(self) -> str:
        """wide | factorized | replicated | projected | none (D' = D: nothing to expand)."""
        return self.member.embedding(self)

    @property
    def resolved_reduce(self) -> str:
        """How the wide state ends: ghc (GroupNorm + W_reduce) | sum | mean | active | none."""
        return self.member.reduce(self)

    def validate(self, hidden_size: int) -> None:
        _positive("model.vwn.m", self.m)
        _positive("model.vwn.n", self.n)
        _positive("model.vwn.output_init_scale", self.output_init_scale)
        _positive("model.vwn.norm_epsilon", self.norm_epsilon)
        _positive("model.vwn.mhc.sinkhorn_iters", self.mhc.sinkhorn_iters)
        _positive("model.vwn.mhc.gate_init", self.mhc.gate_init, allow_zero=True)
        if self.n < self.m:
            raise ConfigError(f"model.vwn.n ({self.n}) must be >= model.vwn.m ({self.m})")
        if hidden_size % self.m:
            raise ConfigError(
                f"model.vwn.m ({self.m}) must divide model.hidden_size ({hidden_size})"
            )
        member = member_of(self.connection)
        member.validate(self)
        if self.embedding not in member.embeddings:
            raise ConfigError(
                f"model.vwn.embedding={self.embedding} does not go with "
                f"model.vwn.connection={self.connection}; allowed: {', '.join(member.embeddings)}"
            )
        if self.group_norm == "on" and not member.group_norm_option:
            raise ConfigError(
                f"model.vwn.group_norm=on applies to model.vwn.connection=ghc only (got "
                f"{self.connection}); allowed here: auto, off"
            )
        if not member.ghc_kernels and (self.recompute != "none" or self.kernel == "triton"):
            key = (f"model.vwn.recompute={self.recompute}" if self.recompute != "none"
                   else "model.vwn.kernel=triton")
            raise ConfigError(
                f"{key} applies to the GHC-style connections (ghc, hc, frac), not "
                f"model.vwn.connection={self.connection}; allowed here: recompute=none, "
                f"kernel=auto|torch (mhc recomputes its mappings with "
                f"model.vwn.recompute_coefficients=true)")
        if self.kernel == "triton":
            _check_triton_available()
        if self.group_norm == "on" and self.n % self.m:
            raise ConfigError(
                f"model.vwn.group_norm=on needs an integer r = n/m (got {self.n}/{self.m}); "
                f"allowed: auto, off"
            )

    @property
    def recompute_mode(self) -> str:
        """``recompute`` with the ``recompute_coefficients`` alias folded in."""
        if self.recompute == "none" and self.recompute_coefficients:
            return "coefficients"
        return self.recompute

    @property
    def use_group_norm(self) -> bool:
        return self.member.group_norm(self)


@dataclass
class MtpConfig:
    """Multi-token (next-N) prediction heads (docs/mtp.md, docs/methods.md §1.5).

    Total loss ``L_main + (loss_weight / num_layers) * sum_k L_k``; depth ``k`` predicts token
    ``t + 1 + k``. With virtual width the heads are VWN-aware (wide embedding, block-level
    projection, one VWN layer, GroupNorm + reduce).
    """

    num_layers: int = 0
    """Prediction depths K; 0 turns MTP off (the VWN paper uses 1: next-2-token)."""
    loss_weight: float = 0.1
    """lambda; Megatron-Core's default (DeepSeek-V3 used 0.3 then 0.1)."""

    def validate(self) -> None:
        _positive("model.mtp.num_layers", self.num_layers, allow_zero=True)
        _positive("model.mtp.loss_weight", self.loss_weight, allow_zero=True)


@dataclass
class MoEConfig:
    """Mixture-of-experts MLPs through Megatron-Core's ``MoELayer`` (docs/moe.md).

    ``num_experts = 0`` is the dense backbone (every other key must then stay at its default).
    Each MoE layer routes every token to ``top_k`` of ``num_experts`` SwiGLU experts of width
    ``ffn_hidden_size``, plus an always-on shared expert when ``shared_expert_ffn_hidden_size``
    is set; the first ``dense_layers`` layers keep the dense MLP (DeepSeek's backbones).
    """

    num_experts: int = 0
    top_k: int = 2
    ffn_hidden_size: int | None = None
    """Width of one expert; None: ``model.ffn_hidden_size`` (the dense MLP's)."""
    shared_expert_ffn_hidden_size: int = 0
    """Width of the shared expert every token passes through; 0: none."""
    dense_layers: int = 0
    """The first this many layers keep the dense MLP; the rest are MoE."""
    router_score: Literal["softmax", "sigmoid"] = "softmax"
    """softmax: top-k of the logits, then a softmax over the k (Mixtral); sigmoid: per-expert
    sigmoid scores, the k chosen normalised to sum 1 (DeepSeek-V3)."""
    router_dtype: Literal["fp32", "fp64"] = "fp32"
    """Precision of the router's logits and scores (fp64: parity tests, so reduction-order
    noise cannot flip a top-k choice)."""
    expert_bias: bool = False
    """DeepSeek-V3's aux-loss-free balancing: a per-expert bias added to the scores for the
    top-k choice only, moved by ``expert_bias_update_rate`` towards balance after every step
    (needs ``router_score=sigmoid``)."""
    expert_bias_update_rate: float = 1e-3
    aux_loss: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    """Load-balancing loss: over the micro-batch (Switch), per sequence (DeepSeek-V3), none."""
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    """Router z-loss (ST-MoE); 0: off."""
    capacity_factor: float | None = None
    """Token dropping: each expert takes at most ``capacity_factor x tokens x top_k /
    num_experts`` tokens (lowest probabilities dropped); None: dropless."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def validate(self, num_layers: int) -> None:
        if not self.enabled:
            _positive("model.moe.num_experts", self.num_experts, allow_zero=True)
            changed = [f"model.moe.{name} ({value})" for name, value in vars(self).items()
                       if name != "num_experts" and value != getattr(MoEConfig(), name)]
            if changed:
                raise ConfigError(
                    f"{', '.join(changed)} set while model.moe.num_experts=0 (dense MLPs); "
                    f"allowed: model.moe.num_experts > 0, or leave the model.moe keys unset")
            return
        _positive("model.moe.top_k", self.top_k)
        _positive("model.moe.ffn_hidden_size", self.ffn_hidden_size)
        _positive("model.moe.shared_expert_ffn_hidden_size", self.shared_expert_ffn_hidden_size,
                  allow_zero=True)
        _positive("model.moe.dense_layers", self.dense_layers, allow_zero=True)
        _positive("model.moe.expert_bias_update_rate", self.expert_bias_update_rate)
        _positive("model.moe.aux_loss_coeff", self.aux_loss_coeff, allow_zero=True)
        _positive("model.moe.z_loss_coeff", self.z_loss_coeff, allow_zero=True)
        _positive("model.moe.capacity_factor", self.capacity_factor)
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.moe.top_k ({self.top_k}) must be <= model.moe.num_experts "
                              f"({self.num_experts})")
        if self.top_k == 1 and self.router_score == "softmax":
            raise ConfigError("model.moe.top_k=1 with model.moe.router_score=softmax gives every "
                              "token the weight 1 (no gradient reaches the router); allowed: "
                              "top_k >= 2, or router_score=sigmoid")
        if self.dense_layers >= num_layers:
            raise ConfigError(f"model.moe.dense_layers ({self.dense_layers}) must be < "
                              f"model.num_layers ({num_layers}); use model.moe.num_experts=0 "
                              f"for a dense model")
        if self.expert_bias and self.router_score != "sigmoid":
            raise ConfigError("model.moe.expert_bias=true needs model.moe.router_score=sigmoid "
                              f"(got {self.router_score}), as in DeepSeek-V3 and Megatron-Core")

    def expert_ffn_size(self, ffn_size: int) -> int:
        return self.ffn_hidden_size or ffn_size


@dataclass
class ModelConfig:
    """Backbone shape (Llama-style GPT: RMSNorm, SwiGLU, RoPE, GQA)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    """Key/value heads for GQA; None means multi-head attention (= num_attention_heads)."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width; None means the Llama rule: 8/3 * hidden, rounded up to 64s."""
    seq_length: int = 128
    vocab_size: int | None = None
    """None takes the tokenizer's size; either way it is padded for tensor parallelism."""
    make_vocab_size_divisible_by: int = 64
    tie_embeddings: bool = False
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """auto: Transformer Engine when it and CUDA are present, else the local spec."""
    vwn: VwnConfig = field(default_factory=VwnConfig)
    mtp: MtpConfig = field(default_factory=MtpConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def validate(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                    "make_vocab_size_divisible_by", "rotary_base"):
            _positive(f"model.{key}", getattr(self, key))
        _positive("model.num_query_groups", self.num_query_groups)
        _positive("model.ffn_hidden_size", self.ffn_hidden_size)
        _positive("model.vocab_size", self.vocab_size)
        _positive("model.norm_epsilon", self.norm_epsilon)
        _positive("model.init_method_std", self.init_method_std)
        for key in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{key} ({value}) must be in [0, 1)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        self.vwn.validate(self.hidden_size)
        self.mtp.validate()
        self.moe.validate(self.num_layers)
        if self.tie_embeddings and self.vwn.enabled and self.vwn.resolved_embedding == "wide":
            other = self.vwn.member.tied_embedding
            raise ConfigError(
                "model.tie_embeddings=true cannot tie the V x D' table of "
                "model.vwn.embedding=wide to the V x D output layer; use "
                f"model.vwn.embedding={other} or model.tie_embeddings=false"
            )
        groups = self.query_groups
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"model.num_query_groups ({groups}) must divide "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallelism is what is left: world / (tensor * pipeline)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); None or 1 means plain 1F1B."""
    sequence_parallel: bool = False
    distributed_optimizer: bool | None = None
    """Shard optimizer state over data-parallel ranks; None means on with CUDA, off on CPU."""
    expert: int = 1
    """Expert parallelism (EP): the experts of every MoE layer split over this many ranks."""
    expert_tensor: int | None = None
    """Tensor parallelism inside each expert; None: ``parallel.tensor`` (Megatron-Core's
    default). Expert-TP x EP x pipeline must divide the world (docs/moe.md)."""
    timeout_s: int | None = None
    """Seconds a rank waits for a silent peer (heartbeats, collectives) before the job stops
    naming the lost rank; None means 600 on GPU, 300 on CPU (docs/reliability.md)."""

    def validate(self) -> None:
        _positive("parallel.timeout_s", self.timeout_s)
        _positive("parallel.tensor", self.tensor)
        _positive("parallel.pipeline", self.pipeline)
        _positive("parallel.virtual_pipeline", self.virtual_pipeline)
        _positive("parallel.expert", self.expert)
        _positive("parallel.expert_tensor", self.expert_tensor)
        if self.virtual_pipeline and self.virtual_pipeline > 1 and self.pipeline < 2:
            raise ConfigError(
                f"parallel.virtual_pipeline ({self.virtual_pipeline}) needs parallel.pipeline >= 2 "
                f"(got {self.pipeline})"
            )
        if self.sequence_parallel and self.tensor < 2:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor >= 2")

    @property
    def vpp(self) -> int:
        return self.virtual_pipeline or 1

    @property
    def etp(self) -> int:
        """Expert tensor parallelism, resolved (defaults to ``tensor``)."""
        return self.expert_tensor or self.tensor


@dataclass
class TrainConfig:
    """Optimisation: AdamW, linear warmup + LR schedule, clipping, recompute, precision,
    evaluation cadence."""

    iters: int = 200
    micro_batch_size: int = 4
    global_batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 20
    lr_decay_iters: int | None = None
    """Iterations of the cosine decay; None means train.iters."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    seed: int = 1234
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU. fp8: bf16 weights and FP8 GEMMs through Transformer
    Engine (CUDA only; docs/scale.md)."""
    eval_interval: int = 50
    """Validate every this many iterations (and at the end); 0 disables validation."""
    eval_iters: int = 4
    """Global batches of the validation split scored by one evaluation."""
    eval_mode: Literal["fixed", "rolling"] = "fixed"
    """fixed: every evaluation scores the same held-out tokens (the first ``eval_iters`` global
    batches of the validation split), comparable across iterations, runs and widths; rolling:
    each evaluation reads the next ``eval_iters`` batches of a cyclic validation stream."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm never updates the weights. stop: exit (status 3)
    naming the iteration and the last good checkpoint; skip: drop that step's update, log its
    row with ``skipped: true`` and go on (docs/reliability.md)."""
    max_skipped_steps: int = 10
    """With nan_policy=skip: stop (as with stop) after this many consecutive skipped steps."""
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """After the linear warmup: cosine or linear decay to ``min_lr`` over ``lr_decay_iters``,
    ``constant`` (stays at ``lr``), or ``wsd`` (warmup-stable-decay: ``lr`` until the last
    ``lr_wsd_decay_iters`` of ``lr_decay_iters``, then down to ``min_lr``; docs/scale.md)."""
    lr_wsd_decay_iters: int | None = None
    """wsd: iterations of the decay phase, ending at ``lr_decay_iters``; None: the last 20%."""
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """wsd: the shape of the decay phase (Megatron-Core's ``lr_wsd_decay_style``)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute (Megatron-Core's ``recompute_granularity``; docs/scale.md):
    ``selective`` recomputes ``recompute_modules`` of every layer, ``full`` whole layers (their
    width connections included), keeping only each recomputed unit's input."""
    recompute_method: Literal["uniform", "block"] | None = None
    """full: ``uniform`` recomputes every layer in units of ``recompute_num_layers``; ``block``
    recomputes the first ``recompute_num_layers`` layers of each pipeline stage. None: uniform."""
    recompute_num_layers: int | None = None
    """full: layers per recomputed unit (uniform) or per stage (block); None: 1 (uniform), all
    of the stage's layers (block)."""
    recompute_modules: list[str] | None = None
    """selective: submodules to recompute (``core_attn``, ``layernorm``, ``mlp``); None:
    ``[core_attn]``."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """precision=fp8: Transformer Engine's scaling recipe (docs/scale.md): delayed scaling,
    current (per-tensor) scaling, MXFP8 (Blackwell) or block-wise scaling (Hopper)."""
    fp8_first_last_bf16: bool = False
    """precision=fp8: keep the first and last transformer layers in bf16."""

    def validate(self) -> None:
        _positive("train.max_skipped_steps", self.max_skipped_steps)
        if self.nan_policy not in ("stop", "skip"):
            raise ConfigError(f"train.nan_policy ({self.nan_policy!r}) must be 'stop' or 'skip'")
        for key in ("iters", "micro_batch_size", "global_batch_size"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.lr", self.lr)
        _positive("train.min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must be <= train.lr ({self.lr})")
        for key in ("warmup_iters", "weight_decay", "clip_grad", "eval_interval", "eval_iters"):
            _positive(f"train.{key}", getattr(self, key), allow_zero=True)
        _positive("train.lr_decay_iters", self.lr_decay_iters)
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"train.{key} ({value}) must be in [0, 1)")
        _positive("train.adam_eps", self.adam_eps)
        if self.eval_interval and not self.eval_iters:
            raise ConfigError("train.eval_iters must be > 0 when train.eval_interval > 0")
        validate_schedule(self)

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.iters

    @property
    def wsd_decay_iters(self) -> int:
        """Length of the WSD decay phase: ``lr_wsd_decay_iters`` or 20% of ``decay_iters``."""
        return self.lr_wsd_decay_iters or max(1, round(0.2 * self.decay_iters))


@dataclass
class DataConfig:
    """Where tokens come from. Empty ``paths`` means the bundled public-domain corpus."""

    paths: list[str] = field(default_factory=list)
    """Megatron indexed-dataset prefixes (``PREFIX.bin`` / ``PREFIX.idx``)."""
    weights: list[float] | None = None
    """Blend weights, one per path; None weighs each dataset by its size."""
    split: str = "98,2,0"
    """Document-level train,valid,test split of every dataset (Megatron's split string)."""
    tokenizer_model: str | None = None
    """SentencePiece ``.model``, Hugging Face ``tokenizer.json`` or a directory holding one; None
    means the tokenizer trained on the bundled corpus."""
    eod_token: str | None = None
    """Hugging Face tokenizers: the end-of-document token; None: its eos, else <|endoftext|>."""
    tokenizer_vocab_size: int = 4096
    """Vocabulary of the tokenizer built for the bundled corpus."""
    cache_dir: str | None = None
    """Built tokenizer, indexed files and sample indices; None means ~/.cache/megatron_vwn."""
    num_workers: int = 0
    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""

    def validate(self) -> None:
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ConfigError(
                    f"data.weights has {len(self.weights)} entries but data.paths has "
                    f"{len(self.paths)}; give one weight per path or leave data.weights unset"
                )
            if any(w <= 0 for w in self.weights):
                raise ConfigError(f"data.weights ({self.weights}) must all be > 0")
        try:
            parts = [float(p) for p in self.split.split(",")]
        except ValueError:
            parts = []
        if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0:
            raise ConfigError(
                f"data.split ({self.split!r}) must be three non-negative numbers "
                f"'train,valid,test' with train > 0, e.g. '98,2,0'"
            )
        _positive("data.tokenizer_vocab_size", self.tokenizer_vocab_size)
        _positive("data.num_workers", self.num_workers, allow_zero=True)


@dataclass
class RunConfig:
    """The run directory: config.yaml, metrics.jsonl, logs and (later) checkpoints."""

    dir: str = "runs/default"
    name: str | None = None
    """Display name (wandb, logs); None means the directory's basename."""


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: Literal["off", "offline", "online"] = "offline"
    """offline writes wandb files under run.dir/wandb with no network; online needs a login."""
    wandb_project: str = "megatron-vwn"
    tensorboard: Literal["off", "on"] = "off"
    """on: the same scalars as wandb as TensorBoard events under run.dir/tensorboard (needs the
    ``tensorboard`` package, the 'tensorboard' extra)."""

    def validate(self) -> None:
        _positive("logging.interval", self.interval)


@dataclass
class AnalysisConfig:
    """Neural-interaction metrics logged during training (docs/shape.md, docs/methods.md §4)."""

    interaction_interval: int = 0
    """Log ``aofe_ratio_agop`` and ``aofe_ratio_wtw`` (``split: analysis`` rows of metrics.jsonl)
    every this many iterations and at the end; 0 turns them off."""
    batches: int = 1
    """Held-out global batches (``train.global_batch_size`` sequences each, the same ones every
    time) the AGOP averages over."""
    probes: int = 64
    """Rows of the random logit projection ``P``: the AGOP is ``probes x probes``; each row
    costs one backward pass per held-out micro-batch (the NIL code's 64)."""
    seed: int = 0
    """Seed of ``P``, independent of ``train.seed``."""

    def validate(self) -> None:
        _positive("analysis.interaction_interval", self.interaction_interval, allow_zero=True)
        _positive("analysis.batches", self.batches)
        _positive("analysis.probes", self.probes)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig())
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    debug: DebugConfig = field(default_factory=lambda: DebugConfig())


@dataclass
class CheckpointConfig:
    """Distributed checkpoints under ``run.dir/checkpoints`` (see docs/checkpoints.md)."""

    save_interval: int = 0
    """Save every this many iterations; 0: only at the end of training and on SIGTERM/SIGUSR1."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the latest complete checkpoint of run.dir, else start fresh."""
    load: str | None = None
    """Checkpoint to start from: an ``iter_NNNNNNN`` directory, a checkpoints directory or a run
    directory (its latest). With ``resume=auto`` run.dir's own checkpoints win once it has any."""
    weights_only: bool = False
    """With ``load``: take the model weights only and start a new run (iteration 0, fresh
    optimizer, scheduler, data position and RNG)."""
    keep_last: int | None = None
    """Keep the newest this many checkpoints; None keeps all."""
    keep_every: int | None = None
    """Also keep every checkpoint whose iteration is a multiple of this; None: no such rule."""
    async_save: bool | None = None
    """Write in the background while training continues; None means on with CUDA (GPU only)."""
    on_save_error: Literal["stop", "continue"] = "stop"
    """A save that fails (disk full, permissions, I/O error) is removed and the previous
    checkpoint stays the latest. stop: exit (status 5); continue: warn, keep training and save
    again at the next interval."""

    def validate(self) -> None:
        if self.on_save_error not in ("stop", "continue"):
            raise ConfigError(f"checkpoint.on_save_error ({self.on_save_error!r}) must be "
                              f"'stop' or 'continue'")
        _positive("checkpoint.save_interval", self.save_interval, allow_zero=True)
        _positive("checkpoint.keep_last", self.keep_last)
        _positive("checkpoint.keep_every", self.keep_every)
        if self.resume not in ("auto", "never"):
            raise ConfigError(f"checkpoint.resume ({self.resume!r}) must be 'auto' or 'never'")
        if self.weights_only and not self.load:
            raise ConfigError("checkpoint.weights_only=true needs checkpoint.load (a path)")


@dataclass
class DebugConfig:
    """Testing aids: inject faults on purpose to see what a run does with them
    (docs/reliability.md). Leave empty in real runs."""

    nan_at: list[int] = field(default_factory=list)
    """Make the loss of these iterations NaN on every rank (and so its gradients)."""
    save_error_at: list[int] = field(default_factory=list)
    """Make the saves of these iterations fail on the last rank with a real write error: its
    file-size limit is lowered to 0 for the save, so the kernel refuses the write (EFBIG)."""

    def validate(self) -> None:
        for key in ("nan_at", "save_error_at"):
            for index, iteration in enumerate(getattr(self, key)):
                _positive(f"debug.{key}[{index}]", iteration)
