"""``model.vwn.recompute=ghc``: keep the wide state once per layer, rebuild the rest in backward.

What dynamic GHC keeps for backward in this mode (docs/gpu.md, "Recompute modes"):

- no coefficients at all (``[T, n, 2m + n]`` each, a large fraction of the state at (8,64)):
  every backward recomputes them from the state (:class:`KeptRead`, :class:`RecomputedWrite`);
- the wide state entering each layer, but not the one between its attention and its MLP:
  ``H' = write(coeffs(H), Z_attn, H)`` is rebuilt from the layer input ``H`` and the attention
  output ``Z_attn`` (both kept anyway, ``Z`` is ``D`` wide) by the MLP's GHC in backward;
- at the end of the stack, neither the GroupNorm's input (the last layer's output, rebuilt the
  same way) nor its output (recomputed from that): :class:`RecomputedFinalNorm`.

A write's rebuild recipe (:class:`WideSource`) reaches the next reader through the
:class:`RecomputeChain` its model chunk owns, which recognises the write's output by identity.
Each rebuild runs the same read/write functions as forward (torch or Triton), so the values are
the forward's. The tensors a rebuild needs are saved through ``save_for_backward``, so tools
that count saved bytes see them.
"""

from __future__ import annotations

import weakref
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
    ``make_viewless_tensor`` passes it on as the same object (the one the chain remembers)."""
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


class RecomputeChain:
    """The rebuild recipe of the last ``recompute=ghc`` write of one model chunk, shared by the
    chunk's GHC modules and final norms (:func:`link_recompute_chain`).

    A write hands its output and :class:`WideSource` to :meth:`remember`; the next reader asks
    :meth:`source_of` with the tensor it was given and gets the recipe only if that tensor *is*
    the output (object identity): a view, a detached alias or another tensor on the same storage
    gets none and is kept as usual. The output is held weakly and the recipe is dropped when it
    dies, so the chain keeps nothing alive that the output itself would not.
    """

    def __init__(self):
        self._last: tuple[weakref.ref, WideSource] | None = None

    def remember(self, output: torch.Tensor, source: WideSource) -> None:
        self._last = (weakref.ref(output, self._forget), source)

    def _forget(self, dead: weakref.ref) -> None:
        if self._last is not None and self._last[0] is dead:
            self._last = None

    def source_of(self, hidden: torch.Tensor) -> WideSource | None:
        """The recipe of ``hidden`` if it is the last write's output, else ``None``."""
        last = self._last
        return last[1] if last is not None and last[0]() is hidden else None


def link_recompute_chain(chunk: torch.nn.Module) -> None:
    """Give every member of one model chunk (the modules with a ``recompute_chain`` slot: GHC
    connections and final norms) one shared chain, if any of its connections runs
    ``recompute=ghc``; otherwise leave the slots empty."""
    members = [module for module in chunk.modules() if hasattr(module, "recompute_chain")]
    if any(getattr(module, "recompute", None) == "ghc" for module in members):
        chain = RecomputeChain()
        for module in members:
            module.recompute_chain = chain


class RecomputedFinalNorm(torch.autograd.Function):
    """``region(H)`` (the final GroupNorm and ``W_reduce``) keeping neither ``H`` (the last
    layer's output, rebuilt from its :class:`WideSource`) nor the GroupNorm's output: backward
    rebuilds ``H``, runs ``region`` again and back-propagates through it, the parameters'
    gradients accumulating as in Megatron-Core's reentrant recompute. The parameters are saved
    too, so that autograd refuses a backward after they changed in place."""

    @staticmethod
    def forward(ctx, wide, region, source, params):
        ctx.save_for_backward(*params, *source.tensors())
        ctx.meta = (region, source, wide.shape)
        return region(wide)

    @staticmethod
    def backward(ctx, grad):
        region, source, shape = ctx.meta
        ctx.saved_tensors  # noqa: B018 -- unpacking checks that nothing saved changed in place
        wide = source.rebuild().view(shape).detach().requires_grad_()
        with torch.enable_grad():
            out = region(wide)
        torch.autograd.backward(out, grad)
        return wide.grad, None, None, None
