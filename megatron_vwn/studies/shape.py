"""Fixed-budget shape planning: for each depth the widest model that fits a parameter budget.

The depth-width study (docs/methods.md §4) compares shapes at one parameter count. For every
depth ``L`` the planner binary-searches the hidden size ``D`` on the project's own parameter
accounting (:mod:`megatron_vwn.model.accounting`), so what it counts is what the builder builds.

The config's rules carry over to every ``D``:

* head dimension: the config's ``hidden_size / num_attention_heads``; heads = ``D / head_dim``;
* grouped-query attention: the config's heads-per-group ratio (so ``D`` steps by
  ``head_dim x ratio`` to keep the group count whole); multi-head attention stays multi-head;
* FFN: the Llama rule (8/3 D rounded up to 64s) when ``model.ffn_hidden_size`` is unset, else
  the config's ``ffn_hidden_size / hidden_size`` ratio, rounded to an integer;
* virtual width (``model.vwn.*``): ``m`` must divide ``D``; its extras (GHC modules, wide table,
  expand/reduce) are counted in the budget;
* tensor parallelism (``parallel.tensor``): heads, key/value groups and the FFN stay divisible
  by it.

``--count non-embedding`` leaves the token table and output layer out of the budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.lists import parse_list
from megatron_vwn.config.schema import Config, ModelConfig
from megatron_vwn.model.accounting import ParamCounts, count_params

INTERVAL = (0.023, 0.047)
"""The NIL paper's efficient interaction interval of ``R_DW = L / D`` (1M-10M parameters)."""
COUNTS = ("embedding", "non-embedding")
DEFAULT_DEPTHS = (2, 4, 6, 8, 12, 16, 24)


@dataclass(frozen=True)
class ShapeRules:
    """How heads, groups and FFN follow ``D`` (taken from one config)."""

    head_dim: int
    heads_per_group: int | None
    """None: multi-head attention (one key/value head per query head)."""
    ffn_ratio: Fraction | None
    """None: the Llama rule; else ``ffn_hidden_size / hidden_size`` of the config."""
    multiple_of: int
    """``D`` steps: lcm of ``head_dim x heads_per_group x tensor`` and the VWN fraction rate
    ``m``."""
    tensor: int = 1

    @classmethod
    def of(cls, model: ModelConfig, tensor: int = 1) -> ShapeRules:
        head_dim = model.hidden_size // model.num_attention_heads
        per_group = None
        if model.num_query_groups is not None:
            per_group = model.num_attention_heads // model.query_groups
        ffn_ratio = None
        if model.ffn_hidden_size is not None:
            ffn_ratio = Fraction(model.ffn_hidden_size, model.hidden_size)
        step = math.lcm(head_dim * (per_group or 1) * tensor, model.vwn.m)
        return cls(head_dim=head_dim, heads_per_group=per_group, ffn_ratio=ffn_ratio,
                   multiple_of=step, tensor=tensor)

    def model_at(self, model: ModelConfig, depth: int, hidden: int) -> ModelConfig:
        heads = hidden // self.head_dim
        groups = None if self.heads_per_group is None else heads // self.heads_per_group
        ffn = None
        if self.ffn_ratio is not None:  # the nearest multiple of the TP size
            ffn = self.tensor * max(1, round(self.ffn_ratio * hidden / self.tensor))
        return dataclasses.replace(model, num_layers=depth, hidden_size=hidden,
                                   num_attention_heads=heads, num_query_groups=groups,
                                   ffn_hidden_size=ffn)


@dataclass
class Shape:
    """One planned shape; ``hidden`` is None when not even the narrowest ``D`` fits."""

    depth: int
    hidden: int | None
    heads: int | None = None
    query_groups: int | None = None
    ffn: int | None = None
    """The SwiGLU inner width the rules give (set explicitly in :meth:`overrides`)."""
    params: int | None = None
    """The budgeted count (total, or without embedding and output layer)."""
    total: int | None = None
    embedding: int | None = None
    backbone: int | None = None
    other: int | None = None
    """Virtual-width extras (GHC modules, W_expand, GroupNorm, W_reduce)."""

    @property
    def r_dw(self) -> float | None:
        return self.depth / self.hidden if self.hidden else None

    @property
    def in_interval(self) -> bool:
        return self.r_dw is not None and INTERVAL[0] <= self.r_dw <= INTERVAL[1]

    def overrides(self) -> list[str]:
        """The ``key=value`` overrides that build this shape from the planning config."""
        items = [f"model.num_layers={self.depth}", f"model.hidden_size={self.hidden}",
                 f"model.num_attention_heads={self.heads}"]
        if self.query_groups is not None:
            items.append(f"model.num_query_groups={self.query_groups}")
        items.append(f"model.ffn_hidden_size={self.ffn}")
        return items

    def to_json(self) -> dict:
        row = dataclasses.asdict(self)
        row.update(r_dw=self.r_dw, in_interval=self.in_interval,
                   overrides=self.overrides() if self.hidden else [])
        return row


def planning_vocab_size(cfg: Config) -> int:
    """The padded vocabulary the run would build: ``model.vocab_size``, else the configured
    tokenizer's size, else the size of the tokenizer built for the bundled corpus."""
    from megatron_vwn.model.builder import padded_vocab_size  # imports Megatron-Core: lazily

    vocab = cfg.model.vocab_size
    if vocab is None and cfg.data.tokenizer_model:
        from megatron_vwn.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(cfg.data.tokenizer_model).vocab_size
    vocab = vocab or cfg.data.tokenizer_vocab_size
    return padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)


def budgeted(counts: ParamCounts, count: str) -> int:
    return counts.total if count == "embedding" else counts.total - counts.embedding


def plan_depth(model: ModelConfig, vocab_size: int, budget: int, depth: int,
               count: str = "embedding", tensor: int = 1) -> Shape:
    """The widest ``D`` (a multiple of the rules' step) with ``depth`` layers within ``budget``.

    The count grows with ``D`` at fixed depth, so a binary search over ``D / step`` finds it."""
    rules = ShapeRules.of(model, tensor)

    def size(k: int) -> int:
        return budgeted(count_params(rules.model_at(model, depth, k * rules.multiple_of),
                                     vocab_size), count)

    if size(1) > budget:
        return Shape(depth=depth, hidden=None)
    low, high = 1, 2
    while size(high) <= budget:
        low, high = high, high * 2
    while high - low > 1:  # size(low) <= budget < size(high)
        mid = (low + high) // 2
        low, high = (mid, high) if size(mid) <= budget else (low, mid)
    shaped = rules.model_at(model, depth, low * rules.multiple_of)
    counts = count_params(shaped, vocab_size)
    return Shape(depth=depth, hidden=shaped.hidden_size, heads=shaped.num_attention_heads,
                 query_groups=shaped.num_query_groups, ffn=shaped.ffn_size,
                 params=budgeted(counts, count), total=counts.total,
                 embedding=counts.embedding, backbone=counts.backbone, other=counts.other)


def plan_shapes(cfg: Config, budget: int, depths: list[int],
                count: str = "embedding") -> list[Shape]:
    """One :class:`Shape` per depth for the config's model at ``budget`` parameters."""
    if count not in COUNTS:
        raise ConfigError(f"--count ({count!r}) must be one of {list(COUNTS)}")
    if budget <= 0:
        raise ConfigError(f"--params ({budget}) must be > 0")
    vocab = planning_vocab_size(cfg)
    return [plan_depth(cfg.model, vocab, budget, depth, count, cfg.parallel.tensor)
            for depth in depths]


def parse_depths(text: str) -> list[int]:
    return parse_list(text, "--depths", int, "2,4,8", minimum=1)


def parse_params(text: str) -> int:
    """``3000000``, ``3e6``, ``3M``, ``500k``."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise ConfigError(f"--params ({text!r}) must be a number such as 3000000, 3e6 or "
                          f"3M") from None
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"--params ({text!r}) must be >= 1")
    return int(value)


def vwn_note(model: ModelConfig) -> str | None:
    vwn = model.vwn
    if not vwn.enabled:
        return None
    return (f"virtual width {vwn.connection} (m={vwn.m}, n={vwn.n}): its extras (GHC modules, "
            f"wide table or W_expand, GroupNorm, W_reduce) are counted in the budget")


def format_plan(shapes: list[Shape], budget: int, count: str, model: ModelConfig) -> str:
    """A fixed-width table; ``*`` marks shapes inside the efficient interval."""
    lines = [f"# budget {budget:,} parameters ({count} count); '*' = R_DW = L/D inside the "
             f"NIL interval {INTERVAL[0]}-{INTERVAL[1]}"]
    note = vwn_note(model)
    if note:
        lines.append(f"# {note}")
    lines.append(f"{'L':>3} {'D':>6} {'heads':>5} {'kv':>4} {'ffn':>6} {'params':>12} "
                 f"{'total':>12} {'vwn extra':>10} {'R_DW':>8}")
    for s in shapes:
        if s.hidden is None:
            lines.append(f"{s.depth:>3} {'-':>6}  does not fit: the narrowest D already "
                         f"exceeds the budget")
            continue
        kv = s.query_groups if s.query_groups is not None else s.heads
        lines.append(f"{s.depth:>3} {s.hidden:>6} {s.heads:>5} {kv:>4} "
                     f"{s.ffn:>6} {s.params:>12,} "
                     f"{s.total:>12,} {s.other:>10,} {s.r_dw:>8.4f}"
                     f"{' *' if s.in_interval else ''}")
    return "\n".join(lines)
