"""The one build path: everything a command needs to run a model, from a config and a layout.

Every command that runs a model builds it here (docs/training_loop.md):

* :func:`run_inputs` -- the prepared data files, the tokenizer and the padded vocabulary (before
  any process group, so a data or vocabulary error surfaces first);
* :func:`build_model_parts` -- the model chunks of this rank and, when asked, the DDP wrapper, the
  optimizer and the LR schedule. ``train`` asks for all of them; ``eval``, ``profile``,
  ``convert`` and the shape probe build the bare chunks (``ddp=False``: no gradient buffers,
  ``optimizer=False``: no optimizer state);
* :func:`build_schedule` -- how one global batch runs through Megatron's schedules;
* :func:`build_loaders` -- the training iterators and the held-out batches of the run; built
  after the weights are loaded because a resumed run reads on from the checkpoint's positions.

Weights come from a checkpoint through :mod:`megatron_vwn.checkpoint.weights` (bare chunks) or
the run's :class:`~megatron_vwn.checkpoint.CheckpointManager` (a training run: all its state).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)

from megatron_vwn.config import Config, ConfigError
from megatron_vwn.data.datasets import PreparedData, build_datasets, prepare_data
from megatron_vwn.data.sampler import build_loader
from megatron_vwn.data.tokenizer import load_tokenizer
from megatron_vwn.model.builder import build_model, padded_vocab_size
from megatron_vwn.optim.optimizer import build_optimizer, use_distributed_optimizer
from megatron_vwn.optim.schedule import build_scheduler
from megatron_vwn.parallel.pipeline import tensor_shape_adjuster
from megatron_vwn.training.evaluation import HeldOut, valid_samples_needed
from megatron_vwn.training.faults import guard_optimizer
from megatron_vwn.training.step import ForwardStep, Schedule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
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


@dataclass
class RunInputs:
    """The data side of a run that the model's shape depends on."""

    prepared: PreparedData
    tokenizer: object
    vocab_size: int
    """The padded vocabulary the model is built with."""


def run_inputs(cfg: Config) -> RunInputs:
    """Prepare (or find in the cache) the data files, load the tokenizer, size the vocabulary."""
    prepared = prepare_data(cfg.data)
    tokenizer = load_tokenizer(prepared.tokenizer_model, cfg.data.eod_token)
    return RunInputs(prepared, tokenizer, resolve_vocab_size(cfg, tokenizer.vocab_size))


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


@dataclass
class ModelParts:
    """The model of this rank, as built for one command."""

    modules: list
    """The bare ``GPTModel`` chunks, one per (virtual) pipeline stage of this rank."""
    model: list
    """What the schedules run and checkpoints store: the DDP-wrapped chunks when built with
    ``ddp=True``, else :attr:`modules` themselves."""
    optimizer: object | None = None
    scheduler: object | None = None

    @property
    def feeds_data(self) -> list[bool]:
        """Which chunks read micro-batches (the first and last stages)."""
        return [chunk.pre_process or chunk.post_process for chunk in self.modules]


def build_model_parts(cfg: Config, vocab_size: int, *, ddp: bool = True,
                      optimizer: bool = True) -> ModelParts:
    """This rank's model chunks (process groups must exist), initialised from ``train.seed``.

    ``ddp``: wrap them in Megatron-Core's DDP (gradient buffers, gradient sync), as training
    needs; ``optimizer``: also build the guarded AdamW and its LR schedule (needs ``ddp``).
    """
    if optimizer and not ddp:
        raise ValueError("the optimizer updates DDP-wrapped chunks: build with ddp=True")
    modules = build_model(cfg, vocab_size)
    parts = ModelParts(modules=modules, model=wrap_ddp(cfg, modules) if ddp else modules)
    if optimizer:
        config = modules[0].config
        parts.optimizer = build_optimizer(cfg, parts.model, bf16=config.bf16)
        guard_optimizer(parts.optimizer)  # a non-finite gradient norm never updates the weights
        parts.scheduler = build_scheduler(cfg.train, parts.optimizer)
        config.grad_scale_func = parts.optimizer.scale_loss
    return parts


def build_schedule(cfg: Config, layout: Layout, eod: int | None) -> Schedule:
    """How one global batch of ``cfg`` runs through Megatron's schedules on ``layout``."""
    return Schedule(
        num_microbatches=layout.num_microbatches,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_step=ForwardStep(cfg.model.mtp.num_layers, eod),
        adjust_tensor_shapes_fn=tensor_shape_adjuster(cfg),
    )


@dataclass
class Loaders:
    """What a run reads: one training iterator per chunk (None where a chunk reads none) and
    the held-out batches (None without a validation split)."""

    train: list
    held_out: HeldOut | None


def build_loaders(cfg: Config, inputs: RunInputs, layout: Layout, feeds_data: list[bool],
                  consumed_train: int, consumed_valid: int) -> Loaders:
    """The run's datasets, read from the given global sample positions (a resume's)."""
    train = cfg.train
    num_samples = (train.iters * train.global_batch_size, valid_samples_needed(train), 0)
    train_ds, valid_ds = build_datasets(
        cfg.data, inputs.prepared, inputs.tokenizer, cfg.model.seq_length, train.seed,
        num_samples, create_attention_mask=False,
    )
    dp_rank = parallel_state.get_data_parallel_rank()

    def loaders(dataset, consumed_samples: int, cyclic: bool) -> list:
        if dataset is None:
            return [None] * len(feeds_data)
        return [
            build_loader(
                dataset, train.micro_batch_size, dp_rank, layout.data_parallel,
                consumed_samples=consumed_samples,
                num_workers=cfg.data.num_workers, cyclic=cyclic,
            ) if feeds else None
            for feeds in feeds_data
        ]

    held_out = HeldOut(
        train, lambda consumed: loaders(valid_ds, consumed, cyclic=True), consumed_valid,
    ) if valid_ds is not None else None
    if train.eval_interval and valid_ds is None:
        logger.warning("data.split (%s) leaves no validation documents: validation is off",
                       cfg.data.split)
    return Loaders(train=loaders(train_ds, consumed_train, cyclic=False), held_out=held_out)
