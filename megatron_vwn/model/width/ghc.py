"""Generalized hyper-connections (GHC): the width connection of Virtual Width Networks.

Pure math, no parallelism. The wide residual state ``H`` is ``[s, b, D']`` viewed as
``[s, b, n, d_b]`` (``n`` segments of width ``d_b = D / m``). Around one sublayer ``T``
(docs/methods.md §1.2, VWN Eqs. 5-12):

    X  = Å^T H          read:  [n, d_b] -> [m, d_b], flattened to the backbone's x in R^D
    Z  = T(X)           the sublayer (its own pre-norm, no residual add), [m, d_b]
    H' = B^T Z + Â^T H  write: output blocks into slots plus the carried state

with ``A = [Å | Â]`` (``[n, m + n]``) and ``B`` (``[m, n]``). Dynamic GHC adds token-dependent
terms from one GEMM on the per-segment RMS-normalised state, in fp32:

    Hn   = RMSNorm_{d_b}(H)                        [s, b, n, d_b]
    C    = tanh(Hn [W_a | W_b] / tau)              [s, b, n, m + n + m]
    A(H) = S_a * C[..., :m+n] + A                  row i from segment i
    B(H) = (S_b * C[..., m+n:])^T + B              [s, b, m, n]

Dynamic GHC runs as two autograd functions with hand-written backward passes
(:class:`_DynamicRead`: norm, coefficients and read; :class:`_DynamicWrite`: the write), built to
pass over the ``r``-times-wider state as few times as the math allows; ``docs/vwn.md`` ("How GHC
is computed") says what that buys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.model.width import ghc_reference
from megatron_vwn.model.width.registry import WidthMember, register, require_single_segment


@dataclass(frozen=True)
class GHCInit:
    """Static coefficients at initialisation and how the dynamic part is scaled."""

    read: torch.Tensor
    """Å: [n, m]."""
    carry: torch.Tensor
    """Â: [n, n]."""
    write: torch.Tensor
    """B: [m, n]."""
    scale: float = 1.0
    """Initial value of the dynamic scales S_a, S_b."""
    scalar_scales: bool = False
    """HC's single learnable scalar per scale instead of VWN's elementwise matrices."""
    tau: float = 1.0
    """Temperature of the tanh."""


def vwn_init(m: int, n: int, d_b: int) -> GHCInit:
    """VWN Eqs. 11-12: read the first m segments, carry everything, slot j gets block j mod m;
    ``S = 1``, ``tau = sqrt(d_b)``. With ``n = m`` this is frac-connections' init (read, carry
    and write all identity)."""
    read = torch.zeros(n, m)
    read[:m] = torch.eye(m)
    write = torch.zeros(m, n)
    for j in range(n):
        write[j % m, j] = 1.0
    return GHCInit(read=read, carry=torch.eye(n), write=write, tau=math.sqrt(d_b))


def hc_init(n: int, sublayer_index: int) -> GHCInit:
    """Hyper-connections: sublayer k reads stream k mod n, writes to every stream, carries all;
    scalar scales 0.01, no temperature."""
    read = torch.zeros(n, 1)
    read[sublayer_index % n, 0] = 1.0
    return GHCInit(read=read, carry=torch.eye(n), write=torch.ones(1, n), scale=0.01,
                   scalar_scales=True, tau=1.0)


class _DynamicRead(torch.autograd.Function):
    """Coefficient path and read of dynamic GHC in one pass, with a hand-written backward.

    Forward, for the state ``H`` ``[T, n, d_b]``, in the dtype of ``weight`` (fp32 at least,
    whatever ``H``'s dtype):

        rstd  = (|H_i|^2 / d_b + eps)^-1/2                 [T, n, 1]
        coeff = static + scales * tanh(rstd * (H @ W))     [T, n, 2m + n]
        X     = read^T H                                   [T, m, d_b]

    where ``W = diag(g) W_proj / tau`` folds the RMSNorm weight and temperature into the GEMM,
    so no normalised copy of the wide state is made. It returns ``X`` and the write-side
    operands ``carry^T`` ``[T, n, n]`` and ``write^T`` ``[T, n, m]`` for :class:`_DynamicWrite`,
    as strided views of one coefficient tensor (batched GEMMs take them as they are).

    Why by hand: autograd's graph for these few lines makes about a dozen passes over
    wide-state-sized tensors in backward (the norm's backward, gradient sums, a concatenation)
    and runs its GEMMs in the slow transposed layouts. Here the state's gradient is one GEMM
    output updated in place (norm term, read term), the coefficient gradient is assembled once,
    and each GEMM uses its fast layout (hence ``W^T``). With ``recompute`` the output of ``H W``
    and of the tanh are not kept but recomputed in backward (the paper's memory saving).
    """

    @staticmethod
    def forward(ctx, state, weight, scales, static, m: int, eps: float, recompute: bool):
        tokens, n, d_b = state.shape
        x = state.to(weight.dtype)
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d_b)
        rstd = rstd.add_(eps).rsqrt_()  # [T, n, 1]
        logits = torch.mm(x.view(-1, d_b), weight.t()).view(tokens, n, -1)
        activated = torch.mul(logits, rstd).tanh_()
        coeffs = torch.addcmul(static, activated, scales).to(state.dtype)
        # Views: CPU and GPU batched GEMMs take strided operands, so nothing is copied.
        read = coeffs[..., :m]  # [T, n, m]
        carry_t = coeffs[..., m:m + n].transpose(1, 2)  # [T, n, n]
        write_t = coeffs[..., m + n:]  # [T, n, m]
        out = torch.bmm(read.transpose(1, 2), state)  # [T, m, d_b]
        saved = (None, None) if recompute else (logits, activated)
        ctx.save_for_backward(state, weight, scales, rstd, read, *saved)
        ctx.recompute = recompute
        return out, carry_t, write_t

    @staticmethod
    def backward(ctx, grad_out, grad_carry_t, grad_write_t):
        state, weight, scales, rstd, read, logits, activated = ctx.saved_tensors
        tokens, n, d_b = state.shape
        m = read.shape[-1]
        x = state.to(weight.dtype)
        if ctx.recompute:
            logits = torch.mm(x.view(-1, d_b), weight.t()).view(tokens, n, -1)
            activated = torch.mul(logits, rstd).tanh_()
        grad_out = grad_out.contiguous()
        grad = torch.empty_like(activated)  # d coeffs, [T, n, 2m + n], laid out as coeffs
        grad_read = torch.bmm(state, grad_out.transpose(1, 2))
        grad_carry = None if grad_carry_t is None else grad_carry_t.transpose(1, 2)
        for part, value in zip(grad.split([m, n, m], dim=-1),
                               (grad_read, grad_carry, grad_write_t), strict=True):
            if value is None:
                part.zero_()
            else:
                part.copy_(value)
        grad_static = grad.sum(0)
        grad_scales = torch.mul(grad, activated).sum(0)
        grad_logits = torch.ops.aten.tanh_backward(grad.mul_(scales), activated)
        grad_rstd = torch.mul(grad_logits, logits).sum(-1, keepdim=True)  # [T, n, 1]
        grad_logits.mul_(rstd)
        grad_logits = grad_logits.view(-1, weight.shape[0])
        grad_weight = torch.mm(grad_logits.t(), x.view(-1, d_b))
        grad_x = torch.mm(grad_logits, weight).view_as(x)
        grad_x.addcmul_(x, grad_rstd.mul_(rstd.pow(3)).div_(-d_b))  # d rstd / d H
        grad_state = grad_x.to(state.dtype).baddbmm_(read, grad_out)  # + d X / d H
        return grad_state, grad_weight, grad_scales, grad_static, None, None, None


class _DynamicWrite(torch.autograd.Function):
    """``H' = write^T Z + carry^T H`` per token: two batched GEMMs, the second accumulating in
    place, so nothing wide is concatenated or summed afterwards."""

    @staticmethod
    def forward(ctx, carry_t, write_t, blocks, state):
        out = torch.bmm(carry_t, state).baddbmm_(write_t, blocks)  # [T, n, d_b]
        ctx.save_for_backward(carry_t, write_t, blocks, state)
        return out

    @staticmethod
    def backward(ctx, grad):
        carry_t, write_t, blocks, state = ctx.saved_tensors
        grad = grad.contiguous()
        # d carry in the coefficients' own layout (a transposed view is what carry_t's grad is).
        grad_carry_t = torch.bmm(state, grad.transpose(1, 2)).transpose(1, 2)
        grad_write_t = torch.bmm(grad, blocks.transpose(1, 2))
        grad_blocks = torch.bmm(write_t.transpose(1, 2), grad)
        grad_state = torch.bmm(carry_t.transpose(1, 2), grad)
        return grad_carry_t, grad_write_t, grad_blocks, grad_state


def resolve_kernel(kernel: str) -> str:
    """``model.vwn.kernel``: ``auto`` is ``triton`` on CUDA when Triton imports, else ``torch``."""
    if kernel != "auto":
        return kernel
    if not torch.cuda.is_available():
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def _dynamic_functions(kernel: str):
    """The (read, write) autograd functions of a kernel; Triton is imported only here."""
    if kernel == "triton":
        from megatron_vwn.model.width.ghc_triton import TritonRead, TritonWrite

        return TritonRead, TritonWrite
    return _DynamicRead, _DynamicWrite


class GHC(torch.nn.Module):
    """One generalized hyper-connection module (static + optional dynamic coefficients).

    Parameters: ``static_read`` Å ``[n, m]``, ``static_carry`` Â ``[n, n]``, ``static_write``
    B ``[m, n]``; dynamic: ``norm_weight`` ``[d_b]``, ``proj`` ``[d_b, 2m + n]`` (W_a | W_b,
    zero-initialised), ``scale_a`` ``[n, m + n]`` and ``scale_b`` ``[n, m]`` (or ``[1]`` each
    for HC). Static coefficients and scales carry ``no_weight_decay``.
    """

    def __init__(self, m: int, n: int, d_b: int, init: GHCInit, dynamic: bool = True,
                 eps: float = 1e-6, recompute_coefficients: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, kernel: str = "torch",
                 recompute: str = "none"):
        super().__init__()
        self.m, self.n, self.d_b = m, n, d_b
        self.dynamic = dynamic
        self.eps = eps
        self.tau = init.tau
        self.recompute_coefficients = recompute_coefficients
        self.kernel = resolve_kernel(kernel)
        self.recompute = "coefficients" if recompute == "none" and recompute_coefficients \
            else recompute  # none | coefficients | ghc (ghc_recompute.py)
        self.recompute_chain = None  # recompute=ghc: shared by the chunk (link_recompute_chain)
        kwargs = dict(dtype=dtype, device=device)

        def param(value: torch.Tensor, decay: bool) -> torch.nn.Parameter:
            p = torch.nn.Parameter(value.to(**kwargs).clone())
            if not decay:
                p.no_weight_decay = True
            return p

        self.static_read = param(init.read, decay=False)
        self.static_carry = param(init.carry, decay=False)
        self.static_write = param(init.write, decay=False)
        if dynamic:
            scale_a = (1,) if init.scalar_scales else (n, m + n)
            scale_b = (1,) if init.scalar_scales else (n, m)
            self.norm_weight = param(torch.ones(d_b), decay=False)
            self.proj = param(torch.zeros(d_b, 2 * m + n), decay=True)
            self.scale_a = param(torch.full(scale_a, init.scale), decay=False)
            self.scale_b = param(torch.full(scale_b, init.scale), decay=False)

    def _fused_operands(self):
        """The parameters as :class:`_DynamicRead` takes them, in fp32 at least:
        ``W^T = (diag(g) W_proj / tau)^T`` ``[2m + n, d_b]`` (the layout whose GEMMs are fast
        both ways), and the scales and static coefficients laid out like the coefficients,
        ``[n, 2m + n]`` (row i: read | carry | write^T)."""
        n, m = self.n, self.m
        dtype = torch.promote_types(self.proj.dtype, torch.float32)
        weight = self.proj.to(dtype) * (self.norm_weight.to(dtype).unsqueeze(1) / self.tau)
        weight = weight.t().contiguous()
        scales = torch.cat([self.scale_a.to(dtype).expand(n, m + n),
                            self.scale_b.to(dtype).expand(n, m)], dim=1)
        static = torch.cat([self.static_read, self.static_carry, self.static_write.t()], dim=1)
        return weight, scales, static.to(dtype)

    def read(self, hidden: torch.Tensor):
        """``[s, b, D']`` -> backbone input ``[s, b, D]`` and what :meth:`write` needs."""
        s, b, _ = hidden.shape
        state = hidden.reshape(s * b, self.n, self.d_b)  # [T, n, d_b]
        if self.dynamic and self.recompute == "ghc" and torch.is_grad_enabled():
            from megatron_vwn.model.width import ghc_recompute

            chain = self.recompute_chain
            source = None if chain is None else chain.source_of(hidden)
            if source is not None and source.depth > 0:
                source = None  # keep the state once per layer: rebuild only from a kept one
            functions, operands = _dynamic_functions(self.kernel), self._fused_operands()
            x, carry_t, write_t = ghc_recompute.KeptRead.apply(
                state, *operands, self.m, self.eps, functions, source)
            return x.reshape(s, b, self.m * self.d_b), (state, carry_t, write_t,
                                                        (source, functions, operands))
        if self.dynamic:
            recompute = self.recompute != "none" and torch.is_grad_enabled()
            read_fn, _ = _dynamic_functions(self.kernel)
            x, carry_t, write_t = read_fn.apply(state, *self._fused_operands(), self.m,
                                                self.eps, recompute)
        else:
            carry_t, write_t = self.static_carry.t(), self.static_write.t()
            x = torch.matmul(self.static_read.t(), state)
        return x.reshape(s, b, self.m * self.d_b), (state, carry_t, write_t)

    def write(self, output: torch.Tensor, saved) -> torch.Tensor:
        """Sublayer output ``[s, b, D]`` -> new wide state ``[s, b, D']``."""
        state, carry_t, write_t, *rebuild = saved
        s, b, _ = output.shape
        blocks = output.reshape(s * b, self.m, self.d_b)  # [T, m, d_b]
        if rebuild:  # recompute=ghc: keep no coefficients; say how to rebuild the output
            from megatron_vwn.model.width import ghc_recompute

            source, functions, operands = rebuild[0]
            new = ghc_recompute.RecomputedWrite.apply(
                carry_t, write_t, blocks, state, *operands, self.m, self.eps, functions, source,
                (s, b, self.n * self.d_b))
            if self.recompute_chain is not None:
                self.recompute_chain.remember(new, ghc_recompute.WideSource(
                    state=state if source is None else None, parent=source, blocks=blocks,
                    operands=operands, m=self.m, eps=self.eps, functions=functions))
            return new
        if self.dynamic:
            _, write_fn = _dynamic_functions(self.kernel)
            new = write_fn.apply(carry_t, write_t, blocks, state)
        else:
            new = torch.matmul(write_t, blocks) + torch.matmul(carry_t, state)
        return new.reshape(s, b, self.n * self.d_b)

    def extra_repr(self) -> str:
        return (f"m={self.m}, n={self.n}, d_b={self.d_b}, dynamic={self.dynamic}, "
                f"tau={self.tau:g}, kernel={self.kernel}")


@register
class GHCMember(WidthMember):
    """``connection=ghc``: VWN's generalized hyper-connections (docs/vwn.md). Its exit is the
    GroupNorm + ``W_reduce`` when ``D' > D``; ``n = m`` keeps the state ``D``-wide."""

    name = "ghc"
    unit_width_is_backbone = True
    embeddings = ("auto", "wide", "factorized")
    group_norm_option = True
    ghc_kernels = True
    legacy_slots = {"attention_connection": "attention_ghc", "mlp_connection": "mlp_ghc"}
    hf_slot_names = ("attn_ghc", "mlp_ghc")
    hf_params = ("static_read", "static_carry", "static_write", "norm_weight", "proj",
                 "scale_a", "scale_b")
    reference = ghc_reference

    def embedding(self, vwn) -> str:
        return "none" if vwn.n == vwn.m else super().embedding(vwn)

    def reduce(self, vwn) -> str:
        return "ghc" if vwn.n > vwn.m else "none"

    def group_norm(self, vwn) -> bool:
        if vwn.n == vwn.m:
            return False
        if vwn.group_norm == "auto":
            return vwn.n % vwn.m == 0
        return vwn.group_norm == "on"

    def init(self, shape, sublayer_index: int) -> GHCInit:
        """The static coefficients of sublayer ``sublayer_index`` at initialisation."""
        return vwn_init(shape.m, shape.n, shape.d_b)

    def connection(self, shape, index, dtype, device=None):
        return GHC(shape.m, shape.n, shape.d_b, self.init(shape, index), dynamic=shape.dynamic,
                   eps=shape.norm_epsilon, recompute_coefficients=shape.recompute_coefficients,
                   dtype=dtype, device=device, kernel=shape.kernel, recompute=shape.recompute)

    def scale_params(self, vwn) -> int:
        """The dynamic scales ``S_a``, ``S_b`` of one module."""
        return vwn.n * (2 * vwn.m + vwn.n)

    def module_params(self, vwn, hidden_size: int) -> int:
        """One GHC module (docs/methods.md §1.4): static A, B ``n(2m+n)``; dynamic: the scales,
        projection ``d_b(2m+n)``, norm gain ``d_b``."""
        m, n, d_b = vwn.m, vwn.n, hidden_size // vwn.m
        static = n * (2 * m + n)
        if not vwn.dynamic:
            return static
        return static + self.scale_params(vwn) + d_b * (2 * m + n) + d_b

    def layer_params(self, vwn, hidden_size: int) -> int:
        return 2 * self.module_params(vwn, hidden_size)

    def module_flops(self, vwn, hidden_size: int) -> int:
        """Forward FLOPs of one GHC module per token (VWN Sec. 3.5): RMSNorm ``4rD``, dynamic
        coefficients ``2(2m+n)rD``, width connection ``2(m+n)rD``, depth connection ``2nD``."""
        m, n, d = vwn.m, vwn.n, hidden_size
        r_d = n * d // m
        norm_and_coeffs = (4 + 2 * (2 * m + n)) * r_d if vwn.dynamic else 0
        return norm_and_coeffs + 2 * (m + n) * r_d + 2 * n * d

    def layer_flops(self, vwn, hidden_size: int) -> int:
        return 2 * self.module_flops(vwn, hidden_size)

    def hf_config(self, vwn) -> dict:
        return {"vwn_scalar_scales": False}


@register
class HCMember(GHCMember):
    """``connection=hc``: hyper-connections as a GHC preset (``m = 1``, ``n`` replicated
    streams, scalar scales 0.01, summed at the exit; docs/width_family.md)."""

    name = "hc"
    embeddings = ("auto", "wide", "replicated")
    group_norm_option = False
    unit_width_is_backbone = False

    def validate(self, vwn) -> None:
        require_single_segment(vwn, "the number of streams")

    def embedding(self, vwn) -> str:
        return "replicated"  # wide is accepted as its old spelling

    def reduce(self, vwn) -> str:
        return "sum"

    def group_norm(self, vwn) -> bool:
        return False

    def output_init_scale(self, vwn) -> float:
        return 1.0 / math.sqrt(vwn.n)  # the summed streams would grow the output n-fold

    def init(self, shape, sublayer_index: int) -> GHCInit:
        return hc_init(shape.n, sublayer_index)

    def scale_params(self, vwn) -> int:
        return 2

    def hf_config(self, vwn) -> dict:
        return {"vwn_scalar_scales": True}


@register
class FracMember(GHCMember):
    """``connection=frac``: frac-connections as a GHC preset (``n = m``: the width split into
    ``m`` fractions, no expansion; docs/width_family.md)."""

    name = "frac"
    group_norm_option = False
    unit_width_is_backbone = False

    def validate(self, vwn) -> None:
        if vwn.n != vwn.m:
            raise ConfigError(
                f"model.vwn.connection=frac needs model.vwn.n = model.vwn.m (got m={vwn.m}, "
                f"n={vwn.n}); use connection=ghc for n > m"
            )
