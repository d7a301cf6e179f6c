"""Hugging Face tokenizers (tokenizer.json) beside SentencePiece: the kind read from the file,
the end-of-document token, preprocessing with workers, and the Megatron tokenizer interface.
The tokenizer is a byte-level BPE (Llama 3 / Qwen / OLMo style) trained here with `tokenizers`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_vwn.data.hf_tokenizer import DEFAULT_EOD, HFTokenizer
from megatron_vwn.data.preprocess import write_indexed_dataset
from megatron_vwn.data.tokenizer import load_tokenizer, open_tokenizer

TEXTS = ["Call me Ishmael. Some years ago - never mind how long precisely -",
         "having little or no money in my purse,\nand nothing particular to interest me on shore,",
         "I thought I would sail about a little and see the watery part of the world. \u00e9\u00e8"]


def train_byte_level_bpe(directory, special=(DEFAULT_EOD,), vocab_size=400) -> str:
    """A byte-level BPE ``tokenizer.json`` trained on TEXTS (what Llama 3-style teams bring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_byte_level_bpe(tmp_path_factory.mktemp("bpe"))


def test_kind_is_read_from_the_file_and_a_directory_works(bpe, tmp_path):
    from_file, from_dir = open_tokenizer(bpe), open_tokenizer(str(Path(bpe).parent))
    assert isinstance(from_file, HFTokenizer) and isinstance(from_dir, HFTokenizer)
    renamed = tmp_path / "vocab.model"  # the name does not decide the kind
    renamed.write_bytes(open(bpe, "rb").read())
    assert isinstance(open_tokenizer(str(renamed)), HFTokenizer)
    assert from_file.eod_token == DEFAULT_EOD and from_file.eod == from_dir.eod
    for text in TEXTS:
        ids = from_file.tokenize(text)
        assert from_file.detokenize(ids) == text  # byte-level: lossless
        assert from_file.eod not in ids


def test_neither_kind_is_refused_in_one_line(tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="neither a SentencePiece model nor a Hugging Face "
                                         "tokenizer.json"):
        open_tokenizer(str(junk))
    with pytest.raises(ValueError, match="holds no Hugging Face tokenizer.json"):
        open_tokenizer(str(tmp_path))


def test_the_eod_token_is_the_eos_else_endoftext_else_named(tmp_path, bpe):
    with_eos = tmp_path / "eos"
    path = train_byte_level_bpe(with_eos, special=("<s>", "</s>", DEFAULT_EOD))
    (with_eos / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tokenizer = HFTokenizer(with_eos)
    assert (tokenizer.eod_token, tokenizer.eod) == ("</s>", 1)
    assert HFTokenizer(path).eod == 1  # the file: the config beside it counts too
    assert HFTokenizer(bpe).eod_token == DEFAULT_EOD  # no config: <|endoftext|>
    assert HFTokenizer(with_eos, eod_token="<s>").eod == 0
    bare = train_byte_level_bpe(tmp_path / "bare", special=("<unk>",))
    with pytest.raises(ValueError, match="has no <\\|endoftext\\|>; name its end-of-document "
                                         "token with data.eod_token"):
        HFTokenizer(bare)
    with pytest.raises(ValueError, match="data.eod_token \\('<eot>'\\) is not in its vocab"):
        HFTokenizer(bpe, eod_token="<eot>")


def test_preprocess_gives_the_same_ids_with_one_or_two_workers(bpe, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    documents = TEXTS * 200  # several encode batches
    one = write_indexed_dataset(documents, str(tmp_path / "one"), bpe, workers=1)
    two = write_indexed_dataset(documents, str(tmp_path / "two"), bpe, workers=2)
    assert (one.documents, one.tokens) == (two.documents, two.tokens)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    tokenizer = load_tokenizer(bpe)  # what training loads
    dataset = IndexedDataset(str(tmp_path / "one"))
    for index in (0, 1, 2, len(documents) - 1):
        expected = tokenizer.tokenize(documents[index]) + [tokenizer.eod]
        assert np.asarray(dataset[index]).tolist() == expected


def test_export_carries_the_tokenizer_and_from_hf_uses_it(bpe, tmp_path):
    """What ``convert hf`` writes for a tokenizer.json gives, through AutoTokenizer, the ids
    training saw; ``convert from-hf`` of a folder with only tokenizer.json trains with it."""
    from transformers import AutoTokenizer

    from megatron_vwn.convert.importer import import_config
    from megatron_vwn.convert.tokenizer import write_hf_tokenizer_json

    out = tmp_path / "export"
    out.mkdir()
    ids = write_hf_tokenizer_json(bpe, out, None, model_max_length=128)
    training = HFTokenizer(bpe)
    assert ids == {"pad_token_id": None, "bos_token_id": None, "eos_token_id": training.eod}
    exported = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert exported(text)["input_ids"] == training.tokenize(text)
    assert exported.eos_token_id == training.eod

    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": training.vocab_size,
        "max_position_embeddings": 128}))
    cfg = import_config(out, [])
    assert cfg.data.tokenizer_model == str(out.resolve())
    assert load_tokenizer(cfg.data.tokenizer_model).eod == training.eod
