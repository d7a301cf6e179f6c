"""``megatron-vwn shape``: the depth-width study (docs/shape.md).

    megatron-vwn shape plan --params N [--depths 2,4,8] [--count embedding|non-embedding]
                            [--json] [CONFIG] [key=value ...]
    megatron-vwn shape sweep --params N[,N...] [--depths ...] [--seeds S] [--name NAME]
                             [--runs-dir DIR] (--local [--nproc P] | --submit [SITE FLAGS]
                             [--chain K]) [--dry-run] [CONFIG] [key=value ...]
    megatron-vwn shape report SWEEP_DIR [--out DIR]

``plan`` prints the widest shape per depth within a parameter budget; ``sweep`` trains every
planned shape (per budget and seed) under one sweep directory, here (``--local``) or on SLURM
(``--submit``; with ``--dry-run`` the sbatch lines are printed); without either it prints the
runs it would start. ``report`` writes the plots and a markdown table of a sweep.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_vwn.studies.shape import COUNTS, DEFAULT_DEPTHS


def _model_arguments(p: argparse.ArgumentParser, several: bool = False) -> None:
    if not several:  # the sweep's come with slurm's job arguments
        p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]",
                       help="the training config the shapes start from, then dotted overrides")
    p.add_argument("--params", required=True,
                   help="parameter budget" + ("s, comma-separated" if several else "") +
                        ": 3000000, 3e6, 3M, 500k")
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

    from megatron_vwn.launch.slurm import job_arguments

    sweep = actions.add_parser("sweep", help="train every planned shape (local or SLURM)",
                               description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    job_arguments(sweep)  # CONFIG and overrides, --chain, --dry-run, the site flags
    _model_arguments(sweep, several=True)
    sweep.add_argument("--seeds", type=int, default=1,
                       help="runs per shape, train.seed, train.seed + 1, ... (default 1)")
    sweep.add_argument("--name", help="sweep name (default: CONFIG-shape)")
    sweep.add_argument("--runs-dir", default=None,
                       help="the sweep directory is RUNS_DIR/NAME (default runs/shape)")
    mode = sweep.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true",
                      help="train the runs one after another on this machine")
    mode.add_argument("--submit", action="store_true", help="submit one SLURM job per run")
    sweep.add_argument("--nproc", type=int, default=1, help="--local: ranks per run")

    report = actions.add_parser("report", help="plots and a table of a shape sweep")
    report.add_argument("sweep_dir", metavar="SWEEP_DIR", help="RUNS_DIR/NAME of a shape sweep")
    report.add_argument("--out", default=None, help="where to write (default SWEEP_DIR/report)")


def _config_and_overrides(args: list[str]):
    from megatron_vwn.config.loader import DEFAULT_CONFIG

    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return DEFAULT_CONFIG, list(args)


def cmd_plan(ns: argparse.Namespace) -> int:
    from megatron_vwn.config import load_config
    from megatron_vwn.studies.shape import (
        INTERVAL,
        format_plan,
        parse_depths,
        parse_params,
        plan_shapes,
        vwn_note,
    )

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


def cmd_sweep(ns: argparse.Namespace) -> int:
    from dataclasses import asdict

    from megatron_vwn.config.errors import ConfigError
    from megatron_vwn.launch.runner import Launch, run_sweep
    from megatron_vwn.log import setup_logging
    from megatron_vwn.studies.shape import parse_depths, parse_params
    from megatron_vwn.studies.shape_sweep import (
        DEFAULT_RUNS_DIR,
        ShapeSweepSpec,
        plan_shape_sweep,
        record_plan,
    )

    setup_logging(rank=0)
    config, overrides = _config_and_overrides(ns.args)
    spec = ShapeSweepSpec(
        config=config, overrides=overrides,
        budgets=[parse_params(item) for item in ns.params.split(",") if item.strip()],
        depths=parse_depths(ns.depths), seeds=ns.seeds, count=ns.count, name=ns.name,
        runs_dir=ns.runs_dir or DEFAULT_RUNS_DIR)
    if ns.dry_run and not ns.submit:
        raise ConfigError("--dry-run prints sbatch lines: use it with --submit (without "
                          "--local/--submit the sweep only prints its runs)")
    if ns.nproc < 1:
        raise ConfigError(f"--nproc ({ns.nproc}) must be >= 1")
    site = None
    if ns.submit:
        from megatron_vwn.launch.slurm import site_from_args

        site = site_from_args(ns)
    world = site.world_size if site is not None else ns.nproc
    runs = plan_shape_sweep(spec, world)
    print(f"# shape sweep {spec.sweep_name}: {len(runs)} runs ({len(spec.budgets)} budget(s) x "
          f"{len(spec.depths)} depth(s) x {spec.seeds} seed(s)) under {spec.directory}")
    for run in runs:
        shape = run.shape
        print(f"# {run.name}: L={shape['depth']} D={shape['hidden']} params={shape['params']:,}"
              f" R_DW={shape['r_dw']:.4f}{' (in interval)' if shape['in_interval'] else ''}")
    if ns.submit:
        run_sweep(runs, Launch("submit", site, ns.chain or 1, ns.dry_run))
        if not ns.dry_run:
            path = record_plan(spec, runs, "submit", asdict(site))
            print(f"# recorded in {path}; then: megatron-vwn shape report {path.parent}")
        return 0
    if not ns.local:
        run_sweep(runs, Launch("print"))
        return 0
    path = record_plan(spec, runs, "local")
    codes = run_sweep(runs, Launch("local", nproc=ns.nproc))
    failed = [run.name for run, code in zip(runs, codes, strict=True) if code]
    print(f"# {len(runs) - len(failed)}/{len(runs)} runs finished; recorded in {path}; "
          f"then: megatron-vwn shape report {path.parent}")
    if failed:
        print(f"# failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_report(ns: argparse.Namespace) -> int:
    from megatron_vwn.studies.shape_report import write_report

    out = write_report(ns.sweep_dir, ns.out)
    print(f"# report written to {out}")
    return 0


def run_shape(ns: argparse.Namespace) -> int:
    """Dispatch ``megatron-vwn shape ACTION``."""
    return {"plan": cmd_plan, "sweep": cmd_sweep, "report": cmd_report}[ns.action](ns)
