"""Has this run finished? Asked by ``slurm/train.sbatch`` before it starts the ranks and before
it requeues a preempted job, so a requeued or chained job whose run is already complete exits at
once instead of building a model to train zero iterations.

    python -m megatron_vwn.launch.progress [CONFIG] [key=value ...]

Exit status 0: the run directory holds a complete checkpoint at ``train.iters`` (or beyond);
1: not finished (no checkpoint, or an earlier one); 2: the config does not load. Only files are
read (``config``, ``checkpoint.files``): no torch import, so it costs a fraction of a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_vwn.checkpoint.files import list_complete
from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.loader import DEFAULT_CONFIG, load_config


def latest_complete_iteration(run_dir: str | Path) -> int | None:
    """The iteration of the newest complete checkpoint under ``run_dir/checkpoints``."""
    complete = list_complete(Path(run_dir) / "checkpoints")
    return max((iteration for iteration, _ in complete), default=None)


def run_finished(config: str, overrides: list[str]) -> tuple[bool, str]:
    """(finished, a one-line description) for the run that ``config`` + ``overrides`` name."""
    cfg = load_config(config, overrides)
    latest = latest_complete_iteration(cfg.run.dir)
    if latest is None:
        return False, f"{cfg.run.dir}: no complete checkpoint yet"
    done = latest >= cfg.train.iters
    state = "finished" if done else "not finished"
    return done, f"{cfg.run.dir}: {state} (checkpoint at iteration {latest} of {cfg.train.iters})"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config = args.pop(0) if args and "=" not in args[0] else DEFAULT_CONFIG
    try:
        done, message = run_finished(config, args)
    except ConfigError as exc:
        print(f"megatron-vwn: error: {exc}", file=sys.stderr)
        return 2
    print(message)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
