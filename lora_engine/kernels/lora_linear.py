"""Triton kernels of the fused LoRA linear, and their launchers.

Forward:  xa = dropout(x) Aᵀ, and y = s · xa Bᵀ + b (lora_down, one launch; cuBLAS then adds x Wᵀ onto y)
          or y = x Wᵀ + b + s · xa Bᵀ               (gemm_lora: the LoRA term is the GEMM's epilogue;
                                                     on Hopper the persistent TMA kernel, gemm_lora_tma,
                                                     which without dropout can also compute xa itself)
Backward: g  = dy B,  dB = s · dyᵀ xa,  db = Σ dy    (lora_dy: one read of dy)
          dA = s · gᵀ dropout(x)                    (lora_grad_a: one read of x)
          dx = dy W + s · mask ⊙ (g A)              (the LoRA term from lora_grad_a's tiles, then
                                                     cuBLAS adds dy W onto it; or gemm_lora fused,
                                                     on Hopper with dA in the same kernel's epilogue,
                                                     or with dropout the mask read as bits that
                                                     lora_grad_a wrote beside dA)

Ranks above 64, and fp32 x on a GPU (ops._wide): torch matmuls run the LoRA products; `dropout_apply` masks x, and
dx's LoRA term in place, with the same mask.

The dropout mask is Philox-4x32 in 7 rounds (`tl.randint4x(..., n_rounds=7)`, one call per 8 consecutive
elements of a row) keyed by a seed and the element's (row, column), so backward regenerates it instead of storing it
(within backward, lora_grad_a may hand it to the dx GEMM as bits, M·K/8 bytes, freed when backward returns). The
seed is a (1,) int64 device tensor the kernels load, so drawing it needs no host sync (nor a graph break under
torch.compile).
`keep = bits16 >= round(p · 2**16)`: an integer test, reproduced bit-for-bit by the torch reference.

A and B may be fp32 (as patch_model creates them) with x in half precision: every kernel rounds them
to x's dtype as it loads them, as the reference's `.to(x.dtype)` does, so no cast runs before a launch
(one exception, measured faster: the TMA GEMM that computes xa in its K-loop takes A cast to x's dtype).

Launches go through `launch.launch` (a cached direct launch) rather than `kernel[grid](...)`.

Reductions across programs (dB, db, g when N is split, dA when M is split) go through fp32
`atomic_add` into zeroed buffers; the launchers return those fp32 buffers.
"""

import functools
import os

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (newer triton); without them the TMA GEMM is simply not available
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from lora_engine.kernels.launch import INTERPRET as _INTERPRET
from lora_engine.kernels.launch import cdiv, launch, next_power_of_2, num_sms

# Under TRITON_INTERPRET=1 (CPU) autotuning would run every config on numpy: one small config there.
# Autotuning compiles and times every config for each new (M bucket, N, K, rank): worth it for a
# benchmark or a long run, not for a short job with varying shapes. Default: a shape heuristic.
_AUTOTUNE = os.environ.get("LORA_ENGINE_AUTOTUNE", "0") == "1"


def _rank_pad(r: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, next_power_of_2(r))


def _gemm_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    shapes = [
        # (BM, BN, BK, warps, stages): Hopper-sized tiles first, smaller ones for small or odd shapes.
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 256, 32, 8, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# Philox-4x32 rounds of the dropout mask. 7 is the fewest at which Philox-4x32 passes TestU01's BigCrush (Salmon et
# al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), and what the flash-attention dropout in PyTorch uses;
# Triton's default is 10. The mask's generator bounds the masked passes over x: on an H200, 7 rounds took 0.03-0.05x
# of the frozen base off the 8192x4096->1024 dropout rows (benchmarks/RESULTS.md). `ops.dropout_keep_mask` reads it.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def _philox_groups(seed, offs_m, k_start, BLOCK_K: tl.constexpr, row_len):
    """The four 32-bit Philox outputs (`randint4x`) of each group of eight consecutive columns, for rows offs_m and
    columns k_start + [0, BLOCK_K): counter m·ceil(row_len/8) + k//8; (len(offs_m), BLOCK_K // 8) each."""
    groups = (row_len + 7) // 8
    offs_g = k_start // 8 + tl.arange(0, BLOCK_K // 8)
    ctr = offs_m.to(tl.int64)[:, None] * groups + offs_g.to(tl.int64)[None, :]
    return tl.randint4x(seed, ctr, PHILOX_ROUNDS)


@triton.jit
def _keep_from_groups(r0, r1, r2, r3, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_M, BLOCK_K) keep-mask of `_philox_groups`' outputs: an element keeps when its 16-bit half >=
    threshold (= round(p·2¹⁶)). Halves h0..h7 = (r0 lo, r0 hi, r1 lo, ...); three levels of join put h[4c + 2b + a] at
    lane 4a + 2b + c of its group."""
    lo, hi = 0xFFFF, 16
    q0 = tl.join(tl.join(r0 & lo, r0 >> hi), tl.join(r1 & lo, r1 >> hi))
    q1 = tl.join(tl.join(r2 & lo, r2 >> hi), tl.join(r3 & lo, r3 >> hi))
    bits = tl.reshape(tl.join(q0, q1), (BLOCK_M, BLOCK_K))
    return bits.to(tl.int32) >= threshold


@triton.jit
def _keep_bytes_from_groups(r0, r1, r2, r3, threshold):
    """The same keep-mask packed a byte per group of eight columns (column c in bit c % 8), from the halves
    directly: half h[4c + 2b + a] is lane 4a + 2b + c (`_keep_from_groups`)."""
    lo, hi = 0xFFFF, 16
    t = threshold
    byte = ((r0 & lo) >= t).to(tl.int32) | (((r0 >> hi) >= t).to(tl.int32) << 4)
    byte |= (((r1 & lo) >= t).to(tl.int32) << 2) | (((r1 >> hi) >= t).to(tl.int32) << 6)
    byte |= (((r2 & lo) >= t).to(tl.int32) << 1) | (((r2 >> hi) >= t).to(tl.int32) << 5)
    byte |= (((r3 & lo) >= t).to(tl.int32) << 3) | (((r3 >> hi) >= t).to(tl.int32) << 7)
    return byte.to(tl.uint8)


@triton.jit
def _keep_mask(seed, offs_m, k_start, BLOCK_K: tl.constexpr, row_len, threshold):
    """Dropout keep-mask for rows offs_m, columns k_start + [0, BLOCK_K) of an (M, row_len) tensor.

    One Philox call (`randint4x`: four 32-bit outputs, eight 16-bit halves) covers eight consecutive
    columns: counter m·ceil(row_len/8) + k//8. k_start and BLOCK_K are multiples of 8, so groups
    never straddle tiles. Element keeps when its 16-bit half >= threshold (= round(p·2¹⁶)).
    """
    r0, r1, r2, r3 = _philox_groups(seed, offs_m, k_start, BLOCK_K, row_len)
    return _keep_from_groups(r0, r1, r2, r3, threshold, offs_m.shape[0], BLOCK_K)


@triton.jit
def _keep_bits(bits_ptr, stride_bits, offs_m, n0, PART_N: tl.constexpr, M, N):
    """The keep-mask of rows offs_m, columns n0 + [0, PART_N) from packed bits (M, ceil(N / 8)) uint8: column c is
    bit c % 8 of byte c // 8 (as `_keep_bytes_from_groups` packs them)."""
    offs_b = n0 // 8 + tl.arange(0, PART_N // 8)
    byte = tl.load(bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bits + offs_b[None, :],
                   mask=(offs_m < M)[:, None] & (offs_b < (N + 7) // 8)[None, :], other=0)
    lanes = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(lanes, (offs_m.shape[0], PART_N)) != 0


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a linear tile index in grouped order: GROUP_M row-tiles share b's tiles in L2."""
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + ((tile % group) % group_m), (tile % group) // group_m


@triton.jit
def _gemm_lora_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr, d_ptr, out_ptr,
    M, N, K, R, m_bucket,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cr, stride_dn, stride_dr,
    stride_om, stride_on,
    scale, seed_ptr, threshold,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = a[M, K] · b[N, K]ᵀ (+ bias[N]) + scale · mask ⊙ (c[M, R] · d[N, R]ᵀ)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, num_m, num_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        c = tl.load(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_r[None, :] * stride_cr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        dt = tl.load(d_ptr + offs_r[:, None] * stride_dr + offs_n.to(tl.int64)[None, :] * stride_dn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
            dt = dt.to(tl.float32)
        else:
            c = c.to(a_ptr.dtype.element_ty)
            dt = dt.to(a_ptr.dtype.element_ty)
        lora = tl.dot(c, dt, input_precision=PRECISION)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            lora = tl.where(_keep_mask(seed, offs_m, pid_n * BLOCK_N, BLOCK_N, N, threshold), lora, 0.0)
        acc += scale * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _tma_epilogue_part(
    part, out_desc, row0, n0, offs_m, c_op, dt, M, N, R,
    bias_ptr, x_ptr, stride_xm, stride_xn, da_ptr, bits_ptr, stride_bits,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_GRAD_A: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, R_PAD: tl.constexpr, PART_N: tl.constexpr, DEFER_DA: tl.constexpr,
):
    """Finish and store output columns [n0, n0 + PART_N) of a tile: bias, the LoRA term when masked (a tile of
    its own, PART_N wide: a whole one beside the accumulator spills; unmasked it is already in `part`) and
    dA's share from the x tile, then the store. Returns dA's share (PART_N, R_PAD) fp32 (zeros without
    HAS_GRAD_A); with DEFER_DA it is not added to da here (the caller sums a unit's shares first)."""
    offs_n = n0 + tl.arange(0, PART_N)
    mask_n = offs_n < N
    if HAS_DROPOUT:
        keep = _keep_bits(bits_ptr, stride_bits, offs_m, n0, PART_N, M, N)
        if HAS_LORA:
            lora = tl.dot(c_op, dt, input_precision=PRECISION)
            part += tl.where(keep, lora, 0.0)
    if HAS_BIAS:
        part += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_GRAD_A:
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_n.to(tl.int64)[None, :] * stride_xn,
                    mask=(offs_m < M)[:, None] & mask_n[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep, x, 0.0)
        da_t = tl.dot(tl.trans(x.to(c_op.dtype)), c_op, input_precision=PRECISION)
        if not DEFER_DA:
            _add_da(da_ptr, da_t, n0, N, R, R_PAD, PART_N)
    else:
        da_t = tl.zeros((PART_N, R_PAD), dtype=tl.float32)
    out_desc.store([row0, n0], part.to(out_desc.dtype))
    return da_t


@triton.jit
def _add_da(da_ptr, da_t, n0, N, R, R_PAD: tl.constexpr, PART_N: tl.constexpr):
    """da[:, n0:n0 + PART_N] += da_tᵀ (fp32 atomics; da is (R, N) contiguous)."""
    offs_n = n0 + tl.arange(0, PART_N)
    offs_r = tl.arange(0, R_PAD)
    tl.atomic_add(da_ptr + offs_r[None, :] * N + offs_n[:, None], da_t,
                  mask=(offs_r < R)[None, :] & (offs_n < N)[:, None], sem="relaxed")


@triton.jit
def _tma_mainloop(
    a_desc, b_desc, down_desc, pid_m, pid_n, K,
    WITH_DOWN: tl.constexpr, B_ROWS_OUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The K-loop of one output tile: acc = a[rows] · b[cols]ᵀ (fp32), and with WITH_DOWN also
    xa = a[rows] · down[:, K]ᵀ from the same a tiles."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
        if B_ROWS_OUT:
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K]).T
        else:
            b = b_desc.load([ki * BLOCK_K, pid_n * BLOCK_N])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if WITH_DOWN:
            xa = tl.dot(a, down_desc.load([0, ki * BLOCK_K]).to(a.dtype).T, xa, input_precision=PRECISION)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc, xa


@triton.jit
def _load_d_tile(d_ptr, n0, N, R, stride_dn, stride_dr, op_dtype: tl.constexpr, R_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """d[n0 : n0 + BLOCK_N]ᵀ, rounded to op_dtype: the (R_PAD, BLOCK_N) operand of a tile's LoRA product."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    dt = tl.load(d_ptr + offs_r[:, None] * stride_dr + offs_n.to(tl.int64)[None, :] * stride_dn,
                 mask=(offs_r < R)[:, None] & (offs_n < N)[None, :], other=0.0)
    return dt.to(op_dtype)


@triton.jit
def _column_halves(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A (ROWS, COLS) tensor's column halves [0, COLS/2) and [COLS/2, COLS)."""
    return tl.split(tl.permute(tl.reshape(t, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _tma_tile_epilogue(
    acc, c_op, dt, pid_m, pid_n, out_desc, M, N, R,
    bias_ptr, x_ptr, stride_xm, stride_xn, da_ptr, bits_ptr, stride_bits,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_GRAD_A: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPI_SPLIT: tl.constexpr, DEFER_DA: tl.constexpr,
):
    """Add the unmasked LoRA term c_op · dt to the tile's accumulator (dt: `_load_d_tile`'s), then finish and store
    the tile in EPI_SPLIT column parts (`_tma_epilogue_part`, each with its columns of dt when masked). Returns the
    parts' dA shares, four (BLOCK_N / EPI_SPLIT, R_PAD) fp32 tensors (zeros past EPI_SPLIT)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if HAS_LORA:
        if not HAS_DROPOUT:
            acc = tl.dot(c_op, dt, acc, input_precision=PRECISION)
    row0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    d0 = tl.zeros((BLOCK_N // EPI_SPLIT, R_PAD), dtype=tl.float32)
    d1 = d0
    d2 = d0
    d3 = d0
    if EPI_SPLIT == 1:
        d0 = _tma_epilogue_part(
            acc, out_desc, row0, n0, offs_m, c_op, dt, M, N, R, bias_ptr, x_ptr, stride_xm, stride_xn, da_ptr,
            bits_ptr, stride_bits, HAS_BIAS, HAS_LORA, HAS_DROPOUT, HAS_GRAD_A, UPCAST, PRECISION, R_PAD, BLOCK_N,
            DEFER_DA)
    elif EPI_SPLIT == 2:
        lo, hi = _column_halves(acc, BLOCK_M, BLOCK_N)
        dt_lo, dt_hi = _column_halves(dt, R_PAD, BLOCK_N)
        d0 = _tma_epilogue_part(
            lo, out_desc, row0, n0, offs_m, c_op, dt_lo, M, N, R, bias_ptr, x_ptr, stride_xm, stride_xn, da_ptr,
            bits_ptr, stride_bits, HAS_BIAS, HAS_LORA, HAS_DROPOUT, HAS_GRAD_A, UPCAST, PRECISION, R_PAD,
            BLOCK_N // 2, DEFER_DA)
        d1 = _tma_epilogue_part(
            hi, out_desc, row0, n0 + BLOCK_N // 2, offs_m, c_op, dt_hi, M, N, R, bias_ptr, x_ptr, stride_xm,
            stride_xn, da_ptr, bits_ptr, stride_bits, HAS_BIAS, HAS_LORA, HAS_DROPOUT, HAS_GRAD_A, UPCAST, PRECISION,
            R_PAD, BLOCK_N // 2, DEFER_DA)
    else:
        # Quarters: the halves' halves, in column order.
        h0, h1 = _column_halves(acc, BLOCK_M, BLOCK_N)
        q0, q1 = _column_halves(h0, BLOCK_M, BLOCK_N // 2)
        q2, q3 = _column_halves(h1, BLOCK_M, BLOCK_N // 2)
        e0, e1 = _column_halves(dt, R_PAD, BLOCK_N)
        t0, t1 = _column_halves(e0, R_PAD, BLOCK_N // 2)
        t2, t3 = _column_halves(e1, R_PAD, BLOCK_N // 2)
        d0 = _tma_epilogue_part(
            q0, out_desc, row0, n0, offs_m, c_op, t0, M, N, R, bias_ptr, x_ptr, stride_xm, stride_xn, da_ptr,
            bits_ptr, stride_bits, HAS_BIAS, HAS_LORA, HAS_DROPOUT, HAS_GRAD_A, UPCAST, PRECISION, R_PAD,
            BLOCK_N // 4, DEFER_DA)
        d1 = _tma_epilogue_part(
            q1, out_desc, row0, n0 + BLOCK_N // 4, offs_m, c_op, t1, M, N, R, bias_ptr, x_ptr, stride_xm, stride_xn,
            da_ptr, bits_ptr, stride_bits, HAS_BIAS, HAS_LORA, HAS_DROPOUT, HAS_GRAD_A, UPCAST, PRECISION, R_PAD,
            BLOCK_N // 4, DEFER_DA)
        d2 = _tma_epilogue_part(
            q2, out_desc, row0, n0 + BLOCK_N // 2, offs_m, c_op, t2, M, N, R, bias_ptr, x_ptr, stride_xm, stride_xn,
            da_ptr, bits_ptr, stride_bits, HAS_BIAS, HAS_LORA, HAS_DROPOUT, HAS_GRAD_A, UPCAST, PRECISION, R_PAD,
            BLOCK_N // 4, DEFER_DA)
        d3 = _tma_epilogue_part(
            q3, out_desc, row0, n0 + 3 * (BLOCK_N // 4), offs_m, c_op, t3, M, N, R, bias_ptr, x_ptr, stride_xm,
            stride_xn, da_ptr, bits_ptr, stride_bits, HAS_BIAS, HAS_LORA, HAS_DROPOUT, HAS_GRAD_A, UPCAST, PRECISION,
            R_PAD, BLOCK_N // 4, DEFER_DA)
    return d0, d1, d2, d3


@triton.jit
def _gemm_lora_tma_kernel(
    a_desc, b_desc, out_desc, down_desc, bias_ptr, c_ptr, d_ptr, x_ptr, da_ptr,
    M, N, K, R,
    stride_cm, stride_cr, stride_dn, stride_dr, stride_xm, stride_xn,
    scale, bits_ptr, stride_bits,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DOWN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_GRAD_A: tl.constexpr, B_ROWS_OUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EPI_SPLIT: tl.constexpr, CHUNK_N: tl.constexpr, CHUNK_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, PREFETCH: tl.constexpr,
):
    """out[M, N] = a[M, K] · bᵀ (+ bias[N]) + mask ⊙ (c' · d[N, R]ᵀ) with c' = round(scale · c[M, R]):
    persistent, with a, b, out (and down) moved by TMA descriptors. b is (N, K) when B_ROWS_OUT, else (K, N).

    HAS_DOWN (forward): c is computed, c' = round(scale · a · down[R, K]ᵀ) (xa), from the a tiles the K-loop
    loads, and the first column block stores it to c_ptr (M, R). The tiles are walked in units of CHUNK_N
    consecutive column blocks of one row block: c is computed in a unit's first tile and reused by the others
    (ceil(N / BLOCK_N) / CHUNK_N computations per row block instead of one per tile).
    HAS_DROPOUT (backward dx): the LoRA term (and x, for dA) is multiplied by the dropout keep-mask of an (M, N)
    tensor, read from packed bits at bits_ptr (`_keep_bits`, row stride stride_bits), which `lora_grad_a` wrote as it
    generated the mask for dA. (Generating the mask here instead stalls the tensor cores: nothing overlaps the
    epilogue in this kernel; benchmarks/RESULTS.md.)
    HAS_GRAD_A (backward dx): da[R, N] (fp32) += c'ᵀ · (mask ⊙ x[M, N]), from x tiles loaded in the epilogue:
    the dA pass over x rides on the dx GEMM. With CHUNK_M > 1 (HAS_GRAD_A only) the tiles are walked in units of
    CHUNK_M consecutive row blocks of one column block, and a unit adds its summed dA shares to da once.
    Each of NUM_PROGRAMS programs walks the units pid, pid + NUM_PROGRAMS, ... in grouped order. An unmasked
    LoRA product accumulates into the GEMM's own accumulator; the epilogue then runs in EPI_SPLIT column parts.
    PREFETCH: a tile's LoRA operands (c's rows, d's columns) are loaded before its K-loop and held in registers
    through it, their latency hidden behind it; else after it.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_chunks = tl.cdiv(num_n, CHUNK_N)
    op_dtype = tl.float32 if UPCAST else a_desc.dtype
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    if CHUNK_M > 1:
        # dx with dA: units of CHUNK_M consecutive row blocks of one column block; the unit's dA shares are summed
        # in registers and added to da once per unit (CHUNK_M times fewer atomics).
        num_row_chunks = tl.cdiv(num_m, CHUNK_M)
        for unit in range(tl.program_id(0), num_row_chunks * num_n, NUM_PROGRAMS):
            row_chunk, pid_n = _tile_coords(unit, num_row_chunks, num_n, GROUP_M)
            n0 = pid_n * BLOCK_N
            if PREFETCH:  # one column block a unit: d's columns once
                dt = _load_d_tile(d_ptr, n0, N, R, stride_dn, stride_dr, op_dtype, R_PAD, BLOCK_N)
            da0 = tl.zeros((BLOCK_N // EPI_SPLIT, R_PAD), dtype=tl.float32)
            da1 = da0
            da2 = da0
            da3 = da0
            for i in range(0, min(CHUNK_M, num_m - row_chunk * CHUNK_M)):
                pid_m = row_chunk * CHUNK_M + i
                if PREFETCH:
                    c_op = _load_c_op(c_ptr, pid_m, M, R, stride_cm, stride_cr, scale, op_dtype, R_PAD, BLOCK_M)
                acc, _ = _tma_mainloop(a_desc, b_desc, down_desc, pid_m, pid_n, K, False, B_ROWS_OUT, UPCAST,
                                       PRECISION, R_PAD, BLOCK_M, BLOCK_N, BLOCK_K)
                if not PREFETCH:
                    c_op = _load_c_op(c_ptr, pid_m, M, R, stride_cm, stride_cr, scale, op_dtype, R_PAD, BLOCK_M)
                    dt = _load_d_tile(d_ptr, n0, N, R, stride_dn, stride_dr, op_dtype, R_PAD, BLOCK_N)
                d0, d1, d2, d3 = _tma_tile_epilogue(
                    acc, c_op, dt, pid_m, pid_n, out_desc, M, N, R, bias_ptr, x_ptr, stride_xm, stride_xn, da_ptr,
                    bits_ptr, stride_bits, HAS_BIAS, HAS_LORA, HAS_DROPOUT, HAS_GRAD_A, UPCAST, PRECISION, R_PAD,
                    BLOCK_M, BLOCK_N, EPI_SPLIT, True)
                da0 += d0
                da1 += d1
                da2 += d2
                da3 += d3
            _add_da(da_ptr, da0, n0, N, R, R_PAD, BLOCK_N // EPI_SPLIT)
            if EPI_SPLIT > 1:
                _add_da(da_ptr, da1, n0 + BLOCK_N // EPI_SPLIT, N, R, R_PAD, BLOCK_N // EPI_SPLIT)
            if EPI_SPLIT > 2:
                _add_da(da_ptr, da2, n0 + 2 * (BLOCK_N // EPI_SPLIT), N, R, R_PAD, BLOCK_N // EPI_SPLIT)
                _add_da(da_ptr, da3, n0 + 3 * (BLOCK_N // EPI_SPLIT), N, R, R_PAD, BLOCK_N // EPI_SPLIT)
    else:
        for unit in range(tl.program_id(0), num_m * num_chunks, NUM_PROGRAMS):
            pid_m, chunk = _tile_coords(unit, num_m, num_chunks, GROUP_M)
            pid_n = chunk * CHUNK_N
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            c_op = tl.zeros((BLOCK_M, R_PAD), dtype=op_dtype)
            dt = tl.zeros((R_PAD, BLOCK_N), dtype=op_dtype)
            if PREFETCH and HAS_LORA:
                dt = _load_d_tile(d_ptr, pid_n * BLOCK_N, N, R, stride_dn, stride_dr, op_dtype, R_PAD, BLOCK_N)
                if not HAS_DOWN:
                    c_op = _load_c_op(c_ptr, pid_m, M, R, stride_cm, stride_cr, scale, op_dtype, R_PAD, BLOCK_M)
            acc, xa = _tma_mainloop(a_desc, b_desc, down_desc, pid_m, pid_n, K, HAS_DOWN, B_ROWS_OUT, UPCAST,
                                    PRECISION, R_PAD, BLOCK_M, BLOCK_N, BLOCK_K)
            if not PREFETCH and HAS_LORA:
                dt = _load_d_tile(d_ptr, pid_n * BLOCK_N, N, R, stride_dn, stride_dr, op_dtype, R_PAD, BLOCK_N)
                if not HAS_DOWN:
                    c_op = _load_c_op(c_ptr, pid_m, M, R, stride_cm, stride_cr, scale, op_dtype, R_PAD, BLOCK_M)
            if HAS_DOWN:
                c_st = (xa * scale).to(c_ptr.dtype.element_ty)
                if pid_n == 0:
                    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_r[None, :] * stride_cr, c_st,
                             mask=(offs_m < M)[:, None] & mask_r[None, :])
                c_op = c_st.to(op_dtype)
            _tma_tile_epilogue(acc, c_op, dt, pid_m, pid_n, out_desc, M, N, R, bias_ptr, x_ptr, stride_xm, stride_xn,
                               da_ptr, bits_ptr, stride_bits, HAS_BIAS, HAS_LORA, HAS_DROPOUT, HAS_GRAD_A, UPCAST,
                               PRECISION, R_PAD, BLOCK_M, BLOCK_N, EPI_SPLIT, False)
            if CHUNK_N > 1:
                for j in range(1, min(CHUNK_N, num_n - pid_n)):
                    if PREFETCH:
                        dt = _load_d_tile(d_ptr, (pid_n + j) * BLOCK_N, N, R, stride_dn, stride_dr, op_dtype, R_PAD,
                                          BLOCK_N)
                    acc, _ = _tma_mainloop(a_desc, b_desc, down_desc, pid_m, pid_n + j, K, False, B_ROWS_OUT,
                                           UPCAST, PRECISION, R_PAD, BLOCK_M, BLOCK_N, BLOCK_K)
                    if not PREFETCH:
                        dt = _load_d_tile(d_ptr, (pid_n + j) * BLOCK_N, N, R, stride_dn, stride_dr, op_dtype, R_PAD,
                                          BLOCK_N)
                    _tma_tile_epilogue(acc, c_op, dt, pid_m, pid_n + j, out_desc, M, N, R, bias_ptr, x_ptr,
                                       stride_xm, stride_xn, da_ptr, bits_ptr, stride_bits, HAS_BIAS, HAS_LORA,
                                       HAS_DROPOUT, HAS_GRAD_A, UPCAST, PRECISION, R_PAD, BLOCK_M, BLOCK_N, EPI_SPLIT,
                                       False)


@triton.jit
def _load_c_op(c_ptr, pid_m, M, R, stride_cm, stride_cr, scale, op_dtype: tl.constexpr, R_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """round(scale · c[rows of row block pid_m]) as the (BLOCK_M, R_PAD) operand of the epilogue's products."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    c = tl.load(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_r[None, :] * stride_cr,
                mask=(offs_m < M)[:, None] & (offs_r < R)[None, :], other=0.0)
    return (c.to(tl.float32) * scale).to(op_dtype)


_gemm_lora_autotuned = triton.autotune(configs=_gemm_configs(), key=["m_bucket", "N", "K", "R_PAD"])(
    _gemm_lora_kernel
)


def _gemm_heuristic(M: int, N: int) -> dict:
    """Tile config without autotuning: large Hopper tiles for large problems, smaller otherwise."""
    if _INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if M >= 2048 and N >= 2048:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if M >= 512 and N >= 512:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, out_ptr, b_ptr, bias_ptr, y_ptr,
    M, K, R, N, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or, stride_bn, stride_br, stride_ym, stride_yn,
    scale, seed_ptr, threshold,
    HAS_DROPOUT: tl.constexpr, HAS_UP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[M, R] = scale · (mask ⊙ x[M, K]) · a[R, K]ᵀ; one pass over x. With SPLIT_K, program (i, j) takes columns
    [j·k_per_split, (j+1)·k_per_split) and adds its share to a zeroed fp32 out with atomics. With HAS_UP (not with
    SPLIT_K), also y[M, N] = out · b[N, R]ᵀ (+ bias[N]) from out as rounded and stored."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    k_start = pid_s * k_per_split
    k_end = min(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < k_end
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m, k0, BLOCK_K, K, threshold), x, 0.0)
        at = tl.load(a_ptr + offs_r[:, None] * stride_ar + ks[None, :] * stride_ak,
                     mask=mask_r[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            at = at.to(tl.float32)
        else:
            at = at.to(x.dtype)
        acc = tl.dot(x, tl.trans(at), acc, input_precision=PRECISION)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_r[None, :] * stride_or
    if SPLIT_K:
        tl.atomic_add(out_ptrs, acc * scale, mask=mask_m[:, None] & mask_r[None, :], sem="relaxed")
    else:
        xa = (acc * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, xa, mask=mask_m[:, None] & mask_r[None, :])
    if HAS_UP:
        if UPCAST:
            xa = xa.to(tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + offs_n
            n_ok = ns < N
            bt = tl.load(b_ptr + offs_r[:, None] * stride_br + ns[None, :] * stride_bn,
                         mask=mask_r[:, None] & n_ok[None, :], other=0.0)
            y = tl.dot(xa, bt.to(xa.dtype), input_precision=PRECISION)
            if HAS_BIAS:
                y += tl.load(bias_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + ns[None, :] * stride_yn,
                     y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & n_ok[None, :])


@triton.jit
def _lora_dy_kernel(
    dy_ptr, b_ptr, xa_ptr, g_ptr, db_ptr, dbias_ptr,
    M, N, R, n_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,
    scale, g_scale,
    HAS_BIAS_GRAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """From one read of dy[M, N]: g[M, R] += g_scale·dy·b, db[N, R] += scale·dyᵀ·xa, dbias[N] += Σ_m dy (fp32)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_r = offs_r < R
    xa = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    g = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    n_start = pid_s * n_per_split
    n_end = min(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        ns = n0 + offs_n
        n_ok = ns < n_end
        dy = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=mask_m[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ns[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_ok[:, None] & mask_r[None, :], other=0.0)
        xa_op = xa.to(dy.dtype)
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
            xa_op = xa.to(tl.float32)
        else:
            b = b.to(dy.dtype)
        g = tl.dot(dy, b, g, input_precision=PRECISION)
        db_part = tl.dot(tl.trans(dy), xa_op, input_precision=PRECISION) * scale
        tl.atomic_add(db_ptr + ns[:, None] * R + offs_r[None, :], db_part,
                      mask=n_ok[:, None] & mask_r[None, :], sem="relaxed")
        if HAS_BIAS_GRAD:
            tl.atomic_add(dbias_ptr + ns, tl.sum(dy.to(tl.float32), axis=0), mask=n_ok, sem="relaxed")
    tl.atomic_add(g_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :], g * g_scale,
                  mask=mask_m[:, None] & mask_r[None, :], sem="relaxed")


@triton.jit
def _lora_grad_a_kernel(
    g_ptr, x_ptr, da_ptr, a_ptr, dx_ptr, bits_ptr,
    M, K, R, m_per_split,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_ar, stride_ak, stride_dxm, stride_dxk, stride_bits,
    scale, seed_ptr, threshold,
    HAS_DROPOUT: tl.constexpr, HAS_DX: tl.constexpr, HAS_BITS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """da[R, K] += scale · g[M, R]ᵀ · (mask ⊙ x[M, K]) over this program's slice of M (fp32), and,
    with HAS_DX, dx[M, K] = scale · mask ⊙ (g · a[R, K]) from the same tiles and the same mask; with HAS_BITS
    the mask itself, packed 8 columns a byte (`_keep_bytes_from_groups`) into bits[M, ceil(K / 8)]."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_r = offs_r < R
    if HAS_DX:
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        else:
            a = a.to(x_ptr.dtype.element_ty)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    m_start = pid_s * m_per_split
    m_end = min(m_start + m_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = m0 + offs_m
        m_ok = ms < m_end
        x = tl.load(x_ptr + ms.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            r0, r1, r2, r3 = _philox_groups(seed, ms, pid_k * BLOCK_K, BLOCK_K, K)
            keep = _keep_from_groups(r0, r1, r2, r3, threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, 0.0)
            if HAS_BITS:
                offs_b = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
                tl.store(bits_ptr + ms.to(tl.int64)[:, None] * stride_bits + offs_b[None, :],
                         _keep_bytes_from_groups(r0, r1, r2, r3, threshold),
                         mask=m_ok[:, None] & (offs_b < (K + 7) // 8)[None, :])
        g = tl.load(g_ptr + ms.to(tl.int64)[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                    mask=m_ok[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            g = g.to(tl.float32)
        else:
            g = g.to(x.dtype)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        if HAS_DX:
            dx = tl.dot(g, a, input_precision=PRECISION) * scale
            if HAS_DROPOUT:
                dx = tl.where(keep, dx, 0.0)
            tl.store(dx_ptr + ms.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                     dx.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & mask_k[None, :])
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], acc * scale,
                  mask=mask_r[:, None] & mask_k[None, :], sem="relaxed")


@triton.jit
def _dropout_apply_kernel(
    x_ptr, out_ptr, M, K, stride_xm, stride_xk, stride_om, stride_ok, seed_ptr, threshold,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[M, K] = keep ⊙ x[M, K] with the keep-mask of an (M, K) tensor (`_keep_mask`); out may be x itself."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    inside = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_k.to(tl.int64)[None, :]  # a column-major x of over 2**31 elements
    x = tl.load(x_ptr + rows * stride_xm + cols * stride_xk, mask=inside, other=0.0)
    keep = _keep_mask(tl.load(seed_ptr), offs_m, k0, BLOCK_K, K, threshold)
    tl.store(out_ptr + rows * stride_om + cols * stride_ok, tl.where(keep, x, 0.0), mask=inside)


# ----------------------------------------------------------------------------------------------
# Launchers. Shapes: x (M, K) any strides; weight (N, K); lora_a (R, K); lora_b (N, R).


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # The CPU interpreter's tl.dot returns garbage on bf16 operands (triton 3.9): compute in fp32 there.
    return _INTERPRET and dtype == torch.bfloat16


def dropout_threshold(p: float) -> int:
    """Integer threshold of the keep test `bits16 >= threshold` for drop probability p."""
    return int(round(p * (1 << 16)))


def dropout_apply(x, mask_seed, threshold, out=None):
    """keep ⊙ x for x (M, K), any strides, with the dropout keep-mask every kernel here generates for an (M, K)
    tensor (no 1/(1-p) scaling). out: (M, K), defaults to a new contiguous tensor; x itself to mask in place.
    The wide-rank path's masked x and masked dx term (ops), where cuBLAS runs the LoRA products."""
    M, K = x.shape
    out = torch.empty((M, K), device=x.device, dtype=x.dtype) if out is None else out
    if M == 0 or K == 0:
        return out
    block_m, block_k = (32, 32) if _INTERPRET else (32, 256)
    launch(_dropout_apply_kernel, (cdiv(M, block_m), cdiv(K, block_k)),
           (x, out, M, K, x.stride(0), x.stride(1), out.stride(0), out.stride(1), mask_seed, threshold),
           dict(BLOCK_M=block_m, BLOCK_K=block_k), num_warps=4)
    return out


def gemm_lora(a, b, bias, c, d, scale, out_dtype, *, mask_seed=None, threshold=0, da=None, da_x=None):
    """out = a · bᵀ (+ bias) + scale · mask ⊙ (c · dᵀ).

    a: (M, K), b: (N, K), bias: (N,) or None, c: (M, R) or None, d: (N, R); any strides. c and d are
    rounded to a's dtype for their product.
    mask_seed: a (1,) int64 tensor on the device (read in-kernel: no host sync); when given, the LoRA
    term is multiplied by the keep-mask of an (M, N) tensor.
    da, da_x: a zeroed fp32 (R, N) buffer and an (M, N) tensor: also da += scale · cᵀ · (mask ⊙ da_x)
    (backward dA, with c = g and da_x = x).
    Returns a new contiguous (M, N) tensor of out_dtype. Without a mask, runs the persistent TMA kernel where
    `tma_gemm_available(a, b)` (Hopper), with dA in its epilogue up to rank 128 (beyond, its shared memory runs
    out); elsewhere (and with a mask) the pointer kernel, then `lora_grad_a` for dA.
    """
    tma_da_fits = da is None or c is None or _rank_pad(c.shape[1]) <= _TMA_DA_MAX_RANK_PAD
    if mask_seed is None and tma_da_fits and tma_gemm_available(a, b):
        return gemm_lora_tma(a, b, bias, c, d, scale, out_dtype, da=da, da_x=da_x)
    if da is not None:
        lora_grad_a(c, da_x, scale, da, mask_seed=mask_seed, threshold=threshold)
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty((M, N), device=a.device, dtype=out_dtype)
    has_lora = c is not None
    R = c.shape[1] if has_lora else 1
    c_ = c if has_lora else a
    d_ = d if has_lora else b
    args = (
        a, b, bias if bias is not None else a, c_, d_, out,
        M, N, K, R, next_power_of_2(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c_.stride(0), c_.stride(1),
        d_.stride(0), d_.stride(1), out.stride(0), out.stride(1),
        float(scale), mask_seed if mask_seed is not None else out, threshold,
    )
    flags = dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_DROPOUT=mask_seed is not None,
                 UPCAST=_upcast(a.dtype), PRECISION=_precision(a.dtype), R_PAD=_rank_pad(R))
    if _AUTOTUNE:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        _gemm_lora_autotuned[grid](*args, **flags)
        return out
    config = _gemm_heuristic(M, N)
    num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
    grid = (cdiv(M, config["BLOCK_M"]) * cdiv(N, config["BLOCK_N"]),)
    launch(_gemm_lora_kernel, grid, args, flags | config, num_warps=num_warps, num_stages=num_stages)
    return out


def _tma_ready(t: torch.Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can address: one unit stride, 16-byte aligned base and row stride."""
    s0, s1 = t.stride()
    if (s1 != 1 and s0 != 1) or t.data_ptr() % 16:
        return False
    return ((s0 if s1 == 1 else s1) * t.element_size()) % 16 == 0


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Hopper or newer with Hopper-class shared memory: the kernel's tiles need 180,248 bytes a block in bf16
    (benchmarks/smem_tma.py), which consumer Blackwell (sm_120, ~100 KB) does not have."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 and _big_smem(device)


def tma_gemm_available(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `gemm_lora_tma` can run a · bᵀ: Hopper or newer with Hopper-class shared memory (or the interpreter),
    2-byte operands on a GPU, no empty operand, a with unit column stride, b with one unit stride, both
    TMA-addressable, output rows of 16-byte multiples. False while torch.compile traces: Dynamo cannot trace the data
    pointers' alignment."""
    if torch.compiler.is_compiling() or TensorDescriptor is None:
        return False
    if not (_INTERPRET or _has_tma(a.device)) or a.numel() == 0 or b.numel() == 0:
        return False
    # Its tiles are sized for 2-byte operands: compiled for sm_90, fp32 needs 262-328 KB of shared memory against
    # Hopper's 227 KB (benchmarks/smem_tma.py). The interpreter has no such limit and runs fp32 for the CPU tests.
    if a.element_size() != 2 and not _INTERPRET:
        return False
    return a.stride(1) == 1 and _tma_ready(a) and _tma_ready(b) and (b.shape[0] * a.element_size()) % 16 == 0


def _tma_config() -> dict:
    # (128, 256, 64), 8 warps, 3 stages, epilogue in halves: within 2-6% of cuBLAS with the rank-16 epilogue at
    # the four shapes of bench_kernels.py on an H100 (benchmarks/profile_gemm.py; flattening the tile loop
    # as Triton's persistent tutorial does cost 15-20% with the epilogue's loads). Halves with the dropout mask too:
    # read from bits, the masked epilogue in halves was 2-8 µs faster than in quarters at rank 16 and tied at rank 64
    # (H200; quarters paid while the epilogue generated the mask itself).
    if _INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, EPI_SPLIT=2, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, EPI_SPLIT=2, num_warps=8, num_stages=3)


# The forward's xa inside the TMA GEMM: computed once per unit of `_unit_blocks` consecutive column blocks of a row
# block, its extra MMA is (column blocks / chunk) times that of one bandwidth-bound pass over x. On an H100, r16
# and r64, one computation per tile paid at 4 and 8 column blocks (8192x4096->1024, 2048^2), not at 16 or 56; in
# units (8 at ->4096, 7 at ->14336) it pays at all four shapes of bench_kernels.py (benchmarks/RESULTS.md).
_DOWN_IN_GEMM_MAX_BLOCKS = 8  # computations per row block
_DOWN_IN_GEMM_MAX_RANK = 64
_UNIT_MAX_BLOCKS = 8


@functools.cache
def _unit_blocks(num_other: int, num_blocks: int, programs: int) -> int:
    """Blocks per unit of the TMA GEMM's tile walk (column blocks of a row block with a down-projection, row blocks
    of a column block with dA): the largest divisor of num_blocks (at most _UNIT_MAX_BLOCKS) whose units leave no
    program more tiles than walking tile by tile would."""
    per_program = cdiv(num_other * num_blocks, programs)
    return max(c for c in range(1, min(num_blocks, _UNIT_MAX_BLOCKS) + 1)
               if num_blocks % c == 0 and cdiv(num_other * (num_blocks // c), programs) * c <= per_program)


def down_in_gemm(a: torch.Tensor, b: torch.Tensor, r: int, *, tma_checked: bool = False) -> bool:
    """Whether `gemm_lora_tma(a, b, ..., down=A)` (A of rank r) should compute xa itself instead of a separate
    pass over a. tma_checked: the caller has already found `tma_gemm_available(a, b)` true (one check per call
    instead of two, on the host)."""
    if not (tma_checked or tma_gemm_available(a, b)):
        return False
    if not ((a.shape[1] * a.element_size()) % 16 == 0 and _rank_pad(r) <= _DOWN_IN_GEMM_MAX_RANK):
        return False
    return _down_computations(a.shape[0], b.shape[0], num_sms(a.device, 4)) <= _DOWN_IN_GEMM_MAX_BLOCKS


@functools.cache
def _down_computations(M: int, N: int, programs: int) -> int:
    """How many times per row block the TMA GEMM with a down-projection computes xa (column blocks / unit)."""
    cfg = _tma_config()
    num_n = cdiv(N, cfg["BLOCK_N"])
    return num_n // _unit_blocks(cdiv(M, cfg["BLOCK_M"]), num_n, programs)


# Validated TMA descriptors as attribute dicts with no base, by (dtype, shape, strides, block shape); `_descriptor`
# copies one and sets its base instead of running Triton's constructor (~3 µs of host time each, 4 per launch).
_DESCRIPTORS: dict = {}


def _descriptor(t: torch.Tensor, shape: tuple, strides: tuple, block: tuple) -> TensorDescriptor:
    """TensorDescriptor(t, shape, strides, block). Triton's checks run once per (dtype, shape, strides, block); t's
    16-byte alignment, the one check that depends on t itself, is the caller's (`tma_gemm_available` checks a and b,
    fresh outputs are aligned)."""
    key = (t.dtype, shape, strides, block)
    fields = _DESCRIPTORS.get(key)
    if fields is None:
        desc = TensorDescriptor(t, list(shape), list(strides), list(block))
        if hasattr(desc, "__dict__"):  # a plain dataclass in triton 3.6 and 3.9
            if len(_DESCRIPTORS) >= 4096:
                _DESCRIPTORS.clear()
            _DESCRIPTORS[key] = dict(vars(desc), base=None)  # no reference to t kept
        return desc
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(fields)
    desc.base = t
    return desc


@functools.lru_cache(maxsize=1024)
def _tma_plan(M: int, N: int, K: int, R: int, flags: tuple, resident: int, config: tuple | None) -> tuple:
    """Everything of a `gemm_lora_tma` launch that the shapes, flags and config decide (host time: computed once):
    (constexprs in signature order, num_warps, num_stages).
    flags: (HAS_BIAS, HAS_LORA, HAS_DOWN, HAS_DROPOUT, HAS_GRAD_A, B_ROWS_OUT, UPCAST, PRECISION)."""
    has_bias, has_lora, has_down, masked, has_da, rows_out, upcast, precision = flags
    cfg = dict(config) if config is not None else _tma_config()
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    per_sm = cfg.pop("programs_per_sm", 1)
    resident *= per_sm
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    num_m, num_n = cdiv(M, bm), cdiv(N, bn)
    chunk = cfg.pop("CHUNK_N", _unit_blocks(num_m, num_n, resident) if has_down else 1)
    chunk_m = cfg.pop("CHUNK_M", _unit_blocks(num_n, num_m, resident) if has_da else 1)
    if chunk_m > 1 and not has_da:
        raise ValueError("gemm_lora_tma: units of rows (CHUNK_M > 1) sum dA's shares: they need da and da_x")
    if chunk_m > 1 and (has_down or chunk > 1):
        raise ValueError("gemm_lora_tma: units of rows (CHUNK_M, with da) and of columns (CHUNK_N) exclude each other")
    # The LoRA operands loaded before the K-loop: 2-6 µs faster per GEMM at rank 16 for the forward's given xa and for
    # dx with dA (H200); no faster without dA, with the mask's bits or at rank 64, and beyond shared memory with a
    # down-projection or dA at rank 64 (benchmarks/RESULTS.md).
    prefetch = cfg.pop("PREFETCH", has_lora and not (has_down or masked) and (rows_out or has_da) and R <= 16)
    unknown = set(cfg) - {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPI_SPLIT"}
    if unknown:
        raise ValueError(f"gemm_lora_tma: unknown config keys {sorted(unknown)}; it takes BLOCK_M, BLOCK_N, BLOCK_K, "
                         "GROUP_M, EPI_SPLIT, CHUNK_N, CHUNK_M, PREFETCH, num_warps, num_stages and programs_per_sm")
    constexprs = dict(HAS_BIAS=has_bias, HAS_LORA=has_lora, HAS_DOWN=has_down, HAS_DROPOUT=masked,
                      HAS_GRAD_A=has_da, B_ROWS_OUT=rows_out, UPCAST=upcast, PRECISION=precision, R_PAD=_rank_pad(R),
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], EPI_SPLIT=cfg["EPI_SPLIT"],
                      CHUNK_N=chunk, CHUNK_M=chunk_m,
                      NUM_PROGRAMS=min(resident, cdiv(num_m, chunk_m) * cdiv(num_n, chunk)), PREFETCH=prefetch)
    return constexprs, num_warps, num_stages


# The largest rank pad whose dA epilogue fits Hopper's shared memory: 180,248 bytes at 128, 294,912 at 256 (bf16 and
# fp16, compiled for sm_90 by benchmarks/smem_tma.py; the H200 reported the same 294,912 when that launch failed).
_TMA_DA_MAX_RANK_PAD = 128


def gemm_lora_tma(a, b, bias, c, d, scale, out_dtype, *, down=None, mask_bits=None, da=None, da_x=None, config=None):
    """out = a · bᵀ (+ bias) + mask ⊙ (c' · dᵀ), c' = round(scale · c), through the persistent TMA kernel; the
    shapes and dtypes of `gemm_lora` (check `tma_gemm_available(a, b)` first).

    down: (R, K), with c None: c' = round(scale · a · downᵀ) is computed from the GEMM's own a tiles (the
    forward's xa without its pass over x); returns (out, c') with c' (M, R) of out_dtype.
    mask_bits: the dropout keep-mask of an (M, N) tensor on the LoRA term, as `lora_grad_a(..., keep_bits=)` packed
    it: (M, ceil(N / 8)) uint8 with unit column stride. (Unlike `gemm_lora`, this kernel does not generate the mask.)
    da, da_x: a zeroed fp32 (R, N) buffer and an (M, N) tensor: da += c'ᵀ · (mask ⊙ da_x) from x tiles the
    epilogue loads (backward dA beside dx).
    config: optional dict of the kernel's tile constexprs plus num_warps / num_stages (and programs_per_sm,
    default 1: persistent programs per SM; CHUNK_N and CHUNK_M, default `_unit_blocks`'s; PREFETCH, default
    `_tma_plan`'s), for benchmarks.
    """
    M, K = a.shape
    N = b.shape[0]
    has_down = down is not None
    if has_down:
        if c is not None:
            raise ValueError("gemm_lora_tma: pass c or down, not both")
        if down.dim() != 2 or down.shape[1] != K:
            raise ValueError(f"gemm_lora_tma: down must be (R, {K}) to match a's {K} columns, got {tuple(down.shape)}")
        # An fp32 A is cast first: loading it in fp32 in the K-loop and rounding there made the forward 3-5% slower
        # than this cast launch on an H200 (benchmarks/RESULTS.md).
        if down.dtype != a.dtype or not down.is_contiguous() or down.data_ptr() % 16:
            down = down.to(a.dtype, memory_format=torch.contiguous_format, copy=True)
        c = torch.empty((M, down.shape[0]), device=a.device, dtype=out_dtype)
    has_lora = c is not None
    if da is not None and not has_lora:
        raise ValueError("gemm_lora_tma: da needs the LoRA operands c and d")
    R = c.shape[1] if has_lora else 1
    if da is not None and _rank_pad(R) > _TMA_DA_MAX_RANK_PAD and not _INTERPRET:
        raise ValueError(f"gemm_lora_tma: dA in the epilogue at rank {R} (padded to {_rank_pad(R)}) needs more shared "
                         f"memory than a Hopper block has (294,912 bytes at 256, of 232,448; benchmarks/smem_tma.py): "
                         f"pass da only up to rank {_TMA_DA_MAX_RANK_PAD}, or leave it out and compute dA with "
                         "lora_grad_a (gemm_lora does so; lora_linear runs ranks above 64 as torch matmuls)")
    rows_out = b.stride(1) == 1
    masked = mask_bits is not None
    if masked and (tuple(mask_bits.shape) != (M, cdiv(N, 8)) or mask_bits.dtype != torch.uint8
                   or mask_bits.stride(1) != 1):
        raise ValueError(f"gemm_lora_tma: mask_bits must be a ({M}, {cdiv(N, 8)}) uint8 tensor with unit column "
                         f"stride, got {tuple(mask_bits.shape)} {mask_bits.dtype} with strides {mask_bits.stride()}")
    flags = (bias is not None, has_lora, has_down, masked, da is not None, rows_out, _upcast(a.dtype),
             _precision(a.dtype))
    constexprs, num_warps, num_stages = _tma_plan(
        M, N, K, R, flags, num_sms(a.device, 4), tuple(config.items()) if config else None)
    bm, bn, bk = constexprs["BLOCK_M"], constexprs["BLOCK_N"], constexprs["BLOCK_K"]
    out = torch.empty((M, N), device=a.device, dtype=out_dtype)
    b_desc = (_descriptor(b, (N, K), (b.stride(0), 1), (bn, bk)) if rows_out
              else _descriptor(b.t(), (K, N), (b.stride(1), 1), (bk, bn)))
    # A single row is contiguous whatever its row stride, but TMA reads the stride: pass the dense one.
    down_desc = _descriptor(down, (R, K), (K, 1), (constexprs["R_PAD"], bk)) if has_down else None
    c_ = c if has_lora else a
    d_ = d if has_lora else a
    x_ = da_x if da is not None else a
    launch(
        _gemm_lora_tma_kernel, (constexprs["NUM_PROGRAMS"],),
        (_descriptor(a, (M, K), (a.stride(0), 1), (bm, bk)), b_desc,
         _descriptor(out, (M, N), (N, 1), (bm, bn // constexprs["EPI_SPLIT"])),
         down_desc, bias if bias is not None else out, c_, d_, x_, da if da is not None else out,
         M, N, K, R, c_.stride(0), c_.stride(1), d_.stride(0), d_.stride(1), x_.stride(0), x_.stride(1),
         float(scale), mask_bits if masked else out, mask_bits.stride(0) if masked else 0),
        constexprs, num_warps=num_warps, num_stages=num_stages,
    )
    return (out, c) if has_down else out


def _grid_splits(length: int, block: int, other_blocks: int, waves: int, sms: int) -> int:
    """How many parts of whole blocks to cut [0, length) into so that, beside `other_blocks` programs on the grid's
    other axis, the grid covers the GPU's `sms` about `waves` times: at least 1, at most one a block (an empty range
    or axis gets 1). The kernels' K- (lora_down), N- (lora_dy) and M-splits (lora_grad_a); `_split_range` cuts."""
    return max(1, min(cdiv(length, block), cdiv(waves * sms, max(other_blocks, 1))))


def _split_range(length: int, block: int, splits: int) -> tuple:
    """[0, length) cut into at most `splits` parts of whole blocks: (part length, parts); one part at least, so an
    empty range still gets one column of programs. The kernels' K- (lora_down), N- (lora_dy) and M-splits
    (lora_grad_a)."""
    per = max(block, cdiv(cdiv(length, splits), block) * block)
    return per, max(1, cdiv(length, per))


@functools.lru_cache(maxsize=256)
def _down_plan(M: int, K: int, r_pad: int, masked: bool, split_ok: bool, sms: int) -> tuple:
    """`lora_down`'s (BLOCK_M, BLOCK_K, num_warps, splits of K). Unmasked, a read of x bound by bandwidth: enough row
    blocks to cover the GPU about twice. Masked, the Philox mask's integer work bounds it, and more programs hide more
    of it: where its output may be summed with fp32 atomics (split_ok), K is split. On an H200, bf16, µs, the masked
    pass at 8192×4096 went 40.1 -> 33.7 at rank 16 ((64, 64, 4), 8 splits), and at 2048² 16.1 -> 7.1 at rank 16 and
    20.6 -> 10.1 at rank 64 ((32, 128, 4), 4 splits); rank 64 at 8192 rows kept its tiles, unsplit (53.1 against
    52-59 split), as did the unmasked pass (21.2 against 19.6-25.2 split) (benchmarks/RESULTS.md)."""
    if _INTERPRET:
        return 32, 32, 4, (2 if masked and split_ok and K > 32 else 1)
    block_m = 64 if (r_pad <= 64 and cdiv(M, 64) >= 2 * sms) else 32
    block_k, warps, splits = (128 if r_pad <= 64 else 64), 4, 1
    if masked and split_ok and r_pad <= 32:
        block_m, block_k = 64, 64
        splits = min(8, _grid_splits(K, block_k, cdiv(M, block_m), 8, sms))
    elif masked and split_ok and r_pad == 64 and cdiv(M, block_m) < sms:
        splits = min(4, _grid_splits(K, block_k, cdiv(M, block_m), 2, sms))
    return block_m, block_k, warps, splits


def lora_down(x, lora_a, scale, out_dtype, *, mask_seed=None, threshold=0, lora_b=None, bias=None, tiles=None,
              splits=None, may_split=False):
    """xa = scale · (mask ⊙ x) · lora_aᵀ: x (M, K), lora_a (R, K) -> (M, R) of out_dtype.

    With lora_b (N, R) given, returns (xa, y) with y = xa · lora_bᵀ (+ bias) of shape (M, N), computed
    from xa as rounded to out_dtype (the LoRA term of the forward, one launch). lora_a and lora_b may be
    fp32 with x in half precision: they are rounded to x's dtype in-kernel.
    may_split (without lora_b): let the pass split K over programs that sum into xa with fp32 atomics where
    `_down_plan` says that pays; xa then comes back in fp32 whatever out_dtype, a sum in another order (not bitwise
    repeatable from run to run). An fp32 out_dtype allows it too. splits: how many, instead of the plan's choice.
    tiles: optional (BLOCK_M, BLOCK_K, num_warps) override, for benchmarks.
    """
    M, K = x.shape
    R = lora_a.shape[0]
    has_up = lora_b is not None
    split_ok = (may_split or out_dtype == torch.float32) and not has_up
    if splits is not None and splits < 1:
        raise ValueError(f"lora_down: splits must be at least 1, got {splits}")
    if splits is not None and splits > 1 and not split_ok:
        raise ValueError("lora_down: splitting K sums xa with fp32 atomics: it needs may_split=True or "
                         "out_dtype=torch.float32, and no lora_b")
    r_pad = _rank_pad(R)
    block_m, block_k, warps, auto_splits = _down_plan(M, K, r_pad, mask_seed is not None, split_ok,
                                                      num_sms(x.device, 4))
    if tiles is not None:
        block_m, block_k, warps = tiles
    k_per_split, num_splits = _split_range(K, block_k, splits if splits is not None else auto_splits)
    split_k = num_splits > 1
    out = (torch.zeros((M, R), device=x.device, dtype=torch.float32) if split_k
           else torch.empty((M, R), device=x.device, dtype=out_dtype))
    N = lora_b.shape[0] if has_up else 1
    y = torch.empty((M, N), device=x.device, dtype=out_dtype) if has_up else out
    b_ = lora_b if has_up else lora_a
    launch(
        _lora_down_kernel, (cdiv(M, block_m), num_splits),
        (x, lora_a, out, b_, bias if bias is not None else out, y, M, K, R, N, k_per_split,
         x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), out.stride(0), out.stride(1),
         b_.stride(0), b_.stride(1), y.stride(0), y.stride(1),
         float(scale), mask_seed if mask_seed is not None else out, threshold),
        dict(HAS_DROPOUT=mask_seed is not None, HAS_UP=has_up, HAS_BIAS=bias is not None, SPLIT_K=split_k,
             UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), R_PAD=r_pad, BLOCK_M=block_m,
             BLOCK_K=block_k, BLOCK_N=32 if _INTERPRET else 64),
        num_warps=warps, num_stages=3,
    )
    return (out, y) if has_up else out


# Shared memory of lora_dy's 256-row blocks by (rank pad, stages), bytes, for a 2-byte dy (the op's; the wide path
# takes fp32 x): compiled for sm_80, 86, 89 and 120 by benchmarks/smem_kernels.py (sm_90 needs as much or less). Three
# stages at rank 64 exceed the 101,376 bytes a block of an RTX 3090 / 4090 / 5090, A10 or L4 may use.
_DY_256_SMEM = {(32, 3): 73_728, (32, 2): 65_536, (64, 3): 106_496, (64, 2): 90_112}
_HOPPER_SMEM = 227 * 1024  # what "Hopper-class shared memory" asks of a block (an H100 / H200 / B200 allows 232,448)


@functools.lru_cache(maxsize=256)
def _dy_tiles(M: int, N: int, r_pad: int, sms: int, smem: int) -> tuple:
    """lora_dy's (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU of `sms` SMs whose blocks may use `smem` bytes of
    shared memory. Its fp32 atomics are dB's, ceil(M / BLOCK_M)·N·R, and g's, splits·M·R. At ranks 32 and 64 they
    bound the kernel where N is large: there 256-row blocks halve dB's and take fewer atomics in all (on an H200, 8192
    rows, rank 64: 61.5 -> 40.1 µs at N = 4096, 204 -> 149 at 14336; rank 32: 44.1 -> 29.5 at N = 4096; at N = 1024
    the counts tie, and 2048² has more with them, 15.1 against 17.2 and 9.4 against 14.2 µs at rank 64). Three stages
    where the block's shared memory holds them, else two (53.0 µs at rank 64, N = 4096, on the H200; consumer GPUs
    lack the 106,496 bytes of three, `_DY_256_SMEM`). Where 512-row blocks (two stages, Hopper-class shared memory)
    cut the count by a quarter more, they halve dB's again: 149 -> 120 µs (rank 64) and 107 -> 95 (rank 32; 144 on
    128 rows) at 8192×14336; at 8192×4096, where the counts tie, they were slower (40 against 50 µs). At rank 16 dy's
    read bounds it and 128 rows are as fast or faster (benchmarks/RESULTS.md)."""
    if _INTERPRET:
        return 32, 32, 4, 3
    if r_pad > 64:
        return 64, 64, 8, 3
    if r_pad in (32, 64):
        # lora_dy's splits of N cover the GPU about twice over; each adds M·R atomics to g.
        atomics = lambda bm: cdiv(M, bm) * N + _grid_splits(N, 64, cdiv(M, bm), 2, sms) * M
        if smem >= _HOPPER_SMEM and 4 * atomics(512) < 3 * atomics(256):
            return 512, 64, 8, 2
        if atomics(256) < atomics(128):
            for stages in (3, 2):
                if _DY_256_SMEM[r_pad, stages] <= smem:
                    return 256, 64, 8, stages
    return 128, 64, 4, 3


# Opt-in shared memory a block may use, by compute capability, where torch does not report it: CUDA's table
# (sm_80 and sm_87 163 KB, sm_90 and sm_100 227 KB, the other sm_8x / sm_12x 99 KB).
_SMEM_BY_CAPABILITY = {(8, 0): 166_912, (8, 7): 166_912, (9, 0): 232_448, (10, 0): 232_448}


@functools.cache
def _smem_per_block(device: torch.device) -> int:
    """Bytes of shared memory a block may use on `device` (opt-in; 0 off CUDA): 232,448 on an H100 / H200, 166,912 on
    an A100, 101,376 on most consumer GPUs."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    return smem if smem is not None else _SMEM_BY_CAPABILITY.get((props.major, props.minor), 101_376)


def _big_smem(device: torch.device) -> bool:
    """Whether a block may use Hopper-class shared memory (~227 KB)."""
    return _smem_per_block(device) >= _HOPPER_SMEM


def lora_dy(dy, lora_b, xa, scale, g_scale, g, db, dbias=None, *, tiles=None):
    """From dy (M, N), lora_b (N, R), xa (M, R), accumulate into zeroed fp32 buffers:
    g (M, R) += g_scale·dy·lora_b, db (N, R) += scale·dyᵀ·xa, dbias (N,) += Σ_m dy (when given).
    tiles: (BLOCK_M, BLOCK_N, num_warps[, num_stages]) instead of the default, for benchmarks."""
    M, N = dy.shape
    R = lora_b.shape[1]
    r_pad = _rank_pad(R)
    sms = num_sms(dy.device, 4)
    block_m, block_n, warps, stages = (*tiles, 3)[:4] if tiles is not None else _dy_tiles(
        M, N, r_pad, sms, _smem_per_block(dy.device))
    m_blocks = cdiv(M, block_m)
    n_per_split, splits = _split_range(N, block_n, _grid_splits(N, block_n, m_blocks, 2, sms))
    launch(
        _lora_dy_kernel, (m_blocks, splits),
        (dy, lora_b, xa, g, db, dbias if dbias is not None else db,
         M, N, R, n_per_split,
         dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1), xa.stride(0), xa.stride(1),
         float(scale), float(g_scale)),
        dict(HAS_BIAS_GRAD=dbias is not None, UPCAST=_upcast(dy.dtype), PRECISION=_precision(dy.dtype),
             R_PAD=r_pad, BLOCK_M=block_m, BLOCK_N=block_n),
        num_warps=warps, num_stages=stages,
    )


def _grad_a_tiles(r_pad: int, has_dx: bool, itemsize: int = 2, bits: bool = False) -> tuple:
    """(BLOCK_M, BLOCK_K, num_warps) of `lora_grad_a` for x of `itemsize` bytes, from a sweep of five tilings per
    mode on an H200 at 8192×4096, bf16, r16 and r64 (benchmarks/sweep_grad_a.py; one tiling per mode and rank class,
    so the fastest but for the masked dx term at r64, where (64, 256, 8) was 7 µs faster masked and slower unmasked).
    Against the (32, 128, 4) used before for all of them, r16 / r64 in µs: dA alone 27 against 30 / 35 against 52; dA
    with the mask and its bits 52 against 63 / 64 against 83; dA with dx's LoRA term 49 against 55 / 71 against 105;
    the same masked 80 against 85 / 119 against 184. At 2048² the chosen tilings are within ~1.5 µs of the old one.
    For fp32 x at ranks up to 64 the tile keeps the bytes of the bf16 one (half the columns; not timed), so its
    pipelined copies fit the shared memory of GPUs with ~100 KB per SM, as the (32, 128) tiles before did.
    With the mask's bits (Hopper's dropout) at ranks up to 32, (16, 256) blocks (4 warps), which `lora_grad_a` gives
    twice the splits of M: 48.5 / 13.4 / 8.2 µs at 8192×4096 / 8192×1024 / 2048² against 52.6 / 14.8 / 8.8 at rank
    16; at rank 32, with the op's fp32 g, 51.1 / 17.6 / 11.9 against 59.1 / 19.4 / 11.3. Rank 64 keeps (32, 256):
    (16, 128) was faster on a bf16 g alone, but the op's g is fp32 and 128-column blocks read it twice as often; the
    whole op at 8192×4096->1024 r64 was 0.02-0.03× of the base slower with them."""
    if _INTERPRET:
        return 32, 32, 4
    if r_pad > 64:
        return 32, 64, 8
    if bits and r_pad <= 32:
        block_m, block_k, warps = 16, 256, 4
    elif has_dx:
        block_m, block_k, warps = (32, 256, 4) if r_pad <= 16 else (64, 128, 4)
    else:
        block_m, block_k, warps = (32, 256, 8) if r_pad <= 16 else (32, 256, 4)
    return block_m, block_k * 2 // max(itemsize, 2), warps


def lora_grad_a(g, x, scale, da, *, mask_seed=None, threshold=0, lora_a=None, dx=None, keep_bits=None, tiles=None):
    """da (R, K) += scale · gᵀ · (mask ⊙ x) into a zeroed fp32 buffer: g (M, R), x (M, K).
    With lora_a (R, K) and dx (M, K) given, also writes dx = scale · mask ⊙ (g · lora_a).
    keep_bits: with mask_seed, an (M, ceil(K / 8)) uint8 tensor (unit column stride) that receives the mask packed
    8 columns a byte, column c in bit c % 8 of byte c // 8 (for `gemm_lora_tma(..., mask_bits=)`).
    tiles: optional (BLOCK_M, BLOCK_K, num_warps) override, for benchmarks."""
    M, K = x.shape
    R = g.shape[1]
    has_dx = dx is not None
    has_bits = keep_bits is not None
    if has_bits and (mask_seed is None or keep_bits.dtype != torch.uint8 or tuple(keep_bits.shape) != (M, cdiv(K, 8))
                     or keep_bits.stride(1) != 1):
        raise ValueError(f"lora_grad_a: keep_bits must be a ({M}, {cdiv(K, 8)}) uint8 tensor with unit column stride, "
                         "and needs mask_seed")
    r_pad = _rank_pad(R)
    block_m, block_k, warps = _grad_a_tiles(r_pad, has_dx, x.element_size(), has_bits) if tiles is None else tiles
    k_blocks = cdiv(K, block_k)
    # Splits of M so that the grid covers the GPU about twice, or four times with blocks of 16 rows.
    waves = 4 if block_m < 32 else 2
    m_per_split, splits = _split_range(M, block_m, _grid_splits(M, block_m, k_blocks, waves, num_sms(x.device, 4)))
    a_ = lora_a if has_dx else x
    dx_ = dx if has_dx else x
    bits_ = keep_bits if has_bits else x
    launch(
        _lora_grad_a_kernel, (k_blocks, splits),
        (g, x, da, a_, dx_, bits_, M, K, R, m_per_split,
         g.stride(0), g.stride(1), x.stride(0), x.stride(1), a_.stride(0), a_.stride(1),
         dx_.stride(0), dx_.stride(1), bits_.stride(0),
         float(scale), mask_seed if mask_seed is not None else da, threshold),
        dict(HAS_DROPOUT=mask_seed is not None, HAS_DX=has_dx, HAS_BITS=has_bits, UPCAST=_upcast(x.dtype),
             PRECISION=_precision(x.dtype), R_PAD=r_pad, BLOCK_M=block_m, BLOCK_K=block_k),
        num_warps=warps, num_stages=3,
    )
