"""Writing a sharded state dict with ``megatron.core.dist_checkpointing`` (torch_dist format).

Synchronous saves (CPU, and GPU with ``checkpoint.async_save=false``) return when every rank has
written its files. Asynchronous saves (GPU only) stage tensors to host memory, write from a forked
process while training continues, and run their completion step (manifest, tracker, retention)
from :meth:`Saver.poll` once all ranks have finished. With several data-parallel ranks the
writing of replicated tensors is spread over them (Megatron-Core's fully parallel save).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

from megatron_vwn.compat.mcore_internals import use_in_process_results_queue


class Saver:
    """Sync or async torch_dist saves; one strategy object per run (it caches save plans)."""

    def __init__(self, async_save: bool):
        self.async_save = async_save
        self._strategy = None
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

    def _get_strategy(self):
        if self._strategy is None:
            strategy = TorchDistSaveShardedStrategy("torch_dist", 1)
            if parallel_state.get_data_parallel_world_size() > 1:
                strategy = FullyParallelSaveStrategyWrapper(
                    strategy,
                    parallel_state.get_data_parallel_group(with_context_parallel=True),
                    do_cache_distribution=True,
                )
            self._strategy = strategy
        return self._strategy

    def save(
        self, state_dict: dict, path: Path, content_metadata: dict, on_complete: Callable[[], None]
    ) -> None:
        """Save ``state_dict`` into the existing directory ``path``. Synchronous: returns once
        this rank has written, and the caller runs ``on_complete`` after the ranks agree that
        all of them succeeded. Asynchronous: ``on_complete`` runs on every rank from
        :meth:`poll` once all ranks have written."""
        if not self.async_save:
            use_in_process_results_queue()  # no results-queue helper process
            dist_checkpointing.save(
                state_dict, str(path), sharded_strategy=self._get_strategy(),
                content_metadata=content_metadata,
            )
            return
        request = dist_checkpointing.save(
            state_dict, str(path), sharded_strategy=self._get_strategy(),
            async_sharded_save=True, content_metadata=content_metadata,
        )
        request.finalize_fns.append(on_complete)
        self._queue.schedule_async_request(request)

    def poll(self, blocking: bool = False) -> None:
        """Complete finished async saves (a collective: call it on every rank)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self._queue is not None:
            self._queue.close()
