"""Damaged data is refused before training starts, with one line naming the file.

Megatron-Core maps ``PREFIX.bin`` / ``PREFIX.idx`` and trusts them: a truncated ``.bin`` reads
past its end (a crash or garbage deep inside a step, on every rank), a ``.bin`` and ``.idx`` of
different datasets give wrong tokens silently, an empty dataset loops forever in the sample
builder, and token ids at or above the vocabulary index past the embedding table. Each is found
here from the files alone (no Megatron, no process group), in :func:`check_indexed_dataset`:

1. the ``.idx`` header: magic, version, a known dtype code;
2. the ``.idx`` size against what its header describes (lengths, pointers, document indices);
3. at least one document with at least one token;
4. pointers and lengths consistent, and the ``.bin`` exactly as long as they describe;
5. every token id below the tokenizer's vocabulary (the whole ``.bin`` when it is at most
   :data:`FULL_SCAN_BYTES`, else :data:`SAMPLE_WINDOWS` windows of :data:`WINDOW_BYTES` spread
   over it, first and last included: a mismatched tokenizer shows up in any window).
"""

from __future__ import annotations

import os
import struct

import numpy as np

from megatron_vwn.config.errors import ConfigError

IDX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
"""Megatron-Core's ``DType`` codes of ``indexed_dataset.py``."""
FULL_SCAN_BYTES = 64 << 20
WINDOW_BYTES = 1 << 20
SAMPLE_WINDOWS = 16
"""A blend of many large files costs at most 16 MiB of reading per file and rank start."""


class DataError(ConfigError):
    """A data file is damaged or does not fit the tokenizer (one line, exit status 2)."""


def check_indexed_dataset(prefix: str, vocab_size: int, key: str) -> int:
    """Check ``PREFIX.idx`` / ``PREFIX.bin`` (see the module docstring); ``key`` names the
    config entry in messages (``data.paths[0]``). Returns the number of documents."""
    idx, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    with open(idx, "rb") as stream:
        header = stream.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:9] != IDX_MAGIC:
        raise DataError(f"{key}: {idx} is not a Megatron indexed-dataset index (bad header)")
    (version,), code = struct.unpack("<Q", header[9:17]), header[17]
    if version != 1:
        raise DataError(f"{key}: {idx} has index version {version}; only 1 is known")
    if code not in DTYPES:
        raise DataError(f"{key}: {idx} names token dtype code {code}, which is not one of "
                        f"{sorted(DTYPES)}")
    dtype = np.dtype(DTYPES[code])
    sequences, documents = struct.unpack("<QQ", header[18:34])
    expected = HEADER_BYTES + sequences * (4 + 8) + documents * 8
    size = os.path.getsize(idx)
    if size not in (expected, expected + sequences):  # + one mode byte per sequence (multimodal)
        raise DataError(f"{key}: {idx} is truncated or damaged: {size} bytes, but its header "
                        f"describes {sequences} sequences and {documents - 1} documents "
                        f"({expected} bytes)")
    if sequences == 0 or documents < 2:
        raise DataError(f"{key}: {prefix} is an empty dataset ({idx} lists no documents)")
    index = np.memmap(idx, mode="r", offset=HEADER_BYTES, dtype=np.uint8)
    lengths = np.frombuffer(index, dtype=np.int32, count=sequences)
    pointers = np.frombuffer(index, dtype=np.int64, count=sequences, offset=sequences * 4)
    doc_index = np.frombuffer(index, dtype=np.int64, count=documents, offset=sequences * 12)
    ends = pointers + lengths.astype(np.int64) * dtype.itemsize
    if (lengths < 0).any() or pointers[0] != 0 or (pointers[1:] != ends[:-1]).any() \
            or doc_index[0] != 0 or doc_index[-1] != sequences or (np.diff(doc_index) < 0).any():
        raise DataError(f"{key}: {idx} is damaged: its sequence lengths, pointers and document "
                        f"indices do not agree")
    tokens = int(lengths.sum(dtype=np.int64))
    if tokens == 0:
        raise DataError(f"{key}: {prefix} is an empty dataset ({idx} lists only empty "
                        f"documents)")
    bin_bytes = os.path.getsize(bin_path)
    if bin_bytes != int(ends[-1]):
        what = "truncated" if bin_bytes < ends[-1] else "longer than its index"
        raise DataError(f"{key}: {bin_path} is {what}: {bin_bytes} bytes, but {idx} describes "
                        f"{int(ends[-1])} ({tokens} {dtype.name} tokens); a damaged copy, or a "
                        f".bin and .idx that are not one pair")
    _check_token_ids(bin_path, dtype, tokens, vocab_size, key)
    del lengths, pointers, doc_index, index
    return int(documents - 1)


def _check_token_ids(bin_path: str, dtype: np.dtype, tokens: int, vocab_size: int,
                     key: str) -> None:
    data = np.memmap(bin_path, mode="r", dtype=dtype, shape=(tokens,))
    per_window = max(1, WINDOW_BYTES // dtype.itemsize)
    if tokens * dtype.itemsize <= FULL_SCAN_BYTES:
        starts = range(0, tokens, per_window)
        how = ""
    else:
        starts = np.linspace(0, tokens - per_window, SAMPLE_WINDOWS).astype(np.int64)
        how = f" (in {SAMPLE_WINDOWS} sampled windows)"
    low, high = 0, 0
    for start in starts:
        window = data[int(start):int(start) + per_window]
        low, high = min(low, int(window.min())), max(high, int(window.max()))
    del data
    if low < 0:
        raise DataError(f"{key}: {bin_path} holds negative token id {low}{how}")
    if high >= vocab_size:
        raise DataError(f"{key}: {bin_path} holds token id {high}{how} but the tokenizer has "
                        f"{vocab_size} pieces (ids 0..{vocab_size - 1}): the data was "
                        f"preprocessed with another tokenizer (data.tokenizer_model)")
