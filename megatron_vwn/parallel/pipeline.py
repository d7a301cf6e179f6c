"""Shapes of the tensors pipeline stages exchange.

Megatron-Core's schedules send ``[s (/tp under SP), b, config.hidden_size]``. With virtual width
every stage boundary carries the wide state ``[s, b, D']`` instead (the first stage expands, the
stage holding the final norm reduces). The 1F1B schedule takes a hook that rewrites the shapes;
the interleaved schedule has none, so there the config sets ``variable_seq_lengths`` and stages
announce shapes before sending (see ``model.builder.build_transformer_config``).
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_vwn.config.schema import Config
from megatron_vwn.model.builder import residual_width


def tensor_shape_adjuster(cfg: Config) -> Callable | None:
    """``adjust_tensor_shapes_fn`` for the 1F1B schedule, or None when shapes are stock."""
    width = residual_width(cfg)
    if cfg.parallel.pipeline == 1 or cfg.parallel.vpp > 1 or width == cfg.model.hidden_size:
        return None

    def widen(recv_shapes: list, send_shapes: list) -> tuple[list, list]:
        return ([(*shape[:-1], width) for shape in recv_shapes],
                [(*shape[:-1], width) for shape in send_shapes])

    return widen
