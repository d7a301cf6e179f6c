"""Triton kernels for dynamic GHC: the same numerics as ``ghc._DynamicRead`` / ``_DynamicWrite``.

Imported only when ``model.vwn.kernel`` resolves to ``triton`` (``ghc.resolve_kernel``), so the
package never needs Triton. On a machine without a GPU the kernels run under Triton's
interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which is how CI checks
them against the torch functions (``tests/unit/test_ghc_triton.py``).

Layout, per token ``t`` (``T = s x b`` tokens; one program per token or per block of tokens):
the state ``H`` ``[T, n, d_b]``, the fused projection ``W^T`` ``[C, d_b]`` with ``C = 2m + n``,
``scales`` and ``static`` ``[n, C]`` (row i: read | carry | write^T), the coefficients
``[T, n, C]`` in the state's dtype. Every kernel walks ``d_b`` in chunks of ``BD`` and keeps the
per-token ``[n, C]`` tiles in registers; the coefficient path (norm statistics, GEMM, tanh) is
fp32 whatever the state's dtype (fp64 for an fp64 state, which only the tests use).

Passes over the wide state (``r`` times wider than the backbone), per GHC module:

- read forward: 2 reads of ``H`` (statistics + coefficient GEMM, then ``X = Å^T H`` once the
  coefficients are known; the second read of a token's few KB mostly hits cache), writes ``X``
  and the coefficients only;
- write forward: 1 read of ``H``, 1 write of ``H'``;
- write backward: 1 read of ``H`` and of ``dH'``, 1 write of ``dH``;
- read backward: 2 reads of ``H`` (the coefficient gradient needs every ``d_b`` before the
  state gradient can start), 1 write of ``dH``. Nothing of the coefficient path is kept from
  forward (only ``H`` and the parameters): it is recomputed in the first backward pass, which
  reads ``H`` anyway.

Tiles are padded to at least 16 in every dot dimension (what ``tl.dot`` needs on a GPU) and
masked, so any ``(m, n)`` runs, HC's ``m = 1`` and odd token counts included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_TOKENS = 16
"""Tokens per program in the read backward (partial sums of the parameter gradients)."""


def _pad(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def _chunk(d_b: int, n: int, m: int) -> int:
    """Width of the ``d_b`` chunks: 32 when the per-token tiles are large (``64 x 128`` at
    (8,64)), so the pipelined operand buffers of the backward stay well inside shared memory."""
    big = _pad(n) * _pad(2 * m + n) >= 64 * 128
    return min(32 if big else 64, _pad(d_b))


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 dots in full fp32 (not tf32): the torch reference runs them in fp32. Other dtypes:
    Triton's default (the option applies to fp32 operands only)."""
    return "ieee" if dtype == torch.float32 else None


def _launch(n: int, m: int) -> dict:
    """Warps and pipelining depth: more warps for the large per-token tiles (fewer registers per
    thread), two stages so the operand buffers fit in shared memory."""
    big = _pad(n) * _pad(2 * m + n) >= 64 * 128
    return dict(num_warps=8 if big else 4, num_stages=2)


@triton.jit
def _tanh(x):
    """tanh to rounding everywhere (the interpreter has no libdevice): its Taylor series near 0,
    where ``(1 - e) / (1 + e)`` would lose digits, that formula elsewhere. Eight terms: the
    first omitted one is below ``0.2^16 * 4e-4 < 3e-15`` of ``tanh(x)`` for ``|x| < 0.2``, so
    the series is exact to fp64 rounding too (the fp64 kernel tests rely on it); in fp32 the
    last three terms are below rounding and change nothing."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    far = tl.where(x < 0, -far, far)
    x2 = x * x
    tail = 62.0 / 2835.0 + x2 * (-1382.0 / 155925.0 + x2 * (21844.0 / 6081075.0
                                                            + x2 * (-929569.0 / 638512875.0)))
    near = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * tail))))
    return tl.where(a < 0.2, near, far)


@triton.jit
def _coefficient_logits(state_row, weight_ptr, n, m, C, d_b,
                        N_PAD: tl.constexpr, C_PAD: tl.constexpr, M_PAD: tl.constexpr,
                        BD: tl.constexpr, ACC: tl.constexpr):
    """One pass over a token's ``[n, d_b]``: sum of squares ``[N]``, ``H W`` ``[N, C]`` and its
    read columns ``[N, M]`` (fp32)."""
    rows = tl.arange(0, N_PAD)
    cols = tl.arange(0, C_PAD)
    reads = tl.arange(0, M_PAD)
    sumsq = tl.zeros([N_PAD], dtype=ACC)
    logits = tl.zeros([N_PAD, C_PAD], dtype=ACC)
    read_logits = tl.zeros([N_PAD, M_PAD], dtype=ACC)
    for d0 in range(0, d_b, BD):
        d = d0 + tl.arange(0, BD)
        d_ok = d < d_b
        h = tl.load(state_row + rows[:, None] * d_b + d[None, :],
                    mask=(rows < n)[:, None] & d_ok[None, :], other=0.0).to(ACC)
        w = tl.load(weight_ptr + cols[None, :] * d_b + d[:, None],
                    mask=(cols < C)[None, :] & d_ok[:, None], other=0.0)  # [BD, C]
        w_read = tl.load(weight_ptr + reads[None, :] * d_b + d[:, None],
                         mask=(reads < m)[None, :] & d_ok[:, None], other=0.0)  # [BD, M]
        sumsq += tl.sum(h * h, axis=1)
        logits += tl.dot(h, w, input_precision="ieee")
        read_logits += tl.dot(h, w_read, input_precision="ieee")
    return sumsq, logits, read_logits


@triton.jit
def _read_fwd_kernel(state_ptr, weight_ptr, scales_ptr, static_ptr, out_ptr, coeff_ptr,
                     n, m, C, d_b, eps,
                     N_PAD: tl.constexpr, C_PAD: tl.constexpr, M_PAD: tl.constexpr,
                     BD: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, N_PAD)
    cols = tl.arange(0, C_PAD)
    reads = tl.arange(0, M_PAD)
    row_ok = rows < n
    state_row = state_ptr + t * n * d_b
    sumsq, logits, read_logits = _coefficient_logits(state_row, weight_ptr, n, m, C, d_b,
                                                     N_PAD, C_PAD, M_PAD, BD, ACC)
    rstd = 1.0 / tl.sqrt(sumsq / d_b + eps)  # [N]
    tile = rows[:, None] * C + cols[None, :]
    tile_ok = row_ok[:, None] & (cols < C)[None, :]
    coeffs = (tl.load(static_ptr + tile, mask=tile_ok, other=0.0)
              + tl.load(scales_ptr + tile, mask=tile_ok, other=0.0)
              * _tanh(logits * rstd[:, None]))
    tl.store(coeff_ptr + t * n * C + tile, coeffs.to(coeff_ptr.dtype.element_ty), mask=tile_ok)
    # The read columns again, from their own accumulator (no register slicing in Triton).
    rtile = rows[:, None] * C + reads[None, :]
    rtile_ok = row_ok[:, None] & (reads < m)[None, :]
    read = (tl.load(static_ptr + rtile, mask=rtile_ok, other=0.0)
            + tl.load(scales_ptr + rtile, mask=rtile_ok, other=0.0)
            * _tanh(read_logits * rstd[:, None]))
    read_t = tl.trans(read.to(state_ptr.dtype.element_ty))  # [M, N], rounded like the torch path
    for d0 in range(0, d_b, BD):
        d = d0 + tl.arange(0, BD)
        d_ok = d < d_b
        h = tl.load(state_row + rows[:, None] * d_b + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        x = tl.dot(read_t, h, input_precision=PREC)  # [M, BD]
        tl.store(out_ptr + t * m * d_b + reads[:, None] * d_b + d[None, :],
                 x.to(out_ptr.dtype.element_ty), mask=(reads < m)[:, None] & d_ok[None, :])


@triton.jit
def _read_bwd_coeff_kernel(state_ptr, weight_ptr, scales_ptr, static_ptr, gout_ptr,
                           gct_ptr, gct_s0, gct_s1, gct_s2, gwt_ptr, gwt_s0, gwt_s1, gwt_s2,
                           glogit_ptr, grstd_ptr, read_ptr, gstatic_ptr, gscales_ptr,
                           T, n, m, C, d_b, eps,
                           HAS_GCT: tl.constexpr, HAS_GWT: tl.constexpr,
                           BT: tl.constexpr, N_PAD: tl.constexpr, C_PAD: tl.constexpr,
                           M_PAD: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """Per token: recompute the coefficient path, assemble d coeffs, write d logits (scaled by
    rstd), the norm term's factor and the read coefficients for the state pass; per program:
    partial sums of d static and d scales."""
    block = tl.program_id(0)
    rows = tl.arange(0, N_PAD)
    cols = tl.arange(0, C_PAD)
    row_ok = rows < n
    tile = rows[:, None] * C + cols[None, :]
    tile_ok = row_ok[:, None] & (cols < C)[None, :]
    scales = tl.load(scales_ptr + tile, mask=tile_ok, other=0.0)
    static = tl.load(static_ptr + tile, mask=tile_ok, other=0.0)
    carry_cols = (cols >= m) & (cols < m + n)
    write_cols = (cols >= m + n) & (cols < C)
    gstatic = tl.zeros([N_PAD, C_PAD], dtype=ACC)
    gscales = tl.zeros([N_PAD, C_PAD], dtype=ACC)
    for i in range(0, BT):
        t = (block * BT + i).to(tl.int64)
        if t < T:
            state_row = state_ptr + t * n * d_b
            sumsq = tl.zeros([N_PAD], dtype=ACC)
            logits = tl.zeros([N_PAD, C_PAD], dtype=ACC)
            grad = tl.zeros([N_PAD, C_PAD], dtype=ACC)  # d coeffs, read columns first
            for d0 in range(0, d_b, BD):
                d = d0 + tl.arange(0, BD)
                d_ok = d < d_b
                h = tl.load(state_row + rows[:, None] * d_b + d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
                w = tl.load(weight_ptr + cols[None, :] * d_b + d[:, None],
                            mask=(cols < C)[None, :] & d_ok[:, None], other=0.0)
                # d X laid out over the coefficient columns (zero beyond the m read columns).
                gx = tl.load(gout_ptr + t * m * d_b + cols[None, :] * d_b + d[:, None],
                             mask=(cols < m)[None, :] & d_ok[:, None], other=0.0)
                sumsq += tl.sum(h * h, axis=1)
                logits += tl.dot(h, w, input_precision="ieee")
                grad += tl.dot(h, gx.to(ACC), input_precision="ieee")
            rstd = 1.0 / tl.sqrt(sumsq / d_b + eps)
            act = _tanh(logits * rstd[:, None])
            if HAS_GCT:  # d carry^T, stored [j, i]: column m + j of row i
                grad += tl.load(gct_ptr + t * gct_s0 + (cols[None, :] - m) * gct_s1
                                + rows[:, None] * gct_s2,
                                mask=row_ok[:, None] & carry_cols[None, :],
                                other=0.0).to(ACC)
            if HAS_GWT:
                grad += tl.load(gwt_ptr + t * gwt_s0 + rows[:, None] * gwt_s1
                                + (cols[None, :] - m - n) * gwt_s2,
                                mask=row_ok[:, None] & write_cols[None, :],
                                other=0.0).to(ACC)
            gstatic += grad
            gscales += grad * act
            glogits = grad * scales * (1.0 - act * act)
            grstd = tl.sum(glogits * logits, axis=1)  # [N]
            tl.store(glogit_ptr + t * n * C + tile, glogits * rstd[:, None], mask=tile_ok)
            tl.store(grstd_ptr + t * n + rows, grstd * rstd * rstd * rstd / (-d_b), mask=row_ok)
            read = (static + scales * act).to(read_ptr.dtype.element_ty)
            tl.store(read_ptr + t * n * m + rows[:, None] * m + cols[None, :], read,
                     mask=row_ok[:, None] & (cols < m)[None, :])
    tl.store(gstatic_ptr + block * n * C + tile, gstatic, mask=tile_ok)
    tl.store(gscales_ptr + block * n * C + tile, gscales, mask=tile_ok)


@triton.jit
def _read_bwd_state_kernel(state_ptr, weight_ptr, gout_ptr, glogit_ptr, grstd_ptr, read_ptr,
                           gstate_ptr, gweight_ptr, T, n, m, C, d_b,
                           BT: tl.constexpr, N_PAD: tl.constexpr, C_PAD: tl.constexpr,
                           M_PAD: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                           ACC: tl.constexpr):
    """Per (token block, d chunk): ``dH = dlogits W + H * g_rstd + read dX`` and a partial
    ``dW^T = dlogits^T H`` summed over the block's tokens."""
    block = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = d < d_b
    rows = tl.arange(0, N_PAD)
    cols = tl.arange(0, C_PAD)
    reads = tl.arange(0, M_PAD)
    row_ok = rows < n
    w = tl.load(weight_ptr + cols[:, None] * d_b + d[None, :],
                mask=(cols < C)[:, None] & d_ok[None, :], other=0.0)  # [C, BD]
    gweight = tl.zeros([C_PAD, BD], dtype=ACC)
    for i in range(0, BT):
        t = (block * BT + i).to(tl.int64)
        if t < T:
            chunk = rows[:, None] * d_b + d[None, :]
            chunk_ok = row_ok[:, None] & d_ok[None, :]
            h = tl.load(state_ptr + t * n * d_b + chunk, mask=chunk_ok, other=0.0)
            gx = tl.load(gout_ptr + t * m * d_b + reads[:, None] * d_b + d[None, :],
                         mask=(reads < m)[:, None] & d_ok[None, :], other=0.0)
            glogits = tl.load(glogit_ptr + t * n * C + rows[:, None] * C + cols[None, :],
                              mask=row_ok[:, None] & (cols < C)[None, :], other=0.0)
            grstd = tl.load(grstd_ptr + t * n + rows, mask=row_ok, other=0.0)
            read = tl.load(read_ptr + t * n * m + rows[:, None] * m + reads[None, :],
                           mask=row_ok[:, None] & (reads < m)[None, :], other=0.0)
            hf = h.to(ACC)
            gstate = tl.dot(glogits, w, input_precision="ieee") + hf * grstd[:, None]
            gstate += tl.dot(read, gx, input_precision=PREC)
            tl.store(gstate_ptr + t * n * d_b + chunk, gstate.to(gstate_ptr.dtype.element_ty),
                     mask=chunk_ok)
            gweight += tl.dot(tl.trans(glogits), hf, input_precision="ieee")
    tl.store(gweight_ptr + block * C * d_b + cols[:, None] * d_b + d[None, :], gweight,
             mask=(cols < C)[:, None] & d_ok[None, :])


@triton.jit
def _write_fwd_kernel(ct_ptr, ct_s0, ct_s1, ct_s2, wt_ptr, wt_s0, wt_s1, wt_s2,
                      blocks_ptr, state_ptr, out_ptr, n, m, d_b,
                      N_PAD: tl.constexpr, M_PAD: tl.constexpr, BD: tl.constexpr,
                      PREC: tl.constexpr):
    """``H' = carry^T H + write^T Z`` for one token: one read of H, one write of H'."""
    t = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, N_PAD)
    reads = tl.arange(0, M_PAD)
    row_ok = rows < n
    carry_t = tl.load(ct_ptr + t * ct_s0 + rows[:, None] * ct_s1 + rows[None, :] * ct_s2,
                      mask=row_ok[:, None] & row_ok[None, :], other=0.0)  # [N, N]
    write_t = tl.load(wt_ptr + t * wt_s0 + rows[:, None] * wt_s1 + reads[None, :] * wt_s2,
                      mask=row_ok[:, None] & (reads < m)[None, :], other=0.0)  # [N, M]
    for d0 in range(0, d_b, BD):
        d = d0 + tl.arange(0, BD)
        d_ok = d < d_b
        chunk = rows[:, None] * d_b + d[None, :]
        chunk_ok = row_ok[:, None] & d_ok[None, :]
        h = tl.load(state_ptr + t * n * d_b + chunk, mask=chunk_ok, other=0.0)
        z = tl.load(blocks_ptr + t * m * d_b + reads[:, None] * d_b + d[None, :],
                    mask=(reads < m)[:, None] & d_ok[None, :], other=0.0)
        out = tl.dot(carry_t, h, input_precision=PREC)
        out += tl.dot(write_t, z, input_precision=PREC)
        tl.store(out_ptr + t * n * d_b + chunk, out.to(out_ptr.dtype.element_ty), mask=chunk_ok)


@triton.jit
def _write_bwd_kernel(ct_ptr, ct_s0, ct_s1, ct_s2, wt_ptr, wt_s0, wt_s1, wt_s2,
                      blocks_ptr, state_ptr, grad_ptr, gct_ptr, gwt_ptr, gblocks_ptr,
                      gstate_ptr, n, m, d_b,
                      N_PAD: tl.constexpr, M_PAD: tl.constexpr, BD: tl.constexpr,
                      PREC: tl.constexpr, ACC: tl.constexpr):
    """One pass over H, Z and dH' per token: d carry^T, d write^T, dZ and the carried dH."""
    t = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, N_PAD)
    reads = tl.arange(0, M_PAD)
    row_ok = rows < n
    read_ok = reads < m
    carry_t = tl.load(ct_ptr + t * ct_s0 + rows[:, None] * ct_s1 + rows[None, :] * ct_s2,
                      mask=row_ok[:, None] & row_ok[None, :], other=0.0)
    write_t = tl.load(wt_ptr + t * wt_s0 + rows[:, None] * wt_s1 + reads[None, :] * wt_s2,
                      mask=row_ok[:, None] & read_ok[None, :], other=0.0)
    gct = tl.zeros([N_PAD, N_PAD], dtype=ACC)
    gwt = tl.zeros([N_PAD, M_PAD], dtype=ACC)
    for d0 in range(0, d_b, BD):
        d = d0 + tl.arange(0, BD)
        d_ok = d < d_b
        chunk = rows[:, None] * d_b + d[None, :]
        chunk_ok = row_ok[:, None] & d_ok[None, :]
        zchunk = reads[:, None] * d_b + d[None, :]
        zchunk_ok = read_ok[:, None] & d_ok[None, :]
        h = tl.load(state_ptr + t * n * d_b + chunk, mask=chunk_ok, other=0.0)
        z = tl.load(blocks_ptr + t * m * d_b + zchunk, mask=zchunk_ok, other=0.0)
        g = tl.load(grad_ptr + t * n * d_b + chunk, mask=chunk_ok, other=0.0)
        gct += tl.dot(g, tl.trans(h), input_precision=PREC)
        gwt += tl.dot(g, tl.trans(z), input_precision=PREC)
        gz = tl.dot(tl.trans(write_t), g, input_precision=PREC)
        gh = tl.dot(tl.trans(carry_t), g, input_precision=PREC)
        tl.store(gblocks_ptr + t * m * d_b + zchunk, gz.to(gblocks_ptr.dtype.element_ty),
                 mask=zchunk_ok)
        tl.store(gstate_ptr + t * n * d_b + chunk, gh.to(gstate_ptr.dtype.element_ty),
                 mask=chunk_ok)
    tl.store(gct_ptr + t * n * n + rows[:, None] * n + rows[None, :],
             gct.to(gct_ptr.dtype.element_ty), mask=row_ok[:, None] & row_ok[None, :])
    tl.store(gwt_ptr + t * n * m + rows[:, None] * m + reads[None, :],
             gwt.to(gwt_ptr.dtype.element_ty), mask=row_ok[:, None] & read_ok[None, :])


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulators for every training dtype; fp64 for an fp64 state, which only the tests
    use: there the kernels and the torch functions agree to fp64 rounding, so a comparison
    between them checks the kernels' logic with a bound that no CPU or BLAS can reach."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _meta(n: int, m: int, d_b: int, dtype: torch.dtype) -> dict:
    acc = tl.float64 if _accumulator(dtype) == torch.float64 else tl.float32
    return dict(N_PAD=_pad(n), C_PAD=_pad(2 * m + n), M_PAD=_pad(m), BD=_chunk(d_b, n, m),
                PREC=_precision(dtype), ACC=acc, **_launch(n, m))


class TritonRead(torch.autograd.Function):
    """``ghc._DynamicRead`` in Triton: same arguments, outputs and gradients.

    Keeps only ``H`` and the parameters for backward (``recompute`` is accepted for the
    interface and has nothing left to drop): the coefficient path is rebuilt in the backward's
    first pass over ``H``, which it makes anyway.
    """

    @staticmethod
    def forward(ctx, state, weight, scales, static, m: int, eps: float, recompute: bool):
        state = state.contiguous()
        tokens, n, d_b = state.shape
        channels = weight.shape[0]
        out = torch.empty(tokens, m, d_b, dtype=state.dtype, device=state.device)
        coeffs = torch.empty(tokens, n, channels, dtype=state.dtype, device=state.device)
        meta = _meta(n, m, d_b, state.dtype)
        if tokens:
            _read_fwd_kernel[(tokens,)](state, weight, scales, static, out, coeffs, n, m,
                                        channels, d_b, eps, **meta)
        ctx.save_for_backward(state, weight, scales, static)
        ctx.m, ctx.eps = m, eps
        return out, coeffs[..., m:m + n].transpose(1, 2), coeffs[..., m + n:]

    @staticmethod
    def backward(ctx, grad_out, grad_carry_t, grad_write_t):
        state, weight, scales, static = ctx.saved_tensors
        tokens, n, d_b = state.shape
        m, channels = ctx.m, weight.shape[0]
        meta = _meta(n, m, d_b, state.dtype)
        precision = meta.pop("PREC")
        device = state.device
        blocks = triton.cdiv(tokens, _BLOCK_TOKENS)
        grad_out = grad_out.contiguous()
        acc = _accumulator(state.dtype)
        glogits = torch.empty(tokens, n, channels, dtype=acc, device=device)
        grstd = torch.empty(tokens, n, dtype=acc, device=device)
        read = torch.empty(tokens, n, m, dtype=state.dtype, device=device)
        gstatic = torch.zeros(blocks, n, channels, dtype=acc, device=device)
        gscales = torch.zeros_like(gstatic)
        gweight = torch.zeros(blocks, channels, d_b, dtype=acc, device=device)
        gstate = torch.empty_like(state)
        gct = grad_carry_t if grad_carry_t is not None else glogits  # any tensor: unused
        gwt = grad_write_t if grad_write_t is not None else glogits
        if tokens:
            _read_bwd_coeff_kernel[(blocks,)](
                state, weight, scales, static, grad_out, gct, *_strides3(gct), gwt,
                *_strides3(gwt), glogits, grstd, read, gstatic, gscales, tokens, n, m,
                channels, d_b, ctx.eps, HAS_GCT=grad_carry_t is not None,
                HAS_GWT=grad_write_t is not None, BT=_BLOCK_TOKENS, **meta)
            _read_bwd_state_kernel[(blocks, triton.cdiv(d_b, meta["BD"]))](
                state, weight, grad_out, glogits, grstd, read, gstate, gweight, tokens, n, m,
                channels, d_b, BT=_BLOCK_TOKENS, PREC=precision, **meta)
        else:
            gstate.zero_()
        dtype = weight.dtype
        return (gstate, gweight.sum(0).to(dtype), gscales.sum(0).to(dtype),
                gstatic.sum(0).to(static.dtype), None, None, None)


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class TritonWrite(torch.autograd.Function):
    """``ghc._DynamicWrite`` in Triton: ``H' = carry^T H + write^T Z`` per token."""

    @staticmethod
    def forward(ctx, carry_t, write_t, blocks, state):
        state, blocks = state.contiguous(), blocks.contiguous()
        tokens, n, d_b = state.shape
        m = blocks.shape[1]
        out = torch.empty_like(state)
        meta = _meta(n, m, d_b, state.dtype)
        del meta["C_PAD"], meta["ACC"]  # nothing accumulates across chunks
        if tokens:
            _write_fwd_kernel[(tokens,)](carry_t, *_strides3(carry_t), write_t,
                                         *_strides3(write_t), blocks, state, out, n, m, d_b,
                                         **meta)
        ctx.save_for_backward(carry_t, write_t, blocks, state)
        return out

    @staticmethod
    def backward(ctx, grad):
        carry_t, write_t, blocks, state = ctx.saved_tensors
        tokens, n, d_b = state.shape
        m = blocks.shape[1]
        grad = grad.contiguous()
        gct = torch.empty(tokens, n, n, dtype=carry_t.dtype, device=state.device)
        gwt = torch.empty(tokens, n, m, dtype=write_t.dtype, device=state.device)
        gblocks = torch.empty_like(blocks)
        gstate = torch.empty_like(state)
        meta = _meta(n, m, d_b, state.dtype)
        del meta["C_PAD"]
        if tokens:
            _write_bwd_kernel[(tokens,)](carry_t, *_strides3(carry_t), write_t,
                                         *_strides3(write_t), blocks, state, grad, gct, gwt,
                                         gblocks, gstate, n, m, d_b, **meta)
        return gct, gwt, gblocks, gstate
