"""Shared fixtures: one data cache per test session, so the bundled tokenizer and indexed files
are built once and every multi-rank test reads the same files."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The fast tier, `pytest -m "not slow"` (README: before every commit, a few minutes on 2 cores):
# the unit tests, one parallel layout (TP=2 + SP) for the backbone and each width member with
# its single-process reference, the MoE backbone at EP=2, and one Hugging Face export. Everything
# else under tests/distributed and tests/integration is marked slow and runs in CI's full tier.
FAST_TIER = {
    *(f"tests/distributed/test_parity.py::test_layout_matches_single_process[{model}-tp2_sp]"
      for model in ("backbone", "vwn_8_64", "mhc4", "altup2", "backbone_mtp1")),
    "tests/distributed/test_moe_parity.py::test_moe_layout_matches_single_process[moe-ep2]",
    "tests/integration/test_convert_hf.py::test_every_connection_exports_exactly[static-1.5x]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(("tests/distributed/", "tests/integration/")) \
                and item.nodeid not in FAST_TIER:
            item.add_marker(pytest.mark.slow)


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
