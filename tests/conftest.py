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
