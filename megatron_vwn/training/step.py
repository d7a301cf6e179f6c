"""One training or evaluation step through Megatron-Core's pipeline schedules.

The loss is a *sum* over unmasked tokens per micro-batch; with ``calculate_per_token_loss`` the
schedules and ``finalize_model_grads`` divide the gradients by the token count summed over all
micro-batches and data-parallel ranks, so the step optimises the true token mean of the global
batch whatever the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper, roll_tensor
from megatron.core.utils import get_attr_wrapped_model

from megatron_vwn.model.mtp import MTPLossRecorder

LOSS_KEY = "lm_loss"


def loss_keys(mtp_depths: int) -> list[str]:
    """Names of the reported losses: ``lm_loss`` and one ``mtp_loss_k`` per MTP depth."""
    return [LOSS_KEY] + [f"mtp_loss_{k}" for k in range(1, mtp_depths + 1)]


def mtp_loss_mask(loss_mask: torch.Tensor, labels: torch.Tensor, depths: int,
                  eod: int | None) -> torch.Tensor:
    """The mask ``GPTModel`` rolls once per MTP depth: no prediction across an end-of-document.

    Depth ``k`` at position ``i`` predicts ``labels[i + k]``, which lies in another document when
    one of ``labels[i .. i+k-1]`` is EOD. Megatron applies the same mask, rolled, to every depth,
    so position ``j`` is kept only if ``labels[j-K .. j-1]`` hold no EOD: exact for the deepest
    depth, and for shallower depths it also drops up to ``K - k`` positions after a document
    start (never a crossing). Padding and masked tokens stay masked (``loss_mask``).
    """
    if eod is None:
        return loss_mask
    is_eod = labels == eod
    blocked = torch.zeros_like(is_eod)
    for shift in range(1, depths + 1):
        blocked[:, shift:] |= is_eod[:, :-shift]
    return loss_mask * (~blocked).to(loss_mask.dtype)


def loss_func(loss_mask: torch.Tensor, mtp_mask: torch.Tensor | None,
              mtp_losses: list[torch.Tensor], output_tensor: torch.Tensor,
              inject_nan: bool = False):
    """Per-token cross entropy ``[b, s]`` -> (sum, token count, report for logging).

    The report holds ``[loss sum, token count]`` for the main loss and for every MTP depth (whose
    gradient ``GPTModel`` has already injected through ``MTPLossAutoScaler``). ``inject_nan``
    (``debug.nan_at``) multiplies the per-token loss by NaN, so the loss and every gradient of
    the step are NaN, as after a real divergence.
    """
    if inject_nan:
        output_tensor = output_tensor * float("nan")
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(output_tensor.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = {LOSS_KEY: torch.stack([loss_sum.detach(), mask.sum()])}
    depth_mask = mtp_mask
    for depth, losses in enumerate(mtp_losses, start=1):
        depth_mask, _ = roll_tensor(depth_mask, shifts=-1, dims=-1)  # as GPTModel rolls it
        masked = losses.float() * depth_mask.float()
        report[f"mtp_loss_{depth}"] = torch.stack([masked.sum(), depth_mask.float().sum()])
    return loss_sum, num_tokens, report


class ForwardStep:
    """Megatron's ``forward_step_func``: read a micro-batch (first/last stages), run the chunk.

    With MTP the chunk holding the heads also gets the MTP loss mask, and the per-depth losses
    ``GPTModel`` computed are collected for the report.
    """

    def __init__(self, mtp_depths: int = 0, eod: int | None = None):
        self.mtp_depths = mtp_depths
        self.eod = eod
        self.inject_nan = False
        """Set for one training step by :func:`train_step` (``debug.nan_at``)."""

    def __call__(self, data_iterator: Iterator | None, model: torch.nn.Module):
        batch = next(data_iterator) if data_iterator is not None else None
        if batch is None:  # a middle pipeline stage: input arrives by p2p
            return model(None, None, None), None
        keys = ("tokens", "labels", "loss_mask", "position_ids")
        tokens, labels, loss_mask, position_ids = (batch[k] for k in keys)
        if torch.cuda.is_available():
            tokens, labels, loss_mask, position_ids = (
                t.cuda(non_blocking=True) for t in (tokens, labels, loss_mask, position_ids)
            )
        if not self.mtp_depths:
            output = model(tokens, position_ids, None, labels=labels)
            return output, partial(loss_func, loss_mask, None, [], inject_nan=self.inject_nan)
        mtp_mask = mtp_loss_mask(loss_mask, labels, self.mtp_depths, self.eod)
        output = model(tokens, position_ids, None, labels=labels, loss_mask=mtp_mask)
        recorder = get_attr_wrapped_model(model, "compute_language_model_loss")
        mtp_losses = recorder.take() if isinstance(recorder, MTPLossRecorder) else []
        return output, partial(loss_func, loss_mask, mtp_mask, mtp_losses,
                               inject_nan=self.inject_nan)


@dataclass
class StepResult:
    losses: dict[str, float]
    """Token means over the global batch: ``lm_loss`` and ``mtp_loss_k``."""
    tokens: int
    grad_norm: float | None = None
    skipped: bool = False
    """The update was dropped: a non-finite loss or gradient norm (training/faults.py)."""
    lr: float | None = None
    """The learning rate the step ran with (training steps only)."""

    @property
    def lm_loss(self) -> float:
        return self.losses[LOSS_KEY]


@dataclass(frozen=True)
class Schedule:
    """How one global batch runs through Megatron's schedules on this layout."""

    num_microbatches: int
    seq_length: int
    micro_batch_size: int
    forward_step: ForwardStep
    adjust_tensor_shapes_fn: Callable | None = None


def run_schedule(model_chunks: list, data_iterators: list, schedule: Schedule,
                 forward_only: bool) -> tuple[dict[str, float], int]:
    """Forward (and backward) over the micro-batches of one global batch; returns the token-mean
    losses of the global batch and its LM token count, identical on every rank."""
    forward_backward = get_forward_backward_func()
    outputs = forward_backward(
        forward_step_func=schedule.forward_step,
        data_iterator=data_iterators if len(data_iterators) > 1 else data_iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=schedule.num_microbatches,
        seq_length=schedule.seq_length,
        micro_batch_size=schedule.micro_batch_size,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=schedule.adjust_tensor_shapes_fn,
    )
    return _reduce_losses(outputs, loss_keys(schedule.forward_step.mtp_depths))


def _reduce_losses(outputs: list[dict], keys: list[str]) -> tuple[dict[str, float], int]:
    """Sum the (loss, tokens) pairs over micro-batches, then over data-parallel ranks; share the
    result from the last pipeline stage with every stage."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    totals = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for out in outputs:
            totals += torch.stack([out[key].to(torch.float64) for key in keys])
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(
            totals, src=last, group=parallel_state.get_pipeline_model_parallel_group()
        )
    means = {key: loss / max(count, 1.0) for key, (loss, count) in zip(keys, totals.tolist(),
                                                                       strict=True)}
    return means, int(totals[0, 1].item())


def train_step(model_chunks: list, optimizer, scheduler, data_iterators: list,
               schedule: Schedule, inject_nan: bool = False) -> StepResult:
    """Zero grads, forward/backward all micro-batches, reduce grads, clip, step, advance LR.

    A non-finite loss (the same on every rank) skips the optimizer; a non-finite gradient norm
    makes the guarded optimizer drop the update (``faults.guard_optimizer``): either way the
    weights, optimizer state and LR stay as they were and the result says ``skipped``.
    ``inject_nan`` makes this step's loss NaN (``debug.nan_at``).
    """
    # GPTModel also accumulates MTP losses in Megatron's global logging tracker; we report our
    # own token-weighted per-depth losses, so keep that tracker from growing (or going stale).
    MTPLossLoggingHelper.tracker.clear()
    lr = optimizer.param_groups[0]["lr"]
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    schedule.forward_step.inject_nan = inject_nan
    try:
        losses, tokens = run_schedule(model_chunks, data_iterators, schedule,
                                      forward_only=False)
    finally:
        schedule.forward_step.inject_nan = False
    if not all(math.isfinite(value) for value in losses.values()):
        return StepResult(losses=losses, tokens=tokens, grad_norm=None, skipped=True, lr=lr)
    success, grad_norm, _ = optimizer.step()
    if success:
        scheduler.step(increment=1)
    return StepResult(losses=losses, tokens=tokens, grad_norm=grad_norm, skipped=not success,
                      lr=lr)


@torch.no_grad()
def eval_step(model_chunks: list, data_iterators: list, schedule: Schedule) -> StepResult:
    for chunk in model_chunks:
        chunk.eval()
    try:
        losses, tokens = run_schedule(model_chunks, data_iterators, schedule, forward_only=True)
    finally:
        for chunk in model_chunks:
            chunk.train()
    return StepResult(losses=losses, tokens=tokens)
