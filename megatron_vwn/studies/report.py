"""``megatron-vwn report``: what virtual width bought, from the files runs leave behind.

Input: run directories (``config.yaml`` + ``metrics.jsonl``) and/or sweep directories (their
``sweep.json`` names the runs). Output in ``--out``:

- ``summary.json``: ``{"runs": [...], "fit": {...}, "baseline": ...}``; per run ``name``, ``r``,
  ``m``, ``n``, ``mtp_depths``, ``seed``, ``final_valid_loss``, ``tokens`` (trained),
  ``flops`` (training FLOPs, ``tokens x`` :func:`megatron_vwn.model.accounting.flops_per_token`),
  ``complete`` (the run reached ``train.iters``; the table marks the others "partial"),
  ``token_speedup`` (next-token, against the backbone: see
  :func:`megatron_vwn.studies.curves.token_speedup`) and, for multi-token-prediction runs,
  ``final_valid_mtp_loss_1`` and ``token_speedup_next2`` (the next-2-token loss ``mtp_loss_1``
  against a backbone run that has the same head). ``fit`` is the least-squares line of final
  held-out loss against ``log2 r`` over the finished widened runs (``r > 1``, no MTP): ``slope``,
  ``intercept``, ``r2``, ``points`` (null values with fewer than two widths).
- ``report.md``: the table, the fit next to the paper's, the figures.
- PNGs: held-out loss vs tokens, vs training FLOPs, the loss gap to the backbone over tokens, and
  final loss vs log2(r) with the fitted line.

The backbone is ``--baseline DIR``, or else, per run, the ``r = 1`` run without MTP of the same
``train.seed`` (the first ``r = 1`` run given when no seed matches; it is also the figures'
reference); the next-2-token backbone likewise among the ``r = 1`` runs with MTP. Curves are the
``valid`` rows, which score the same tokens at every evaluation under ``train.eval_mode=fixed``
(the default); runs written with ``rolling`` evaluation are flagged, as their curves are noisier.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_vwn.config import Config
from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.loader import from_dict
from megatron_vwn.runs.rows import read_rows
from megatron_vwn.runs.sweeps import WIDTH_MANIFEST, read_manifest, run_directory
from megatron_vwn.studies.curves import Curve, fit_log2, loss_gap, token_speedup

logger = logging.getLogger(__name__)

PAPER = {"speedup_8x": 2.5, "speedup_8x_next2": 3.5, "slope": -0.0069, "intercept": 1.6212,
         "r2": 0.9986}
"""The paper's headline figures (docs/methods.md §1.6): 8x reaches the backbone's loss with 2.5x
fewer tokens (next-2-token loss: 3.5x) at 3T tokens; loss = -0.0069 log2 r + 1.6212 over
r = 2, 4, 8, R^2 = 0.9986."""

FIGURES = {
    "loss_vs_tokens": "held-out loss vs training tokens",
    "loss_vs_flops": "held-out loss vs training FLOPs",
    "loss_gap": "held-out loss minus the backbone's, over tokens",
    "loss_vs_log2r": "final held-out loss vs log2(r), with the fitted line",
}


@dataclass
class RunData:
    """One run as the report sees it."""

    name: str
    directory: Path
    cfg: Config
    curves: dict[str, Curve] = field(default_factory=dict)
    """``lm_loss`` and ``mtp_loss_k`` held-out curves over consumed tokens."""
    tokens: int = 0
    flops_per_token: int = 0
    iteration: int = 0
    """The last logged training iteration."""

    @property
    def complete(self) -> bool:
        """Whether the run reached ``train.iters`` (a partial run's final loss is not final)."""
        return self.iteration >= self.cfg.train.iters

    @property
    def r(self) -> float:
        vwn = self.cfg.model.vwn
        return vwn.n / vwn.m

    @property
    def mtp_depths(self) -> int:
        return self.cfg.model.mtp.num_layers

    @property
    def valid(self) -> Curve:
        return self.curves.get("lm_loss", Curve([], []))


def padded_vocab_of(cfg: Config, tensor_parallel: int | None = None) -> int:
    """The padded vocabulary of ``cfg``'s output layer (as the trainer pads it), from
    ``model.vocab_size``, the tokenizer file, or the bundled tokenizer's size; no data needed."""
    vocab = cfg.model.vocab_size
    if not vocab and cfg.data.tokenizer_model and Path(cfg.data.tokenizer_model).is_file():
        import sentencepiece as spm

        vocab = spm.SentencePieceProcessor(model_file=cfg.data.tokenizer_model).get_piece_size()
    vocab = vocab or cfg.data.tokenizer_vocab_size
    multiple = cfg.model.make_vocab_size_divisible_by * (tensor_parallel or cfg.parallel.tensor)
    return -(-vocab // multiple) * multiple


def load_run(directory: str | Path, name: str | None = None) -> RunData:
    """A run directory's config and held-out curves (ConfigError if it is not one)."""
    from megatron_vwn.model.accounting import flops_per_token

    directory = Path(directory)
    config_file = directory / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{directory}: no config.yaml (not a run directory, and no "
                          f"{WIDTH_MANIFEST})")
    cfg = from_dict(yaml.safe_load(config_file.read_text()) or {})
    rows = read_rows(directory)
    valid = [r for r in rows if r.get("split") == "valid"]
    train = [r for r in rows if r.get("split") == "train"]
    curves = {}
    for key in sorted({k for row in valid for k in row if k == "lm_loss" or
                       k.startswith("mtp_loss_")}):
        points = sorted({row["consumed_tokens"]: row[key] for row in valid if key in row}.items())
        curves[key] = Curve([float(t) for t, _ in points], [float(y) for _, y in points])
    tokens = max([r["consumed_tokens"] for r in train + valid], default=0)
    if cfg.train.eval_mode != "fixed":
        logger.warning("%s evaluated with train.eval_mode=%s: each point scores other tokens",
                       directory, cfg.train.eval_mode)
    return RunData(name=name or cfg.run.name or directory.name, directory=directory, cfg=cfg,
                   curves=curves, tokens=int(tokens),
                   iteration=max([r.get("iteration", 0) for r in train], default=0),
                   flops_per_token=flops_per_token(cfg.model, padded_vocab_of(cfg)))


def find_runs(paths: list[str | Path]) -> list[RunData]:
    """Runs named by run directories and sweep directories (``sweep.json``), in order, each
    once."""
    runs, seen = [], set()
    for path in map(Path, paths):
        if (path / WIDTH_MANIFEST).is_file():
            manifest = read_manifest(path, WIDTH_MANIFEST)
            entries = [(run_directory(manifest, run, path), run["name"])
                       for run in manifest["runs"]]
        elif path.is_dir():
            entries = [(path, None)]
        else:
            raise ConfigError(f"{path}: no such run or sweep directory")
        for directory, name in entries:
            key = directory.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(load_run(directory, name))
    return runs


def _pick_baselines(runs: list[RunData], baseline: RunData | None):
    """The report's backbone and next-2-token backbone: ``--baseline``, else the first ``r = 1``
    run (without / with MTP) in the order the runs were given (a sweep's own order)."""
    backbones = [run for run in runs if run.r == 1]
    next_token = baseline or next((run for run in backbones if not run.mtp_depths), None) \
        or (backbones[0] if backbones else None)
    next2 = baseline if baseline is not None and baseline.mtp_depths else \
        next((run for run in backbones if run.mtp_depths), None)
    return next_token, next2


def _same_seed(run: RunData, runs: list[RunData], default: RunData | None,
               mtp: bool) -> RunData | None:
    """The ``r = 1`` run of ``run``'s seed (with MTP heads when ``mtp``), else ``default``: with
    several seeds, each width is compared with the backbone that saw the same data order and
    initialisation seed, so the seeds' noise is not counted as a speed-up."""
    return next((other for other in runs if other.r == 1 and bool(other.mtp_depths) == mtp
                 and other.cfg.train.seed == run.cfg.train.seed), default)


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def summarize(runs: list[RunData], baseline: RunData | None = None) -> dict[str, Any]:
    """The ``summary.json`` content (see the module docstring)."""
    base, base2 = _pick_baselines(runs, baseline)
    rows = []
    for run in runs:
        own = base if baseline is not None else _same_seed(run, runs, base, mtp=False)
        own2 = base2 if baseline is not None else _same_seed(run, runs, base2, mtp=True)
        row = {
            "name": run.name, "dir": str(run.directory), "r": run.r, "m": run.cfg.model.vwn.m,
            "n": run.cfg.model.vwn.n, "mtp_depths": run.mtp_depths, "seed": run.cfg.train.seed,
            "final_valid_loss": _rounded(run.valid.final_loss), "tokens": run.tokens,
            "complete": run.complete,
            "flops": run.tokens * run.flops_per_token,
            "token_speedup": _rounded(token_speedup(own.valid, run.valid)) if own else None,
            "baseline": own.name if own else None,
        }
        if run.mtp_depths:
            next2 = run.curves.get("mtp_loss_1", Curve([], []))
            row["final_valid_mtp_loss_1"] = _rounded(next2.final_loss)
            row["token_speedup_next2"] = _rounded(token_speedup(
                own2.curves["mtp_loss_1"], next2)) if own2 and "mtp_loss_1" in own2.curves \
                else None
            row["baseline_next2"] = own2.name if own2 else None
        rows.append(row)
    points = [(row["r"], row["final_valid_loss"]) for row in rows
              if row["r"] > 1 and not row["mtp_depths"] and row["complete"]
              and row["final_valid_loss"] is not None]
    fit = fit_log2([r for r, _ in points], [y for _, y in points])
    return {
        "runs": rows,
        "fit": {"slope": _rounded(fit.slope), "intercept": _rounded(fit.intercept),
                "r2": _rounded(fit.r2), "points": fit.points} if fit else
               {"slope": None, "intercept": None, "r2": None, "points": len(points)},
        "baseline": base.name if base else None,
        "baseline_next2": base2.name if base2 else None,
    }


def _plot(runs: list[RunData], summary: dict, base: RunData | None, out: Path) -> list[str]:
    """The four figures as PNGs in ``out``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def style(run: RunData) -> dict:  # one colour per run across the figures
        return {"label": run.name, "marker": "o", "markersize": 3,
                "color": f"C{runs.index(run) % 10}",
                "linestyle": "--" if run.mtp_depths else "-"}

    written = []

    def save(fig, stem: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=120)
        plt.close(fig)
        written.append(f"{stem}.png")

    for stem, scale, xlabel in (("loss_vs_tokens", 1.0, "training tokens"),
                                ("loss_vs_flops", None, "training FLOPs")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in runs:
            factor = scale or run.flops_per_token
            ax.plot([t * factor for t in run.valid.tokens], run.valid.loss, **style(run))
        ax.set(xlabel=xlabel, ylabel="held-out loss (nats/token)", title=FIGURES[stem])
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, stem)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if base is not None:
        for run in runs:
            if run is not base:
                gap = loss_gap(base.valid, run.valid)
                ax.plot(gap.tokens, gap.loss, **style(run))
        ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="training tokens", ylabel=f"loss - {base.name if base else 'backbone'}",
           title=FIGURES["loss_gap"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "loss_gap")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = [row for row in summary["runs"] if row["final_valid_loss"] is not None]
    for mtp, marker, label in ((False, "o", "runs"), (True, "s", "runs with MTP")):
        chosen = [row for row in points if bool(row["mtp_depths"]) == mtp]
        if chosen:
            ax.scatter([math.log2(row["r"]) for row in chosen],
                       [row["final_valid_loss"] for row in chosen], marker=marker, label=label)
    fit = summary["fit"]
    if fit["slope"] is not None:
        xs = [math.log2(row["r"]) for row in points]
        line = [min(xs), max(xs)]
        ax.plot(line, [fit["slope"] * x + fit["intercept"] for x in line], color="C3",
                label=f"fit: {fit['slope']:.4f} log2 r + {fit['intercept']:.4f} "
                      f"(R^2 {fit['r2']:.3f})")
    ax.set(xlabel="log2(r)", ylabel="final held-out loss", title=FIGURES["loss_vs_log2r"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "loss_vs_log2r")
    return written


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def render_table(summary: dict) -> str:
    """The per-run table (Markdown; also what the command prints)."""
    lines = ["| run | r | m | n | MTP | seed | tokens | training FLOPs | final held-out loss | "
             "token speed-up | next-2 loss | next-2 speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["runs"]:
        lines.append(
            f"| {row['name']} | {row['r']:g} | {row['m']} | {row['n']} | {row['mtp_depths']} | "
            f"{row['seed']} | {row['tokens']:,}{'' if row['complete'] else ' (partial)'} | "
            f"{row['flops']:.3e} | "
            f"{_num(row['final_valid_loss'], '{:.4f}')} | "
            f"{_num(row['token_speedup'], '{:.2f}x')} | "
            f"{_num(row.get('final_valid_mtp_loss_1'), '{:.4f}')} | "
            f"{_num(row.get('token_speedup_next2'), '{:.2f}x')} |")
    return "\n".join(lines)


def fit_text(fit: dict) -> str:
    if fit["slope"] is None:
        return (f"No fit: it needs finished runs at two or more widths r > 1 "
                f"({fit['points']} point(s))")
    return (f"Fit over the finished widened runs without MTP ({fit['points']} points): "
            f"loss = {fit['slope']:.4f} log2 r + {fit['intercept']:.4f}, R^2 = {fit['r2']:.4f}")


def render_markdown(summary: dict, figures: list[str]) -> str:
    """``report.md``: the table, the fit against the paper's, and the figures."""
    own = sorted({row["baseline"] for row in summary["runs"] if row.get("baseline")})
    backbones = (f"Backbone (speed-ups are against it): `{summary['baseline']}`"
                 if len(own) <= 1 else "Speed-ups are against the backbone of the same seed: "
                 + ", ".join(f"`{name}`" for name in own))
    lines = ["# Width-scaling report", "",
             backbones + (f"; next-2-token backbone: `{summary['baseline_next2']}`"
                          if summary["baseline_next2"] else ""), "",
             render_table(summary)]
    lines += ["", "Token speed-up: tokens the backbone needed to reach its final held-out loss "
              "divided by the tokens this run needed to reach that loss (linear between "
              "evaluations; `-` when not reached).", "", fit_text(summary["fit"]) + "."]
    lines += ["", f"Paper (docs/methods.md §1.6, 3T tokens): 8x needs {PAPER['speedup_8x']}x fewer "
              f"tokens ({PAPER['speedup_8x_next2']}x for the next-2-token loss); "
              f"loss = {PAPER['slope']} log2 r + {PAPER['intercept']}, R^2 = {PAPER['r2']}.", ""]
    for name in figures:
        stem = name.rsplit(".", 1)[0]
        lines += [f"## {FIGURES[stem].capitalize()}", "", f"![{stem}]({name})", ""]
    return "\n".join(lines)


def write_report(paths: list[str | Path], out: str | Path,
                 baseline: str | Path | None = None) -> dict:
    """Read the runs, write ``summary.json``, ``report.md`` and the PNGs; return the summary."""
    runs = find_runs(paths)
    base = None
    if baseline is not None:
        key = Path(baseline).resolve()
        base = next((run for run in runs if run.directory.resolve() == key), None) \
            or load_run(baseline)
        if base not in runs:
            runs.insert(0, base)
    if not runs:
        raise ConfigError("report: no runs found")
    summary = summarize(runs, base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    picked, _ = _pick_baselines(runs, base)
    figures = _plot(runs, summary, picked, out)
    (out / "report.md").write_text(render_markdown(summary, figures))
    logger.info("report: %d runs -> %s", len(runs), out)
    return summary
