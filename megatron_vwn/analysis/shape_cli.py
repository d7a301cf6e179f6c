"""``megatron-vwn shape``: the depth-width study (docs/shape.md).

    megatron-vwn shape plan --params N [--depths 2,4,8] [--count embedding|non-embedding]
                            [--json] [CONFIG] [key=value ...]
"""

from __future__ import annotations

import argparse
import json

from megatron_vwn.analysis.shape import COUNTS, DEFAULT_DEPTHS


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="the training config the shapes start from, then dotted overrides")
    p.add_argument("--params", required=True, help="parameter budget: 3000000, 3e6, 3M, 500k")
    p.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)),
                   help="comma-separated depths (default %(default)s)")
    p.add_argument("--count", choices=COUNTS, default="embedding",
                   help="embedding: all parameters; non-embedding: without the token table and "
                        "output layer (default %(default)s)")


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``shape`` subcommand's actions."""
    actions = parser.add_subparsers(dest="action", required=True)
    plan = actions.add_parser("plan", help="the widest shape per depth within a budget",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _config_and_overrides(args: list[str]):
    from megatron_vwn.config.loader import DEFAULT_CONFIG

    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return DEFAULT_CONFIG, list(args)


def cmd_plan(ns: argparse.Namespace) -> int:
    from megatron_vwn.analysis.shape import (
        INTERVAL,
        format_plan,
        parse_depths,
        parse_params,
        plan_shapes,
        vwn_note,
    )
    from megatron_vwn.config import load_config

    config, overrides = _config_and_overrides(ns.args)
    cfg = load_config(config, overrides)
    cfg.model.validate()
    budget, depths = parse_params(ns.params), parse_depths(ns.depths)
    shapes = plan_shapes(cfg, budget, depths, ns.count)
    if ns.json:
        print(json.dumps({"budget": budget, "count": ns.count, "interval": list(INTERVAL),
                          "config": config, "overrides": overrides,
                          "vwn": vwn_note(cfg.model),
                          "shapes": [s.to_json() for s in shapes]}, indent=2))
    else:
        print(format_plan(shapes, budget, ns.count, cfg.model))
    return 0


def run_shape(ns: argparse.Namespace) -> int:
    """Dispatch ``megatron-vwn shape ACTION``."""
    return {"plan": cmd_plan}[ns.action](ns)
