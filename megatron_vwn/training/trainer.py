"""The training run: one visible build sequence, then the loop.

    validate config -> prepare data files -> process groups -> run directory
    -> model -> DDP -> optimizer + schedule -> resume from a checkpoint -> datasets + loaders
    -> hooks -> loop (step, then every hook: log, NaN policy, validate, interaction metrics,
       save; SIGTERM/SIGUSR1 save and stop)

The parts are built by :mod:`megatron_vwn.training.build` (the build path every command shares);
what runs after a step lives in hooks (:mod:`megatron_vwn.training.hooks`, docs/training_loop.md).
Each component receives only its own sub-config where it can.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_vwn.checkpoint import CheckpointManager
from megatron_vwn.config import Config, dump_config, to_dict, validate
from megatron_vwn.log import setup_logging, silence_expected_warnings
from megatron_vwn.model.accounting import flops_per_token, format_summary
from megatron_vwn.parallel.distributed import initialize_distributed
from megatron_vwn.parallel.env import DistEnv, resolve_dist_env
from megatron_vwn.parallel.watchdog import default_timeout_s
from megatron_vwn.training.build import (
    Layout,
    build_loaders,
    build_model_parts,
    build_schedule,
    run_inputs,
)
from megatron_vwn.training.faults import NanPolicy, RunGuard, lost_rank_reporter, report_fault
from megatron_vwn.training.hooks import (
    Checkpointing,
    Hook,
    LoopState,
    NanGuard,
    TrainLog,
    Validation,
    run_loop,
)
from megatron_vwn.training.interaction_hook import interaction_metrics
from megatron_vwn.training.lifetime import STOP_GRACE_S, StopDeadline, tie_forked_children
from megatron_vwn.training.metrics import MetricsWriter
from megatron_vwn.training.moe_metrics import MoEMonitor
from megatron_vwn.training.run_lease import RunLease, check_run_dir_free
from megatron_vwn.training.signals import StopSignals
from megatron_vwn.training.step import StepResult, train_step

logger = logging.getLogger(__name__)


class Trainer:
    """Owns the model, optimizer, data, metrics and hooks of one run on this rank."""

    def __init__(self, cfg: Config, dist: DistEnv):
        self.cfg = cfg
        self.dist = dist
        self.layout = Layout.of(cfg, dist.world_size)
        self.run_dir = Path(cfg.run.dir)
        self.inputs = run_inputs(cfg)
        self.tokenizer = self.inputs.tokenizer
        self.vocab_size = self.inputs.vocab_size
        self.checkpoints = CheckpointManager(cfg, self.run_dir, self.vocab_size)
        self.signals = StopSignals()
        self.signals.install()  # from the start: a preemption during set-up also saves and exits
        self.stop_deadline = StopDeadline(  # a rank stuck after a stop signal still ends
            default_timeout_s(cfg.parallel.timeout_s) + STOP_GRACE_S, report_fault,
            lambda: f"; the latest checkpoint is {self.checkpoints.describe_latest()}")
        self.stop_deadline.install()
        tie_forked_children()  # checkpoint writers end with this rank (training/lifetime.py)

        initialize_distributed(cfg, dist, on_lost=lost_rank_reporter(
            self.checkpoints.describe_latest))
        self._prepare_run_dir()

        parts = build_model_parts(cfg, self.vocab_size, ddp=True, optimizer=True)
        self.feeds_data = parts.feeds_data
        self.model, self.optimizer, self.scheduler = parts.model, parts.optimizer, parts.scheduler
        self.nan_policy = NanPolicy.of(cfg.train, cfg.debug)
        self.schedule = build_schedule(cfg, self.layout, self.tokenizer.eod)
        self.moe_monitor = MoEMonitor(self.model, cfg.model, self.layout.num_microbatches)
        self.flops_per_token = flops_per_token(cfg.model, self.vocab_size)
        logger.info("model: %s", format_summary(cfg.model, self.vocab_size))
        logger.info(
            "layout: world %d = tensor %d x pipeline %d (x virtual %d) x data %d | "
            "%d micro-batches of %d per step",
            dist.world_size, cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.vpp,
            self.layout.data_parallel, self.layout.num_microbatches, cfg.train.micro_batch_size,
        )
        if cfg.model.moe.enabled:
            par = cfg.parallel
            logger.info("experts: world %d = expert-tensor %d x expert %d x pipeline %d x "
                        "expert-data %d | %d experts per rank", dist.world_size, par.etp,
                        par.expert, par.pipeline,
                        dist.world_size // (par.etp * par.expert * par.pipeline),
                        cfg.model.moe.num_experts // par.expert)
        resumed = self.checkpoints.resume(self.model, self.optimizer, self.scheduler)
        self.state = LoopState(
            iteration=resumed.iteration, start_iteration=resumed.iteration,
            total_iters=cfg.train.iters, global_batch_size=cfg.train.global_batch_size,
            seq_length=cfg.model.seq_length, consumed_valid_samples=resumed.consumed_valid_samples,
        )
        loaders = build_loaders(cfg, self.inputs, self.layout, self.feeds_data,
                                consumed_train=resumed.iteration * cfg.train.global_batch_size,
                                consumed_valid=resumed.consumed_valid_samples)
        self.train_iterators, self.held_out = loaders.train, loaders.held_out
        self.metrics = MetricsWriter(
            self.run_dir,
            total_iters=cfg.train.iters,
            enabled=dist.rank == 0,
            wandb_mode=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            run_name=cfg.run.name,
            config=to_dict(cfg),
            tensorboard=cfg.logging.tensorboard == "on",
        )
        self.hooks = self._build_hooks()

    def _build_hooks(self) -> list[Hook]:
        """The loop's hooks from the config, in the order a step's side effects happen."""
        cfg = self.cfg
        hooks: list[Hook] = [
            TrainLog(self.metrics, cfg.logging.interval, self.flops_per_token,
                     self.dist.world_size, self.moe_monitor),
            NanGuard(self.nan_policy, self.checkpoints),
        ]
        if self.held_out is not None and cfg.train.eval_interval:
            hooks.append(Validation(self.held_out, self.model, self.schedule, cfg.train,
                                    self.metrics))
        interaction = interaction_metrics(cfg, self.inputs, self.layout, self.model,
                                          self.feeds_data, self.schedule, self.metrics,
                                          reporting=self.dist.rank == 0)
        if interaction is not None:
            hooks.append(interaction)
        hooks.append(Checkpointing(self.checkpoints, self.signals, self.model, self.optimizer,
                                   self.scheduler))
        return hooks

    def _prepare_run_dir(self) -> None:
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
        setup_logging(self.dist.rank, self.run_dir / "logs" / "train.log")
        silence_expected_warnings()
        torch.distributed.barrier()

    def step(self) -> StepResult:
        """One optimizer step over one global batch."""
        return train_step(
            self.model, self.optimizer, self.scheduler, self.train_iterators, self.schedule,
            inject_nan=self.nan_policy.inject(self.state.iteration + 1),
        )

    def train(self) -> None:
        """Steps until ``train.iters`` or until a hook stops the run (a signal)."""
        logger.info("training for %d iterations", self.state.total_iters - self.state.iteration)
        run_loop(self.state, self.step, self.hooks)

    def close(self) -> None:
        self.checkpoints.close()
        self.signals.restore()
        self.stop_deadline.uninstall()
        self.metrics.close()


def run_training(cfg: Config, dist: DistEnv | None = None) -> None:
    """Entry point of one rank: validate, take the run directory, train, tear down."""
    dist = dist or resolve_dist_env()
    validate(cfg, dist.world_size)
    check_run_dir_free(cfg.run.dir)  # every rank, before any process group: one writer per run
    lease = RunLease.acquire(cfg.run.dir) if dist.rank == 0 else None
    try:
        with RunGuard().guard() as run:  # a lost rank is named; process groups torn down
            trainer = Trainer(cfg, dist)
            run.latest = trainer.checkpoints.describe_latest
            try:
                trainer.train()
            finally:
                trainer.close()
    finally:
        if lease is not None:
            lease.release()
