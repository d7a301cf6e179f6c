"""``model.vwn.recompute=ghc``: keep the wide state once per layer, rebuild the rest in backward.

What dynamic GHC keeps for backward in this mode (docs/gpu.md, "Recompute modes"):

- no coefficients at all (``[T, n, 2m + n]`` each, a large fraction of the state at (8,64)):
  every backward recomputes them from the state (:class:`KeptRead`, :class:`RecomputedWrite`);
- the wide state entering each layer, but not the one between its attention and its MLP:
  ``H' = write(coeffs(H), Z_attn, H)`` is rebuilt from the layer input ``H`` and the attention
  output ``Z_attn`` (both kept anyway, ``Z`` is ``D`` wide) by the MLP's GHC in backward;
- at the end of the stack, neither the GroupNorm's input (the last layer's output, rebuilt the
  same way) nor its output (recomputed from that): :func:`final_norm_region`.

Each rebuild runs the same read/write functions as forward (torch or Triton), so the values are
the forward's. The tensors a rebuild needs are saved through ``save_for_backward`` (or reported
to the enclosing saved-tensor hooks), so tools that count saved bytes see them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class WideSource:
    """How backward rebuilds a wide state ``write(coeffs(S), Z, S)`` ``[T, n, d_b]`` that forward
    did not keep: from ``S`` itself (kept) or from ``S``'s own source."""

    state: torch.Tensor | None
    parent: WideSource | None
    blocks: torch.Tensor  # Z [T, m, d_b]
    operands: tuple  # (W^T, scales, static) as the read function takes them
    m: int
    eps: float
    functions: tuple  # (read, write) autograd functions of the kernel

    @property
    def depth(self) -> int:
        """0: rebuilt from a kept state; 1: from a state that is itself rebuilt; ..."""
        return 0 if self.parent is None else self.parent.depth + 1

    def tensors(self) -> list[torch.Tensor]:
        own = [self.blocks, *self.operands] + ([] if self.state is None else [self.state])
        return own + ([] if self.parent is None else self.parent.tensors())

    def rebuild(self) -> torch.Tensor:
        read_fn, write_fn = self.functions
        with torch.no_grad():
            state = self.state if self.parent is None else self.parent.rebuild()
            _, carry_t, write_t = read_fn.apply(state, *self.operands, self.m, self.eps, True)
            return write_fn.apply(carry_t, write_t, self.blocks, state)


def _state_of(kept: list[torch.Tensor], source: WideSource | None) -> torch.Tensor:
    return kept[0] if source is None else source.rebuild()


class KeptRead(torch.autograd.Function):
    """The GHC read keeping only its state (or, with ``source``, not even that) and the
    parameters; backward recomputes the read with the kernel's own function and takes its
    gradients."""

    @staticmethod
    def forward(ctx, state, weight, scales, static, m, eps, functions, source):
        read_fn, _ = functions
        out, carry_t, write_t = read_fn.apply(state, weight, scales, static, m, eps, True)
        kept = [state] if source is None else source.tensors()
        ctx.save_for_backward(weight, scales, static, *kept)
        ctx.meta = (m, eps, functions, source)
        return out, carry_t, write_t

    @staticmethod
    def backward(ctx, grad_out, grad_carry_t, grad_write_t):
        weight, scales, static, *kept = ctx.saved_tensors
        m, eps, (read_fn, _), source = ctx.meta
        state = _state_of(kept, source)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (state, weight, scales, static)]
            outs = read_fn.apply(*leaves, m, eps, True)
            pairs = [(o, g) for o, g in zip(outs, (grad_out, grad_carry_t, grad_write_t),
                                            strict=True) if g is not None]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (*(leaf.grad for leaf in leaves), None, None, None, None)


def _as_base(tensor: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``tensor`` seen as ``shape`` without being a view (``_base`` None), so Megatron's
    ``make_viewless_tensor`` passes it on as the same object (and its ``WideSource`` with it)."""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), shape)


class RecomputedWrite(torch.autograd.Function):
    """The GHC write keeping neither its coefficients nor (with ``source``) its state: backward
    recomputes the coefficients from the state, then takes the write function's gradients."""

    @staticmethod
    def forward(ctx, carry_t, write_t, blocks, state, weight, scales, static, m, eps, functions,
                source, shape):
        _, write_fn = functions
        out = write_fn.apply(carry_t, write_t, blocks, state)
        kept = [state] if source is None else source.tensors()
        ctx.save_for_backward(blocks, weight, scales, static, *kept)
        ctx.meta = (m, eps, functions, source)
        return _as_base(out.contiguous(), shape)

    @staticmethod
    def backward(ctx, grad):
        blocks, weight, scales, static, *kept = ctx.saved_tensors
        m, eps, (read_fn, write_fn), source = ctx.meta
        state = _state_of(kept, source)
        with torch.no_grad():
            _, carry_t, write_t = read_fn.apply(state, weight, scales, static, m, eps, True)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (carry_t, write_t, blocks, state)]
            out = write_fn.apply(*leaves)
            out.backward(grad.reshape(out.shape))
        return (*(leaf.grad for leaf in leaves), *([None] * 8))


def source_of(hidden: torch.Tensor) -> WideSource | None:
    """The rebuild recipe a ``recompute=ghc`` write attached to its output, if any."""
    return getattr(hidden, "_ghc_source", None)


def _outer_hooks():
    """The saved-tensor hooks around ours (a byte counter, say), so that they still see every
    tensor kept alive. ``None`` when there are none."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class _Region:
    """Saved-tensor hooks that replace the listed wide tensors by recipes (see
    :func:`final_norm_region`)."""

    def __init__(self, source: WideSource, wide: torch.Tensor):
        self._recipes = {}  # storage pointer -> function rebuilding that storage's tensor
        self._source = source
        self._add(wide, self._rebuild_input)
        self._outer = None
        self._hooks = None

    def _rebuild_input(self) -> torch.Tensor:
        return self._source.rebuild()

    def _add(self, tensor: torch.Tensor, rebuild) -> None:
        self._recipes[tensor.untyped_storage().data_ptr()] = (rebuild, tensor.dtype)

    def track(self, module, hidden: torch.Tensor) -> torch.Tensor:
        """``module(hidden)``, its output rebuilt in backward as ``module(rebuilt hidden)``."""
        out = module(hidden)
        source_fn = self._recipes.get(hidden.untyped_storage().data_ptr())
        if source_fn is not None:
            rebuild = source_fn[0]

            def recompute():
                with torch.no_grad():
                    return module(rebuild().view(hidden.shape))

            self._add(out, recompute)
        return out

    def _pack(self, t: torch.Tensor):
        recipe = self._recipes.get(t.untyped_storage().data_ptr())
        if recipe is None or recipe[1] != t.dtype:
            return ("kept", self._outer[0](t) if self._outer else t)
        keep = [self._outer[0](s) for s in self._source.tensors()] if self._outer else []
        return ("rebuilt", recipe[0], (t.shape, t.stride(), t.storage_offset()), keep)

    def _unpack(self, packed):
        if packed[0] == "kept":
            return self._outer[1](packed[1]) if self._outer else packed[1]
        _, rebuild, (shape, stride, offset), _ = packed
        value = rebuild()
        return value.as_strided(shape, stride, offset)  # same layout as the storage it replaces

    def __enter__(self):
        self._outer = _outer_hooks()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


class _NoRegion(contextlib.nullcontext):
    def __enter__(self):
        return self

    @staticmethod
    def track(module, hidden: torch.Tensor) -> torch.Tensor:
        return module(hidden)


def final_norm_region(wide: torch.Tensor, hidden: torch.Tensor):
    """Context for the final GroupNorm and reduce: with ``recompute=ghc`` (``wide`` carries a
    :class:`WideSource`) and ``hidden`` still the same storage as ``wide`` (TP = 1, no SP),
    neither the GroupNorm's input nor its output is kept: backward rebuilds the input from the
    last layer's kept state and recomputes the GroupNorm (``region.track``). Otherwise a no-op."""
    source = source_of(wide)
    if (source is None or not torch.is_grad_enabled() or source.depth > 1
            or hidden.untyped_storage().data_ptr() != wide.untyped_storage().data_ptr()):
        return _NoRegion()
    return _Region(source, hidden)
