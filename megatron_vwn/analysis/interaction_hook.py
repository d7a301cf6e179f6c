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
from typing import Any

from megatron.core import parallel_state

from megatron_vwn.analysis.interaction import aofe, projection, wtw
from megatron_vwn.analysis.interaction_probe import gathered_table, layout_agop, local_projection

logger = logging.getLogger(__name__)


class InteractionMetrics:
    """Owns the held-out micro-batches and the projection ``P`` of one run on this rank."""

    def __init__(self, trainer: Any, micro_batches: list[dict]):
        cfg = trainer.cfg
        self.trainer = trainer
        self.interval = cfg.analysis.interaction_interval
        self.micro_batches = micro_batches
        self.vocab = cfg.model.vocab_size or trainer.tokenizer.vocab_size
        full = projection(self.vocab, cfg.analysis.probes, cfg.analysis.seed)
        self.local_p = local_projection(full, trainer.vocab_size)  # [probes, V_padded / tp]

    def after_step(self, iteration: int, last: bool) -> None:
        if iteration % self.interval == 0 or last:
            self.measure(iteration)

    def measure(self, iteration: int) -> dict[str, float] | None:
        """One measurement (a collective: every rank calls it); the row on the reporting rank."""
        trainer = self.trainer
        tick = time.perf_counter()
        agop = layout_agop(trainer.model, trainer.feeds_data, self.micro_batches, self.local_p,
                           trainer.schedule)
        table = gathered_table(trainer.model, self.vocab)
        if agop.matrix is None or trainer.dist.rank != 0:
            return None
        gradient, parameter = aofe(agop.matrix), aofe(wtw(table))
        row = {
            "iteration": iteration,
            "consumed_tokens": iteration * trainer.tokens_per_iteration(),
            "aofe_ratio_agop": gradient.ratio,
            "aofe_ratio_wtw": parameter.ratio,
            "aofe_agop": gradient.aofe,
            "aofe_wtw": parameter.aofe,
            "analysis_sequences": agop.sequences,
            "analysis_probes": self.local_p.shape[0],
            "analysis_time_s": time.perf_counter() - tick,
        }
        trainer.metrics.log_analysis(row)
        return row


class _Off:
    def after_step(self, iteration: int, last: bool) -> None:
        return None


def interaction_metrics(trainer: Any) -> InteractionMetrics | _Off:
    """The hook for this run: a no-op unless ``analysis.interaction_interval`` > 0 and the data
    has a validation split."""
    cfg = trainer.cfg
    if not cfg.analysis.interaction_interval:
        return _Off()
    from megatron_vwn.data.datasets import build_datasets
    from megatron_vwn.data.sampler import build_loader

    wanted = cfg.analysis.batches * cfg.train.global_batch_size
    _, held_out = build_datasets(cfg.data, trainer.prepared, trainer.tokenizer,
                                 cfg.model.seq_length, cfg.train.seed, (1, wanted, 0),
                                 create_attention_mask=False)
    if held_out is None:
        logger.warning("data.split (%s) leaves no validation documents: the interaction "
                       "metrics (analysis.interaction_interval) are off", cfg.data.split)
        return _Off()
    loader = build_loader(held_out, cfg.train.micro_batch_size,
                          parallel_state.get_data_parallel_rank(), trainer.layout.data_parallel,
                          cyclic=True)
    count = cfg.analysis.batches * trainer.layout.num_microbatches
    micro_batches = list(itertools.islice(loader, count))
    logger.info("interaction metrics every %d iterations on %d held-out sequences, %d probes",
                cfg.analysis.interaction_interval, wanted, cfg.analysis.probes)
    return InteractionMetrics(trainer, micro_batches)
