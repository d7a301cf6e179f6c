"""Fixtures for in-process model tests: a one-rank gloo world, torn down after each module so
tests that must see no process group (bad-config refusals) are unaffected."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def single_process():
    from megatron_vwn.config import load_config
    from megatron_vwn.parallel.distributed import destroy_distributed, initialize_distributed
    from megatron_vwn.parallel.env import resolve_dist_env

    launcher = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    initialize_distributed(load_config(None), resolve_dist_env())
    yield
    destroy_distributed()
    # initialize_distributed exports the rendezvous address; a CLI started by a later test would
    # inherit it and try to listen on a port this process still holds.
    for key, value in launcher.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
