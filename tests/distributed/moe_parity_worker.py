"""One rank of a batch of MoE parity runs: many configurations in one launch of N ranks.

Starting ranks costs most of a small case's time on 2 cores (imports, the gloo world), so every
configuration of one world size runs in the same processes, one after another: the world stays,
Megatron-Core's model-parallel groups are rebuilt for each. Per configuration it saves, under
``OUT/<name>/rank<r>.pt``: the losses of every step, the first step's gradients under global
names (experts included), the MoE metrics of every step, every router's expert bias after the
last step, and the smallest top-k margin the routers saw (see :func:`_margin_hook`).

    python tests/distributed/moe_parity_worker.py OUT_DIR CASES.json

``CASES.json``: ``{"name": ["key=value", ...], ...}``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_vwn.config import load_config, validate
from megatron_vwn.model.moe import routers
from megatron_vwn.parallel.distributed import destroy_distributed
from megatron_vwn.parallel.env import resolve_dist_env
from megatron_vwn.training.trainer import Trainer
from tests.distributed.parity_worker import gather_grads


def _margin_hook(margins: list[float]):
    """Record, per router call, the smallest gap between the k-th and (k+1)-th selection score
    of any token, recomputed in fp64 from the router's input and weight: a choice that close
    could flip under another layout's reduction order."""

    def hook(router, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        logits = x @ router.weight.detach().double().T  # [tokens, experts]
        if router.score_function == "sigmoid":
            scores = torch.sigmoid(logits)
            if router.expert_bias is not None:
                scores = scores + router.expert_bias.double()
        else:
            scores = logits  # top-k of the logits, then a softmax over the k
        top = scores.topk(router.topk + 1, dim=-1).values
        margins.append((top[:, -2] - top[:, -1]).min().item())

    return hook


def _expert_biases(trainer) -> dict[int, torch.Tensor]:
    return {row: router.expert_bias.detach().clone() for row, router in trainer.moe_monitor.routers
            if router.expert_bias is not None}


def run_case(name: str, overrides: list[str], out_dir: Path, dist) -> None:
    cfg = load_config("tiny", overrides)
    validate(cfg, dist.world_size)
    trainer = Trainer(cfg, dist)
    margins: list[float] = []
    for chunk in trainer.model:
        for router in routers(chunk.module):
            router.register_forward_pre_hook(_margin_hook(margins))
    losses, mtp_losses, grad_norms, moe, grads = [], [], [], [], None
    for step in range(cfg.train.iters):
        result = trainer.step()
        losses.append(result.lm_loss)
        mtp_losses.append([v for k, v in sorted(result.losses.items()) if k.startswith("mtp")])
        grad_norms.append(float(result.grad_norm))
        moe.append(trainer.moe_monitor.collect(steps=1))
        if step == 0:
            grads = gather_grads(trainer.model)
    case_dir = out_dir / name
    case_dir.mkdir(exist_ok=True)
    torch.save({"losses": losses, "mtp_losses": mtp_losses, "grad_norms": grad_norms,
                "grads": grads, "moe": moe, "expert_bias": _expert_biases(trainer),
                "margin": min(margins, default=math.inf)},
               case_dir / f"rank{dist.rank}.pt")
    trainer.close()
    parallel_state.destroy_model_parallel()


def main() -> None:
    out_dir = Path(sys.argv[1])
    cases = json.loads(Path(sys.argv[2]).read_text())
    dist = resolve_dist_env()
    for name, overrides in cases.items():
        run_case(name, overrides, out_dir, dist)
    destroy_distributed()


if __name__ == "__main__":
    main()
