"""From ``DataConfig`` to Megatron GPT datasets.

Two steps, because they run at different times:

1. :func:`prepare_data` runs in the launcher/CLI *before* any process group exists. It resolves
   what to train on and makes sure it is on disk: the user's indexed datasets (checked, with
   errors naming the ``data.*`` key) or, with no ``data.paths``, the bundled corpus, tokenized
   once into the cache. It must not touch ``torch.distributed``.
2. :func:`build_datasets` runs in every rank after initialisation. It hands the blend to
   Megatron-Core's ``BlendedMegatronDatasetBuilder``, which splits every dataset by document
   (``data.split``), builds the shuffled sample indices (rank 0 first, then a barrier, when
   ``torch.distributed`` is initialised) and caches them under ``cache_dir/indices``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.schema import DataConfig
from megatron_vwn.data import bundled
from megatron_vwn.data.cache import build_once, resolve_cache_dir
from megatron_vwn.data.split import documents_in_split, read_sequence_count, split_bounds

logger = logging.getLogger(__name__)

BUNDLED_BUILD_VERSION = 1
"""Bump when the tokenizer training or preprocessing changes what they write: old caches then
stop matching and are rebuilt."""


@dataclass
class PreparedData:
    """Everything :func:`build_datasets` needs, resolved to absolute paths."""

    tokenizer_model: str
    paths: list[str]
    """Indexed-dataset prefixes (``PREFIX.bin`` / ``PREFIX.idx`` exist)."""
    weights: list[float] | None
    cache_dir: str


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_tokenizer_model(model: str | None, why: str, eod_token: str | None = None) -> str:
    from megatron_vwn.data.tokenizer import open_tokenizer

    if not model:
        raise ConfigError(f"data.tokenizer_model is required {why}")
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise ConfigError(f"data.tokenizer_model ({model!r}): no such file")
    try:
        open_tokenizer(path, eod_token)
    except ValueError as err:
        raise ConfigError(f"data.tokenizer_model ({model!r}): {err}") from err
    return path


def _tokenizer_key(path: str, eod_token: str | None) -> str:
    """What identifies a user tokenizer in cache keys: its file's bytes (and a chosen EOD)."""
    from megatron_vwn.data.hf_tokenizer import hf_tokenizer_file

    file = hf_tokenizer_file(path) or path
    return _file_sha256(str(file)) + (f"-eod-{eod_token}" if eod_token else "")


def _check_prefix(index: int, path: str) -> str:
    prefix = os.path.abspath(os.path.expanduser(path))
    missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if not missing:
        return prefix
    hint = (
        "data.paths holds prefixes: PREFIX.bin and PREFIX.idx, as written by "
        "`megatron-vwn preprocess --output-prefix PREFIX`"
    )
    if prefix.endswith((".bin", ".idx")):
        hint = f"drop the {prefix[-4:]} suffix; {hint}"
    raise ConfigError(f"data.paths[{index}] ({path!r}): no {' or '.join(missing)} ({hint})")


def _no_training_documents(cfg: DataConfig, index: int, path: str, count: int) -> ConfigError:
    return ConfigError(
        f"data.split ({cfg.split!r}) gives data.paths[{index}] ({path!r}) no training "
        f"documents (it has {count}); raise the train share or give a dataset with more "
        f"documents"
    )


def _check_files(paths: list[str], tokenizer_model: str, eod_token: str | None = None) -> None:
    """Every ``.bin``/``.idx`` pair intact, non-empty and within the tokenizer's vocabulary
    (``data/validate.py``): one line naming the file otherwise."""
    from megatron_vwn.data.tokenizer import open_tokenizer
    from megatron_vwn.data.validate import check_indexed_dataset

    vocab = open_tokenizer(tokenizer_model, eod_token).vocab_size
    for index, path in enumerate(paths):
        check_indexed_dataset(path, vocab, f"data.paths[{index}]")


def _check_split(cfg: DataConfig, paths: list[str]) -> None:
    """Fail early (before any process group) if the split leaves a dataset without training
    documents. ``build_datasets`` repeats the check with Megatron's own bounds."""
    train = split_bounds(cfg.split)[0]
    for index, path in enumerate(paths):
        try:
            count = read_sequence_count(path)
        except ValueError as err:
            raise ConfigError(f"data.paths[{index}] ({path!r}): {err}") from err
        if documents_in_split(count, train) == 0:
            raise _no_training_documents(cfg, index, path, count)


def _prepare_bundled(cfg: DataConfig, cache_dir: str) -> PreparedData:
    user_model = None
    if cfg.tokenizer_model:
        user_model = _check_tokenizer_model(cfg.tokenizer_model, "", cfg.eod_token)
    if user_model is None:
        vocab = cfg.tokenizer_vocab_size
        tokenizer_key, label = f"trained-bpe-{vocab}", f"v{vocab}"
    else:
        tokenizer_key, label = f"user-{_tokenizer_key(user_model, cfg.eod_token)}", "usertok"
    key = hashlib.sha256(
        f"build={BUNDLED_BUILD_VERSION}\ncorpus={bundled.bundled_corpus_sha256()}\n"
        f"tokenizer={tokenizer_key}\n".encode()
    ).hexdigest()[:16]
    directory = os.path.join(cache_dir, "bundled", f"{bundled.BUNDLED_NAME}-{label}-{key}")

    def build(tmp_dir: str) -> None:
        from megatron_vwn.data.preprocess import write_indexed_dataset
        from megatron_vwn.data.tokenizer import train_tokenizer

        documents = list(bundled.iter_bundled_documents())
        model = user_model
        if model is None:
            model = train_tokenizer(documents, os.path.join(tmp_dir, "tokenizer"),
                                    cfg.tokenizer_vocab_size)
        write_indexed_dataset(documents, os.path.join(tmp_dir, bundled.BUNDLED_NAME), model,
                              eod_token=cfg.eod_token)

    logger.info("bundled corpus: using cache %s", directory)
    build_once(directory, build)
    model = user_model or os.path.join(directory, "tokenizer.model")
    return PreparedData(
        tokenizer_model=model,
        paths=[os.path.join(directory, bundled.BUNDLED_NAME)],
        weights=None,
        cache_dir=cache_dir,
    )


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Resolve ``cfg`` to files on disk, building the bundled corpus into the cache if needed.

    With empty ``cfg.paths`` the bundled corpus is used: on first use a tokenizer of
    ``cfg.tokenizer_vocab_size`` pieces is trained on it (unless ``cfg.tokenizer_model`` is
    given) and it is written as an indexed dataset under
    ``cache_dir/bundled/<name>-<hash>/``; the hash covers the corpus, the vocabulary size (or
    the given tokenizer's bytes) and the build version, so a change rebuilds and an unchanged
    setup costs a ``stat``. Safe when several processes call it at once.

    With ``cfg.paths`` set it only checks that every ``PREFIX.bin`` / ``PREFIX.idx`` and
    ``cfg.tokenizer_model`` exist. Either way the data files are then checked for damage and
    against the tokenizer's vocabulary (``data/validate.py``). Problems raise
    :class:`ConfigError` naming the key and the file.
    Never touches ``torch.distributed``.
    """
    cfg.validate()
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    if not cfg.paths:
        prepared = _prepare_bundled(cfg, cache_dir)
        _check_files(prepared.paths, prepared.tokenizer_model, cfg.eod_token)
        _check_split(cfg, prepared.paths)
        return prepared
    paths = [_check_prefix(i, p) for i, p in enumerate(cfg.paths)]
    model = _check_tokenizer_model(
        cfg.tokenizer_model,
        "when data.paths is set: the tokenizer the data was preprocessed with",
        cfg.eod_token,
    )
    _check_files(paths, model, cfg.eod_token)
    _check_split(cfg, paths)
    weights = [float(w) for w in cfg.weights] if cfg.weights is not None else None
    return PreparedData(tokenizer_model=model, paths=paths, weights=weights, cache_dir=cache_dir)


def _dataset_sizes(paths: list[str]) -> list[tuple[int, int]]:
    """(documents, tokens) of each indexed dataset, read from the ``.idx`` files only."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sizes = []
    for path in paths:
        # Keep the dataset referenced while reading: its lengths are a view of an mmap that
        # the dataset closes when it is garbage-collected.
        dataset = IndexedDataset(path, mmap=True)
        lengths = dataset.sequence_lengths
        sizes.append((int(lengths.shape[0]), int(lengths.sum(dtype="int64"))))
        del lengths, dataset
    return sizes


def _plan_splits(cfg: DataConfig, prepared: PreparedData, split_matrix: list,
                 doc_counts: list[int], valid_samples: int) -> list:
    """The split matrix to build: test never (unused), valid only if it can be built.

    Megatron's GPT dataset loops forever when asked for samples from a split with no documents,
    so empty splits are found here first: an empty train split is a config error, an empty
    validation split (in any dataset of the blend) means no validation set.
    """
    train, valid = split_matrix[0], split_matrix[1]
    for index, count in enumerate(doc_counts):
        if documents_in_split(count, train) == 0:
            raise _no_training_documents(cfg, index, prepared.paths[index], count)
    if valid is not None and valid_samples > 0:
        for index, count in enumerate(doc_counts):
            if documents_in_split(count, valid) == 0:
                logger.warning(
                    "data.split (%r) gives %s (%d documents) no validation documents: "
                    "building no validation set", cfg.split, prepared.paths[index], count,
                )
                valid = None
                break
    else:
        valid = None
    return [train, valid, None]


def build_datasets(
    cfg: DataConfig,
    prepared: PreparedData,
    tokenizer: Any,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    create_attention_mask: bool,
) -> tuple[Any, Any | None]:
    """Build the train and validation datasets with Megatron-Core's blended builder.

    Args:
        cfg: the data config (``split``, ``eod_mask_loss``).
        prepared: the result of :func:`prepare_data`.
        tokenizer: from :func:`megatron_vwn.data.tokenizer.load_tokenizer` (its ``eod`` marks
            document ends in the loss mask and position ids).
        seq_length: tokens per sample (each sample reads ``seq_length + 1`` tokens).
        seed: seeds Megatron's document and sample shuffles.
        num_samples: samples wanted for (train, valid, test); the datasets are built with at
            least that many samples, going over the data for more epochs if needed. The test
            split is never built (nothing uses it), but its share of ``data.split`` still
            keeps its documents out of train and valid.
        create_attention_mask: put an explicit causal ``attention_mask`` in every sample.

    Returns:
        ``(train, valid)``: Megatron ``GPTDataset`` / ``BlendedDataset`` objects; ``valid`` is
        None when the split gives it no documents (in any dataset of the blend) or
        ``num_samples[1]`` is 0.

    Raises:
        ConfigError: the split leaves a dataset with no training documents.

    Without explicit ``data.weights`` several datasets are weighted by their token counts (the
    builder's own fallback would cap the blend at one epoch of data).
    """
    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    sizes = _dataset_sizes(prepared.paths)
    weights = prepared.weights
    if weights is None and len(prepared.paths) > 1:
        weights = [float(tokens) for _, tokens in sizes]
    path_to_cache: str | None = os.path.join(prepared.cache_dir, "indices")
    if len(prepared.paths) > 1 and not torch.distributed.is_initialized():
        # Megatron-Core 0.16's BlendedDataset asks torch.distributed for the rank when it
        # writes its cache, which fails without a process group; single-process runs build
        # the (cheap) indices in memory instead.
        path_to_cache = None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(prepared.paths), list(weights) if weights is not None else None),
        split=cfg.split,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=create_attention_mask,
        mmap_bin_files=True,
    )
    # Same bounds Megatron derived from data.split; only unbuildable/unused splits are dropped.
    config.split_matrix = _plan_splits(
        cfg, prepared, config.split_matrix, [docs for docs, _ in sizes], int(num_samples[1])
    )
    requested = [int(num_samples[0]), int(num_samples[1]), 0]
    train, valid, _test = BlendedMegatronDatasetBuilder(
        GPTDataset, requested, lambda: True, config
    ).build()
    if valid is not None and len(valid) == 0:
        valid = None
    return train, valid
