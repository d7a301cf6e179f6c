"""``megatron-vwn slurm``: submit training runs and width sweeps to SLURM, and read sweeps back.

    megatron-vwn slurm submit [CONFIG] [key=value ...] [SITE FLAGS] [--chain K] [--dry-run]
    megatron-vwn slurm sweep  [CONFIG] [key=value ...] [--widths 1,2,4,8] [--name NAME]
                              [--runs-dir DIR] [SITE FLAGS] [--chain K] [--dry-run]
    megatron-vwn slurm status SWEEP_DIR

Every job is ``slurm/train.sbatch`` (one torchrun per node, USR1 -> save -> requeue) with the site
settings (``--site FILE`` / ``$MVWN_SLURM_SITE``, then flags) as sbatch options and ``MVWN_*``
variables. ``--dry-run`` prints the sbatch commands instead of running them. ``sweep`` without
CONFIG runs ``configs/sweep/default.yaml``. See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.loader import DEFAULT_CONFIG, load_config
from megatron_vwn.launch.runner import Launch, run_sweep, submit_chain
from megatron_vwn.launch.site import SiteConfig, load_site
from megatron_vwn.launch.sweep import (
    format_summary,
    parse_widths,
    plan_sweep,
    record_submission,
    resolve_spec,
    summarize_sweep,
    token_budget,
)
from megatron_vwn.runs.sweeps import WIDTH_MANIFEST, read_manifest


def _site_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("site (flags win over --site FILE / $MVWN_SLURM_SITE)")
    g.add_argument("--site", metavar="FILE", help="site settings YAML (slurm/site.example.yaml)")
    for flag, kind, text in (
        ("--partition", str, "partition"), ("--account", str, "account"), ("--qos", str, "QOS"),
        ("--reservation", str, "reservation"), ("--constraint", str, "node features"),
        ("--nodes", int, "nodes per job"), ("--gpus-per-node", int, "GPUs per node"),
        ("--nproc-per-node", int, "ranks per node (default: GPUs per node, else 1)"),
        ("--cpus-per-task", int, "CPUs of the per-node task"), ("--mem", str, "memory per node"),
        ("--time", str, "time limit per job (HH:MM:SS, D-HH:MM:SS)"),
        ("--signal-grace", int, "USR1 this many seconds before the time limit (default 180)"),
        ("--container-image", str, "enroot/pyxis image for the ranks"),
        ("--python", str, "python with megatron_vwn on the nodes (default: this one)"),
        ("--log-dir", str, "directory of the job logs (default logs/slurm)"),
    ):
        dest = "signal_grace_s" if flag == "--signal-grace" else None
        g.add_argument(flag, type=kind, help=text, **({"dest": dest} if dest else {}))
    g.add_argument("--exclusive", action="store_true", default=None, help="whole nodes")
    g.add_argument("--no-requeue", dest="requeue", action="store_false", default=None,
                   help="do not requeue after a USR1 save")
    g.add_argument("--container-mount", dest="container_mounts", action="append",
                   metavar="SRC:DST", help="container mount (repeatable)")
    g.add_argument("--env", dest="env", action="append", metavar="NAME=VALUE",
                   help="environment for the job (repeatable)")
    g.add_argument("--sbatch-arg", dest="sbatch_args", action="append", metavar="ARG",
                   help="extra sbatch option, verbatim: --sbatch-arg=--mail-type=FAIL")


def job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a YAML file or shipped config name, then dotted overrides")
    p.add_argument("--chain", type=int, default=None,
                   help="jobs per run, each --dependency=afterany on the one before (runs "
                        "longer than the time limit); chained jobs do not requeue")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands only")
    _site_arguments(p)


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``slurm`` subcommand's actions: submit, sweep, status."""
    actions = parser.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="submit one training run",
                                description=__doc__, formatter_class=_Raw)
    job_arguments(submit)
    submit.add_argument("--job-name", help="job and log name (default: run.name or the run "
                                           "directory's name)")
    sweep = actions.add_parser("sweep", help="submit the backbone and its virtual widths",
                               description=__doc__, formatter_class=_Raw)
    job_arguments(sweep)
    sweep.add_argument("--widths", type=str, default=None,
                       help="virtual width factors, e.g. 1,2,4,8 (1 = backbone, 1.5 = m2 n3)")
    sweep.add_argument("--name", help="sweep name: run names NAME-x2, ... (default: config's)")
    sweep.add_argument("--runs-dir", help="run directories go to RUNS_DIR/NAME/xR "
                                          "(default runs/sweeps)")
    status = actions.add_parser("status", help="progress and losses of a sweep's runs")
    status.add_argument("sweep_dir", metavar="SWEEP_DIR", help="RUNS_DIR/NAME of a sweep")


class _Raw(argparse.RawDescriptionHelpFormatter):
    pass


def site_from_args(ns: argparse.Namespace) -> SiteConfig:
    flags = {key: getattr(ns, key, None) for key in (
        "partition", "account", "qos", "reservation", "constraint", "nodes", "gpus_per_node",
        "nproc_per_node", "cpus_per_task", "mem", "time", "signal_grace_s", "container_image",
        "python", "log_dir", "exclusive", "requeue", "container_mounts", "sbatch_args")}
    site = load_site(ns.site, flags)
    for item in ns.env or []:
        if "=" not in item:
            raise ConfigError(f"--env {item!r} must look like NAME=VALUE")
        key, value = item.split("=", 1)
        site.env[key] = value
    return site


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, list(args)


def cmd_submit(ns: argparse.Namespace) -> int:
    from megatron_vwn.config import validate

    site = site_from_args(ns)
    config, overrides = _split(ns.args)
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    validate(cfg, site.world_size)
    job_name = ns.job_name or cfg.run.name or Path(cfg.run.dir).name
    train_args = [config or DEFAULT_CONFIG, *overrides]
    submit_chain(site, job_name, train_args, ns.chain or 1, ns.dry_run)
    return 0


def cmd_sweep(ns: argparse.Namespace) -> int:
    site = site_from_args(ns)
    config, overrides = _split(ns.args)
    widths = parse_widths(ns.widths) if ns.widths is not None else None
    spec = resolve_spec(config, overrides, widths, ns.name, ns.runs_dir, ns.chain)
    runs = plan_sweep(spec, site.world_size)
    out = sys.stdout
    print(f"# sweep {spec.sweep_name}: {spec.config} at widths "
          f"{', '.join(f'{r.width:g} (m={r.m}, n={r.n})' for r in runs)}; "
          f"{token_budget(spec)} tokens per run; {site.nodes} node(s) x "
          f"{site.ranks_per_node} rank(s) per job", file=out)
    run_sweep(runs, Launch("submit", site, spec.chain, ns.dry_run))
    if not ns.dry_run:
        path = record_submission(spec, runs, asdict(site))
        print(f"# recorded in {path}; progress: megatron-vwn slurm status {path.parent}")
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    summary = summarize_sweep(ns.sweep_dir)
    print(format_summary(summary, read_manifest(ns.sweep_dir, WIDTH_MANIFEST).get("token_budget")))
    return 0


def run_slurm(ns: argparse.Namespace) -> int:
    """Dispatch ``megatron-vwn slurm ACTION``."""
    handlers = {"submit": cmd_submit, "sweep": cmd_sweep, "status": cmd_status}
    return handlers[ns.action](ns)
