"""``megatron-vwn profile [CONFIG] [key=value ...]``: DeepSpeed's FLOPs profiler on the built model.

Builds the model of CONFIG in one process (TP = PP = 1, the local spec, fp32, on the CPU; the
same modules a run builds, without parallel splits), runs one forward of a ``[batch, seq]``
token batch with labels (so multi-token-prediction heads run too), and prints per module:
parameters, forward FLOPs (DeepSpeed counts ``2 x`` multiply-accumulates of every matmul, plus
the elementwise work it can see), FLOPs per token and latency, for the embedding, every layer's
GHC modules, attention and MLP, the final norm / reduce, the MTP layers and the LM head.

The last line compares the profiler's forward FLOPs per token with
:func:`megatron_vwn.model.accounting.flops_per_token`, which counts *training* FLOPs (forward +
backward = 3 x forward): like is compared with like by dividing the accounting by 3.
The comparison is on the whole model, multi-token-prediction heads included
(:func:`~megatron_vwn.model.accounting.mtp_flops_per_token`); the MTP share (the MTP block and
the LM head's passes over its depths) is printed beside it, against the accounting's.

``deepspeed`` is imported here only (the ``profile`` extra; ``DS_BUILD_OPS=0`` on CPU).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import torch


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a YAML file or shipped config name, then dotted overrides")
    p.add_argument("--batch", type=int, default=1, help="sequences in the profiled batch")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(run=run_profile)


@dataclass
class ModuleRow:
    name: str
    kind: str
    params: int
    flops: int
    """Forward FLOPs of the profiled batch (all calls of the module)."""
    latency_s: float


@dataclass
class Profile:
    tokens: int
    rows: list[ModuleRow] = field(default_factory=list)
    total_flops: int = 0
    mtp_flops: int = 0
    """The MTP block and the LM head's passes over the MTP hidden states."""
    total_params: int = 0
    latency_s: float = 0.0
    accounting_forward_per_token: float = 0.0
    accounting_mtp_forward_per_token: float = 0.0

    @property
    def forward_per_token(self) -> float:
        """The profiler's forward FLOPs per token of the whole model, MTP heads included."""
        return self.total_flops / self.tokens

    @property
    def ratio(self) -> float:
        return self.forward_per_token / self.accounting_forward_per_token


_SKIPPED = ("IdentityOp", "IdentityFuncOp", "Dropout")
_OPENED = ("TransformerBlock", "TransformerLayer", "FinalNorm", "MultiTokenPredictionBlock",
           "MultiTokenPredictionLayer")
"""Modules whose parts get rows of their own (besides the model's children and layer lists)."""


def _rows(model: torch.nn.Module, module_flops, module_duration) -> list[ModuleRow]:
    """The model's parts, every (MTP) layer, and the parts of layers and final norms.

    A VWN layer calls its two GHC modules through fused functions, not as modules, so their work
    is the layer's own: it gets a row ``LAYER.ghc`` (both GHC modules' parameters, the layer's
    own FLOPs, its latency less its parts'), and the GHC modules none.
    """
    rows = []

    def add(name: str, module: torch.nn.Module) -> None:
        params = sum(p.numel() for p in module.parameters())
        flops = module_flops(module)
        if params or flops:
            rows.append(ModuleRow(name, type(module).__name__, params, int(flops),
                                  module_duration(module)))

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            kind = type(child).__name__
            if kind in _SKIPPED or kind == "GHC":
                continue
            if isinstance(child, torch.nn.ModuleList):
                visit(name + ".", child)
                continue
            add(name, child)
            if kind.endswith(_OPENED):
                visit(name + ".", child)
            if kind.endswith("TransformerLayer") and child.__flops__:
                ghc = [m for m in child.children() if type(m).__name__ == "GHC"]
                parts = sum(module_duration(m) for m in child.children())
                rows.append(ModuleRow(f"{name}.ghc", "GHC x2 (fused, in the layer)",
                                      sum(p.numel() for m in ghc for p in m.parameters()),
                                      int(child.__flops__),
                                      max(module_duration(child) - parts, 0.0)))

    visit("", model)
    return rows


def profile_model(cfg, vocab_size: int, batch: int = 1) -> Profile:
    """One profiled forward of ``cfg``'s model (built at TP = PP = 1)."""
    os.environ.setdefault("DS_BUILD_OPS", "0")
    from deepspeed.profiling.flops_profiler.profiler import (
        FlopsProfiler,
        get_module_duration,
        get_module_flops,
    )

    from megatron_vwn.convert.megatron_io import build_single_model, single_process_config
    from megatron_vwn.model.accounting import flops_per_token, mtp_flops_per_token

    cfg = single_process_config(cfg)
    model = build_single_model(cfg, vocab_size)
    seq = cfg.model.seq_length
    generator = torch.Generator().manual_seed(cfg.train.seed)
    tokens = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(seq).expand(batch, seq)
    profiler = FlopsProfiler(model)
    profiler.start_profile()
    try:
        with torch.no_grad():
            model(tokens, positions, None, labels=labels, loss_mask=torch.ones(batch, seq))
        result = Profile(tokens=batch * seq, rows=_rows(model, get_module_flops,
                                                        get_module_duration))
        result.total_flops = int(profiler.get_total_flops())
        result.total_params = sum(p.numel() for p in model.parameters())
        result.latency_s = float(profiler.get_total_duration())
        depths = cfg.model.mtp.num_layers
        if depths:
            head = get_module_flops(model.output_layer)  # 1 + depths passes, one accumulator
            result.mtp_flops = int(get_module_flops(model.mtp) + head * depths / (1 + depths))
    finally:
        profiler.end_profile()
    result.accounting_forward_per_token = flops_per_token(cfg.model, vocab_size) / 3
    result.accounting_mtp_forward_per_token = mtp_flops_per_token(cfg.model, vocab_size) / 3
    return result


def format_profile(profile: Profile) -> str:
    """The per-module table and the comparison line."""
    lines = [f"{'module':<50} {'type':<28} {'params':>11} {'MFLOPs':>10} {'MFLOPs/tok':>10} "
             f"{'latency ms':>10}"]
    for row in profile.rows:
        lines.append(f"{row.name:<50} {row.kind:<28} {row.params:>11,} {row.flops / 1e6:>10.2f} "
                     f"{row.flops / profile.tokens / 1e6:>10.4f} {row.latency_s * 1e3:>10.2f}")
    lines.append(f"{'total':<50} {'':<28} {profile.total_params:>11,} "
                 f"{profile.total_flops / 1e6:>10.2f} "
                 f"{profile.total_flops / profile.tokens / 1e6:>10.4f} "
                 f"{profile.latency_s * 1e3:>10.2f}")
    mtp = ""
    if profile.mtp_flops:
        mtp = (f" (of which MTP heads: profiler {profile.mtp_flops / profile.tokens / 1e6:.4f}M, "
               f"accounting {profile.accounting_mtp_forward_per_token / 1e6:.4f}M)")
    lines.append(
        f"forward FLOPs/token: profiler {profile.forward_per_token / 1e6:.4f}M vs "
        f"accounting {profile.accounting_forward_per_token / 1e6:.4f}M (its training FLOPs / 3): "
        f"ratio {profile.ratio:.4f}{mtp}")
    return "\n".join(lines)


def run_profile(ns: argparse.Namespace) -> int:
    import contextlib
    import json
    import sys
    from dataclasses import asdict

    from megatron_vwn.config import load_config
    from megatron_vwn.config.errors import ConfigError
    from megatron_vwn.config.loader import split_config_and_overrides
    from megatron_vwn.studies.report import padded_vocab_of

    if ns.batch < 1:
        raise ConfigError(f"--batch ({ns.batch}) must be >= 1")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the profile runs on the CPU
    config_path, overrides = split_config_and_overrides(ns.args)
    cfg = load_config(config_path, overrides)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's and the build's chatter
        profile = profile_model(cfg, padded_vocab_of(cfg, tensor_parallel=1), ns.batch)
    if ns.json:
        print(json.dumps({**asdict(profile), "forward_per_token": profile.forward_per_token,
                          "ratio": profile.ratio}))
    else:
        print(format_profile(profile))
    return 0
