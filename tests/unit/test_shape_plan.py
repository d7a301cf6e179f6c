"""The shape planner: its counts are the built model's, each D is the widest that fits, and the
config's rules (head dim, GQA ratio, FFN ratio, VWN's m) carry over to every shape."""

from __future__ import annotations

import pytest

from megatron_vwn.config import ConfigError, load_config
from megatron_vwn.model.accounting import count_params
from megatron_vwn.studies.shape import (
    ShapeRules,
    parse_depths,
    parse_params,
    plan_depth,
    plan_shapes,
)

BASE = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.seq_length=16",
        "model.vocab_size=320"]
VWN = ["model.vwn.m=2", "model.vwn.n=4"]


def _built_params(cfg, vocab: int) -> int:
    from megatron_vwn.model.builder import build_model

    (model,) = build_model(cfg, vocab_size=vocab)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("extra,depth,budget", [
    ([], 2, 150_000), ([], 6, 400_000), (["model.num_query_groups=null"], 3, 200_000),
    (VWN, 2, 300_000), (["model.ffn_hidden_size=null"], 4, 250_000),
], ids=["d2", "d6", "mha", "vwn_2_4", "llama_ffn"])
def test_planned_count_is_the_built_models(single_process, extra, depth, budget):
    cfg = load_config(None, [*BASE, *extra])
    (shape,) = plan_shapes(cfg, budget, [depth])
    assert shape.hidden is not None and shape.params <= budget
    built = load_config(None, [*BASE, *extra, *shape.overrides()])
    assert built.model.hidden_size == shape.hidden and built.model.num_layers == depth
    assert _built_params(built, 320) == shape.total == shape.params
    if extra == VWN:
        assert shape.other > 0  # the virtual-width extras are in the count


@pytest.mark.parametrize("count", ["embedding", "non-embedding"])
def test_each_width_is_the_widest_within_budget(count):
    cfg = load_config(None, BASE)
    rules = ShapeRules.of(cfg.model)
    assert rules.multiple_of == 32  # head dim 16 x 2 heads per group
    for depth in (1, 3, 8):
        shape = plan_depth(cfg.model, 320, 500_000, depth, count)
        wider = rules.model_at(cfg.model, depth, shape.hidden + rules.multiple_of)
        counts = count_params(wider, 320)
        over = counts.total - (counts.embedding if count == "non-embedding" else 0)
        assert shape.params <= 500_000 < over
        assert shape.hidden % rules.multiple_of == 0
        assert shape.heads == shape.hidden // 16 and shape.query_groups == shape.heads // 2
        assert shape.ffn == 2 * shape.hidden  # the config's ffn / hidden = 128 / 64


def test_interval_marks_and_r_dw():
    cfg = load_config(None, BASE)
    shapes = plan_shapes(cfg, 2_000_000, [2, 6, 40])  # D = 288, 160, 64
    for s in shapes:
        assert s.r_dw == pytest.approx(s.depth / s.hidden)
        assert s.in_interval == (0.023 <= s.r_dw <= 0.047)
    assert any(s.in_interval for s in shapes) and not all(s.in_interval for s in shapes)


def test_tensor_parallel_keeps_heads_groups_and_ffn_divisible():
    from megatron_vwn.config import validate

    cfg = load_config(None, [*BASE, "model.ffn_hidden_size=99", "parallel.tensor=2"])  # odd
    assert ShapeRules.of(cfg.model, 2).multiple_of == 64
    for shape in plan_shapes(cfg, 600_000, [1, 2, 3, 5]):
        assert shape.heads % 2 == 0 and shape.query_groups % 2 == 0 and shape.ffn % 2 == 0
        validate(load_config(None, [*BASE, "parallel.tensor=2", *shape.overrides()]), 2)


def test_budget_too_small_for_any_width():
    cfg = load_config(None, BASE)
    (shape,) = plan_shapes(cfg, 1000, [4])
    assert shape.hidden is None and not shape.in_interval


def test_vwn_widths_are_multiples_of_m():
    cfg = load_config(None, [*BASE, "model.num_query_groups=null", "model.vwn.m=8",
                             "model.vwn.n=16"])
    assert ShapeRules.of(cfg.model).multiple_of == 16  # lcm(head dim 16, m 8)
    cfg = load_config(None, [*BASE, "model.num_query_groups=null", "model.vwn.m=32",
                             "model.vwn.n=64"])
    assert ShapeRules.of(cfg.model).multiple_of == 32


@pytest.mark.parametrize("text,value", [("3M", 3_000_000), ("500k", 500_000), ("2.5e6", 2_500_000),
                                        ("1200", 1200)])
def test_parse_params(text, value):
    assert parse_params(text) == value


@pytest.mark.parametrize("bad", ["three", "0", "-5M"])
def test_parse_params_refuses(bad):
    with pytest.raises(ConfigError, match="--params"):
        parse_params(bad)


@pytest.mark.parametrize("bad", ["", "2,x", "0,2", "2,2"])
def test_parse_depths_refuses(bad):
    with pytest.raises(ConfigError, match="--depths"):
        parse_depths(bad)
