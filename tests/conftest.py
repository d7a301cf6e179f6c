"""Shared fixtures: one data cache per test session, so the bundled tokenizer and indexed files
are built once and every multi-rank test reads the same files."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """A data cache directory with the bundled corpus prepared."""
    from megatron_vwn.config.schema import DataConfig
    from megatron_vwn.data.datasets import prepare_data

    cache = str(tmp_path_factory.mktemp("data-cache"))
    prepare_data(DataConfig(cache_dir=cache, split="90,10,0"))
    return cache


LEFT_BEHIND_GRACE_S = 10
"""How long a test's processes get to end after the test (they are normally gone already: the
tests wait for what they start). Anything still alive then is killed and fails the test."""


@pytest.fixture(autouse=True)
def no_process_left_behind(request):
    """After each test that used ``tmp_path``: no process naming that directory is left. The
    clean-up kills what it finds and fails the test, naming the processes."""
    yield
    tmp_path = request.node.funcargs.get("tmp_path")
    if tmp_path is None:
        return
    from tests.process_guard import kill_survivors

    killed = kill_survivors(str(tmp_path), LEFT_BEHIND_GRACE_S)
    assert not killed, ("processes of this test outlived it and were killed:\n"
                        + "\n".join(killed))
