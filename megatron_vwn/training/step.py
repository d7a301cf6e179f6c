"""One training or evaluation step through Megatron-Core's pipeline schedules.

The loss is a *sum* over unmasked tokens per micro-batch; with ``calculate_per_token_loss`` the
schedules and ``finalize_model_grads`` divide the gradients by the token count summed over all
micro-batches and data-parallel ranks, so the step optimises the true token mean of the global
batch whatever the layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

LOSS_KEY = "lm_loss"


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token cross entropy ``[b, s]`` -> (sum, token count, report for logging)."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(output_tensor.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {LOSS_KEY: report}


def forward_step(data_iterator: Iterator | None, model: torch.nn.Module):
    """Megatron's ``forward_step_func``: read a micro-batch (first/last stages), run the chunk."""
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:  # a middle pipeline stage: input arrives by p2p
        output = model(None, None, None)
        return output, None
    tokens = batch["tokens"]
    labels = batch["labels"]
    loss_mask = batch["loss_mask"]
    position_ids = batch["position_ids"]
    if torch.cuda.is_available():
        tokens, labels, loss_mask, position_ids = (
            t.cuda(non_blocking=True) for t in (tokens, labels, loss_mask, position_ids)
        )
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(loss_func, loss_mask)


@dataclass
class StepResult:
    lm_loss: float
    tokens: int
    grad_norm: float | None = None
    skipped: bool = False


def run_schedule(
    model_chunks: list,
    data_iterators: list,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
    adjust_tensor_shapes_fn=None,
) -> tuple[float, int]:
    """Forward (and backward) over the micro-batches of one global batch; returns the token-mean
    LM loss of the global batch and its token count, identical on every rank."""
    forward_backward = get_forward_backward_func()
    outputs = forward_backward(
        forward_step_func=forward_step,
        data_iterator=data_iterators if len(data_iterators) > 1 else data_iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=adjust_tensor_shapes_fn,
    )
    return _reduce_loss(outputs)


def _reduce_loss(outputs: list[dict]) -> tuple[float, int]:
    """Sum the (loss, tokens) pairs over micro-batches, then over data-parallel ranks; share the
    result from the last pipeline stage with every stage."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for out in outputs:
            totals += out[LOSS_KEY].to(torch.float64)
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(
            totals, src=last, group=parallel_state.get_pipeline_model_parallel_group()
        )
    loss_sum, tokens = totals.tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)


def train_step(
    model_chunks: list,
    optimizer,
    scheduler,
    data_iterators: list,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    adjust_tensor_shapes_fn=None,
) -> StepResult:
    """Zero grads, forward/backward all micro-batches, reduce grads, clip, step, advance LR."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss, tokens = run_schedule(
        model_chunks, data_iterators, num_microbatches, seq_length, micro_batch_size, False,
        adjust_tensor_shapes_fn,
    )
    success, grad_norm, _ = optimizer.step()
    if success:
        scheduler.step(increment=1)
    return StepResult(lm_loss=loss, tokens=tokens, grad_norm=grad_norm, skipped=not success)


@torch.no_grad()
def eval_step(
    model_chunks: list,
    data_iterators: list,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    adjust_tensor_shapes_fn=None,
) -> StepResult:
    for chunk in model_chunks:
        chunk.eval()
    try:
        loss, tokens = run_schedule(
            model_chunks, data_iterators, num_microbatches, seq_length, micro_batch_size, True,
            adjust_tensor_shapes_fn,
        )
    finally:
        for chunk in model_chunks:
            chunk.train()
    return StepResult(lm_loss=loss, tokens=tokens)
