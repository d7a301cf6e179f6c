"""Comma-separated command-line lists (``--widths 1,2,4``, ``--depths 2,4,8``), parsed in one
place so every flag reports bad input the same way: one line naming the flag and an example."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from megatron_vwn.config.errors import ConfigError

T = TypeVar("T", int, float)


def parse_list(text: str, flag: str, cast: Callable[[str], T], example: str,
               minimum: T | None = None) -> list[T]:
    """The distinct values of ``text`` (``"1,2,4"``), each ``cast`` and ``>= minimum``."""
    kind = "integers" if cast is int else "numbers"
    try:
        values = [cast(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"{flag} ({text!r}) must be {kind} separated by commas, "
                          f"e.g. {example}") from None
    if not values:
        raise ConfigError(f"{flag} is empty")
    if minimum is not None and any(v < minimum for v in values):
        raise ConfigError(f"{flag} ({text!r}) must be one or more {kind} >= {minimum}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag} ({text}) repeats a value")
    return values
