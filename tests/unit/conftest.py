"""Fixtures for in-process model tests: a one-rank gloo world, torn down after each module so
tests that must see no process group (bad-config refusals) are unaffected."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def single_process():
    from megatron_vwn.config import load_config
    from megatron_vwn.launch.env import resolve_dist_env
    from megatron_vwn.parallel.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(load_config(None), resolve_dist_env())
    yield
    destroy_distributed()
