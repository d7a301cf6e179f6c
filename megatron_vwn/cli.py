"""``megatron-vwn``: one console script, thin subcommands.

    megatron-vwn train [CONFIG] [key=value ...] [--nproc N]
    megatron-vwn preprocess --input ... --output-prefix ... (see docs/data.md)
    megatron-vwn checkpoint inspect PATH [--json]   (see docs/checkpoints.md)
    megatron-vwn slurm submit|sweep|status ...      (see docs/slurm.md)
    megatron-vwn convert hf|from-hf ...             (see docs/convert.md)
    megatron-vwn eval|report|profile ...            (see docs/width_scaling.md)
    megatron-vwn shape plan|sweep|report ...        (see docs/shape.md)

``train`` with no CONFIG trains the tiny default (``configs/tiny.yaml``). ``--nproc N`` starts N
local ranks through torchrun; under torchrun or SLURM the same command picks up the launcher's
environment. Bad input is reported as one line (exit status 2) before any process group exists.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.loader import split_config_and_overrides


class _Parser(argparse.ArgumentParser):
    """Usage errors end like every other refusal: one ``megatron-vwn: error:`` line, status 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        command = self.prog.removeprefix("megatron-vwn").strip()
        self.exit(2, f"megatron-vwn: error: {command + ': ' if command else ''}{message}\n")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="pretrain a model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a YAML file or shipped config name, then dotted overrides")
    p.add_argument("--nproc", type=int, default=None,
                   help="start this many local ranks with torchrun")
    p.set_defaults(run=cmd_train)


def cmd_train(ns: argparse.Namespace) -> int:
    from megatron_vwn.config import load_config, validate
    from megatron_vwn.parallel.env import resolve_dist_env, under_launcher

    config_path, overrides = split_config_and_overrides(ns.args)
    cfg = load_config(config_path, overrides)
    if ns.nproc is not None and not under_launcher():
        if ns.nproc < 1:
            raise ConfigError(f"--nproc ({ns.nproc}) must be >= 1")
        validate(cfg, ns.nproc)
        from megatron_vwn.training.run_lease import check_run_dir_free

        check_run_dir_free(cfg.run.dir)
        from megatron_vwn.data.datasets import prepare_data

        prepare_data(cfg.data)  # missing files fail here; the bundled corpus is built once
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ns.nproc}", "-m", "megatron_vwn.cli", "train",
            config_path, *overrides,
        ]
        from megatron_vwn.training.faults import launch_reporting_faults

        return launch_reporting_faults(command)

    from megatron_vwn.training.trainer import run_training

    dist = resolve_dist_env()
    validate(cfg, dist.world_size)
    run_training(cfg, dist)
    return 0


def cmd_preprocess(ns: argparse.Namespace) -> int:
    from megatron_vwn.data.preprocess import run_preprocess
    from megatron_vwn.log import setup_logging

    setup_logging(rank=0)
    return run_preprocess(ns)


def cmd_checkpoint(ns: argparse.Namespace) -> int:
    from megatron_vwn.checkpoint.inspect import run_inspect

    return run_inspect(ns)


def cmd_slurm(ns: argparse.Namespace) -> int:
    from megatron_vwn.launch.slurm import run_slurm

    return run_slurm(ns)


def cmd_convert(ns: argparse.Namespace) -> int:
    from megatron_vwn.convert.cli import run_convert

    return run_convert(ns)


def cmd_shape(ns: argparse.Namespace) -> int:
    from megatron_vwn.tools.shape_cli import run_shape

    return run_shape(ns)


def build_parser() -> argparse.ArgumentParser:
    from megatron_vwn import __version__

    parser = _Parser(prog="megatron-vwn", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"megatron-vwn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    from megatron_vwn.data.preprocess import add_preprocess_arguments

    preprocess = sub.add_parser("preprocess", help="text -> tokenizer + indexed data")
    add_preprocess_arguments(preprocess)
    preprocess.set_defaults(run=cmd_preprocess)
    from megatron_vwn.checkpoint.inspect import add_inspect_arguments

    checkpoint = sub.add_parser("checkpoint", help="inspect checkpoints")
    checkpoint.set_defaults(run=cmd_checkpoint)
    actions = checkpoint.add_subparsers(dest="action", required=True)
    add_inspect_arguments(actions.add_parser(
        "inspect", help="iteration, layout, config, parameter shapes and bytes"))
    from megatron_vwn.launch.slurm import add_slurm_arguments

    slurm = sub.add_parser("slurm", help="submit runs and width sweeps to SLURM")
    add_slurm_arguments(slurm)
    slurm.set_defaults(run=cmd_slurm)
    from megatron_vwn.convert.cli import add_convert_arguments

    convert = sub.add_parser("convert", help="Hugging Face export and import")
    add_convert_arguments(convert)
    convert.set_defaults(run=cmd_convert)
    from megatron_vwn.studies.report_cli import add_report_arguments
    from megatron_vwn.tools.eval_cli import add_eval_arguments
    from megatron_vwn.tools.profile import add_profile_arguments

    # eval, report, profile: each sets its own ``run``
    add_eval_arguments(sub.add_parser("eval", help="score a text file with a trained model"))
    add_report_arguments(sub.add_parser("report", help="width-scaling report of runs/sweeps"))
    add_profile_arguments(sub.add_parser("profile", help="per-module FLOPs, parameters, latency"))
    from megatron_vwn.tools.shape_cli import add_shape_arguments

    shape = sub.add_parser("shape", help="depth-width shape study (plan, sweep, report)")
    add_shape_arguments(shape)
    shape.set_defaults(run=cmd_shape)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_vwn.log import silence_expected_warnings

    silence_expected_warnings()
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`train --nproc 2 train.lr=1e-3`); argparse leaves them over.
    if ns.command in ("train", "slurm", "eval", "profile", "shape") and hasattr(ns, "args") \
            and all(not item.startswith("-") for item in extra):
        ns.args.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from megatron_vwn.parallel.faults import LostRank, TrainingFault
    from megatron_vwn.training.faults import report_fault
    from megatron_vwn.training.lifetime import exit_now

    try:
        return ns.run(ns)
    except ConfigError as exc:
        report_fault(2, str(exc))
        return 2
    except TrainingFault as exc:  # NaN/Inf, a lost rank, a failed save: docs/reliability.md
        if exc.report:
            report_fault(exc.exit_code, str(exc))
        if isinstance(exc, LostRank):  # no orderly shutdown with a peer gone: end here
            exit_now(exc.exit_code)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
