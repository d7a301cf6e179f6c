"""Damaged data files are refused before training starts (and before any process group), with
one line naming the file and what is wrong: a truncated ``.bin`` or ``.idx``, a ``.bin`` and
``.idx`` of different datasets, an empty dataset, token ids beyond the tokenizer's vocabulary."""

from __future__ import annotations

import os
import shutil
import struct

import pytest

from megatron_vwn.config.schema import DataConfig
from megatron_vwn.data import bundled
from megatron_vwn.data.datasets import prepare_data
from megatron_vwn.data.preprocess import write_indexed_dataset
from megatron_vwn.data.tokenizer import train_tokenizer
from megatron_vwn.data.validate import IDX_MAGIC
from tests.unit.test_config import _cli_error


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 512-piece tokenizer and two small datasets written with it."""
    root = tmp_path_factory.mktemp("validate")
    chapters = list(bundled.iter_bundled_documents())[:6]
    model = train_tokenizer(chapters, str(root / "spm"), 512)
    write_indexed_dataset(chapters[:3], str(root / "a"), model)
    write_indexed_dataset(chapters[3:], str(root / "b"), model)
    return root, model


def _copy(corpus, tmp_path, name: str = "a") -> str:
    root, _ = corpus
    for ext in (".bin", ".idx"):
        shutil.copy(root / f"{name}{ext}", tmp_path / f"data{ext}")
    return str(tmp_path / "data")


def _refused(capsys, prefix: str, model: str) -> str:
    return _cli_error(capsys, "train", f"data.paths=[{prefix}]", f"data.tokenizer_model={model}",
                      "--nproc", "1")


def test_intact_files_pass(corpus, tmp_path):
    prefix = _copy(corpus, tmp_path)
    prepared = prepare_data(DataConfig(paths=[prefix], tokenizer_model=corpus[1],
                                       cache_dir=str(tmp_path)))
    assert prepared.paths == [prefix]


def test_truncated_bin(corpus, tmp_path, capsys):
    prefix = _copy(corpus, tmp_path)
    size = os.path.getsize(f"{prefix}.bin")
    os.truncate(f"{prefix}.bin", size - 100)
    err = _refused(capsys, prefix, corpus[1])
    assert f"data.paths[0]: {prefix}.bin is truncated: {size - 100} bytes, but {prefix}.idx " \
           f"describes {size}" in err


def test_truncated_idx(corpus, tmp_path, capsys):
    prefix = _copy(corpus, tmp_path)
    os.truncate(f"{prefix}.idx", os.path.getsize(f"{prefix}.idx") - 8)
    assert f"{prefix}.idx is truncated or damaged" in _refused(capsys, prefix, corpus[1])


def test_bin_and_idx_of_different_datasets(corpus, tmp_path, capsys):
    prefix = _copy(corpus, tmp_path)
    shutil.copy(corpus[0] / "b.bin", f"{prefix}.bin")
    err = _refused(capsys, prefix, corpus[1])
    assert f"{prefix}.bin is" in err and "a .bin and .idx that are not one pair" in err


def test_empty_dataset(tmp_path, corpus, capsys):
    prefix = str(tmp_path / "empty")
    with open(f"{prefix}.idx", "wb") as f:  # Megatron's layout: no sequences, one doc index
        f.write(IDX_MAGIC + struct.pack("<QB", 1, 8) + struct.pack("<QQ", 0, 1)
                + struct.pack("<q", 0))
    open(f"{prefix}.bin", "wb").close()
    err = _refused(capsys, prefix, corpus[1])
    assert f"data.paths[0]: {prefix} is an empty dataset ({prefix}.idx lists no documents)" in err


def test_token_ids_beyond_the_tokenizers_vocabulary(data_cache, corpus, capsys):
    # The bundled corpus, tokenized with a 4096-piece tokenizer, given the 512-piece one.
    from megatron_vwn.config.schema import DataConfig
    from megatron_vwn.data.datasets import prepare_data

    (prefix,) = prepare_data(DataConfig(cache_dir=data_cache, split="90,10,0")).paths
    bin_file = prefix + ".bin"
    err = _refused(capsys, prefix, corpus[1])
    assert f"data.paths[0]: {bin_file} holds token id " in err
    assert "but the tokenizer has 512 pieces (ids 0..511): the data was preprocessed with " \
           "another tokenizer (data.tokenizer_model)" in err
