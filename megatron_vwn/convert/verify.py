"""Parity of an export: the Megatron model and the HF model on the same text.

``--verify`` runs both in fp32 on a text (the tokenizer's ids are checked against SentencePiece
too), reports the largest absolute logit difference over the real vocabulary, for the main head
and every multi-token-prediction depth, and fails above the tolerance (1e-4). A ``bf16`` export
is compared with the Megatron model whose weights went through the same bf16 rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_vwn.config.errors import ConfigError

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4
DEFAULT_TEXT = (
    "Call me Ishmael. Some years ago\u2014never mind how long precisely\u2014having little or "
    "no money in my purse, and nothing particular to interest me on shore, I thought I would "
    "sail about a little and see the watery part of the world.\nIt is a way I have of driving "
    "off the spleen, and regulating the circulation. 1851"
)


class ParityError(ConfigError):
    """The exported model does not reproduce the Megatron model (a one-line CLI error)."""


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """``[main, mtp_1, ..., mtp_K]`` logits ``[b, s, V_padded]`` (fp32) of a single-process
    ``GPTModel`` for ``tokens [b, s]`` (depth ``k`` predicts token ``t + 1 + k``)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        # Cloned now: the loss that follows works on the logits in place.
        captured.append(output[0].detach().float().transpose(0, 1).clone())  # [b, s, V]

    handle = model.output_layer.register_forward_hook(hook)
    try:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
        # Labels make GPTModel run its MTP depths (it needs them when MTP is on).
        model(tokens, positions, None, labels=tokens.clone())
    finally:
        handle.remove()
    main = captured.pop()  # GPTModel calls the output layer for each depth, then the main head
    return [main, *captured]


@torch.no_grad()
def greedy_megatron(model: torch.nn.Module, prompt: list[int], new_tokens: int,
                    vocab: int) -> list[int]:
    """Greedy continuation with the Megatron model, re-running the full prefix each step."""
    ids = list(prompt)
    for _ in range(new_tokens):
        logits = megatron_logits(model, torch.tensor([ids]))[0]
        ids.append(int(logits[0, -1, :vocab].argmax()))
    return ids


def load_hf_model(out_dir: str | Path, fmt: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.float32, trust_remote_code=fmt == "vwn")
    return model.eval()


@dataclass
class ParityReport:
    tokens: int
    max_abs_diff: float
    mtp_max_abs_diff: list[float] = field(default_factory=list)
    tokenizer_matches: bool | None = None

    def describe(self) -> str:
        parts = [f"max |logit difference| {self.max_abs_diff:.3g} over {self.tokens} tokens"]
        parts += [f"mtp depth {k}: {d:.3g}" for k, d in enumerate(self.mtp_max_abs_diff, 1)]
        if self.tokenizer_matches is not None:
            parts.append("tokenizer ids match training's" if self.tokenizer_matches
                         else "tokenizer ids DIFFER from training's")
        return "; ".join(parts)


def _round_through(model: torch.nn.Module, dtype: torch.dtype) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(dtype).to(param.dtype))


def encode(text: str, tokenizer_model: str | None, vocab: int, limit: int,
           eod_token: str | None = None) -> list[int]:
    """The ids training gives ``text`` (SentencePiece or Hugging Face tokenizer), or random ids
    without a tokenizer."""
    if tokenizer_model is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(4, vocab, (min(limit, 64),), generator=generator).tolist()
    from megatron_vwn.data.hf_tokenizer import HFTokenizer, is_hf_tokenizer

    if is_hf_tokenizer(tokenizer_model):
        return HFTokenizer(tokenizer_model, eod_token).tokenize(text)[:limit]
    import sentencepiece as spm

    ids = spm.SentencePieceProcessor(model_file=str(tokenizer_model)).encode(text)
    return ids[:limit]


def check_parity(result, text: str = DEFAULT_TEXT, tolerance: float = TOLERANCE,
                 dtype: str = "fp32") -> ParityReport:
    """Compare the exported model in ``result`` (:class:`ExportResult`) with its source."""
    loaded = result.loaded
    if dtype == "bf16":
        _round_through(loaded.model, torch.bfloat16)
    ids = encode(text, result.tokenizer_model, loaded.vocab_size, loaded.cfg.model.seq_length,
                 loaded.cfg.data.eod_token)
    matches = None
    if result.tokenizer_model is not None:
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(str(result.out_dir),
                                                     trust_remote_code=result.format == "vwn")
        hf_ids = hf_tokenizer(text, verbose=False)["input_ids"]
        matches = hf_ids[: len(ids)] == ids
    tokens = torch.tensor([ids])
    vocab = loaded.vocab_size
    reference = [t[..., :vocab] for t in megatron_logits(loaded.model, tokens)]
    hf = load_hf_model(result.out_dir, result.format)
    with torch.no_grad():
        main = hf(tokens).logits.float()
        mtp = [t.float() for t in hf.mtp_logits(tokens)] if (
            result.format == "vwn" and len(reference) > 1) else []
    report = ParityReport(
        tokens=len(ids), max_abs_diff=float((main - reference[0]).abs().max()),
        mtp_max_abs_diff=[float((a - b).abs().max()) for a, b in zip(mtp, reference[1:],
                                                                      strict=False)],
        tokenizer_matches=matches,
    )
    worst = max([report.max_abs_diff, *report.mtp_max_abs_diff])
    if worst > tolerance or matches is False:
        raise ParityError(f"parity check failed for {result.out_dir}: {report.describe()} "
                          f"(tolerance {tolerance:g})")
    return report
