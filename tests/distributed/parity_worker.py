"""One rank of a parity run: train a few steps, save losses and the first step's gradients.

Gradients are stored under global parameter names as full (TP-gathered) tensors, so runs at any
TP/PP/VPP/DP layout can be compared element by element with the single-process run.

    python tests/distributed/parity_worker.py OUT_DIR key=value ...
    python tests/distributed/parity_worker.py --batch SPEC.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_vwn.config import load_config, validate
from megatron_vwn.model.layout import global_named_parameters
from megatron_vwn.model.moe import tensor_shard
from megatron_vwn.parallel.distributed import destroy_distributed
from megatron_vwn.parallel.env import resolve_dist_env
from megatron_vwn.training.trainer import Trainer


def full_tensor(tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """Undo tensor-parallel sharding (including SwiGLU's stride-2 ``[gate_r; up_r]`` layout;
    routed experts are sharded over expert-TP, not TP)."""
    _, tp, group = tensor_shard(param)
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.clone()
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = [torch.chunk(part, stride, dim=dim) for part in parts]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(tp)], dim=dim)


def gather_grads(model_chunks: list) -> dict[str, torch.Tensor]:
    grads = {}
    for chunk in model_chunks:
        for name, param in global_named_parameters(chunk.module):
            grads[name] = full_tensor(param.main_grad.float(), param)
    return grads


def run_case(out_dir: Path, argv: list[str], dist) -> None:
    """Train ``cfg.train.iters`` steps of one config; save this rank's losses and gradients."""
    cfg = load_config("tiny", argv)
    validate(cfg, dist.world_size)
    trainer = Trainer(cfg, dist)
    losses, mtp_losses, grad_norms, grads = [], [], [], None
    for step in range(cfg.train.iters):
        result = trainer.step()
        losses.append(result.lm_loss)
        mtp_losses.append([v for k, v in sorted(result.losses.items()) if k.startswith("mtp")])
        grad_norms.append(float(result.grad_norm))
        if step == 0:
            grads = gather_grads(trainer.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"losses": losses, "mtp_losses": mtp_losses, "grad_norms": grad_norms,
                "grads": grads},
               out_dir / f"rank{dist.rank}.pt")
    trainer.close()


def main() -> None:
    """One config (``OUT_DIR key=value ...``), or a batch (``--batch SPEC.json``: ``{"base":
    [...], "cases": {name: [...]}}``, written to ``OUT_DIR/name``) in one process group: the
    model-parallel groups and seeds are rebuilt per case, so each case runs as if alone."""
    dist = resolve_dist_env()
    if sys.argv[1] == "--batch":
        spec = json.loads(Path(sys.argv[2]).read_text())
        for name, overrides in spec["cases"].items():
            run_case(Path(spec["out"]) / name, [*spec["base"], *overrides,
                                                f"run.dir={spec['out']}/{name}/run"], dist)
            parallel_state.destroy_model_parallel()
    else:
        run_case(Path(sys.argv[1]), sys.argv[2:], dist)
    destroy_distributed()


if __name__ == "__main__":
    main()
