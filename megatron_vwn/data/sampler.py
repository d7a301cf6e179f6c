"""Megatron-style pretraining batch order and the data loader built on it.

The order is the one Megatron-LM's pretraining sampler uses, so runs are comparable and resume
exactly:

- samples are taken in global order 0, 1, 2, ... (the datasets are already shuffled by
  Megatron's sample index, so no further shuffling happens here);
- each block of ``micro_batch_size * dp_size`` consecutive samples is one micro-batch step
  across data parallelism, and data-parallel rank ``r`` takes the ``r``-th slice of
  ``micro_batch_size`` samples of the block;
- iteration starts at ``consumed_samples`` (the global count already trained on), so a resumed
  run continues with the very next block. A final partial block is dropped, as in Megatron.

With ``cyclic=True`` the global index wraps around the dataset (used for validation, which is
drawn from repeatedly). The order depends only on these integers: it is deterministic, and
independent of ``num_workers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


class PretrainingBatchSampler:
    """Yields the dataset indices of this data-parallel rank's micro-batches, in order."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        cyclic: bool = False,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"the dataset is empty (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) must be > 0")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank ({dp_rank}) < dp_size ({dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples ({consumed_samples}) must be >= 0")
        if not cyclic and consumed_samples >= total_samples:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) is past the end of the dataset "
                f"({total_samples} samples): it was built for fewer samples than this run needs"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.cyclic = cyclic

    @property
    def block_size(self) -> int:
        """Samples consumed by one micro-batch step across all data-parallel ranks."""
        return self.micro_batch_size * self.dp_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples
        offset = self.dp_rank * self.micro_batch_size
        while self.cyclic or start + self.block_size <= self.total_samples:
            first = start + offset
            yield [(first + i) % self.total_samples for i in range(self.micro_batch_size)]
            start += self.block_size

    def __len__(self) -> int:
        if self.cyclic:
            raise TypeError("a cyclic sampler has no length")
        return (self.total_samples - self.consumed_samples) // self.block_size


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack the known sample fields into ``[micro_batch, ...]`` tensors.

    Other fields (e.g. the blend's ``dataset_id``) are left out so every batch has the same
    keys whatever the blend.
    """
    batch = {}
    for key in BATCH_KEYS:
        if key in samples[0]:
            batch[key] = torch.stack([torch.as_tensor(sample[key]) for sample in samples])
    return batch


def build_loader(
    dataset: Any,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
    num_workers: int = 0,
    cyclic: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """An iterator over this rank's micro-batches of ``dataset``.

    Each batch is a dict of tensors: ``tokens``, ``labels``, ``loss_mask``, ``position_ids``
    (all ``[micro_batch_size, seq_length]``) and, when the dataset makes one,
    ``attention_mask`` (``[micro_batch_size, 1, seq_length, seq_length]``). See the module
    docstring for the order. Without ``cyclic`` the iterator ends after the last full block.
    """
    sampler = PretrainingBatchSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        cyclic=cyclic,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=False,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)
