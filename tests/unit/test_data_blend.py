"""Blending, config errors, the bundled-corpus cache and the Megatron-style loader."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.schema import DataConfig
from megatron_vwn.data import bundled
from megatron_vwn.data.cache import resolve_cache_dir
from megatron_vwn.data.datasets import build_datasets, prepare_data
from megatron_vwn.data.preprocess import write_indexed_dataset
from megatron_vwn.data.sampler import PretrainingBatchSampler, build_loader
from megatron_vwn.data.tokenizer import load_tokenizer, train_tokenizer

SEQ = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and two datasets whose samples are told apart by their words."""
    root = tmp_path_factory.mktemp("blend")
    chapters = list(bundled.iter_bundled_documents())[:20]
    model = train_tokenizer(chapters, str(root / "spm"), 512)
    apples = [" ".join(["apple"] * (60 + 7 * i)) for i in range(30)]
    zebras = [" ".join(["zebra"] * (60 + 5 * i)) for i in range(30)]
    write_indexed_dataset(apples, str(root / "apples"), model)
    write_indexed_dataset(zebras[:10], str(root / "zebras"), model)
    write_indexed_dataset(chapters[10:], str(root / "moby"), model)
    return {"root": str(root), "model": model, "tokenizer": load_tokenizer(model),
            "apples": str(root / "apples"), "zebras": str(root / "zebras"),
            "moby": str(root / "moby")}


def source_of(tokenizer, sample) -> str:
    text = tokenizer.detokenize(sample["tokens"].tolist())
    has_apple, has_zebra = "apple" in text, "zebra" in text
    assert has_apple != has_zebra, text
    return "apple" if has_apple else "zebra"


def build(data, weights, num_samples=(2000, 0, 0), split="100,0,0", **kw):
    paths = [data["apples"], data["zebras"]]
    cfg = DataConfig(paths=paths, weights=weights, tokenizer_model=data["model"], split=split,
                     cache_dir=os.path.join(data["root"], "cache"), **kw)
    prepared = prepare_data(cfg)
    return build_datasets(cfg, prepared, data["tokenizer"], SEQ, 1234, num_samples,
                          create_attention_mask=False)


@pytest.mark.parametrize("weights", [[0.8, 0.2], [0.3, 0.7]])
def test_blend_weights_are_respected(data, weights):
    train, valid = build(data, weights)
    assert valid is None
    assert len(train) >= 2000
    sources = [source_of(data["tokenizer"], train[i]) for i in range(2000)]
    apple_fraction = sources.count("apple") / len(sources)
    assert abs(apple_fraction - weights[0]) < 0.01
    # Blended, not concatenated: both sources appear in the first 50 samples.
    assert {"apple", "zebra"} <= set(sources[:50])


def test_blend_without_weights_follows_token_counts(data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = []
    for path in (data["apples"], data["zebras"]):
        dataset = IndexedDataset(path)
        tokens.append(int(dataset.sequence_lengths.sum()))
        del dataset
    expected = tokens[0] / sum(tokens)
    train, _ = build(data, None, num_samples=(1000, 0, 0))
    sources = [source_of(data["tokenizer"], train[i]) for i in range(1000)]
    assert abs(sources.count("apple") / 1000 - expected) < 0.02


def test_missing_files_name_the_key(data, tmp_path):
    base = dict(tokenizer_model=data["model"], cache_dir=str(tmp_path))
    missing = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"data\.paths\[1\] \('.*nothing'\): no .*nothing\.bin "
                                          r"or .*nothing\.idx"):
        prepare_data(DataConfig(paths=[data["apples"], missing], **base))
    with pytest.raises(ConfigError, match=r"data\.paths\[0\] .*drop the \.bin suffix"):
        prepare_data(DataConfig(paths=[data["apples"] + ".bin"], **base))
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data\.paths\[0\] .*: no .*half\.idx \("):
        prepare_data(DataConfig(paths=[str(tmp_path / "half")], **base))
    with pytest.raises(ConfigError, match=r"data\.tokenizer_model is required when data\.paths"):
        prepare_data(DataConfig(paths=[data["apples"]], cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"data\.tokenizer_model \('.*nope\.model'\): no such"):
        prepare_data(DataConfig(paths=[data["apples"]], cache_dir=str(tmp_path),
                                tokenizer_model=str(tmp_path / "nope.model")))
    with pytest.raises(ConfigError, match=r"data\.weights"):
        prepare_data(DataConfig(paths=[data["apples"]], weights=[0.5, 0.5], **base))


def test_split_without_training_documents_is_a_config_error(data):
    # 4% of 30 apple documents is 1, of 10 zebra documents none.
    with pytest.raises(ConfigError, match=r"data\.split \('4,96,0'\) gives data\.paths\[1\]"):
        build(data, [0.5, 0.5], num_samples=(100, 10, 0), split="4,96,0")


def test_empty_validation_split_gives_none(data):
    # zebras has 10 documents: 1% of them rounds to none, so there is no validation set.
    train, valid = build(data, [0.5, 0.5], num_samples=(100, 10, 0), split="99,1,0")
    assert len(train) >= 100 and valid is None
    train, valid = build(data, None, num_samples=(100, 10, 0), split="80,20,0")
    assert valid is not None and len(valid) >= 10


# ---------------------------------------------------------------- bundled corpus and cache


def _prepare_in_child(cache_dir: str, queue) -> None:
    prepared = prepare_data(DataConfig(cache_dir=cache_dir, tokenizer_vocab_size=512))
    queue.put((prepared.tokenizer_model, prepared.paths))


def test_bundled_corpus_is_built_once_and_cached(tmp_path):
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_prepare_in_child, args=(cache, queue)) for _ in range(3)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert len(set(map(repr, results))) == 1  # everyone got the same files

    bundled_dir = os.path.join(cache, "bundled")
    entries = sorted(os.listdir(bundled_dir))
    assert [e for e in entries if not e.endswith(".lock")] == [
        os.path.basename(os.path.dirname(results[0][0]))
    ]  # one build directory, no temporary leftovers

    prepared = prepare_data(DataConfig(cache_dir=cache, tokenizer_vocab_size=512))
    assert prepared.tokenizer_model == results[0][0] and prepared.paths == results[0][1]
    assert prepared.weights is None and prepared.cache_dir == cache
    mtime = os.path.getmtime(prepared.paths[0] + ".bin")
    assert prepare_data(DataConfig(cache_dir=cache, tokenizer_vocab_size=512)).paths == \
        prepared.paths
    assert os.path.getmtime(prepared.paths[0] + ".bin") == mtime  # reused, not rebuilt

    tokenizer = load_tokenizer(prepared.tokenizer_model)
    assert tokenizer.vocab_size == 512
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prepared.paths[0])
    assert len(dataset) == 135
    first = list(bundled.iter_bundled_documents())[0]
    assert tokenizer.detokenize(dataset[0][:-1].tolist()) == first
    del dataset

    other = prepare_data(DataConfig(cache_dir=cache, tokenizer_vocab_size=600))
    assert other.tokenizer_model != prepared.tokenizer_model  # the key covers the vocabulary
    assert load_tokenizer(other.tokenizer_model).vocab_size == 600


def test_default_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir(None) == str(tmp_path / "xdg" / "megatron_vwn")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir(None) == str(tmp_path / "home" / ".cache" / "megatron_vwn")
    assert resolve_cache_dir("~/x") == str(tmp_path / "home" / "x")


# ---------------------------------------------------------------- sampler and loader


@pytest.fixture(scope="module")
def single(data):
    cfg = DataConfig(paths=[data["moby"]], tokenizer_model=data["model"], split="100,0,0",
                     cache_dir=os.path.join(data["root"], "cache"))
    prepared = prepare_data(cfg)
    train, _ = build_datasets(cfg, prepared, data["tokenizer"], SEQ, 99, (200, 0, 0),
                              create_attention_mask=True)
    return train


def batches(dataset, n, **kw):
    loader = build_loader(dataset, **kw)
    return [next(loader) for _ in range(n)]


def test_sampler_follows_megatron_order():
    def order(**kw):
        return list(PretrainingBatchSampler(total_samples=10, micro_batch_size=2, **kw))

    assert order(consumed_samples=0, dp_rank=0, dp_size=2) == [[0, 1], [4, 5]]
    assert order(consumed_samples=0, dp_rank=1, dp_size=2) == [[2, 3], [6, 7]]
    assert order(consumed_samples=4, dp_rank=1, dp_size=2) == [[6, 7]]
    cyclic = iter(PretrainingBatchSampler(10, 6, 2, 1, 2, cyclic=True))
    assert [next(cyclic) for _ in range(2)] == [[8, 9], [2, 3]]
    with pytest.raises(ValueError, match="past the end"):
        PretrainingBatchSampler(10, 10, 2, 0, 1)


def test_batches_have_the_megatron_fields(single):
    batch = batches(single, 1, micro_batch_size=3, dp_rank=0, dp_size=1)[0]
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert batch[key].shape == (3, SEQ)
    assert batch["attention_mask"].shape == (3, 1, SEQ, SEQ)
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["tokens"][0], single[0]["tokens"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dp_ranks_partition_the_global_batch(single, num_workers):
    mbs, steps = 2, 5
    reference = batches(single, 2 * steps, micro_batch_size=mbs, dp_rank=0, dp_size=1)
    ranks = [batches(single, steps, micro_batch_size=mbs, dp_rank=r, dp_size=2,
                     num_workers=num_workers) for r in range(2)]
    for step in range(steps):
        union = torch.cat([ranks[0][step]["tokens"], ranks[1][step]["tokens"]])
        single_rank = torch.cat([reference[2 * step]["tokens"], reference[2 * step + 1]["tokens"]])
        assert torch.equal(union, single_rank)
    assert not torch.equal(ranks[0][0]["tokens"], ranks[1][0]["tokens"])


def test_resume_continues_exactly(single):
    kw = dict(micro_batch_size=2, dp_size=2)
    for rank in range(2):
        full = batches(single, 6, dp_rank=rank, **kw)
        resumed = batches(single, 3, dp_rank=rank, consumed_samples=3 * 2 * 2, **kw)
        for a, b in zip(full[3:], resumed, strict=True):
            assert torch.equal(a["tokens"], b["tokens"])
            assert torch.equal(a["loss_mask"], b["loss_mask"])


def test_non_cyclic_loader_stops_and_cyclic_wraps(single):
    total = len(single)
    finite = list(build_loader(single, micro_batch_size=4, dp_rank=0, dp_size=1))
    assert len(finite) == total // 4
    cyclic = build_loader(single, micro_batch_size=4, dp_rank=0, dp_size=1, cyclic=True,
                          consumed_samples=total - 2)
    wrapped = next(cyclic)["tokens"]
    expected = torch.stack([single[i]["tokens"] for i in (total - 2, total - 1, 0, 1)])
    assert torch.equal(wrapped, expected)


def test_build_datasets_with_a_process_group(data, tmp_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        train, valid = build(data, [0.5, 0.5], num_samples=(100, 10, 0), split="80,20,0")
        assert len(train) >= 100 and len(valid) >= 10
        assert {source_of(data["tokenizer"], train[i]) for i in range(20)} == {"apple", "zebra"}
    finally:
        dist.destroy_process_group()


def test_bundled_corpus_matches_its_documented_checksum():
    documents = list(bundled.iter_bundled_documents())
    assert len(documents) == 135
    assert documents[0].startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    assert bundled.text_sha256(documents) == (
        "7d56229c31530d049ecf2defca986550166cf1dcf5ea726a8bfae1749ce57ba9"
    )


def test_bundled_corpus_with_a_given_tokenizer(data, tmp_path):
    prepared = prepare_data(DataConfig(cache_dir=str(tmp_path), tokenizer_model=data["model"]))
    assert prepared.tokenizer_model == data["model"]
    assert "usertok" in prepared.paths[0]
    train, valid = build_datasets(DataConfig(), prepared, data["tokenizer"], SEQ, 1, (50, 5, 0),
                                  create_attention_mask=False)
    assert len(train) >= 50 and len(valid) >= 5
