"""The errors a user sees when a checkpoint cannot be used."""

from __future__ import annotations

from megatron_vwn.config.errors import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the config.

    A :class:`ConfigError`, so the CLI prints it as one line (exit status 2). The message names the
    checkpoint path and, for a corrupted file, the file; for a shape mismatch, every differing key.
    """


class CorruptCheckpointError(CheckpointError):
    """A file of a checkpoint is missing, truncated or fails its checksum."""


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a failed ``dist_checkpointing.load`` raises: ``torch.distributed.checkpoint``'s
    ``CheckpointException`` derives from ``BaseException``, so ``except Exception`` misses it."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover - every supported torch has it
        return (Exception,)
    return (Exception, CheckpointException)


LOAD_ERRORS = _load_errors()


def describe_load_error(exc: BaseException) -> str:
    """One line for a load failure: the first rank's underlying error, not the tracebacks that
    ``CheckpointException`` carries in its text."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items())[0]
        cause = failure[0] if isinstance(failure, tuple) else failure  # (exception, trace)
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[-1] if text else ''} (rank {rank})"[:400]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:400]
