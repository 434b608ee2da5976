"""Triton kernel that folds a LoRA update into a frozen weight in place, and its launcher.

    W[N, K] += sign · scale · B[N, R] · A[R, K]

Each program owns one (BLOCK_N, BLOCK_K) tile of W: it computes the tile of B·A with an fp32
accumulator, adds it to the tile of W read as fp32, and stores once, so the merged weight is
rounded to W's dtype exactly once (PEFT materialises B·A in fp32, scales it, then adds: three
extra passes over an fp32 copy of W). W may have any strides, so GPT-2's `Conv1D` weight (in, out)
is merged through its transposed view without a copy.
"""

import os

import torch
import triton
import triton.language as tl

from lora_engine.kernels.launch import INTERPRET as _INTERPRET
from lora_engine.kernels.launch import cdiv

# Under TRITON_INTERPRET=1 (CPU) autotuning would run every config on numpy: one small config there.


def _merge_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 16}, num_warps=4)]
    shapes = [
        # (BN, BK, BR, warps, stages): the op is one read and one write of W, plus r FMAs per element.
        (64, 128, 32, 4, 2),
        (128, 128, 32, 8, 2),
        (64, 256, 32, 8, 2),
        (128, 64, 32, 4, 2),
        (128, 128, 64, 8, 2),
        (64, 64, 64, 4, 2),
    ]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br}, num_warps=w, num_stages=s)
        for bn, bk, br, w, s in shapes
    ]


# The kernel updates W in place, so autotuning must restore W after every timed trial.
@triton.autotune(configs=_merge_configs(), key=["N", "K", "R", "K_CONTIG"], restore_value=["w_ptr"])
@triton.jit
def _merge_kernel(
    w_ptr, a_ptr, b_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scale,
    K_CONTIG: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """w[N, K] = round(w + scale · b[N, R] · a[R, K]) with an fp32 accumulator."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_k = offs_k < K

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + offs_r
        r_ok = rs < R
        b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + rs[None, :] * stride_br,
                    mask=mask_n[:, None] & r_ok[None, :], other=0.0)
        a = tl.load(a_ptr + rs[:, None] * stride_ar + offs_k.to(tl.int64)[None, :] * stride_ak,
                    mask=r_ok[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(b, a, acc, input_precision=PRECISION)

    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k.to(tl.int64)[None, :] * stride_wk
    mask = mask_n[:, None] & mask_k[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    merged = w + scale * acc
    if ROUND_BF16:
        merged = _round_to_bf16(merged)
    tl.store(w_ptrs, merged.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_to_bf16(x):
    """fp32 values rounded to the nearest bf16 (ties to even), still held in fp32 (finite x)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_supports(weight: torch.Tensor) -> bool:
    """True where `merge_lora_` runs the Triton kernel for this weight (else pure torch fp32 math)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return weight.dtype in _KERNEL_DTYPES and (weight.is_cuda or interpret)


def _rounds_bf16(dtype: torch.dtype) -> bool:
    """Whether a store to `dtype` must round to bf16 first (`_cast`'s ROUND_BF16): under the CPU
    interpreter the fp32 -> bf16 cast truncates, where the GPU's rounds to nearest even."""
    return _INTERPRET and dtype == torch.bfloat16


@triton.jit
def _cast(v, ptr, ROUND_BF16: tl.constexpr):
    """fp32 v converted (for a store) to the element type of ptr, rounding to nearest even."""
    if ROUND_BF16:
        v = _round_to_bf16(v)
    return v.to(ptr.dtype.element_ty)


def _operand_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    # tl.dot needs both operands in one dtype; bf16·bf16 and fp16·fp16 products are exact in fp32.
    if a.dtype == b.dtype and a.dtype in _KERNEL_DTYPES:
        return a.dtype
    return torch.float32


def _merge_torch_(weight, lora_a, lora_b, scale):
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = lora_b.to(weight.device, acc) @ lora_a.to(weight.device, acc)
    weight.copy_((weight.to(acc) + scale * delta).to(weight.dtype))


def merge_lora_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float):
    """In place: weight += scale · lora_b · lora_a, accumulated in fp32 and rounded once.

    weight: (N, K), any strides (a transposed view is updated in its own storage), fp16/bf16/fp32
    (fp64 and other dtypes, or CPU without TRITON_INTERPRET=1, use the same math in plain torch);
    lora_a: (R, K); lora_b: (N, R), any float dtype. Pass a negative scale to unmerge.
    Returns weight.
    """
    N, K = weight.shape
    R = lora_a.shape[0]
    if lora_a.shape != (R, K) or lora_b.shape != (N, R):
        raise ValueError(
            f"LoRA shapes do not fit weight {tuple(weight.shape)}: lora_a {tuple(lora_a.shape)} should be "
            f"({R}, {K}) and lora_b {tuple(lora_b.shape)} should be ({N}, {R})"
        )
    if N == 0 or K == 0 or R == 0:
        return weight
    if not kernel_supports(weight):
        _merge_torch_(weight, lora_a, lora_b, scale)
        return weight
    dtype = _operand_dtype(lora_a, lora_b)
    a = lora_a.to(device=weight.device, dtype=dtype)
    b = lora_b.to(device=weight.device, dtype=dtype)
    grid = lambda meta: (cdiv(K, meta["BLOCK_K"]), cdiv(N, meta["BLOCK_N"]))
    _merge_kernel[grid](
        weight, a, b, N, K, R,
        weight.stride(0), weight.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        float(scale),
        K_CONTIG=weight.stride(1) == 1,
        # The CPU interpreter's tl.dot returns garbage on bf16 operands (triton 3.9): fp32 there.
        UPCAST=_INTERPRET and dtype == torch.bfloat16,
        ROUND_BF16=_rounds_bf16(weight.dtype),
        # fp32 operands: exact fp32 products ("ieee"), not TF32, so the only rounding is the store.
        PRECISION="ieee",
    )
    return weight
