"""The backbone against virtual widths: one run per width, everything else held equal.

A sweep takes one training config (the backbone) and a list of widths ``r = D'/D``. Each run gets
the same config and overrides, so the same backbone, data, seed and token budget
(``train.iters x train.global_batch_size x model.seq_length``); only ``model.vwn`` (``m``, ``n``,
``connection=ghc``) and the run's name and directory differ. :func:`plan_sweep` builds every
run's config, validates it for the site's world size and checks that nothing else differs.

Widths map to VWN's fraction rate ``m`` and expansion ``n`` as in the paper's sweep
(docs/methods.md §1): 1 is the backbone (``m = n = 1``), integer ``r > 1`` is ``m = 8,
n = 8r`` (2x, 4x, 8x: ``n`` = 16, 32, 64) and a fraction takes the smallest ``m`` that makes
``n = m r`` whole (1.5x: ``m = 2, n = 3``).

A config whose ``model.vwn.connection`` is ``mhc`` or ``altup`` sweeps that family member
instead (docs/width_family.md): width ``r`` (a whole number) is ``m = 1, n = r`` streams or
blocks of width ``D`` with the config's connection, so ``--widths 1,2,4`` on
``altup/tiny_altup2`` runs AltUp K = 1, 2, 4 (``1`` is then the member with a single block or
stream, not the plain backbone).

Naming, for a sweep called ``NAME`` (default: the config's name) and width tag ``xR`` (``x1``,
``x1p5``, ``x2``): run ``NAME-xR`` is the job name, ``run.name`` and the log name, its run
directory ``RUNS_DIR/NAME/xR``; ``RUNS_DIR/NAME/sweep.json`` records the plan and the job ids
(docs/runs.md). The runs are submitted by the sweep runner (:mod:`megatron_vwn.launch.runner`).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from megatron_vwn.config import load_config, to_dict, validate
from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.lists import parse_list
from megatron_vwn.config.loader import CONFIG_DIR, DEFAULT_CONFIG, resolve_config_path
from megatron_vwn.launch.progress import latest_complete_iteration
from megatron_vwn.runs.rows import read_rows
from megatron_vwn.runs.sweeps import WIDTH_MANIFEST, read_manifest, run_directory, write_manifest

DEFAULT_SWEEP = CONFIG_DIR / "sweep" / "default.yaml"
DEFAULT_WIDTHS = (1.0, 2.0, 4.0, 8.0)
DEFAULT_RUNS_DIR = "runs/sweeps"
# The keys a sweep sets per run; user overrides may not touch them.
RESERVED = ("model.vwn.m", "model.vwn.n", "model.vwn.connection", "run.dir", "run.name")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def width_to_vwn(width: float) -> tuple[int, int]:
    """Virtual width factor ``r`` -> (m, n): 1 -> (1, 1), 2/4/8 -> (8, 16/32/64), 1.5 -> (2, 3)."""
    if not math.isfinite(width) or width < 1:
        raise ConfigError(f"sweep width {width} must be >= 1 (1 is the backbone)")
    ratio = Fraction(width).limit_denominator(64)
    if abs(float(ratio) - width) > 1e-9:
        raise ConfigError(f"sweep width {width} is not a ratio n/m with m <= 64")
    if ratio == 1:
        return 1, 1
    if ratio.denominator == 1:
        return 8, 8 * ratio.numerator
    return ratio.denominator, ratio.numerator


def width_to_streams(width: float, connection: str) -> tuple[int, int]:
    """Width ``r`` of a stream member (mHC streams, AltUp blocks) -> (m, n) = (1, r)."""
    if not math.isfinite(width) or width < 1 or width != int(width):
        raise ConfigError(f"sweep width {width:g} of model.vwn.connection={connection} must be "
                          f"a whole number >= 1 (the number of D-wide streams or blocks)")
    return 1, int(width)


def width_tag(width: float) -> str:
    """``x1``, ``x1p5``, ``x2``: file- and job-name-safe."""
    text = f"{width:g}".replace(".", "p")
    return f"x{text}"


def parse_widths(text: str) -> list[float]:
    return parse_list(text, "--widths", float, "1,2,4,8")


@dataclass
class SweepSpec:
    """What to sweep: a training config, widths, shared overrides, naming."""

    config: str = DEFAULT_CONFIG
    widths: list[float] = field(default_factory=lambda: list(DEFAULT_WIDTHS))
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    runs_dir: str = DEFAULT_RUNS_DIR
    chain: int = 1
    """Jobs per run, each ``--dependency=afterany`` on the previous: for runs longer than the
    time limit (each job resumes from the last checkpoint)."""

    @property
    def sweep_name(self) -> str:
        return self.name or Path(self.config).stem


@dataclass
class SweepRun:
    width: float
    m: int
    n: int
    name: str
    run_dir: str
    train_args: list[str]
    job_ids: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"width {self.width:g} (m={self.m}, n={self.n})"


def is_sweep_file(path: Path) -> bool:
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(loaded, dict) and "sweep" in loaded


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """A sweep file: a YAML mapping with one ``sweep:`` section of :class:`SweepSpec` keys.
    A relative ``config`` is looked up next to the file first, then among shipped configs."""
    file = Path(path)
    loaded = yaml.safe_load(file.read_text()) or {}
    if set(loaded) != {"sweep"} or not isinstance(loaded["sweep"], dict):
        raise ConfigError(f"{file}: a sweep file holds one mapping, 'sweep:'; got "
                          f"{sorted(loaded)}")
    raw = dict(loaded["sweep"])
    allowed = sorted(SweepSpec.__dataclass_fields__)
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{file}: unknown sweep key {unknown[0]!r}; allowed: {allowed}")
    if "widths" in raw:
        if not isinstance(raw["widths"], list) or not raw["widths"]:
            raise ConfigError(f"{file}: sweep.widths must be a list of numbers")
        raw["widths"] = [float(w) for w in raw["widths"]]
    if "overrides" in raw and not isinstance(raw["overrides"], list):
        raise ConfigError(f"{file}: sweep.overrides must be a list of key=value strings")
    spec = SweepSpec(**raw)
    relative = file.parent / spec.config
    if relative.is_file():
        spec.config = str(relative)
    return spec


def resolve_spec(config: str | None, overrides: list[str], widths: list[float] | None,
                 name: str | None, runs_dir: str | None, chain: int | None) -> SweepSpec:
    """CLI arguments -> a spec: CONFIG is a sweep file or a training config (None: the default
    sweep); flags win over the sweep file; command-line overrides come after the file's."""
    path = resolve_config_path(config) if config is not None else DEFAULT_SWEEP
    spec = load_sweep_spec(path) if is_sweep_file(path) else SweepSpec(config=config)
    spec.overrides = [*spec.overrides, *overrides]
    if widths is not None:
        spec.widths = widths
    if name is not None:
        spec.name = name
    if runs_dir is not None:
        spec.runs_dir = runs_dir
    if chain is not None:
        spec.chain = chain
    return spec


def plan_sweep(spec: SweepSpec, world_size: int | None = None) -> list[SweepRun]:
    """One validated run per width; raises :class:`ConfigError` before anything is submitted."""
    if spec.chain < 1:
        raise ConfigError(f"--chain ({spec.chain}) must be >= 1")
    if not _NAME_RE.match(spec.sweep_name):
        raise ConfigError(f"sweep name {spec.sweep_name!r} must be letters, digits, '.', '_' "
                          f"or '-'")
    for item in spec.overrides:
        key = item.split("=", 1)[0].strip()
        if key in RESERVED:
            raise ConfigError(f"{key} is set by the sweep for every width; use --widths, "
                              f"--name or --runs-dir instead of overriding it")
    # Members swept by their number of D-wide streams or blocks: r -> (m, n) = (1, r); the
    # others sweep GHC.
    member = load_config(spec.config, spec.overrides).model.vwn.member
    connection = member.name if member.swept_by_streams else "ghc"
    runs, shared = [], None
    for width in spec.widths:
        if member.swept_by_streams:
            m, n = width_to_streams(width, connection)
        else:
            m, n = width_to_vwn(width)
        tag = width_tag(width)
        name = f"{spec.sweep_name}-{tag}"
        run_dir = str(Path(spec.runs_dir) / spec.sweep_name / tag)
        args = [spec.config, *spec.overrides, f"model.vwn.connection={connection}",
                f"model.vwn.m={m}", f"model.vwn.n={n}", f"run.dir={run_dir}",
                f"run.name={name}"]
        try:
            cfg = load_config(args[0], args[1:])
            validate(cfg, world_size)
        except ConfigError as exc:
            raise ConfigError(f"width {width:g} (m={m}, n={n}): {exc}") from None
        held = _held_equal(to_dict(cfg))
        if shared is not None and held != shared:
            raise ConfigError(f"width {width:g} differs from width {spec.widths[0]:g} outside "
                              f"model.vwn and run")  # cannot happen: same config and overrides
        shared = held
        runs.append(SweepRun(width=width, m=m, n=n, name=name, run_dir=run_dir,
                             train_args=args))
    return runs


def _held_equal(resolved: dict) -> dict:
    """The resolved config without what a sweep varies (``model.vwn``, ``run``)."""
    held = {k: v for k, v in resolved.items() if k != "run"}
    held["model"] = {k: v for k, v in held["model"].items() if k != "vwn"}
    return held


def token_budget(spec: SweepSpec) -> int:
    cfg = load_config(spec.config, spec.overrides)
    return cfg.train.iters * cfg.train.global_batch_size * cfg.model.seq_length


def record_submission(spec: SweepSpec, runs: list[SweepRun], site: dict[str, Any]) -> Path:
    """Record the plan and the job ids in ``RUNS_DIR/NAME/sweep.json`` (earlier submissions of
    the same sweep are kept under ``submissions``)."""
    directory = Path(spec.runs_dir) / spec.sweep_name
    previous = read_manifest(directory, WIDTH_MANIFEST) \
        if (directory / WIDTH_MANIFEST).is_file() else {}
    submission = {
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "jobs": {run.name: run.job_ids for run in runs},
    }
    manifest = {
        "name": spec.sweep_name,
        "config": spec.config,
        "overrides": spec.overrides,
        "token_budget": token_budget(spec),
        "submit_dir": os.getcwd(),  # jobs run here: relative run directories start from it
        "runs": [{k: v for k, v in asdict(run).items() if k != "job_ids"} for run in runs],
        "site": site,
        "submissions": [*previous.get("submissions", []), submission],
    }
    return write_manifest(directory, WIDTH_MANIFEST, manifest)


def summarize_sweep(directory: str | Path) -> list[dict[str, Any]]:
    """Per run of a sweep directory: width, m, n, last train/valid rows, latest checkpoint."""
    directory = Path(directory)
    manifest = read_manifest(directory, WIDTH_MANIFEST)
    jobs = manifest["submissions"][-1]["jobs"] if manifest.get("submissions") else {}
    summary = []
    for run in manifest["runs"]:
        run_dir = run_directory(manifest, run, directory)
        train, valid = read_rows(run_dir, "train"), read_rows(run_dir, "valid")
        summary.append({
            "run": run["name"], "width": run["width"], "m": run["m"], "n": run["n"],
            "iteration": train[-1]["iteration"] if train else 0,
            "tokens": train[-1]["consumed_tokens"] if train else 0,
            "train_loss": train[-1]["lm_loss"] if train else None,
            "valid_loss": valid[-1]["lm_loss"] if valid else None,
            "valid_iteration": valid[-1]["iteration"] if valid else None,
            "checkpoint": latest_complete_iteration(run_dir),
            "jobs": jobs.get(run["name"], []),
        })
    return summary


def format_summary(summary: list[dict[str, Any]], token_budget: int | None = None) -> str:
    """A fixed-width table, the backbone's valid loss as the reference for the others."""
    base = next((row["valid_loss"] for row in summary if row["width"] == 1), None)
    lines = [f"{'run':<24} {'width':>5} {'m':>3} {'n':>4} {'iter':>7} {'tokens':>12} "
             f"{'train':>7} {'valid':>7} {'vs x1':>7} {'ckpt':>7}  jobs"]
    for row in summary:
        def num(value, fmt="{:.4f}"):
            return fmt.format(value) if value is not None else "-"
        delta = (row["valid_loss"] - base) if base is not None and row["valid_loss"] is not None \
            else None
        lines.append(
            f"{row['run']:<24} {row['width']:>5g} {row['m']:>3} {row['n']:>4} "
            f"{row['iteration']:>7} {row['tokens']:>12} {num(row['train_loss']):>7} "
            f"{num(row['valid_loss']):>7} {num(delta, '{:+.4f}'):>7} "
            f"{num(row['checkpoint'], '{}'):>7}  {','.join(row['jobs']) or '-'}")
    if token_budget is not None:
        lines.append(f"token budget per run: {token_budget}")
    return "\n".join(lines)
