"""A depth-width sweep's plan: every planned shape of every budget, per seed, under one directory.

For each budget ``N`` and depth ``L`` the planner (:mod:`megatron_vwn.studies.shape`) gives the
widest ``D`` within ``N``; every (budget, depth, seed) becomes one training run of the same
config and overrides. Only the shape keys (``model.num_layers``, ``hidden_size``,
``num_attention_heads``, ``num_query_groups``, ``ffn_hidden_size``: appended after the user's,
whose shape sets the planner's rules), ``train.seed`` and the run's name and directory change.
So data, token budget (``train.iters x train.global_batch_size x seq_length``) and schedule are
the same for every shape. The interaction metrics are turned on (every ``train.iters / 10``
iterations unless ``analysis.interaction_interval`` is set).

Layout, for a sweep called ``NAME`` under ``RUNS_DIR``::

    RUNS_DIR/NAME/shape_sweep.json         the plan: budgets, shapes, seeds, run directories
    RUNS_DIR/NAME/p3M-L4-s1234/            one run directory (config.yaml, metrics.jsonl, ...)

The plan is started by the sweep runner (:mod:`megatron_vwn.launch.runner`), as the width
sweep is: ``--local`` trains the runs one after another on this machine (finished runs are
skipped, so an interrupted sweep continues where it stopped); ``--submit`` sends each to SLURM
(site settings, chains, ``--dry-run``). The manifest's format is in docs/runs.md.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_vwn.config import load_config, validate
from megatron_vwn.config.errors import ConfigError
from megatron_vwn.runs.sweeps import SHAPE_MANIFEST, write_manifest
from megatron_vwn.studies.shape import Shape, plan_shapes

logger = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = "runs/shape"
# The keys a sweep sets per run. Shape keys given by the user are allowed: they set the rules
# (head dim, GQA ratio, FFN ratio) and the sweep's own shape overrides come after them.
RESERVED = ("train.seed", "run.dir", "run.name")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def budget_tag(budget: int) -> str:
    """``3000000`` -> ``p3M``, ``1500000`` -> ``p1p5M``, ``500000`` -> ``p500k``."""
    for unit, scale in (("M", 10**6), ("k", 10**3)):
        if budget >= scale:
            return "p" + f"{budget / scale:g}".replace(".", "p") + unit
    return f"p{budget}"


@dataclass
class ShapeRun:
    budget: int
    seed: int
    shape: dict[str, Any]
    """:meth:`Shape.to_json` of the planned shape (depth, hidden, params, r_dw, ...)."""
    name: str
    run_dir: str
    train_args: list[str]
    job_ids: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"L={self.shape['depth']} D={self.shape['hidden']} "
                f"({self.shape['params']:,} parameters, R_DW {self.shape['r_dw']:.4f})")


@dataclass
class ShapeSweepSpec:
    config: str
    overrides: list[str]
    budgets: list[int]
    depths: list[int]
    seeds: int = 1
    count: str = "embedding"
    name: str | None = None
    runs_dir: str = DEFAULT_RUNS_DIR

    @property
    def sweep_name(self) -> str:
        return self.name or f"{Path(self.config).stem}-shape"

    @property
    def directory(self) -> Path:
        return Path(self.runs_dir) / self.sweep_name


def plan_shape_sweep(spec: ShapeSweepSpec, world_size: int | None = None) -> list[ShapeRun]:
    """Every (budget, depth, seed) run, validated; :class:`ConfigError` before anything runs."""
    if not _NAME_RE.match(spec.sweep_name):
        raise ConfigError(f"sweep name {spec.sweep_name!r} must be letters, digits, '.', '_' "
                          f"or '-'")
    if spec.seeds < 1:
        raise ConfigError(f"--seeds ({spec.seeds}) must be >= 1")
    for item in spec.overrides:
        key = item.split("=", 1)[0].strip()
        if key in RESERVED:
            raise ConfigError(f"{key} is set by the shape sweep for every run; use --seeds "
                              f"(from the config's train.seed), --name or --runs-dir instead")
    base = load_config(spec.config, spec.overrides)
    extra = []
    if not base.analysis.interaction_interval:
        extra.append(f"analysis.interaction_interval={max(1, base.train.iters // 10)}")
    runs = []
    for budget in spec.budgets:
        shapes: list[Shape] = plan_shapes(base, budget, spec.depths, spec.count)
        for shape in shapes:
            if shape.hidden is None:
                logger.warning("budget %d: depth %d does not fit (skipped)", budget, shape.depth)
                continue
            for seed in range(base.train.seed, base.train.seed + spec.seeds):
                tag = f"{budget_tag(budget)}-L{shape.depth}-s{seed}"
                name = f"{spec.sweep_name}-{tag}"
                run_dir = str(spec.directory / tag)
                args = [spec.config, *spec.overrides, *extra, *shape.overrides(),
                        f"train.seed={seed}", f"run.dir={run_dir}", f"run.name={name}"]
                try:
                    validate(load_config(args[0], args[1:]), world_size)
                except ConfigError as exc:
                    raise ConfigError(f"budget {budget}, depth {shape.depth} (D={shape.hidden})"
                                      f": {exc}") from None
                runs.append(ShapeRun(budget=budget, seed=seed, shape=shape.to_json(),
                                     name=name, run_dir=run_dir, train_args=args))
    if not runs:
        raise ConfigError("no shape fits any budget: raise --params or lower --depths")
    return runs


def record_plan(spec: ShapeSweepSpec, runs: list[ShapeRun], mode: str,
                site: dict | None = None) -> Path:
    """``RUNS_DIR/NAME/shape_sweep.json``: the plan, how it ran, the job ids."""
    cfg = load_config(spec.config, spec.overrides)
    manifest = {
        "kind": "shape",
        "name": spec.sweep_name,
        "config": spec.config,
        "overrides": spec.overrides,
        "budgets": spec.budgets,
        "depths": spec.depths,
        "seeds": spec.seeds,
        "count": spec.count,
        "token_budget": cfg.train.iters * cfg.train.global_batch_size * cfg.model.seq_length,
        "mode": mode,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "submit_dir": os.getcwd(),  # relative run directories start here
        "runs": [asdict(run) for run in runs],
        **({"site": site} if site is not None else {}),
    }
    return write_manifest(spec.directory, SHAPE_MANIFEST, manifest)
