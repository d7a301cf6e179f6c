"""Held-out evaluation: which validation batches a run scores, and the token-weighted mean.

``train.eval_mode=fixed`` (the default) scores the *same* tokens at every evaluation: the first
``train.eval_iters`` global batches of the validation split, read from sample 0 each time. The
validation dataset is then built for exactly those samples, so its content depends only on the
data, the split, ``train.seed``, ``model.seq_length`` and the batch shape -- not on
``train.iters`` or ``train.eval_interval`` -- and curves compare across iterations, runs, widths
and resumes.

``train.eval_mode=rolling`` is the older Megatron behaviour: each evaluation reads the next
``train.eval_iters`` global batches of a cyclic validation stream (positioned by the checkpoint's
``consumed_valid_samples``), so every evaluation sees new tokens.

Both modes count ``consumed_valid_samples`` alike (samples scored so far); it is saved in the
checkpoint run state and positions the rolling stream on resume.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_vwn.config.schema import TrainConfig
from megatron_vwn.training.step import Schedule, eval_step


def valid_samples_needed(train: TrainConfig) -> int:
    """Samples the validation dataset must hold for this run's evaluations."""
    if not train.eval_interval:
        return 0
    per_eval = train.eval_iters * train.global_batch_size
    if train.eval_mode == "fixed":
        return per_eval
    evals = train.iters // train.eval_interval + 1
    return evals * per_eval


def evaluate(model_chunks: list, data_iterators: list, schedule: Schedule,
             num_batches: int) -> tuple[dict[str, float], int]:
    """Token-weighted mean losses (``lm_loss``, ``mtp_loss_k``) over ``num_batches`` global
    batches, and the LM token count; identical on every rank."""
    sums: dict[str, float] = {}
    tokens = 0
    for _ in range(num_batches):
        result = eval_step(model_chunks, data_iterators, schedule)
        for key, value in result.losses.items():
            sums[key] = sums.get(key, 0.0) + value * result.tokens
        tokens += result.tokens
    return {key: total / max(tokens, 1) for key, total in sums.items()}, tokens


class HeldOut:
    """The validation batches of one run, in ``train.eval_mode``.

    ``make_iterators(consumed_samples)`` builds this rank's cyclic validation loaders (one per
    model chunk) starting at a global sample index.
    """

    def __init__(self, train: TrainConfig, make_iterators: Callable[[int], list],
                 consumed_samples: int):
        self.train = train
        self.make_iterators = make_iterators
        self._rolling = make_iterators(consumed_samples) if train.eval_mode == "rolling" else None

    def score(self, model_chunks: list, schedule: Schedule) -> tuple[dict[str, float], int]:
        """One evaluation: mean losses over ``train.eval_iters`` global batches, and the
        number of tokens they score."""
        iterators = self._rolling if self._rolling is not None else self.make_iterators(0)
        return evaluate(model_chunks, iterators, schedule, self.train.eval_iters)
