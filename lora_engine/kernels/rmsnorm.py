"""Triton kernels of RMSNorm (as Llama, Mistral and Qwen2 compute it in transformers), and their launchers.

Forward:  rstd = 1 / sqrt(mean(x²) + eps)            (fp32, one per row; saved for backward)
          y    = w · round_x(x · rstd)                (the normalised row is rounded to x's dtype, then
                                                       multiplied by w in fp32 and rounded to y's dtype)
Backward: n  = x · rstd                               (recomputed from x and rstd)
          dx = rstd · (w·dy − n · mean(w·dy·n))
          dw = Σ_rows dy · n                          (fp32 partial sums, one row per program, summed by torch)

A row of up to MAX_BLOCK columns stays in registers (one read of x per pass); several short rows
share a program. Longer rows are processed in MAX_BLOCK-wide chunks: forward then reads x twice,
backward reads x and dy twice.
"""


import torch
import triton
import triton.language as tl

from lora_engine.kernels.launch import cdiv, launch, next_power_of_2, num_sms

from .merge import _cast, _rounds_bf16

# Widest row kept in registers in one piece (a power of 2); read at call time, so tests can lower it.
MAX_BLOCK = 8192


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    M, H, stride_xm, stride_ym, eps,
    ROWS: tl.constexpr, BLOCK_H: tl.constexpr, SINGLE: tl.constexpr,
    ROUND_X_BF16: tl.constexpr, ROUND_Y_BF16: tl.constexpr,
):
    """y[M, H] = w · round_x(x · rstd), rstd[M] = 1/sqrt(mean(x²) + eps); ROWS rows per program."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_H)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_ym
    if SINGLE:
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / H + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        n = _cast(x * rstd[:, None], x_ptr, ROUND_X_BF16).to(tl.float32)
        tl.store(y_rows + cols[None, :], _cast(w[None, :] * n, y_ptr, ROUND_Y_BF16), mask=mask)
    else:
        sq = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            c = h0 + cols
            x = tl.load(x_rows + c[None, :], mask=row_ok[:, None] & (c < H)[None, :], other=0.0).to(tl.float32)
            sq += x * x
        rstd = tl.math.rsqrt(tl.sum(sq, axis=1) / H + eps)
        for h0 in range(0, H, BLOCK_H):
            c = h0 + cols
            mask = row_ok[:, None] & (c < H)[None, :]
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
            n = _cast(x * rstd[:, None], x_ptr, ROUND_X_BF16).to(tl.float32)
            tl.store(y_rows + c[None, :], _cast(w[None, :] * n, y_ptr, ROUND_Y_BF16), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr,
    M, H, stride_dym, stride_xm, stride_dxm, n_progs,
    HAS_DX: tl.constexpr, HAS_DW: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
    SINGLE: tl.constexpr, ROUND_DX_BF16: tl.constexpr,
):
    """dx = rstd · (w·dy − n · mean(w·dy·n)), n = x · rstd; dw_ptr[pid, :] = Σ dy·n over the rows
    of this program (row blocks pid, pid + n_progs, ...). Chunked rows add into a zeroed dw_ptr."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    dw_row = dw_ptr + pid.to(tl.int64) * H
    if SINGLE:
        col_ok = cols < H
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    for rb in range(pid, tl.cdiv(M, ROWS), n_progs):
        rows = rb * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)[:, None]
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)[:, None]
        if SINGLE:
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows64 * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            n = x * rstd
            if HAS_DX:
                wdy = w[None, :] * dy
                mean_wdyn = tl.sum(wdy * n, axis=1)[:, None] / H
                dx = rstd * (wdy - n * mean_wdyn)
                tl.store(dx_ptr + rows64 * stride_dxm + cols[None, :], _cast(dx, dx_ptr, ROUND_DX_BF16), mask=mask)
            if HAS_DW:
                dw += dy * n
        else:
            if HAS_DX:
                acc = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
                for h0 in range(0, H, BLOCK_H):
                    c = h0 + cols
                    mask = row_ok[:, None] & (c < H)[None, :]
                    x = tl.load(x_ptr + rows64 * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(dy_ptr + rows64 * stride_dym + c[None, :], mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
                    acc += w[None, :] * dy * x
                mean_wdyn = tl.sum(acc, axis=1)[:, None] * rstd / H
            for h0 in range(0, H, BLOCK_H):
                c = h0 + cols
                mask = row_ok[:, None] & (c < H)[None, :]
                x = tl.load(x_ptr + rows64 * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + rows64 * stride_dym + c[None, :], mask=mask, other=0.0).to(tl.float32)
                n = x * rstd
                if HAS_DX:
                    w = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
                    dx = rstd * (w[None, :] * dy - n * mean_wdyn)
                    tl.store(dx_ptr + rows64 * stride_dxm + c[None, :], _cast(dx, dx_ptr, ROUND_DX_BF16), mask=mask)
                if HAS_DW:
                    part = tl.load(dw_row + c, mask=c < H, other=0.0)
                    tl.store(dw_row + c, part + tl.sum(dy * n, axis=0), mask=c < H)
    if SINGLE and HAS_DW:
        tl.store(dw_row + cols, tl.sum(dw, axis=0), mask=col_ok)


def _tiling(M: int, H: int) -> tuple[int, int, bool, int]:
    """(ROWS, BLOCK_H, SINGLE, num_warps): short rows are grouped so a program holds >= 2048 columns."""
    if MAX_BLOCK & (MAX_BLOCK - 1):
        raise ValueError(f"MAX_BLOCK must be a power of 2, got {MAX_BLOCK}")
    block_h = min(next_power_of_2(H), MAX_BLOCK)
    single = H <= block_h
    rows = max(1, min(2048 // block_h, 32, next_power_of_2(M))) if single else 1
    tile = rows * block_h
    num_warps = 16 if tile >= 8192 else 8 if tile >= 2048 else 4
    return rows, block_h, single, num_warps


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """(y, rstd) for x (M, H) with unit column stride (any row stride), weight (H,), any float dtypes:
    y a new contiguous (M, H) tensor of out_dtype, rstd (M,) fp32."""
    M, H = x.shape
    rows, block_h, single, num_warps = _tiling(M, H)
    y = torch.empty((M, H), device=x.device, dtype=out_dtype)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    launch(
        _rms_norm_fwd_kernel, (cdiv(M, rows),),
        (x, weight, y, rstd, M, H, x.stride(0), y.stride(0), float(eps)),
        dict(ROWS=rows, BLOCK_H=block_h, SINGLE=single,
             ROUND_X_BF16=_rounds_bf16(x.dtype), ROUND_Y_BF16=_rounds_bf16(out_dtype)),
        num_warps=num_warps,
    )
    return y, rstd


def rms_norm_backward(dy, x, weight, rstd, need_dx: bool = True, need_dw: bool = True):
    """(dx, dw) of RMSNorm from dy and x (M, H, unit column stride), weight (H,), rstd (M,) fp32.

    dx: a new (M, H) tensor of x's dtype, or None unless need_dx; dw: (H,) of weight's dtype, or
    None unless need_dw (per-program fp32 partial sums reduced by torch).
    """
    M, H = x.shape
    rows, block_h, single, num_warps = _tiling(M, H)
    row_blocks = cdiv(M, rows)
    # Without dw every row block gets its own program; with it, a few programs per SM each loop
    # over row blocks, so the partial sums stay small (n_progs × H fp32). Under the interpreter the
    # "SM count" is 1: few programs, so small test shapes exercise the loop over row blocks.
    n_progs = min(row_blocks, 4 * num_sms(x.device, 1)) if need_dw else row_blocks
    dx = torch.empty((M, H), device=x.device, dtype=x.dtype) if need_dx else None
    partial = None
    if need_dw:
        alloc = torch.empty if single else torch.zeros
        partial = alloc((n_progs, H), device=x.device, dtype=torch.float32)
    dx_ = dx if need_dx else x
    launch(
        _rms_norm_bwd_kernel, (n_progs,),
        (dy, x, weight, rstd, dx_, partial if need_dw else rstd,
         M, H, dy.stride(0), x.stride(0), dx_.stride(0), n_progs),
        dict(HAS_DX=need_dx, HAS_DW=need_dw, ROWS=rows, BLOCK_H=block_h, SINGLE=single,
             ROUND_DX_BF16=_rounds_bf16(x.dtype)),
        num_warps=num_warps,
    )
    dw = partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw
