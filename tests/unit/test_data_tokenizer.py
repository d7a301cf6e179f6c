"""Tokenizer: lossless round trips, determinism, the ids Megatron relies on."""

from __future__ import annotations

import gzip
import json

import pytest

from megatron_vwn.data import bundled
from megatron_vwn.data.tokenizer import (
    EOS_ID,
    PAD_ID,
    check_tokenizer_model,
    load_tokenizer,
    train_tokenizer,
)

VOCAB = 512
ORDINARY = [
    "Call me Ishmael. Some years ago—never mind how long precisely—having\nlittle money.",
    "Two  spaces, a trailing space \nand\n\nblank lines, “curly quotes” and ’apostrophes’.",
    " Leading space, digits 1851 and 42, tabs\there, accents: café, naïve, Æsop.",
    "Unseen characters go through byte fallback: 鯨 🐋 Ω.",
]


@pytest.fixture(scope="module")
def chapters() -> list[str]:
    return list(bundled.iter_bundled_documents())[:20]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, chapters) -> str:
    return train_tokenizer(chapters, str(tmp_path_factory.mktemp("tok") / "spm"), VOCAB)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


def test_is_a_megatron_tokenizer_with_distinct_eod_and_pad(tokenizer):
    from megatron.core.tokenizers import MegatronTokenizerBase

    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert tokenizer.vocab_size == VOCAB
    assert tokenizer.eod == EOS_ID
    assert tokenizer.pad == PAD_ID
    assert tokenizer.eod != tokenizer.pad


@pytest.mark.parametrize("text", ORDINARY)
def test_round_trip_is_lossless(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.eod not in ids and tokenizer.pad not in ids
    assert tokenizer.detokenize(ids) == text


def test_round_trip_of_a_whole_chapter_and_compression(tokenizer):
    chapter = list(bundled.iter_bundled_documents())[40]  # not in the training slice
    ids = tokenizer.tokenize(chapter)
    assert tokenizer.detokenize(ids) == chapter
    assert len(chapter) / len(ids) > 1.5  # BPE merges, not characters


def test_newline_is_its_own_piece(model_path, tokenizer):
    newline = check_tokenizer_model(model_path).piece_to_id("\n")
    assert newline not in (0, 1)  # a real piece, not <pad>/<unk>
    assert tokenizer.tokenize("whale\nship").count(newline) == 1
    assert tokenizer.tokenize("whale\n\nship").count(newline) == 2


def test_training_is_deterministic(tmp_path, chapters, model_path):
    again = train_tokenizer(chapters, str(tmp_path / "again"), VOCAB)
    with open(model_path, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    other = train_tokenizer(chapters[:10], str(tmp_path / "other"), VOCAB)
    with open(model_path, "rb") as a, open(other, "rb") as b:
        assert a.read() != b.read()


def test_training_from_files_equals_training_from_texts(tmp_path, chapters, model_path):
    txt = tmp_path / "first.txt"
    txt.write_text(chapters[0], encoding="utf-8")
    jsonl = tmp_path / "rest.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as stream:
        for chapter in chapters[1:]:
            stream.write(json.dumps({"body": chapter}) + "\n")
    from_files = train_tokenizer([str(txt), jsonl], str(tmp_path / "files"), VOCAB,
                                 json_key="body")
    with open(model_path, "rb") as a, open(from_files, "rb") as b:
        assert a.read() == b.read()


def test_tokenize_matches_plain_sentencepiece(model_path, tokenizer, chapters):
    processor = check_tokenizer_model(model_path)
    assert processor.encode(chapters[3]) == tokenizer.tokenize(chapters[3])


def test_errors(tmp_path, chapters):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(chapters, str(tmp_path / "small"), 100)
    with pytest.raises(ValueError, match="too little text"):
        train_tokenizer(["a tiny text"], str(tmp_path / "big"), 5000)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing.model"))


def test_model_without_eos_is_refused(tmp_path, chapters):
    import io

    import sentencepiece as spm

    sink = io.BytesIO()
    lines = [line for chapter in chapters[:5] for line in chapter.splitlines() if line]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=sink,
                                   vocab_size=300, eos_id=-1, minloglevel=2)
    path = tmp_path / "noeos.model"
    path.write_bytes(sink.getvalue())
    with pytest.raises(ValueError, match="end-of-sentence"):
        load_tokenizer(str(path))
