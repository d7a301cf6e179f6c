"""Routing metrics of mixture-of-experts layers, for ``metrics.jsonl``, wandb and the progress line.

Observed, never recomputed: a forward hook on each of Megatron-Core's routers reads the
``routing_map`` it returns (which experts each token went to, after capacity dropping), the
load-balancing and z-losses come from Megatron-Core's own aux-loss tracker, and the expert bias
from the routers' ``expert_bias`` buffers. Per logging window, over the whole global batch:

* ``moe_aux_loss``: the load-balancing loss (``aux_loss`` or ``seq_aux_loss``, without its
  coefficient), mean over MoE layers and micro-batches;
* ``moe_z_loss``: the router z-loss (without its coefficient), same mean;
* ``moe_load_imbalance``: max over mean tokens per expert, worst MoE layer; the value of every
  MoE layer (decoder, then MTP) in ``moe_load_imbalance_per_layer``;
* ``moe_dropped_fraction`` (with ``capacity_factor``): routed (token, expert) pairs dropped;
* ``moe_expert_bias_abs`` (with ``expert_bias``): mean ``|b|`` over layers and experts.

All ranks call :meth:`MoEMonitor.collect` at the same iterations: it is one all-reduce over the
world. Each statistic is a row per global layer (``model.moe.router_rows``), so pipeline stages
fill disjoint rows; data-parallel ranks add disjoint micro-batches; under tensor (and so
sequence) parallelism each rank routes its own shard of the sequence.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_vwn.compat.mcore import clear_moe_aux_losses, moe_aux_losses
from megatron_vwn.config.schema import ModelConfig
from megatron_vwn.model.moe import router_rows

AUX_LOSS_NAMES = ("load_balancing_loss", "seq_load_balancing_loss")
Z_LOSS_NAME = "z_loss"


class MoEMonitor:
    """Accumulates routing statistics of this rank's routers between two :meth:`collect`."""

    def __init__(self, chunks: list, model: ModelConfig, microbatches_per_step: int):
        moe = model.moe
        self.enabled = moe.enabled
        if not self.enabled:
            return
        self.capacity = moe.capacity_factor is not None
        self.expert_bias = moe.expert_bias
        self.top_k = moe.top_k
        self.rows = model.num_layers + model.mtp.num_layers
        moe_layers = model.num_layers - moe.dense_layers + model.mtp.num_layers
        self.moe_layers = moe_layers
        self.microbatches_per_step = microbatches_per_step
        experts = moe.num_experts
        # [rows, experts]: tokens routed to each expert (after dropping)
        self.counts = torch.zeros(self.rows, experts, dtype=torch.float64)
        # [rows]: (token, expert) pairs the router asked for (tokens x top_k)
        self.requested = torch.zeros(self.rows, dtype=torch.float64)
        self.routers = [(row, router) for chunk in chunks
                        for row, router in router_rows(_unwrap(chunk), model.num_layers)]
        for row, router in self.routers:
            router.register_forward_hook(self._observer(row))
        clear_moe_aux_losses(forget_layers=True)

    def _observer(self, row: int):
        def observe(router, inputs, outputs) -> None:
            if not (router.training and torch.is_grad_enabled()):
                return  # evaluation (or a recompute) is not a training step's routing
            _, routing_map = outputs  # [tokens, experts], bool
            self.counts[row] += routing_map.sum(dim=0).to(self.counts)
            self.requested[row] += routing_map.shape[0] * self.top_k

        return observe

    def collect(self, steps: int) -> dict:
        """The metrics of the last ``steps`` training steps (then start a new window)."""
        if not self.enabled:
            return {}
        tracker = moe_aux_losses()
        aux = sum((tracker[name] for name in AUX_LOSS_NAMES if name in tracker),
                  torch.zeros(self.rows, dtype=torch.float64))
        z = tracker.get(Z_LOSS_NAME, torch.zeros(self.rows, dtype=torch.float64))
        bias = torch.zeros(self.rows, self.counts.shape[1], dtype=torch.float64)
        holders = torch.zeros(self.rows, dtype=torch.float64)
        if self.expert_bias:
            for row, router in self.routers:
                bias[row] += router.expert_bias.detach().abs().cpu()
                holders[row] += 1
        # one all-reduce: [rows, experts | requested, aux, z, holders | experts of |bias|]
        table = torch.cat([self.counts, torch.stack([self.requested, aux.double().cpu(),
                                                     z.double().cpu(), holders], dim=1), bias],
                          dim=1)
        if torch.distributed.is_initialized():
            table = _all_reduce(table)
        experts = self.counts.shape[1]
        counts, requested = table[:, :experts], table[:, experts]
        aux, z, holders = table[:, experts + 1], table[:, experts + 2], table[:, experts + 3]
        bias = table[:, experts + 4:]
        self.counts.zero_()
        self.requested.zero_()
        clear_moe_aux_losses()

        micro = steps * self.microbatches_per_step * parallel_state.get_data_parallel_world_size()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        routed = requested > 0  # the MoE layers
        if not routed.any():
            return {}  # no training forward in the window
        per_layer = counts[routed].max(dim=1).values / counts[routed].mean(dim=1)
        row = {
            # aux: TP ranks hold partial sums (Megatron-Core sums them); z: a mean per TP shard
            "moe_aux_loss": aux.sum().item() / (self.moe_layers * micro),
            "moe_z_loss": z.sum().item() / (self.moe_layers * micro * tp),
            "moe_load_imbalance": per_layer.max().item(),
            "moe_load_imbalance_per_layer": [round(v, 6) for v in per_layer.tolist()],
        }
        if self.capacity:
            row["moe_dropped_fraction"] = 1.0 - counts.sum().item() / requested.sum().item()
        if self.expert_bias:
            kept = holders > 0
            row["moe_expert_bias_abs"] = (bias[kept] / holders[kept, None]).mean().item()
        return row


def _all_reduce(table: torch.Tensor) -> torch.Tensor:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    table = table.to(device)
    torch.distributed.all_reduce(table)
    return table.cpu()


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)
