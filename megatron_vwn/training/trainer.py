"""The training run: one visible build sequence, then the loop.

    validate config -> prepare data files -> process groups -> run directory
    -> model -> DDP -> optimizer + schedule -> resume from a checkpoint -> datasets + loaders
    -> loop (train, validate, log, save; SIGTERM/SIGUSR1 save and stop)

Each component receives only its own sub-config where it can.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)

from megatron_vwn.analysis.interaction_hook import interaction_metrics
from megatron_vwn.checkpoint import CheckpointManager, RunState
from megatron_vwn.config import Config, ConfigError, dump_config, to_dict, validate
from megatron_vwn.data.datasets import build_datasets, prepare_data
from megatron_vwn.data.sampler import build_loader
from megatron_vwn.data.tokenizer import load_tokenizer
from megatron_vwn.launch.env import DistEnv, resolve_dist_env
from megatron_vwn.log import setup_logging, silence_expected_warnings
from megatron_vwn.model.accounting import flops_per_token, format_summary
from megatron_vwn.model.builder import build_model, padded_vocab_size
from megatron_vwn.parallel.distributed import initialize_distributed
from megatron_vwn.parallel.pipeline import tensor_shape_adjuster
from megatron_vwn.parallel.watchdog import default_timeout_s
from megatron_vwn.training.evaluation import HeldOut, valid_samples_needed
from megatron_vwn.training.faults import (
    NanPolicy,
    RunGuard,
    guard_optimizer,
    lost_rank_reporter,
    report_fault,
)
from megatron_vwn.training.lifetime import STOP_GRACE_S, StopDeadline, tie_forked_children
from megatron_vwn.training.metrics import MetricsWriter
from megatron_vwn.training.moe_metrics import MoEMonitor
from megatron_vwn.training.optim import build_optimizer, use_distributed_optimizer
from megatron_vwn.training.run_lease import RunLease, check_run_dir_free
from megatron_vwn.training.schedule import build_scheduler
from megatron_vwn.training.signals import StopSignals
from megatron_vwn.training.step import ForwardStep, Schedule, StepResult, train_step

logger = logging.getLogger(__name__)


@dataclass
class Layout:
    """How the global batch maps onto this run's processes."""

    data_parallel: int
    num_microbatches: int

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> Layout:
        dp = world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)
        micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        return cls(data_parallel=dp, num_microbatches=micro)


def resolve_vocab_size(cfg: Config, tokenizer_vocab: int) -> int:
    """``model.vocab_size`` (or the tokenizer's), padded for tensor parallelism."""
    vocab = cfg.model.vocab_size or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); leave it unset or make it >= {tokenizer_vocab}"
        )
    return padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)


def wrap_ddp(cfg: Config, chunks: list) -> list:
    """Megatron-Core DDP around every chunk; gradient sync finishes in ``finalize_model_grads``."""
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer(cfg),
    )
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0
        )
        for index, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in wrapped]
    config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
    return wrapped


class Trainer:
    """Owns the model, optimizer, data and metrics of one run on this rank."""

    def __init__(self, cfg: Config, dist: DistEnv):
        self.cfg = cfg
        self.dist = dist
        self.layout = Layout.of(cfg, dist.world_size)
        self.run_dir = Path(cfg.run.dir)
        self.prepared = prepare_data(cfg.data)
        self.tokenizer = load_tokenizer(self.prepared.tokenizer_model, cfg.data.eod_token)
        self.vocab_size = resolve_vocab_size(cfg, self.tokenizer.vocab_size)
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

        unwrapped = build_model(cfg, self.vocab_size)
        self.feeds_data = [c.pre_process or c.post_process for c in unwrapped]
        self.model = wrap_ddp(cfg, unwrapped)
        config = unwrapped[0].config
        self.optimizer = build_optimizer(cfg, self.model, bf16=config.bf16)
        guard_optimizer(self.optimizer)  # a non-finite gradient norm never updates the weights
        self.nan_policy = NanPolicy.of(cfg.train, cfg.debug)
        self.scheduler = build_scheduler(cfg.train, self.optimizer)
        config.grad_scale_func = self.optimizer.scale_loss

        self.schedule = Schedule(
            num_microbatches=self.layout.num_microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_step=ForwardStep(cfg.model.mtp.num_layers, self.tokenizer.eod),
            adjust_tensor_shapes_fn=tensor_shape_adjuster(cfg),
        )
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
        self.iteration = resumed.iteration
        self.consumed_valid_samples = resumed.consumed_valid_samples
        self._build_data()
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

    def _prepare_run_dir(self) -> None:
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
        setup_logging(self.dist.rank, self.run_dir / "logs" / "train.log")
        silence_expected_warnings()
        torch.distributed.barrier()

    def _build_data(self) -> None:
        cfg, train = self.cfg, self.cfg.train
        num_samples = (train.iters * train.global_batch_size, valid_samples_needed(train), 0)
        train_ds, valid_ds = build_datasets(
            cfg.data, self.prepared, self.tokenizer, cfg.model.seq_length, train.seed,
            num_samples, create_attention_mask=False,
        )
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = self.layout.data_parallel

        def loaders(dataset, consumed_samples: int, cyclic: bool) -> list:
            if dataset is None:
                return [None] * len(self.model)
            return [
                build_loader(
                    dataset, train.micro_batch_size, dp_rank, dp_size,
                    consumed_samples=consumed_samples,
                    num_workers=cfg.data.num_workers, cyclic=cyclic,
                ) if feeds else None
                for feeds in self.feeds_data
            ]

        consumed_train = self.iteration * train.global_batch_size
        self.train_iterators = loaders(train_ds, consumed_train, cyclic=False)
        self.held_out = HeldOut(
            train, lambda consumed: loaders(valid_ds, consumed, cyclic=True),
            self.consumed_valid_samples,
        ) if valid_ds is not None else None
        self.has_valid = valid_ds is not None and bool(train.eval_interval)
        if train.eval_interval and valid_ds is None:
            logger.warning("data.split (%s) leaves no validation documents: validation is off",
                           cfg.data.split)

    def step(self) -> StepResult:
        """One optimizer step over one global batch."""
        return train_step(
            self.model, self.optimizer, self.scheduler, self.train_iterators, self.schedule,
            inject_nan=self.nan_policy.inject(self.iteration + 1),
        )

    def tokens_per_iteration(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length

    def run_state(self) -> RunState:
        """What a checkpoint needs to continue this run exactly (besides model and optimizer)."""
        return RunState(
            iteration=self.iteration,
            consumed_train_samples=self.iteration * self.cfg.train.global_batch_size,
            consumed_valid_samples=self.consumed_valid_samples,
        )

    def _checkpoint_and_check_stop(self, last: bool) -> bool:
        """Save when due, at the end, or on SIGTERM/SIGUSR1; True when the run must stop now."""
        stop = self.signals.stop_requested()
        if stop or last or self.checkpoints.due(self.iteration):
            self.checkpoints.save(self.run_state(), self.model, self.optimizer, self.scheduler,
                                  final=stop or last)
        else:
            self.checkpoints.poll()
        if stop:
            received = self.signals.received
            logger.info("stopping at iteration %d on %s (checkpoint saved)", self.iteration,
                        received.name if received else "another rank's signal")
        return stop

    def train(self) -> None:
        cfg = self.cfg
        start = self.iteration
        window: list[tuple[dict[str, float], float]] = []
        interaction = interaction_metrics(self)
        logger.info("training for %d iterations", cfg.train.iters - start)
        while self.iteration < cfg.train.iters:
            lr = self.optimizer.param_groups[0]["lr"]
            tick = time.perf_counter()
            result = self.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - tick
            self.iteration += 1
            window.append((result.losses, elapsed))
            last = self.iteration == cfg.train.iters
            if self.iteration % cfg.logging.interval == 0 or last:
                mean_time = sum(t for _, t in window) / len(window)
                tokens_per_s = self.tokens_per_iteration() / mean_time
                self.metrics.log_train({
                    "iteration": self.iteration,
                    "consumed_tokens": self.iteration * self.tokens_per_iteration(),
                    **{key: sum(losses[key] for losses, _ in window) / len(window)
                       for key in result.losses},
                    "lr": lr,
                    "grad_norm": result.grad_norm,
                    "iter_time_s": mean_time,
                    "tokens_per_s": tokens_per_s,
                    "tflops_per_s_per_rank":
                        tokens_per_s * self.flops_per_token / self.dist.world_size / 1e12,
                    "skipped": result.skipped,
                    **self.moe_monitor.collect(steps=len(window)),
                }, start_iteration=start)
                window.clear()
            self.nan_policy.check(self.iteration, result.lm_loss, result.skipped,
                                  self.checkpoints.describe_latest())
            if self.has_valid and (self.iteration % cfg.train.eval_interval == 0 or last):
                self.validate()
            interaction.after_step(self.iteration, last)
            if self._checkpoint_and_check_stop(last):
                break

    def validate(self) -> float:
        """Token-weighted mean losses over the held-out batches (``train.eval_mode``)."""
        losses, _ = self.held_out.score(self.model, self.schedule)
        self.consumed_valid_samples += self.cfg.train.eval_iters * self.cfg.train.global_batch_size
        self.metrics.log_valid({
            "iteration": self.iteration,
            "consumed_tokens": self.iteration * self.tokens_per_iteration(),
            **losses,
        })
        return losses["lm_loss"]

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
