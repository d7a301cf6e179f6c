"""``megatron-vwn report RUN_OR_SWEEP_DIR... [--baseline DIR] --out DIR`` (see
:mod:`megatron_vwn.studies.report` and docs/width_scaling.md)."""

from __future__ import annotations

import argparse


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.splitlines()[0]
    p.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                   help="run directories and/or sweep directories (with sweep.json)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="the backbone run the speed-ups are against (default: the first r=1 run)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where report.md, summary.json and the PNGs go")
    p.set_defaults(run=run_report)


def run_report(ns: argparse.Namespace) -> int:
    from megatron_vwn.log import setup_logging
    from megatron_vwn.studies.report import fit_text, render_table, write_report

    setup_logging(rank=0)
    summary = write_report(ns.dirs, ns.out, baseline=ns.baseline)
    print(render_table(summary))
    print(fit_text(summary["fit"]))
    print(f"wrote {ns.out}/report.md, summary.json and the figures")
    return 0
