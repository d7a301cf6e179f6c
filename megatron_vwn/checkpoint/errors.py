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
