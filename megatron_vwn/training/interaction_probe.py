"""The AGOP and the gathered token table of a Megatron-Core model, in any parallel layout.

``J_P`` (see :mod:`megatron_vwn.training.interaction`) is taken with backward passes through
Megatron's own pipeline schedules: micro-batch ``(x, i)`` runs the sequences ``x`` forward and
backpropagates ``sum_x <P_i, logits_last(x)>``; a hook on the token-table lookup of the first
stage keeps the gradient of its output, row ``i`` of ``J_P(x)`` for every sequence of ``x``.
Because the schedule carries the backward pass across pipeline stages and the tensor-parallel
layers sum their partial input gradients, the rows are the single-process rows whatever TP, SP,
PP or VPP is; only their storage differs (sequence-scattered under SP), which is undone here.

Embedding choice: the Jacobian is taken w.r.t. the table lookup's output, the model's input
embeddings. With virtual width that is the backbone-width (``D``) input before ``W_expand``
(factorized) or before HC's replication; VWN's ``wide`` table has no ``D``-wide input, so there it
is the ``D'``-wide row the table returns. The W^T W metric reads the same table.

Cost: ``probes`` forward+backward passes per held-out micro-batch (parameter gradients are
computed too, into the grad buffers, which are zeroed afterwards; the optimizer never sees them).
Memory: ``probes x micro_batch_size x s x d`` gradient values per micro-batch on the first stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state

from megatron_vwn.training.interaction import agop_sum
from megatron_vwn.training.step import Schedule


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def local_projection(full: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """This tensor-parallel rank's columns of ``P`` ``[probes, V]``, zero-padded to the padded
    vocabulary: ``[probes, padded_vocab / tp]``."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    padded = torch.zeros(full.shape[0], padded_vocab, dtype=full.dtype)
    padded[:, : full.shape[1]] = full
    width = padded_vocab // tp
    return padded[:, rank * width:(rank + 1) * width].contiguous()


class ProbeForwardStep:
    """``forward_step_func`` for micro-batches ``(batch, probe index)``: logits, no labels; the
    "loss" is ``sum_x <P_i, logits[x, -1, :]>`` over this rank's vocabulary slice (the
    tensor-parallel backward sums the slices' input gradients into the full one)."""

    def __init__(self, local_p: torch.Tensor):
        self.local_p = local_p  # [probes, V / tp]

    def __call__(self, data_iterator: Iterator | None, model: torch.nn.Module):
        item = next(data_iterator) if data_iterator is not None else None
        if item is None:  # a middle pipeline stage
            return model(None, None, None), None
        batch, probe = item
        tokens, position_ids = batch["tokens"], batch["position_ids"]
        if torch.cuda.is_available():
            tokens, position_ids = tokens.cuda(), position_ids.cuda()
        return model(tokens, position_ids, None), partial(self.projected_logit, probe)

    def projected_logit(self, probe: int, logits: torch.Tensor):
        """``logits`` ``[b, s, V / tp]`` -> the scalar ``sum_b <P_probe, logits[b, -1]>``."""
        weights = self.local_p[probe].to(device=logits.device)
        value = (logits[:, -1, :].to(torch.float64) @ weights).sum()
        return value, torch.tensor(1, dtype=torch.int), {}


class EmbeddingGradients:
    """Keeps the gradient of the first stage's table-lookup output, one per backward pass, as
    ``[b, s, d]`` (gathered over tensor-parallel ranks where sequence parallelism splits it)."""

    def __init__(self, model_chunks: list):
        self.grads: list[torch.Tensor] = []
        self._handles = []
        for chunk in model_chunks:
            module = _unwrap(chunk)
            if getattr(module, "pre_process", False):
                lookup = module.embedding.word_embeddings
                self._handles.append(lookup.register_forward_hook(self._on_forward))

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _on_forward(self, module, inputs, output: torch.Tensor) -> None:
        scattered = bool(getattr(module, "reduce_scatter_embeddings", False))
        output.register_hook(lambda grad: self._keep(grad, scattered))

    def _keep(self, grad: torch.Tensor, scattered: bool) -> None:
        if scattered:  # [s / tp, b, d] -> [s, b, d] -> [b, s, d]
            grad = _gather_first_dim(grad).transpose(0, 1)
        self.grads.append(grad.detach().to(torch.float64))

    def take(self) -> list[torch.Tensor]:
        grads, self.grads = self.grads, []
        return grads

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _gather_first_dim(tensor: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)


@contextmanager
def _probing(model_chunks: list):
    """Eval mode, no loss scaling and no gradient reduction while probing; grad buffers zeroed
    afterwards so the probe gradients never reach an optimizer step."""
    config = _unwrap(model_chunks[0]).config
    saved = config.grad_scale_func, config.finalize_model_grads_func
    config.grad_scale_func = config.finalize_model_grads_func = None
    for chunk in model_chunks:
        chunk.eval()
    try:
        yield
    finally:
        config.grad_scale_func, config.finalize_model_grads_func = saved
        for chunk in model_chunks:
            chunk.train()
            if hasattr(chunk, "zero_grad_buffer"):
                chunk.zero_grad_buffer()
            for param in chunk.parameters():
                param.grad = None


@dataclass
class AgopResult:
    matrix: torch.Tensor | None
    """``E_x[J_P J_P^T]`` ``[probes, probes]`` on the first pipeline stage, None elsewhere."""
    sequences: int


def layout_agop(model_chunks: list, feeds_data: list[bool], micro_batches: list[dict],
                local_p: torch.Tensor, schedule: Schedule) -> AgopResult:
    """``E_x[J_P J_P^T]`` over the held-out micro-batches.

    ``micro_batches`` are this data-parallel rank's held-out micro-batches (every rank of a
    pipeline passes the same list; chunks with ``feeds_data`` false get no iterator). One
    schedule call per micro-batch runs its ``probes`` backward passes; the sum over sequences is
    then added over data-parallel ranks.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    probes = local_p.shape[0]
    forward_step = ProbeForwardStep(local_p)
    grads = EmbeddingGradients(model_chunks)
    total = torch.zeros(probes, probes, dtype=torch.float64)
    sequences = 0
    forward_backward = get_forward_backward_func()
    try:
        with _probing(model_chunks):
            for batch in micro_batches:
                iterators = [iter([(batch, i) for i in range(probes)]) if feeds else None
                             for feeds in feeds_data]
                forward_backward(
                    forward_step_func=forward_step,
                    data_iterator=iterators if len(iterators) > 1 else iterators[0],
                    model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
                    num_microbatches=probes,
                    seq_length=schedule.seq_length,
                    micro_batch_size=schedule.micro_batch_size,
                    forward_only=False,
                    adjust_tensor_shapes_fn=schedule.adjust_tensor_shapes_fn,
                )
                if grads.active:
                    rows = torch.stack(grads.take())  # [probes, b, s, d]
                    total += agop_sum(rows.flatten(2).cpu())
                    sequences += rows.shape[1]
    finally:
        grads.remove()
    if not grads.active:
        return AgopResult(matrix=None, sequences=0)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    summed = torch.cat([total.flatten(), torch.tensor([float(sequences)], dtype=torch.float64)])
    summed = summed.to(device)
    torch.distributed.all_reduce(summed, group=parallel_state.get_data_parallel_group())
    summed = summed.cpu()
    sequences = int(summed[-1].item())
    return AgopResult(matrix=summed[:-1].reshape(probes, probes) / max(sequences, 1),
                      sequences=sequences)


def gathered_table(model_chunks: list, vocab_size: int) -> torch.Tensor | None:
    """The first stage's input token table, gathered over tensor-parallel ranks and cut to the
    tokenizer's ``vocab_size`` rows: ``[V, d]`` float64 (None on other stages)."""
    for chunk in model_chunks:
        module = _unwrap(chunk)
        if getattr(module, "pre_process", False):
            weight = module.embedding.word_embeddings.weight.detach()
            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                weight = _gather_first_dim(weight)
            return weight[:vocab_size].to(torch.float64).cpu()
    return None
