"""The training-loop side of the neural-interaction metrics (``analysis.*``, docs/shape.md).

Every ``analysis.interaction_interval`` iterations and after the last one, every rank joins one
measurement on fixed held-out sequences (the first ``analysis.batches`` global batches of the
validation split, the same each time), and the reporting rank appends a ``split: "analysis"``
row to ``metrics.jsonl``:

    aofe_ratio_agop, aofe_agop   the AGOP E[J_P J_P^T] (probes x probes)
    aofe_ratio_wtw, aofe_wtw     W^T W / V of the gathered input token table
    analysis_sequences, analysis_probes, analysis_time_s
"""

from __future__ import annotations

import itertools
import logging
import time

from megatron.core import parallel_state

from megatron_vwn.config.schema import Config
from megatron_vwn.data.datasets import build_datasets
from megatron_vwn.data.sampler import build_loader
from megatron_vwn.training.build import Layout, RunInputs
from megatron_vwn.training.hooks import LoopState
from megatron_vwn.training.interaction import aofe, projection, wtw
from megatron_vwn.training.interaction_probe import gathered_table, layout_agop, local_projection
from megatron_vwn.training.metrics import MetricsWriter
from megatron_vwn.training.step import Schedule, StepResult

logger = logging.getLogger(__name__)


class InteractionMetrics:
    """A training-loop hook (:mod:`megatron_vwn.training.hooks`) that owns the held-out
    micro-batches and the projection ``P`` of one run on this rank."""

    def __init__(self, cfg: Config, vocab_size: int, padded_vocab_size: int, model: list,
                 feeds_data: list[bool], schedule: Schedule, micro_batches: list[dict],
                 metrics: MetricsWriter, reporting: bool):
        self.interval = cfg.analysis.interaction_interval
        self.model = model
        self.feeds_data = feeds_data
        self.schedule = schedule
        self.micro_batches = micro_batches
        self.metrics = metrics
        self.reporting = reporting
        self.vocab = vocab_size
        full = projection(self.vocab, cfg.analysis.probes, cfg.analysis.seed)
        self.local_p = local_projection(full, padded_vocab_size)  # [probes, V_padded / tp]

    def on_step_end(self, state: LoopState, result: StepResult) -> None:
        if state.iteration % self.interval == 0 or state.last:
            self.measure(state)

    def measure(self, state: LoopState) -> dict[str, float] | None:
        """One measurement (a collective: every rank calls it); the row on the reporting rank."""
        tick = time.perf_counter()
        agop = layout_agop(self.model, self.feeds_data, self.micro_batches, self.local_p,
                           self.schedule)
        table = gathered_table(self.model, self.vocab)
        if agop.matrix is None or not self.reporting:
            return None
        gradient, parameter = aofe(agop.matrix), aofe(wtw(table))
        row = {
            "iteration": state.iteration,
            "consumed_tokens": state.consumed_tokens,
            "aofe_ratio_agop": gradient.ratio,
            "aofe_ratio_wtw": parameter.ratio,
            "aofe_agop": gradient.aofe,
            "aofe_wtw": parameter.aofe,
            "analysis_sequences": agop.sequences,
            "analysis_probes": self.local_p.shape[0],
            "analysis_time_s": time.perf_counter() - tick,
        }
        self.metrics.log_analysis(row)
        return row


def interaction_metrics(cfg: Config, inputs: RunInputs, layout: Layout, model: list,
                        feeds_data: list[bool], schedule: Schedule, metrics: MetricsWriter,
                        reporting: bool) -> InteractionMetrics | None:
    """The hook for this run, or None when ``analysis.interaction_interval`` is 0 or the data has
    no validation split."""
    if not cfg.analysis.interaction_interval:
        return None
    wanted = cfg.analysis.batches * cfg.train.global_batch_size
    _, held_out = build_datasets(cfg.data, inputs.prepared, inputs.tokenizer,
                                 cfg.model.seq_length, cfg.train.seed, (1, wanted, 0),
                                 create_attention_mask=False)
    if held_out is None:
        logger.warning("data.split (%s) leaves no validation documents: the interaction "
                       "metrics (analysis.interaction_interval) are off", cfg.data.split)
        return None
    loader = build_loader(held_out, cfg.train.micro_batch_size,
                          parallel_state.get_data_parallel_rank(), layout.data_parallel,
                          cyclic=True)
    count = cfg.analysis.batches * layout.num_microbatches
    micro_batches = list(itertools.islice(loader, count))
    logger.info("interaction metrics every %d iterations on %d held-out sequences, %d probes",
                cfg.analysis.interaction_interval, wanted, cfg.analysis.probes)
    return InteractionMetrics(cfg, cfg.model.vocab_size or inputs.tokenizer.vocab_size,
                              inputs.vocab_size, model, feeds_data, schedule, micro_batches,
                              metrics, reporting)
