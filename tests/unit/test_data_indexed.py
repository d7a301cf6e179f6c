"""Preprocessing: documents -> .bin/.idx and back; input formats; the CLI; the document split."""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import re

import numpy as np
import pytest

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.schema import DataConfig
from megatron_vwn.data import bundled
from megatron_vwn.data.preprocess import (
    add_preprocess_arguments,
    preprocess_files,
    run_preprocess,
    write_indexed_dataset,
)
from megatron_vwn.data.tokenizer import load_tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    chapters = list(bundled.iter_bundled_documents())[:20]
    return train_tokenizer(chapters, str(tmp_path_factory.mktemp("tok") / "spm"), 512)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


def read_back(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [np.array(dataset[i]) for i in range(len(dataset))]


def assert_documents(prefix: str, tokenizer, expected: list[str]) -> None:
    sequences = read_back(prefix)
    assert len(sequences) == len(expected)
    for sequence, text in zip(sequences, expected, strict=True):
        assert sequence[-1] == tokenizer.eod
        assert tokenizer.eod not in sequence[:-1]
        assert tokenizer.detokenize(sequence[:-1].tolist()) == text


def test_round_trip_documents(tmp_path, model_path, tokenizer):
    docs = list(bundled.iter_bundled_documents())[20:26] + [
        "A short one.",
        "Line one\nline two\n\n  indented, with “quotes” — and 🐋.",
    ]
    result = write_indexed_dataset(docs, str(tmp_path / "out"), model_path)
    assert result.documents == len(docs)
    sequences = read_back(str(tmp_path / "out"))
    assert result.tokens == sum(len(s) for s in sequences)
    assert sequences[0].dtype == np.uint16  # small vocabulary: 2 bytes a token
    assert_documents(str(tmp_path / "out"), tokenizer, docs)
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx"]  # no temporary leftovers


def test_workers_give_identical_files(tmp_path, model_path):
    docs = list(bundled.iter_bundled_documents())[:30]
    write_indexed_dataset(docs, str(tmp_path / "one"), model_path, workers=1)
    write_indexed_dataset(docs, str(tmp_path / "two"), model_path, workers=2)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


def test_input_formats(tmp_path, model_path, tokenizer):
    whole = tmp_path / "whole.txt"
    whole.write_text("First paragraph\nstill first.\n\nSecond paragraph.\n", encoding="utf-8")
    paragraphs = tmp_path / "paras.txt.gz"
    with gzip.open(paragraphs, "wt", encoding="utf-8") as stream:
        stream.write("Para one.\n \nPara two,\nwith two lines.\n\n\n\nPara three.\n")
    jsonl = tmp_path / "docs.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as stream:
        stream.write(json.dumps({"content": "Json doc one."}) + "\n\n")
        stream.write(json.dumps({"content": "   "}) + "\n")  # empty: skipped
        stream.write(json.dumps({"content": "Json doc two.", "other": 1}) + "\n")

    result = preprocess_files([str(whole), str(jsonl)], str(tmp_path / "a"), model_path,
                              json_key="content")
    expected = ["First paragraph\nstill first.\n\nSecond paragraph.\n", "Json doc one.",
                "Json doc two."]
    assert result.documents == 3
    assert_documents(str(tmp_path / "a"), tokenizer, expected)

    preprocess_files([str(paragraphs)], str(tmp_path / "b"), model_path, split_paragraphs=True)
    assert_documents(str(tmp_path / "b"), tokenizer,
                     ["Para one.", "Para two,\nwith two lines.", "Para three."])


def parse(argv: list[str]) -> argparse.Namespace:
    return add_preprocess_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_trains_tokenizer_and_preprocesses(tmp_path):
    corpus = tmp_path / "book.jsonl"
    chapters = list(bundled.iter_bundled_documents())[:12]
    corpus.write_text("".join(json.dumps({"text": c}) + "\n" for c in chapters),
                      encoding="utf-8")
    prefix = str(tmp_path / "out" / "book")
    args = parse(["--input", str(corpus), "--output-prefix", prefix, "--train-tokenizer",
                  "--vocab-size", "400", "--workers", "2"])
    assert run_preprocess(args) == 0
    assert os.path.isfile(prefix + ".model")
    tokenizer = load_tokenizer(prefix + ".model")
    assert tokenizer.vocab_size == 400
    assert_documents(prefix, tokenizer, chapters)


def test_cli_errors_name_the_flag(tmp_path, model_path):
    good = tmp_path / "a.txt"
    good.write_text("some text", encoding="utf-8")
    out = str(tmp_path / "o")
    cases = [
        (["--input", str(good), str(tmp_path / "nope.txt"), "--output-prefix", out,
          "--tokenizer-model", model_path], r"--input\[1\] \('.*nope\.txt'\): no such file"),
        (["--input", str(good), "--output-prefix", out], r"--tokenizer-model is required"),
        (["--input", str(good), "--output-prefix", out, "--tokenizer-model",
          str(tmp_path / "x.model")], r"--tokenizer-model \('.*x\.model'\): no such file"),
        (["--input", str(good), "--output-prefix", out, "--train-tokenizer", "--vocab-size",
          "10"], r"--vocab-size \(10\) must be >= 300"),
    ]
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"txt": "wrong key"}\n', encoding="utf-8")
    cases.append((["--input", str(bad_json), "--output-prefix", out, "--tokenizer-model",
                   model_path], r"--input: .*bad\.jsonl:1: expected a JSON object with key"))
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_preprocess(parse(argv))
    assert not os.path.exists(out + ".bin") and not os.path.exists(out + ".idx")


def test_tools_script_runs(tmp_path, model_path, tokenizer):
    spec = importlib.util.spec_from_file_location(
        "preprocess_data_tool", os.path.join(REPO, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = tmp_path / "t.txt"
    text.write_text("Tool test document.", encoding="utf-8")
    prefix = str(tmp_path / "tool")
    assert tool.main(["--input", str(text), "--output-prefix", prefix,
                      "--tokenizer-model", model_path]) == 0
    assert_documents(prefix, tokenizer, ["Tool test document."])
    assert tool.main(["--input", str(tmp_path / "missing.txt"), "--output-prefix", prefix,
                      "--tokenizer-model", model_path]) == 2


DOC_RE = re.compile(r"doc(\d{3})x")


def test_document_level_split(tmp_path, model_path, tokenizer):
    """Whole documents go to train or to valid: no document is seen on both sides."""
    from megatron_vwn.data.datasets import PreparedData, build_datasets

    n_docs = 20
    docs = [" ".join([f"doc{i:03d}x"] * 40) for i in range(n_docs)]
    write_indexed_dataset(docs, str(tmp_path / "split"), model_path)
    cfg = DataConfig(paths=[str(tmp_path / "split")], tokenizer_model=model_path,
                     split="80,20,0", cache_dir=str(tmp_path / "cache"))
    prepared = PreparedData(model_path, [str(tmp_path / "split")], None, str(tmp_path / "cache"))
    train, valid = build_datasets(cfg, prepared, tokenizer, seq_length=32, seed=7,
                                  num_samples=(300, 60, 0), create_attention_mask=False)

    def documents_seen(dataset) -> set[int]:
        seen: set[int] = set()
        for i in range(len(dataset)):
            text = tokenizer.detokenize(dataset[i]["tokens"].tolist())
            seen.update(int(m) for m in DOC_RE.findall(text))
        return seen

    train_docs, valid_docs = documents_seen(train), documents_seen(valid)
    assert train_docs == set(range(16))
    assert valid_docs == set(range(16, 20))
    assert not train_docs & valid_docs


@pytest.mark.parametrize("split", ["98,2,0", "90,10,0", "99,1", "80,0,20", "1,1,1", "0.7,0.2,0.1",
                                   "100,0,0", "33,33,34"])
def test_early_split_check_agrees_with_megatron(split):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from megatron_vwn.data.split import documents_in_split, split_bounds

    ours = split_bounds(split)
    theirs = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    assert ours == theirs
    for n in (1, 7, 10, 135, 1001):
        for bounds in ours:
            if bounds is not None:
                begin, end = (int(round(b * float(n))) for b in bounds)
                assert documents_in_split(n, bounds) == end - begin


def test_sequence_count_from_the_index_header(tmp_path, model_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_vwn.data.split import read_sequence_count

    write_indexed_dataset([f"doc {i}" for i in range(13)], str(tmp_path / "n"), model_path)
    dataset = IndexedDataset(str(tmp_path / "n"))
    assert read_sequence_count(str(tmp_path / "n")) == len(dataset) == 13
    del dataset
    (tmp_path / "bad.idx").write_bytes(b"not an index at all, definitely not one")
    with pytest.raises(ValueError, match="not a Megatron indexed-dataset index"):
        read_sequence_count(str(tmp_path / "bad"))
