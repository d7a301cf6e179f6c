"""One rank of a conversion test run: ``megatron-vwn train`` (checkpoint at the end), then the
trained weights under global names, TP-gathered, for comparison with what conversion loads.

    python tests/integration/convert_worker.py OUT_FILE_PREFIX key=value ...

Writes ``OUT_FILE_PREFIX-pp{stage}-ep{rank}.pt`` from the first tensor- and (expert-)data-
parallel rank of every pipeline stage and expert-parallel rank (outside any export directory).
"""

from __future__ import annotations

import sys

import torch
from megatron.core import parallel_state

from megatron_vwn.config import load_config, validate
from megatron_vwn.model.layout import global_named_parameters
from megatron_vwn.parallel.distributed import destroy_distributed
from megatron_vwn.parallel.env import resolve_dist_env
from megatron_vwn.training.trainer import Trainer
from tests.distributed.parity_worker import full_tensor


def main() -> None:
    prefix, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config("tiny", overrides)
    dist = resolve_dist_env()
    validate(cfg, dist.world_size)
    trainer = Trainer(cfg, dist)
    try:
        trainer.train()
        weights = {name: full_tensor(param.data.float(), param)
                   for chunk in trainer.model
                   for name, param in global_named_parameters(chunk.module)}
        if (parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_expert_tensor_parallel_rank() == 0
                and parallel_state.get_expert_data_parallel_rank() == 0):
            stage = parallel_state.get_pipeline_model_parallel_rank()
            expert = parallel_state.get_expert_model_parallel_rank()
            torch.save(weights, f"{prefix}-pp{stage}-ep{expert}.pt")
    finally:
        trainer.close()
        destroy_distributed()


if __name__ == "__main__":
    main()
