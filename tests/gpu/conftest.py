"""GPU tests: skipped without CUDA; run by ``scripts/gpu_check.py --part check`` on a device."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def single_process():
    from megatron_vwn.config import load_config
    from megatron_vwn.parallel.distributed import destroy_distributed, initialize_distributed
    from megatron_vwn.parallel.env import resolve_dist_env

    initialize_distributed(load_config(None), resolve_dist_env())
    yield
    destroy_distributed()
