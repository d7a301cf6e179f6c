"""Declarative key maps between Megatron-Core and Hugging Face state dicts, with typed transforms.

A :class:`Rule` pairs one Megatron name pattern with one or more HF name patterns and a
:class:`Transform` that turns the Megatron tensor into the HF tensors and back. Patterns hold
``{i}`` (decoder layer) or ``{k}`` (MTP depth) placeholders. :func:`to_hf` and
:func:`to_megatron` apply a rule list to whole state dicts and refuse anything left over, so a
parameter can never be dropped or invented silently.

Weight layouts (PLATFORM.md): Megatron's fused QKV is ``[ng * (hpg + 2) * d, D]``, interleaved per
query group as ``[q heads of group g, k_g, v_g]``; SwiGLU's ``linear_fc1`` is ``cat([gate, up])``;
the vocabulary of the embedding and output layer is padded (rows past the real vocabulary).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

Tensors = tuple[torch.Tensor, ...]


class Transform:
    """Megatron tensor <-> the HF tensors of one rule (one or several)."""

    def to_hf(self, tensor: torch.Tensor) -> Tensors:
        raise NotImplementedError

    def to_megatron(self, tensors: Tensors) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Same(Transform):
    """The same tensor on both sides."""

    def to_hf(self, tensor):
        return (tensor,)

    def to_megatron(self, tensors):
        (tensor,) = tensors
        return tensor


@dataclass(frozen=True)
class FusedQKV(Transform):
    """``linear_qkv [ng * (hpg + 2) * d, D]`` <-> ``q_proj [h * d, D]``, ``k_proj``, ``v_proj``
    ``[ng * d, D]`` (query head ``j`` belongs to group ``j // hpg`` on both sides)."""

    heads: int
    groups: int
    head_dim: int

    def to_hf(self, tensor):
        hpg, d = self.heads // self.groups, self.head_dim
        per_group = tensor.reshape(self.groups, (hpg + 2) * d, -1)
        q, k, v = torch.split(per_group, [hpg * d, d, d], dim=1)
        width = tensor.shape[-1]
        return (q.reshape(self.heads * d, width), k.reshape(self.groups * d, width),
                v.reshape(self.groups * d, width))

    def to_megatron(self, tensors):
        q, k, v = tensors
        hpg, d, width = self.heads // self.groups, self.head_dim, q.shape[-1]
        fused = torch.cat([q.reshape(self.groups, hpg * d, width),
                           k.reshape(self.groups, d, width),
                           v.reshape(self.groups, d, width)], dim=1)
        return fused.reshape(self.groups * (hpg + 2) * d, width)


@dataclass(frozen=True)
class FusedGateUp(Transform):
    """SwiGLU ``linear_fc1 [2F, D] = cat([gate, up])`` <-> ``gate_proj``, ``up_proj`` ``[F, D]``."""

    def to_hf(self, tensor):
        gate, up = torch.chunk(tensor, 2, dim=0)
        return gate, up

    def to_megatron(self, tensors):
        return torch.cat(tensors, dim=0)


@dataclass(frozen=True)
class VocabRows(Transform):
    """Padded vocabulary ``[V_padded, ...]`` <-> the real one ``[V, ...]``; padding rows are
    dropped on export and zero-filled on import."""

    vocab: int
    padded: int

    def to_hf(self, tensor):
        if tensor.shape[0] != self.padded:
            raise ValueError(f"expected {self.padded} vocabulary rows, got {tensor.shape[0]}")
        return (tensor[: self.vocab],)

    def to_megatron(self, tensors):
        (tensor,) = tensors
        if tensor.shape[0] != self.vocab:
            raise ValueError(f"expected {self.vocab} vocabulary rows, got {tensor.shape[0]}")
        pad = tensor.new_zeros((self.padded - self.vocab, *tensor.shape[1:]))
        return torch.cat([tensor, pad], dim=0)


@dataclass(frozen=True)
class Rule:
    """``megatron`` name pattern <-> ``hf`` name patterns, through ``transform``."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform = Same()

    def pattern(self) -> re.Pattern:
        escaped = re.escape(self.megatron)
        return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", escaped) + "$")


SKIPPED_MEGATRON = re.compile(r"(^|\.)_extra_state$")
"""Megatron state entries that are not weights (Transformer Engine / linear extra state)."""


def _match(rules: Iterable[Rule], name: str) -> tuple[Rule, dict[str, str]]:
    for rule in rules:
        found = rule.pattern().match(name)
        if found:
            return rule, found.groupdict()
    raise KeyError(name)


def to_hf(state: Mapping[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Map a Megatron state dict to HF names; every weight must match exactly one rule."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for name, tensor in state.items():
        if SKIPPED_MEGATRON.search(name) or tensor is None:
            continue
        try:
            rule, fields = _match(rules, name)
        except KeyError:
            unmapped.append(name)
            continue
        for hf_name, value in zip(rule.hf, rule.transform.to_hf(tensor), strict=True):
            hf_name = hf_name.format(**fields)
            if hf_name in out:
                raise ValueError(f"two Megatron parameters map to {hf_name}")
            out[hf_name] = value.contiguous()
    if unmapped:
        raise ValueError(f"no HF name for Megatron parameters {unmapped[:5]}"
                         + (f" (and {len(unmapped) - 5} more)" if len(unmapped) > 5 else ""))
    return out


def to_megatron(hf_state: Mapping[str, torch.Tensor], rules: list[Rule],
                megatron_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Build the named Megatron tensors from an HF state dict; every HF tensor must be used."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in megatron_names:
        if SKIPPED_MEGATRON.search(name):
            continue
        rule, fields = _match(rules, name)
        hf_names = [pattern.format(**fields) for pattern in rule.hf]
        missing = [n for n in hf_names if n not in hf_state]
        if missing:
            raise KeyError(f"the Hugging Face checkpoint lacks {missing} (for {name})")
        out[name] = rule.transform.to_megatron(tuple(hf_state[n] for n in hf_names))
        used.update(hf_names)
    unused = sorted(set(hf_state) - used)
    if unused:
        raise ValueError(f"Hugging Face tensors with no Megatron parameter: {unused[:5]}"
                         + (f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""))
    return out
