"""``megatron-vwn shape report``: what a shape sweep shows, as PNGs and a markdown table.

Reads ``shape_sweep.json`` and every run's ``metrics.jsonl``; per run the final held-out loss
(the last ``valid`` row's ``lm_loss``) and the last ``analysis`` row. Writes into ``OUT``:

* ``loss_vs_rdw.png``: final held-out loss against ``R_DW = L / D`` (log axis), one line per
  budget (mean over seeds, bars from the lowest to the highest seed), the NIL interval shaded,
  each budget's best shape starred;
* ``loss_vs_aofe_wtw.png``: final loss against the final W^T W AOFE ratio of every run, with the
  fitted power law ``loss = a * ratio^b`` (least squares on ``log loss`` vs ``log ratio``) and
  its R^2 (of that log-log fit);
* ``aofe_over_training.png``: both AOFE ratios against the iteration, one line per shape
  (seeds averaged), coloured by ``R_DW``;
* ``report.md``: the table, the fit, the best shape per budget, and how stable the ranking of
  the shapes is across seeds (Spearman correlation of the seeds' orderings, same best shape).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_vwn.runs.rows import read_rows
from megatron_vwn.runs.sweeps import SHAPE_MANIFEST, read_manifest, run_directory
from megatron_vwn.studies.shape import INTERVAL


@dataclass
class RunResult:
    name: str
    budget: int
    seed: int
    depth: int
    hidden: int
    params: int
    r_dw: float
    in_interval: bool
    valid_loss: float | None
    aofe_ratio_wtw: float | None
    aofe_ratio_agop: float | None
    analysis: list[dict[str, Any]] = field(default_factory=list)


def collect(sweep_dir: str | Path) -> tuple[dict[str, Any], list[RunResult]]:
    """The manifest and one :class:`RunResult` per planned run (missing metrics: None)."""
    directory = Path(sweep_dir)
    manifest = read_manifest(directory, SHAPE_MANIFEST)
    results = []
    for run in manifest["runs"]:
        rows = read_rows(run_directory(manifest, run, directory))
        valid = [r for r in rows if r.get("split") == "valid"]
        analysis = [r for r in rows if r.get("split") == "analysis"]
        shape = run["shape"]
        results.append(RunResult(
            name=run["name"], budget=run["budget"], seed=run["seed"], depth=shape["depth"],
            hidden=shape["hidden"], params=shape["params"], r_dw=shape["r_dw"],
            in_interval=shape["in_interval"],
            valid_loss=valid[-1]["lm_loss"] if valid else None,
            aofe_ratio_wtw=analysis[-1]["aofe_ratio_wtw"] if analysis else None,
            aofe_ratio_agop=analysis[-1]["aofe_ratio_agop"] if analysis else None,
            analysis=analysis,
        ))
    return manifest, results


@dataclass(frozen=True)
class PowerLaw:
    """``y = a * x^b``, fitted on logs; ``r2`` of the log-log fit."""

    a: float
    b: float
    r2: float
    points: int


def fit_power_law(xs: list[float], ys: list[float]) -> PowerLaw | None:
    """Least squares of ``log y = log a + b log x``; None with fewer than 3 positive points."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pairs) < 3:
        return None
    lx, ly = [p[0] for p in pairs], [p[1] for p in pairs]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in pairs) / sxx
    log_a = my - b * mx
    total = sum((y - my) ** 2 for y in ly)
    residual = sum((y - (log_a + b * x)) ** 2 for x, y in pairs)
    return PowerLaw(a=math.exp(log_a), b=b, r2=1 - residual / total if total > 0 else 1.0,
                    points=len(pairs))


@dataclass
class ShapeSummary:
    """One (budget, depth) over its seeds."""

    budget: int
    depth: int
    hidden: int
    params: int
    r_dw: float
    in_interval: bool
    losses: list[float]
    wtw: list[float]
    agop: list[float]

    @property
    def loss(self) -> float | None:
        return statistics.fmean(self.losses) if self.losses else None


def summarize(results: list[RunResult]) -> dict[int, list[ShapeSummary]]:
    """Per budget, its shapes ordered by ``R_DW``, seeds pooled."""
    groups: dict[tuple[int, int], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.budget, r.depth), []).append(r)
    budgets: dict[int, list[ShapeSummary]] = {}
    for (budget, depth), runs in sorted(groups.items()):
        first = runs[0]
        budgets.setdefault(budget, []).append(ShapeSummary(
            budget=budget, depth=depth, hidden=first.hidden, params=first.params,
            r_dw=first.r_dw, in_interval=first.in_interval,
            losses=[r.valid_loss for r in runs if r.valid_loss is not None],
            wtw=[r.aofe_ratio_wtw for r in runs if r.aofe_ratio_wtw is not None],
            agop=[r.aofe_ratio_agop for r in runs if r.aofe_ratio_agop is not None]))
    for shapes in budgets.values():
        shapes.sort(key=lambda s: s.r_dw)
    return budgets


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for rank, index in enumerate(order):
        ranks[index] = float(rank)
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else None


def seed_stability(results: list[RunResult], budget: int) -> dict[str, Any] | None:
    """How the seeds of one budget rank its shapes: the mean pairwise Spearman correlation of
    their loss orderings and whether every seed picks the same best depth."""
    by_seed: dict[int, dict[int, float]] = {}
    for r in results:
        if r.budget == budget and r.valid_loss is not None:
            by_seed.setdefault(r.seed, {})[r.depth] = r.valid_loss
    seeds = sorted(by_seed)
    if len(seeds) < 2:
        return None
    depths = sorted(set.intersection(*(set(by_seed[s]) for s in seeds)))
    if len(depths) < 2:
        return None
    correlations = [spearman([by_seed[s][d] for d in depths], [by_seed[t][d] for d in depths])
                    for i, s in enumerate(seeds) for t in seeds[i + 1:]]
    correlations = [c for c in correlations if c is not None]
    best = {s: min(depths, key=lambda d, s=s: by_seed[s][d]) for s in seeds}
    return {"seeds": seeds, "depths": depths,
            "spearman": statistics.fmean(correlations) if correlations else None,
            "best_depth_per_seed": best, "same_best": len(set(best.values())) == 1}


def _budget_label(budget: int) -> str:
    return f"{budget / 1e6:g}M" if budget >= 10**6 else f"{budget / 1e3:g}k"


def plot_loss_vs_rdw(budgets: dict[int, list[ShapeSummary]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axvspan(*INTERVAL, color="tab:green", alpha=0.15,
               label=f"NIL interval {INTERVAL[0]}-{INTERVAL[1]}")
    for budget, shapes in budgets.items():
        shapes = [s for s in shapes if s.losses]
        if not shapes:
            continue
        xs, ys = [s.r_dw for s in shapes], [s.loss for s in shapes]
        low = [s.loss - min(s.losses) for s in shapes]
        high = [max(s.losses) - s.loss for s in shapes]
        line = ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3,
                           label=f"{_budget_label(budget)} parameters")
        best = min(shapes, key=lambda s: s.loss)
        ax.plot([best.r_dw], [best.loss], marker="*", markersize=16,
                color=line[0].get_color(), markeredgecolor="black")
        for s in shapes:
            ax.annotate(f"L{s.depth}", (s.r_dw, s.loss), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("R_DW = layers / hidden size (log)")
    ax.set_ylabel("final held-out loss")
    ax.set_title("Held-out loss vs depth-width ratio (star: best per budget)")
    _save_with_legend(fig, ax, path)


def _save_with_legend(fig, ax, path: Path) -> None:
    """Log-aware grid and legend, then write ``path`` and free the figure."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_vs_aofe(results: list[RunResult], fit: PowerLaw | None, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [r for r in results if r.valid_loss is not None and r.aofe_ratio_wtw]
    for budget in sorted({r.budget for r in points}):
        mine = [r for r in points if r.budget == budget]
        ax.scatter([r.aofe_ratio_wtw for r in mine], [r.valid_loss for r in mine],
                   label=f"{_budget_label(budget)} parameters")
    if fit is not None and points:
        low = min(r.aofe_ratio_wtw for r in points)
        high = max(r.aofe_ratio_wtw for r in points)
        xs = [low * (high / low) ** (i / 99) for i in range(100)]
        ax.plot(xs, [fit.a * x ** fit.b for x in xs], color="black",
                label=f"loss = {fit.a:.4g} * ratio^{fit.b:.3f}, R^2 = {fit.r2:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("W^T W AOFE ratio at the end of training (log)")
    ax.set_ylabel("final held-out loss (log)")
    ax.set_title("Loss vs parameter-space interaction")
    _save_with_legend(fig, ax, path)


def plot_aofe_over_training(results: list[RunResult], path: Path) -> None:
    """One line per shape (seeds averaged at their common iterations), coloured by ``R_DW``
    on a log scale, one line style per budget."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    shapes: dict[tuple[int, int], list[RunResult]] = {}
    for r in results:
        if r.analysis:
            shapes.setdefault((r.budget, r.depth), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.6), layout="constrained")
    fig.suptitle("AOFE ratios over training, per shape (mean over seeds; line style: budget)")
    if shapes:
        ratios = [runs[0].r_dw for runs in shapes.values()]
        norm = LogNorm(vmin=min(ratios), vmax=max(ratios) * (1.0001 if len(set(ratios)) == 1
                                                            else 1.0))
        styles = dict(zip(sorted({b for b, _ in shapes}), ["-", "--", ":", "-."] * 8,
                          strict=False))
        for (budget, depth), runs in sorted(shapes.items()):
            common = sorted(set.intersection(*({row["iteration"] for row in r.analysis}
                                               for r in runs)))
            color = plt.cm.viridis(norm(runs[0].r_dw))
            label = f"{_budget_label(budget)} L{depth} D{runs[0].hidden} (R_DW {runs[0].r_dw:.3f})"
            for ax, key in zip(axes, ("aofe_ratio_agop", "aofe_ratio_wtw"), strict=True):
                means = [statistics.fmean(next(row[key] for row in r.analysis
                                               if row["iteration"] == step) for r in runs)
                         for step in common]
                ax.plot(common, means, marker=".", color=color, linestyle=styles[budget],
                        label=label)
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes)
        bar.set_label("R_DW = L / D")
        axes[1].legend(fontsize=6, ncol=2)
    for ax, title in zip(axes, ("AGOP AOFE ratio", "W^T W AOFE ratio"), strict=True):
        ax.set_xlabel("iteration")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _num(value: float | None, fmt: str = "{:.4f}") -> str:
    return fmt.format(value) if value is not None else "-"


def markdown(manifest: dict[str, Any], results: list[RunResult],
             budgets: dict[int, list[ShapeSummary]], fit: PowerLaw | None) -> str:
    lines = [f"# Shape sweep `{manifest['name']}`", "",
             f"Config `{manifest['config']}` with `{' '.join(manifest['overrides']) or '-'}`; "
             f"{manifest['token_budget']:,} tokens per run; parameters counted: "
             f"{manifest['count']}; seeds per shape: {manifest['seeds']}. "
             f"NIL interval: R_DW {INTERVAL[0]}-{INTERVAL[1]}.", "",
             "| budget | L | D | params | R_DW | in interval | held-out loss (mean, seeds) "
             "| W^T W AOFE ratio | AGOP AOFE ratio | best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for budget, shapes in budgets.items():
        scored = [s for s in shapes if s.losses]
        best = min(scored, key=lambda s: s.loss) if scored else None
        for s in shapes:
            spread = (f" ({', '.join(f'{x:.4f}' for x in s.losses)})"
                      if len(s.losses) > 1 else "")
            lines.append(
                f"| {_budget_label(budget)} | {s.depth} | {s.hidden} | {s.params:,} | "
                f"{s.r_dw:.4f} | {'yes' if s.in_interval else ''} | {_num(s.loss)}{spread} | "
                f"{_num(statistics.fmean(s.wtw) if s.wtw else None)} | "
                f"{_num(statistics.fmean(s.agop) if s.agop else None)} | "
                f"{'**best**' if s is best else ''} |")
    lines += ["", "## Best shape per budget", ""]
    for budget, shapes in budgets.items():
        scored = [s for s in shapes if s.losses]
        if not scored:
            lines.append(f"- {_budget_label(budget)}: no finished runs")
            continue
        best = min(scored, key=lambda s: s.loss)
        where = "inside" if best.in_interval else (
            "below" if best.r_dw < INTERVAL[0] else "above")
        lines.append(f"- {_budget_label(budget)}: L={best.depth}, D={best.hidden}, R_DW "
                     f"{best.r_dw:.4f}, loss {best.loss:.4f}: {where} the NIL interval")
        stability = seed_stability(results, budget)
        if stability is not None:
            lines.append(f"  - seeds {stability['seeds']}: mean Spearman correlation of the "
                         f"shape rankings {_num(stability['spearman'], '{:.3f}')}; best depth "
                         f"per seed {stability['best_depth_per_seed']} "
                         f"({'the same' if stability['same_best'] else 'NOT the same'})")
    lines += ["", "## Loss vs W^T W AOFE ratio", ""]
    if fit is None:
        lines.append("Too few runs with both a held-out loss and an analysis row for a fit.")
    else:
        lines.append(f"`loss = {fit.a:.4g} * ratio^{fit.b:.3f}`, R^2 = {fit.r2:.3f} (least "
                     f"squares on log-log, {fit.points} runs; the NIL paper: 0.9035 * "
                     f"ratio^-1.857, R^2 = 0.97).")
    lines += ["", "![loss vs R_DW](loss_vs_rdw.png)", "",
              "![loss vs AOFE](loss_vs_aofe_wtw.png)", "",
              "![AOFE over training](aofe_over_training.png)", ""]
    return "\n".join(lines)


def write_report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """All four outputs into ``out`` (default ``SWEEP_DIR/report``); returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    manifest, results = collect(sweep_dir)
    out = Path(out) if out is not None else Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    budgets = summarize(results)
    finished = [r for r in results if r.valid_loss is not None and r.aofe_ratio_wtw]
    fit = fit_power_law([r.aofe_ratio_wtw for r in finished], [r.valid_loss for r in finished])
    plot_loss_vs_rdw(budgets, out / "loss_vs_rdw.png")
    plot_loss_vs_aofe(results, fit, out / "loss_vs_aofe_wtw.png")
    plot_aofe_over_training(results, out / "aofe_over_training.png")
    (out / "report.md").write_text(markdown(manifest, results, budgets, fit))
    return out
