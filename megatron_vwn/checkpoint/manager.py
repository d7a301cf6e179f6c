"""Resume and save: the checkpoint side of a training run.

Which checkpoint a run starts from (:meth:`CheckpointManager.resume`):

1. ``checkpoint.resume=auto`` and ``run.dir/checkpoints`` holds a complete checkpoint: the one the
   tracker names; if it is corrupted, the newest older complete one (each failure is logged with
   the file it concerns). A missing tracker is reported and the newest complete one is used.
2. else ``checkpoint.load=PATH`` (an ``iter_*`` directory or a checkpoints directory): that one,
   all state or (``checkpoint.weights_only``) the model weights only; no fallback.
3. else a fresh start.

Before any tensor is read, the manifest's sizes and CRC-32s are checked (each rank checks a share
of the files) and the checkpoint's model section is compared with the config.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_vwn import __version__
from megatron_vwn.checkpoint.compat import check_model_fits
from megatron_vwn.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
)
from megatron_vwn.checkpoint.failures import (
    describe_errors,
    gather_errors,
    injected_save_error,
    local_bytes,
    remove_partial,
    reserve_space,
)
from megatron_vwn.checkpoint.files import (
    CONFIG_FILE,
    data_files,
    describe_files,
    iter_dir_name,
    list_iter_dirs,
    read_manifest,
    write_manifest,
    write_tracker,
)
from megatron_vwn.checkpoint.resolve import explicit_candidates, find_candidates
from megatron_vwn.checkpoint.retention import apply_retention, remove_dir
from megatron_vwn.checkpoint.saver import Saver
from megatron_vwn.checkpoint.state import (
    Layout,
    RunState,
    SavedRun,
    capture_rng,
    load_optimizer_state,
    model_keys,
    model_sharded_state_dict,
    optimizer_sharded_state_dict,
    restore_rng,
    rng_sharded_object,
    sharding_metadata,
)
from megatron_vwn.checkpoint.weights import load_sharded, saved_run, verify_checkpoint
from megatron_vwn.config import Config, dump_config, to_dict
from megatron_vwn.config.errors import ConfigError
from megatron_vwn.optim.optimizer import use_distributed_optimizer
from megatron_vwn.optim.schedule import load_schedule_state, schedule_state_dict
from megatron_vwn.parallel.faults import SaveFailed, any_rank
from megatron_vwn.runs.rows import trim_rows

logger = logging.getLogger(__name__)


def _broadcast(obj):
    """Rank 0's value of ``obj`` on every rank."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def resolve_async_save(value: bool | None) -> bool:
    """``checkpoint.async_save``: None means on with CUDA; on CPU it is refused."""
    if value is None:
        return torch.cuda.is_available()
    if value and not torch.cuda.is_available():
        raise ConfigError("checkpoint.async_save=true needs CUDA; leave it unset on CPU")
    return value


class CheckpointManager:
    """Saves this run's checkpoints and restores the one it starts from (every rank has one)."""

    def __init__(self, cfg: Config, run_dir: Path, padded_vocab_size: int):
        cfg.checkpoint.validate()
        self.cfg = cfg
        self.ckpt = cfg.checkpoint
        self.run_dir = run_dir
        self.dir = run_dir / "checkpoints"
        self.padded_vocab_size = padded_vocab_size
        self.async_save = resolve_async_save(cfg.checkpoint.async_save)
        self.distributed_optimizer = use_distributed_optimizer(cfg)
        self.metadata = sharding_metadata(self.distributed_optimizer)
        self.last_saved: int | None = None
        self.last_complete: int | None = None
        """Iteration of this run's newest complete checkpoint in ``run.dir/checkpoints``."""
        self._saver: Saver | None = None

    # ---------------------------------------------------------------- resume

    def resume(self, model: list, optimizer, scheduler) -> RunState:
        """Restore the checkpoint this run starts from (see the module docstring); returns the
        run state to continue from (iteration 0 for a fresh start or ``weights_only``)."""
        if self.ckpt.resume == "auto":
            candidates, warnings, incomplete = _broadcast(self._own_candidates())
            for warning in warnings:
                logger.warning(warning)
            if candidates:
                return self._load_first(candidates, model, optimizer, scheduler, fallback=True)
            if incomplete:
                logger.warning("%s holds only incomplete checkpoints %s (saves that did not "
                               "finish): starting fresh", self.dir, incomplete)
        elif _is_rank0() and list_iter_dirs(self.dir):
            logger.warning("checkpoint.resume=never: not resuming from %s; this run's saves will "
                           "replace checkpoints of the same iterations there", self.dir)
        if self.ckpt.load:
            candidates = _broadcast(self._explicit_or_error(Path(self.ckpt.load)))
            if isinstance(candidates, CheckpointError):
                raise candidates
            return self._load_first(candidates, model, optimizer, scheduler, fallback=False,
                                    weights_only=self.ckpt.weights_only)
        return RunState()

    def _own_candidates(self):
        if not _is_rank0():
            return None
        candidates, warnings = find_candidates(self.dir)
        incomplete = [p.name for _, p in list_iter_dirs(self.dir)] if not candidates else []
        return candidates, warnings, incomplete

    def _explicit_or_error(self, path: Path):
        if not _is_rank0():
            return None
        try:
            return explicit_candidates(path)
        except CheckpointError as exc:
            return exc

    def _load_first(self, candidates, model, optimizer, scheduler, fallback: bool,
                    weights_only: bool = False) -> RunState:
        failures = []
        for candidate in candidates:
            try:
                verify_checkpoint(candidate.path)
            except CorruptCheckpointError as exc:
                if not fallback:
                    raise
                failures.append(str(exc))
                logger.error("%s; falling back to the previous complete checkpoint", exc)
                continue
            return self._load(candidate.path, model, optimizer, scheduler, weights_only)
        raise CheckpointError(
            f"no usable checkpoint in {self.dir}: " + "; ".join(failures)
            + " (move the directory away or set checkpoint.resume=never to start fresh)"
        )

    def _load(self, path: Path, model: list, optimizer, scheduler, weights_only: bool) -> RunState:
        tick = time.perf_counter()
        saved = saved_run(path)
        if not weights_only and read_manifest(path).get("weights_only"):
            raise CheckpointError(
                f"checkpoint {path} holds weights only (written by convert from-hf): add "
                f"checkpoint.weights_only=true to start a run from them")
        check_model_fits(str(path), saved.config.get("model", {}), saved.padded_vocab_size,
                         self.cfg.model, self.padded_vocab_size)
        here = Layout.current()
        if not weights_only:
            self._check_optimizer_format(path, saved, model)
        state_dict = model_sharded_state_dict([chunk.module for chunk in model], self.metadata)
        if not weights_only:
            state_dict["optimizer"] = optimizer_sharded_state_dict(
                optimizer, dict(state_dict), self.metadata, is_loading=True
            )
        same_layout = _same_layout(saved.layout, here)
        if not weights_only and same_layout:
            state_dict["rng_state"] = rng_sharded_object(None)
        loaded = load_sharded(state_dict, path)
        for key, chunk in zip(model_keys(len(model)), model, strict=True):
            chunk.module.load_state_dict(loaded[key], strict=True)
        if weights_only:
            optimizer.reload_model_params()
            logger.info("loaded model weights from %s (iteration %d, saved at %s); starting a new "
                        "run at iteration 0", path, saved.state.iteration, saved.layout.describe())
            return RunState()
        load_optimizer_state(optimizer, loaded["optimizer"])
        load_schedule_state(scheduler, loaded["opt_param_scheduler"])
        if same_layout:
            restore_rng(loaded["rng_state"])
        else:
            logger.warning("checkpoint saved at %s, running at %s: model and optimizer state are "
                           "resharded; RNG states are not restored (seeded from train.seed)",
                           saved.layout.describe(), here.describe())
        if _is_rank0():
            dropped = trim_rows(self.run_dir, saved.state.iteration)
            if dropped:
                logger.info("removed %d metrics rows logged after iteration %d (trained again)",
                            dropped, saved.state.iteration)
        if path.parent.resolve() == self.dir.resolve():
            self.last_saved = self.last_complete = saved.state.iteration
        logger.info("resumed from %s at iteration %d (%.1f s)", path, saved.state.iteration,
                    time.perf_counter() - tick)
        return saved.state

    def _check_optimizer_format(self, path: Path, saved: SavedRun, model: list) -> None:
        current = self._optimizer_format(model)
        if saved.sharding and saved.sharding != current:
            diffs = ", ".join(f"{k}: checkpoint {saved.sharding.get(k)!r}, run {v!r}"
                              for k, v in current.items() if saved.sharding.get(k) != v)
            raise CheckpointError(
                f"checkpoint {path} holds optimizer state in another format ({diffs}); keep "
                f"parallel.distributed_optimizer / train.precision as saved, or set "
                f"checkpoint.weights_only=true with checkpoint.load to start from its weights"
            )

    def _optimizer_format(self, model: list) -> dict:
        return {
            "distributed_optimizer": self.distributed_optimizer,
            "params_dtype": str(model[0].module.config.params_dtype).replace("torch.", ""),
        }

    # ---------------------------------------------------------------- save

    def due(self, iteration: int) -> bool:
        """Whether ``checkpoint.save_interval`` asks for a save at ``iteration``."""
        interval = self.ckpt.save_interval
        return bool(interval) and iteration % interval == 0

    def save(self, state: RunState, model: list, optimizer, scheduler,
             final: bool = False) -> bool:
        """Save a checkpoint of ``state`` (all ranks). Skipped if this iteration is on disk.

        Returns False when the save failed on some rank and ``checkpoint.on_save_error`` is
        ``continue`` (the partial directory is removed, the previous checkpoint stays the
        latest); raises :class:`SaveFailed` (on every rank) when it is ``stop``, or when this is
        the ``final`` save of the run (end of training, a stop signal: no later save to retry).
        """
        iteration = state.iteration
        if iteration == self.last_saved:
            return True
        saver = self._get_saver()
        saver.poll(blocking=True)  # one save in flight at most
        tick = time.perf_counter()
        path = self.dir / iter_dir_name(iteration)
        error = None
        if _is_rank0():
            try:
                if path.exists():  # left by a save that did not finish, or not tracked
                    remove_dir(path)
                path.mkdir(parents=True)
            except OSError as exc:
                error = exc
        if not any_rank(error is not None):
            state_dict = model_sharded_state_dict(
                [chunk.module for chunk in model], self.metadata)
            state_dict["optimizer"] = optimizer_sharded_state_dict(
                optimizer, dict(state_dict), self.metadata, is_loading=False
            )
            state_dict["rng_state"] = rng_sharded_object(capture_rng())
            state_dict["opt_param_scheduler"] = schedule_state_dict(scheduler)
            layout = Layout.current()
            state_dict["run"] = SavedRun(
                state=state, layout=layout, padded_vocab_size=self.padded_vocab_size,
                config=to_dict(self.cfg), version=__version__,
                sharding=self._optimizer_format(model),
            ).to_dict()
            on_complete = partial(self._complete, iteration, path, layout, tick)
            with injected_save_error(self.cfg.debug.save_error_at, iteration):
                try:  # the expected share of this rank: replicas are spread over DP ranks
                    share = local_bytes(state_dict) // parallel_state.get_data_parallel_world_size()
                    reserve_space(path, share + (1 << 20 if _is_rank0() else 0))
                except OSError as exc:
                    error = exc
            if not any_rank(error is not None):
                try:
                    saver.save(state_dict, path, content_metadata=dict(self.metadata),
                               on_complete=on_complete)
                except Exception as exc:  # noqa: BLE001 - any rank's write error, agreed below
                    error = exc
        errors = gather_errors(error)
        if not errors and not self.async_save:
            try:
                on_complete()  # raises on every rank alike
            except OSError as exc:
                errors = [(0, f"{type(exc).__name__}: {exc}")]
        if errors:
            return self._save_failed(iteration, path, errors, final)
        self.last_saved = iteration
        return True

    def _save_failed(self, iteration: int, path: Path, errors: list[tuple[int, str]],
                     final: bool) -> bool:
        """Every rank: remove the partial directory (rank 0), then stop or warn and go on."""
        if _is_rank0():
            remove_partial(path)
        torch.distributed.barrier()
        message = (f"saving checkpoint {path} failed {describe_errors(errors)}; its partial "
                   f"directory is removed and the latest checkpoint is still "
                   f"{self.describe_latest()}")
        if self.ckpt.on_save_error == "stop" or final:
            why = "checkpoint.on_save_error=stop" if not final else "the run's last save"
            raise SaveFailed(f"{message} ({why})", report=_is_rank0())
        if _is_rank0():
            logger.warning("%s; training on (checkpoint.on_save_error=continue), the next save "
                           "is tried at the next interval", message)
        return False

    def describe_latest(self) -> str:
        """The newest complete checkpoint of this run, for messages."""
        if self.last_complete is None:
            return "none (no checkpoint of this run yet: a restart starts from the beginning)"
        return f"{self.dir / iter_dir_name(self.last_complete)} (iteration {self.last_complete})"

    def _complete(self, iteration: int, path: Path, layout: Layout, tick: float) -> None:
        """After every rank finished writing: manifest (marks it complete), tracker, retention.

        A rank-0 file error here (disk full) is raised on every rank, like a write error."""
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        error = None
        if rank == 0:
            try:
                dump_config(self.cfg, path / CONFIG_FILE)
            except OSError as exc:
                error = exc
        names = _broadcast(data_files(path) if rank == 0 and error is None else None)
        if names is None:
            raise error if error is not None else OSError(f"could not list {path}")
        described = describe_files(path, names[rank::world])
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, described)
        if rank == 0:
            files = {name: info for part in gathered for name, info in part.items()}
            try:
                write_manifest(path, {
                    "iteration": iteration,
                    "version": __version__,
                    "layout": layout.__dict__,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "files": files,
                })
                write_tracker(self.dir, iteration)
            except OSError as exc:
                error = exc
        if any_rank(error is not None):
            raise error if error is not None else OSError("rank 0 could not complete the save")
        self.last_complete = iteration
        if rank == 0:
            apply_retention(self.dir, iteration, self.ckpt.keep_last, self.ckpt.keep_every)
            size = sum(info["bytes"] for info in files.values())
            logger.info("saved checkpoint %s (%.1f MB, %.1f s)", path, size / 1e6,
                        time.perf_counter() - tick)
        torch.distributed.barrier()

    def poll(self) -> None:
        """Complete a finished async save (collective; a no-op for synchronous saves)."""
        if self._saver is not None:
            self._saver.poll(blocking=False)

    def close(self) -> None:
        """Wait for a save in flight to complete."""
        if self._saver is not None:
            self._saver.poll(blocking=True)
            self._saver.close()
            self._saver = None

    def _get_saver(self) -> Saver:
        if self._saver is None:
            self._saver = Saver(self.async_save)
        return self._saver


def _same_layout(saved: Layout, here: Layout) -> bool:
    return (saved.tensor, saved.pipeline, saved.data) == (here.tensor, here.pipeline, here.data)

