"""Differentiable ops over the Triton kernels, each beside its pure-torch reference: the LoRA linear,
RMSNorm, the SwiGLU product, and the chunked linear + cross-entropy of a causal LM's head.

`lora_linear` runs the fused kernels on CUDA tensors of an Ampere (sm_80) or newer GPU (and on CPU tensors under
`TRITON_INTERPRET=1`); elsewhere it falls back to `lora_linear_reference`, which computes the
same function (the same dropout mask included) with plain torch ops.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

__all__ = [
    "lora_linear",
    "lora_linear_reference",
    "dropout_keep_mask",
    "draw_dropout_seed",
    "kernels_available",
    "set_base_gemm",
    "rms_norm",
    "rms_norm_reference",
    "silu_mul",
    "silu_mul_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
]

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85


def _mul32(a: torch.Tensor | int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a·b for unsigned 32-bit values held in int64 tensors."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = a * b_hi  # < 2**48: no int64 overflow
    u = a * b_lo
    hi = (t + (u >> 16)) >> 16
    lo = (((t & 0xFFFF) << 16) + u) & _MASK32
    return hi, lo


def _philox4x(seed: int, offsets: torch.Tensor, rounds: int) -> tuple[torch.Tensor, ...]:
    """Triton's `tl.randint4x(seed, offsets, rounds)` (Philox-4x32-`rounds`) in int64 arithmetic."""
    c0 = offsets & _MASK32
    c1 = offsets >> 32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mul32(c2, torch.full_like(c2, _PHILOX_ROUND_B))
        hi_a, lo_a = _mul32(c0, torch.full_like(c0, _PHILOX_ROUND_A))
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Bool (rows, cols) keep-mask, identical to the one the kernels generate for element (m, k):
    Philox-4x32 (the kernels' `PHILOX_ROUNDS`, 7) at counter m·ceil(cols/8) + k//8, 16-bit half h[4c+2b+a] of its
    outputs at lane k%8 = 4a+2b+c (the order tl.join builds), keep if that half >= round(p·2¹⁶)."""
    from lora_engine.kernels.lora_linear import PHILOX_ROUNDS, dropout_threshold

    groups = (cols + 7) // 8
    ctr = torch.arange(rows, device=device, dtype=torch.int64)[:, None] * groups + torch.arange(
        groups, device=device, dtype=torch.int64
    )
    r0, r1, r2, r3 = _philox4x(seed, ctr, int(PHILOX_ROUNDS.value))
    j = lambda a, b: torch.stack([a, b], dim=-1)  # tl.join
    q0 = j(j(r0 & 0xFFFF, r0 >> 16), j(r1 & 0xFFFF, r1 >> 16))
    q1 = j(j(r2 & 0xFFFF, r2 >> 16), j(r3 & 0xFFFF, r3 >> 16))
    bits = j(q0, q1).reshape(rows, 8 * groups)[:, :cols]
    return bits >= dropout_threshold(p)


def draw_dropout_seed(device: torch.device | str | None = None) -> int:
    """A dropout seed from torch's generator for `device` (default: the CPU's), so `torch.manual_seed`
    repeats a run. lora_linear draws from the generator of its input's device."""
    return int(_draw_seed_tensor(device).item())


def _draw_seed_tensor(device: torch.device | str | None = None) -> torch.Tensor:
    """The same draw as `draw_dropout_seed`, kept as a (1,) int64 tensor on `device`, where that device's
    generator draws it: no `.item()` (so `torch.compile` traces it without a graph break) and no copy
    from pageable host memory (which may wait for the stream, stalling the host every forward)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


# How the frozen base GEMM runs inside `lora_linear`:
#   "cublas": a Triton kernel writes the LoRA term (with bias, or the dropout mask in backward),
#             then cuBLAS accumulates x·Wᵀ onto it in place (addmm_, beta=1);
#   "triton": one Triton GEMM with the LoRA term in its epilogue (y written once): the persistent TMA
#             kernel on Hopper (which without dropout also takes dA in the backward behind a long enough K-loop,
#             and xa in the forward where that pays), a pointer-based kernel elsewhere;
#   "auto" (default): "triton" where the TMA kernel runs (Hopper, TMA-aligned, at least _TRITON_MIN_MACS
#             multiply-adds), else "cublas". On an H100 the TMA kernel with the epilogue is within 2-6% of cuBLAS
#             alone, which saves the extra write and read of the LoRA term; the pointer kernel is 1.1-1.3x slower
#             than cuBLAS (benchmarks/RESULTS.md).
# With dropout, the TMA kernel takes dx's masked LoRA term from the keep-mask as bits, which dA's pass over x
# (`lora_grad_a`) writes as it generates the mask (no M×in term written and read back, and the mask generated once in
# backward). On an H200, whole op at p=.05, against the cuBLAS path: a tie at rank 16, ahead at rank 64 (->1024 1.92x
# of the base against 2.15x); and a tie with the mask generated in the TMA kernel's epilogue (dA beside it) behind the
# long K-loop of ->14336, which it replaced (benchmarks/RESULTS.md). _MASK_BITS = False sends the masked term to the
# cuBLAS path instead (for benchmarks).
BASE_GEMMS = ("auto", "cublas", "triton")
_base_gemm = os.environ.get("LORA_ENGINE_BASE_GEMM", "auto")
_TRITON_MIN_MACS = 1 << 30
_MASK_BITS = True
# Without dropout, dA rides in the TMA dx GEMM's epilogue where that GEMM's K-loop (dy's columns) is at least this
# long; behind a shorter one its own pass over x (`lora_grad_a`) costs less. On an H200, bf16, 8192 rows of x by 4096:
# behind a K-loop of 1024 the epilogue's dA cost 22 / 31 / 40 µs at rank 16 / 32 / 64 against 19 / 22 / 28 for the
# pass; behind 2048 (2048 rows) and 4096 the epilogue was cheaper at every rank (benchmarks/RESULTS.md).
_DA_IN_EPILOGUE_MIN_K = 2048
# Above this rank the LoRA products are GEMMs of their own, which the fused kernels (built for skinny, bandwidth-bound
# products) run slower than cuBLAS; at rank 256 the TMA dx GEMM with dA also needed more shared memory than an H200
# has. There the op runs them as torch matmuls (`_wide_forward`, `_wide_backward`) around the kernels' dropout mask,
# the LoRA terms added onto y and dx in place. On an H200, whole op × the frozen base at p=0, fused / matmuls: r128
# 1.48 / 1.20-1.23 at 8192x4096->4096, 2.25 / 1.57 at ->1024, 1.34 / 1.15 at ->14336 (PEFT-style 1.34, 1.76, 1.25);
# r64 1.14-1.16 / 1.16-1.17, 1.38-1.41 / 1.53, 1.09-1.10 / 1.12 (benchmarks/RESULTS.md).
_WIDE_RANK = 64


def _wide(x2: torch.Tensor, r: int) -> bool:
    """Whether the op runs the LoRA products as torch matmuls (`_wide_forward`, `_wide_backward`): above _WIDE_RANK,
    and for fp32 x on a GPU. The kernels' tiles are sized for 2-byte operands: compiled for sm_90 (triton 3.9, on the
    CPU), the TMA GEMM needs 180,248 bytes of shared memory in bf16 and 327,696 in fp32, past Hopper's 232,448 a block;
    lora_dy's 512-row blocks would need 2 × 128 KB; and fp32 GEMMs gain nothing from Triton over cuBLAS. (Under the
    interpreter fp32 stays on the kernels, which is how the CPU tests check them; `test_gpu_fp32_x_against_fp64`
    checks the fp32 routing on a GPU.)"""
    return r > _WIDE_RANK or (x2.dtype == torch.float32 and x2.is_cuda)


def set_base_gemm(name: str) -> None:
    """Choose how lora_linear runs the base GEMM: "auto" (default), "cublas" or "triton" (fully fused)."""
    global _base_gemm
    if name not in BASE_GEMMS:
        raise ValueError(f"unknown base GEMM {name!r}; choose one of {BASE_GEMMS}")
    _base_gemm = name


def _fused_gemm(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """How a · bᵀ (+ the LoRA term) runs: "tma" (the persistent TMA kernel), "pointer" (the pointer-based fused
    kernel) or None (the cuBLAS path)."""
    from lora_engine.kernels import lora_linear as K

    if _base_gemm == "cublas":
        return None
    if _base_gemm == "triton":
        return "tma" if K.tma_gemm_available(a, b) else "pointer"
    if a.shape[0] * a.shape[1] * b.shape[0] >= _TRITON_MIN_MACS and K.tma_gemm_available(a, b):
        return "tma"
    return None


@functools.cache
def _ampere_or_newer(device: torch.device) -> bool:
    # Device properties, which torch.compile folds to constants while it traces the op.
    return torch.cuda.get_device_properties(device).major >= 8


def kernels_available(x: torch.Tensor) -> bool:
    """True where the Triton kernels run for x: CUDA tensors on an Ampere (sm_80) or newer GPU, or any tensor under
    TRITON_INTERPRET=1. Older GPUs (T4, V100) take the torch references: the kernels' bf16 dots need sm_80, and their
    tiles are sized for sm_80's shared memory and asynchronous copies (compiled for a T4, lora_dy's blocks at rank
    32 need 98,304 bytes of its 65,536; benchmarks/smem_kernels.py)."""
    if x.is_cuda:
        return _ampere_or_newer(x.device)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(x, weight, bias, lora_a, lora_b, dropout_p):
    if weight.requires_grad:
        raise ValueError(
            "lora_linear keeps the base weight frozen, but `weight.requires_grad` is True. "
            "Call `weight.requires_grad_(False)` for LoRA training, or use a plain nn.Linear for "
            "full fine-tuning."
        )
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError("weight, lora_a and lora_b must be 2-D: (out, in), (r, in), (out, r)")
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight expects {in_f}")
    if lora_a.shape != (r, in_f) or lora_b.shape != (out_f, r):
        raise ValueError(
            f"LoRA shapes do not fit weight {tuple(weight.shape)}: lora_a {tuple(lora_a.shape)} "
            f"should be ({r}, {in_f}) and lora_b {tuple(lora_b.shape)} should be ({out_f}, {r})"
        )
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ in plain torch (differentiable by autograd).

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_a: (r, in); lora_b: (out, r).
    With dropout active the seed is drawn as `lora_linear` draws it, so after the same
    `torch.manual_seed` both apply the same mask; pass `seed` to fix it explicitly.
    """
    _check(x, weight, bias, lora_a, lora_b, dropout_p)
    y = F.linear(x, weight, bias)
    xd = x
    if training and dropout_p > 0.0:
        seed = draw_dropout_seed(x.device) if seed is None else seed
        in_f = x.shape[-1]
        rows = x.numel() // in_f
        keep = dropout_keep_mask(seed, rows, in_f, dropout_p, device=x.device).reshape(x.shape)
        xd = x * keep.to(x.dtype) / (1.0 - dropout_p)
    return y + scaling * F.linear(F.linear(xd, lora_a.to(x.dtype)), lora_b.to(x.dtype))


def _grad_buffers(M: int, N: int, R: int, K: int, need_bias: bool, device) -> tuple:
    """Zeroed fp32 buffers for the atomically reduced results of backward: g (M, R), dB (N, R), dA (R, K),
    dbias (N,) or None, and dB and dA as one flat tensor (or None). In eager they are views of one workspace
    (one fill launch; dB and dA adjacent, so one cast converts both). Under torch.compile each is its own
    tensor: Inductor's handling of Triton kernels that mutate several views of one buffer gave wrong dA and dB
    (torch 2.11, measured on an H100; tests/test_lora_linear.py checks the compiled gradients)."""
    if torch.compiler.is_compiling():
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.float32)
        return zeros(M, R), zeros(N, R), zeros(R, K), (zeros(N) if need_bias else None), None
    o_db, o_da, o_bias = M * R, M * R + N * R, M * R + N * R + R * K
    ws = torch.zeros(o_bias + (N if need_bias else 0), device=device, dtype=torch.float32)
    view = ws.as_strided  # one call a view (split and view: three calls for two)
    return (view((M, R), (R, 1)), view((N, R), (R, 1), o_db), view((R, K), (K, 1), o_da),
            view((N,), (1,), o_bias) if need_bias else None, view((N * R + R * K,), (1,), o_db))


def _wide_forward(x2, weight, bias, lora_a, lora_b, scale, seed, threshold):
    """`_lora_forward` where `_wide` (ranks above _WIDE_RANK, fp32 x on a GPU): xa = scale · (mask ⊙ x2)·Aᵀ and
    y = x2·Wᵀ + b + xa·Bᵀ through cuBLAS (the LoRA term added onto y in place), the mask from the kernels (an M×in
    masked copy of x2, freed here)."""
    from lora_engine.kernels import lora_linear as K

    x_d = K.dropout_apply(x2, seed, threshold) if seed is not None else x2
    xa = torch.mm(x_d, lora_a.to(x2.dtype).t()).mul_(scale)
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    return y.addmm_(xa, lora_b.to(x2.dtype).t()), xa


_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=) on CUDA; cleared if this torch lacks it


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b as fp32, unrounded: half-precision operands multiply in cuBLAS with fp32 accumulation and an fp32 output
    (`out_dtype`); where that op is missing (the CPU, older torch) the operands are upcast instead."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return torch.mm(a.float(), b.float())


def _wide_backward(ctx, dy2, x2, xa, weight, a, b):
    """LoRALinearFunction's backward where `_wide`, through cuBLAS: g = scale·dy·B, dB = dyᵀ·xa,
    dA = gᵀ·(mask ⊙ x) and dx = dy·W + mask ⊙ (g·A) (the LoRA term first, masked in place, then dy·W added onto it);
    the mask regenerated from its seed. g, dA and dB come out of their GEMMs in fp32, as the fused kernels keep them
    (no overflow of an fp16 dB, no rounding of fp32 adapters' grads); g is rounded to x's dtype where it is a GEMM
    operand, as the kernels round it."""
    from lora_engine.kernels import lora_linear as K

    _, scale, seed, threshold = ctx.meta
    need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    g = _mm_f32(dy2, b.to(dy2.dtype)).mul_(scale).to(dy2.dtype) if (need_x or need_a) else None
    dx = da = db = dbias = None
    if need_x:
        dx = torch.mm(g, a.to(dy2.dtype))
        if seed is not None:
            K.dropout_apply(dx, seed, threshold, out=dx)
        dx = dx.addmm_(dy2, weight)
    if need_a:
        x_d = K.dropout_apply(x2, seed, threshold) if seed is not None else x2
        da = _mm_f32(g.t(), x_d).to(a.dtype)
    if need_b:
        db = _mm_f32(dy2.t(), xa).to(b.dtype)
    if need_bias:
        dbias = dy2.sum(0)
    return dx, da, db, dbias


def _lora_forward(x2, weight, bias, lora_a, lora_b, scale, seed, threshold):
    """y = x2·Wᵀ + b + xa·Bᵀ and xa = scale · (mask ⊙ x2)·Aᵀ (M, r), through the kernels; x2 is (M, in)."""
    from lora_engine.kernels import lora_linear as K

    if _wide(x2, lora_a.shape[0]):
        return _wide_forward(x2, weight, bias, lora_a, lora_b, scale, seed, threshold)

    # scale (scaling · 1/(1-p)) is folded into xa: no separate pass applies it. lora_a and lora_b go to the kernels
    # as they are (fp32 adapters are rounded to x's dtype in-kernel).
    path = _fused_gemm(x2, weight)
    if path == "tma" and seed is None and K.down_in_gemm(x2, weight, lora_a.shape[0], tma_checked=True):
        # xa from the x tiles the GEMM loads: no pass of its own over x. (With dropout the mask generated in the
        # K-loop cost more than the masked pass: benchmarks/RESULTS.md.)
        return K.gemm_lora_tma(x2, weight, bias, None, lora_b, scale, x2.dtype, down=lora_a)
    if path is None:
        # One launch writes xa and the LoRA term y = xa·Bᵀ (+ b); cuBLAS adds x·Wᵀ onto y in place.
        xa, y = K.lora_down(x2, lora_a, scale, x2.dtype, mask_seed=seed, threshold=threshold, lora_b=lora_b,
                            bias=bias)
        return y.addmm_(x2, weight.t()), xa
    # The masked pass may split K over more programs (`K._down_plan`): xa then comes back in fp32, which the GEMM and
    # backward round to x's dtype.
    xa = K.lora_down(x2, lora_a, scale, x2.dtype, mask_seed=seed, threshold=threshold, may_split=True)
    gemm = K.gemm_lora_tma if path == "tma" else K.gemm_lora
    return gemm(x2, weight, bias, xa, lora_b, 1.0, x2.dtype), xa


class LoRALinearFunction(torch.autograd.Function):
    """Fused LoRA linear with scale = scaling / (1 - p) and the keep test's integer threshold (both from
    `lora_linear`). Saves x (as given, no copy) and xa = scale · (mask ⊙ x)·Aᵀ of shape (M, r), in x's dtype
    or, where the masked pass of the fused GEMMs' path splits K, fp32 (the kernels round it to x's dtype); the dropout
    mask is regenerated in backward from its seed, a (1,) int64 device tensor (None: no dropout). Ranks above
    _WIDE_RANK and fp32 x on a GPU take `_wide_forward` / `_wide_backward`, which save the same."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, seed, threshold):
        x2 = x.reshape(-1, x.shape[-1])
        y, xa = _lora_forward(x2, weight, bias, lora_a, lora_b, scale, seed, threshold)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.meta = (x.shape, scale, seed, threshold)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        from lora_engine.kernels import lora_linear as K

        x2, xa, weight, a, b = ctx.saved_tensors
        x_shape, g_scale, seed, threshold = ctx.meta
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != x2.dtype:
            dy2 = dy2.to(x2.dtype)
        if _wide(x2, a.shape[0]):
            dx, da, db, dbias = _wide_backward(ctx, dy2, x2, xa, weight, a, b)
            return (dx.view(x_shape) if dx is not None else None), None, dbias, da, db, None, None, None
        (M, K_in), N, R = x2.shape, dy2.shape[1], a.shape[0]
        g, db, da, dbias, db_da = _grad_buffers(M, N, R, K_in, need_bias, dy.device)
        # g = scaling·keep·dy·B, so dx_lora = mask ⊙ (g·A) and dA = gᵀ·(mask ⊙ x) need no scale.
        K.lora_dy(dy2, b, xa, 1.0, g_scale, g, db, dbias)
        dx = None
        w_t = weight.t()  # (in, out): dx = dy·W reads W through strides
        path = _fused_gemm(dy2, w_t) if need_x else None
        if path == "tma" and seed is not None and _MASK_BITS:
            # dA's pass over x generates the mask anyway: it also writes it as bits (M·in/8 bytes, freed when backward
            # returns), and the TMA GEMM reads them for dx's masked term.
            bits = torch.empty((M, (K_in + 7) // 8), device=dy.device, dtype=torch.uint8)
            K.lora_grad_a(g, x2, 1.0, da, mask_seed=seed, threshold=threshold, keep_bits=bits)
            dx = K.gemm_lora_tma(dy2, w_t, None, g, a.t(), 1.0, x2.dtype, mask_bits=bits).view(x_shape)
        elif path == "tma" and seed is None:
            # dx = dy·W + g·A in one GEMM (W read as (in, out) and A as (in, r) via strides), dA = gᵀ·x in its epilogue,
            # or in its own pass behind a short K-loop.
            fuse_da = need_a and N >= _DA_IN_EPILOGUE_MIN_K
            dx = K.gemm_lora_tma(dy2, w_t, None, g, a.t(), 1.0, x2.dtype, da=da if fuse_da else None,
                                 da_x=x2).view(x_shape)
            if need_a and not fuse_da:
                K.lora_grad_a(g, x2, 1.0, da)
        elif path == "pointer":
            # The same with the pointer kernel, which generates the mask in its epilogue; dA from a pass over x.
            dx = K.gemm_lora(dy2, w_t, None, g, a.t(), 1.0, x2.dtype, mask_seed=seed, threshold=threshold,
                             da=da if need_a else None, da_x=x2).view(x_shape)
        else:
            # One pass over x: dA, and the LoRA term of dx (mask ⊙ g·A) onto which cuBLAS adds dy·W.
            if need_x:
                dx = torch.empty((M, K_in), device=dy.device, dtype=x2.dtype)
            if need_x or need_a:
                K.lora_grad_a(g, x2, 1.0, da, mask_seed=seed, threshold=threshold, lora_a=a, dx=dx)
            if need_x:
                dx = dx.addmm_(dy2, weight).view(x_shape)
        if need_a and need_b and db_da is not None and a.dtype == b.dtype != torch.float32:
            both = db_da.to(a.dtype)  # one cast launch for both
            db, da = both.as_strided((N, R), (R, 1)), both.as_strided((R, K_in), (K_in, 1), N * R)
        else:
            da = (da if a.dtype == torch.float32 else da.to(a.dtype)) if need_a else None
            db = (db if b.dtype == torch.float32 else db.to(b.dtype)) if need_b else None
        if dbias is not None:
            dbias = dbias.to(x2.dtype)
        return dx, None, dbias, da, db, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ through the fused Triton kernels.

    x: (..., in), any strides, fp32/fp16/bf16; weight: (out, in), frozen; bias: (out,) or None;
    lora_a: (r, in); lora_b: (out, r) (cast to x's dtype for the matmuls; their grads come back in
    their own dtype). Dropout (only when `training`) uses a Philox mask keyed by a seed drawn from
    torch's generator. Under autocast the inputs are cast to the autocast dtype first.
    Ranks above 64, and fp32 x on a GPU, run the LoRA products as torch matmuls around the kernels' mask (`_wide`).
    Falls back to `lora_linear_reference` where the kernels cannot run (CPU without the interpreter, GPUs older than
    Ampere: `kernels_available`).
    """
    _check(x, weight, bias, lora_a, lora_b, dropout_p)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif weight.dtype != x.dtype:
        raise TypeError(
            f"x is {x.dtype} but the base weight is {weight.dtype}: cast the input (or the model) "
            "so they match, or run under torch.autocast"
        )
    seed = _draw_seed_tensor(x.device) if (training and dropout_p > 0.0) else None
    if not kernels_available(x):
        int_seed = int(seed.item()) if seed is not None else None
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, int_seed)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    from lora_engine.kernels.lora_linear import dropout_threshold

    # scaling · 1/(1-p) is folded into xa (and into g in backward); threshold is the kernels' integer keep test.
    scale = scaling * (1.0 / (1.0 - dropout_p)) if seed is not None else scaling
    threshold = dropout_threshold(dropout_p) if seed is not None else 0
    if not (torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad
                                         or (bias is not None and bias.requires_grad))):
        # Nothing to differentiate: the same kernels without the autograd node (host time at small shapes).
        y, _ = _lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scale, seed, threshold)
        return y.view(*x.shape[:-1], weight.shape[0])
    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scale, seed, threshold)


# ----------------------------------------------------------------------------- RMSNorm and SwiGLU

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        hidden = x.shape[-1] if x.dim() else "?"
        raise ValueError(f"rms_norm weight has shape {tuple(weight.shape)} but x {tuple(x.shape)} needs ({hidden},)")
    if weight.device != x.device:
        raise ValueError(f"rms_norm weight is on {weight.device} but x is on {x.device}")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm exactly as transformers' LlamaRMSNorm computes it, in plain torch (differentiable).

    x: (..., H); weight: (H,). The statistics are computed in fp32 (fp64 for fp64 x, so the same
    function serves as an fp64 oracle), the normalised x is rounded to x's dtype, then multiplied
    by weight with torch's type promotion: the result has dtype promote_types(weight, x).
    """
    _check_rms_norm(x, weight)
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Fused RMSNorm. Saves x (as a 2-D view when x has unit column stride, else a contiguous copy),
    weight and rstd (M fp32 values): nothing else of size M×H. dweight is computed only when needed."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        from lora_engine.kernels import rmsnorm as K

        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y, rstd = K.rms_norm_forward(x2, weight, eps, torch.promote_types(weight.dtype, x.dtype))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from lora_engine.kernels import rmsnorm as K

        x2, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dy2 = dy.reshape(x2.shape)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx, dw = K.rms_norm_backward(dy2, x2, weight, rstd, need_x, need_w)
        return (dx.view(ctx.x_shape) if dx is not None else None), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """weight · round_x(x / sqrt(mean(x²) + eps)) over the last dim, as LlamaRMSNorm computes it.

    x: (..., H), any strides, fp32/fp16/bf16; weight: (H,), frozen (LoRA) or trainable (full
    fine-tuning). Returns (..., H) of dtype promote_types(weight, x). Backward keeps only x and
    one fp32 rstd per row (plus weight itself). Runs the Triton kernels where `kernels_available(x)`,
    else (and for other dtypes) `rms_norm_reference`.
    """
    _check_rms_norm(x, weight)
    if not kernels_available(x) or x.dtype not in _FUSED_DTYPES or weight.dtype not in _FUSED_DTYPES or x.numel() == 0:
        return rms_norm_reference(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)


def _check_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"silu_mul needs gate and up of one shape, dtype and device: gate is {tuple(gate.shape)} "
            f"{gate.dtype} on {gate.device}, up is {tuple(up.shape)} {up.dtype} on {up.device}"
        )


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up in plain torch: the activation product of Llama's MLP (SwiGLU)."""
    _check_silu_mul(gate, up)
    return F.silu(gate) * up


class SiLUMulFunction(torch.autograd.Function):
    """Fused silu(gate) · up. Saves only gate and up (contiguous); σ(gate) is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        from lora_engine.kernels import swiglu as K

        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return K.silu_mul_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        from lora_engine.kernels import swiglu as K

        gate, up = ctx.saved_tensors
        dg, du = K.silu_mul_backward(dy.to(gate.dtype).contiguous(), gate, up)
        need_gate, need_up = ctx.needs_input_grad
        return (dg if need_gate else None), (du if need_up else None)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up elementwise, computed in fp32 and rounded once.

    gate, up: the same shape (any leading dims, any strides) and dtype (fp32/fp16/bf16). Returns a
    new contiguous tensor of that shape and dtype. Backward keeps only gate and up (torch's
    `F.silu(gate) * up` also keeps silu(gate)). Runs the Triton kernels where
    `kernels_available(gate)`, else (and for other dtypes) `silu_mul_reference`.
    """
    _check_silu_mul(gate, up)
    if not kernels_available(gate) or gate.dtype not in _FUSED_DTYPES or gate.numel() == 0:
        return silu_mul_reference(gate, up)
    return SiLUMulFunction.apply(gate, up)


# ------------------------------------------------------------------------------------------------
# Linear + cross-entropy, chunked: the logits are never held in full


def _check_cross_entropy(hidden, weight, labels):
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has {hidden.shape[-1]} features but the output weight is {tuple(weight.shape)}: "
            "expected weight (vocab, hidden)"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be integers, got {labels.dtype}")


def _check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """A clear error (one host sync) instead of a device-side assert that kills the CUDA context."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"label {first} is outside the vocabulary [0, {vocab}); use {ignore_index} (ignore_index) "
            "for positions without a target"
        )


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits = hidden·weightᵀ against labels, as transformers computes a causal LM's
    loss once labels are shifted: fp32 logits, mean over the non-ignored labels, or their sum divided
    by `num_items_in_batch` when given. hidden: (..., H); weight: (V, H); labels: hidden's leading dims."""
    _check_cross_entropy(hidden, weight, labels)
    logits = F.linear(hidden, weight).float().reshape(-1, weight.shape[0])
    labels = labels.reshape(-1).long()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / num_items_in_batch


def _chunk_rows(rows: int, vocab: int, itemsize: int, budget_bytes: int) -> int:
    """Rows of logits per chunk: as many as fit `budget_bytes`, a multiple of 64 where possible."""
    fit = max(1, budget_bytes // max(1, vocab * itemsize))
    if fit >= 64:
        fit -= fit % 64
    return max(1, min(rows, fit))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked hidden·Wᵀ -> cross-entropy whose backward work is done in forward, chunk by chunk:
    each chunk's logits are turned into their gradient in place and multiplied out at once.
    Saved for backward: dh (M, H) in hidden's dtype, dW in fp32 only if the weight is trained,
    and the loss denominator (a 0-d tensor); no logits."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, denominator, chunk_bytes, grad_enabled):
        from lora_engine.kernels.cross_entropy import cross_entropy_grad_

        h2 = hidden.reshape(-1, hidden.shape[-1])
        if h2.stride(-1) != 1:
            h2 = h2.contiguous()
        labels = labels.reshape(-1).long()
        rows, vocab = h2.shape[0], weight.shape[0]
        # needs_input_grad ignores grad mode: under no_grad the loss alone is computed.
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        dh = torch.empty_like(h2) if need_h else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        losses = torch.empty(rows, device=h2.device, dtype=torch.float32)
        step = _chunk_rows(rows, vocab, h2.element_size(), chunk_bytes)
        for start in range(0, rows, step):
            end = min(rows, start + step)
            h_c = h2[start:end]
            logits = h_c @ weight.t()
            losses[start:end] = cross_entropy_grad_(logits, labels[start:end], ignore_index)
            if need_h:
                torch.mm(logits, weight, out=dh[start:end])
            if need_w:
                dw += (logits.t() @ h_c).float()
        if denominator is None:
            denominator = (labels != ignore_index).sum()
        denominator = torch.as_tensor(denominator, device=h2.device, dtype=torch.float32)
        ctx.save_for_backward(dh, dw, denominator)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        return losses.sum() / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw, denominator = ctx.saved_tensors
        shape, h_dtype, w_dtype = ctx.shapes
        scale = grad_loss.float() / denominator
        dh = (dh * scale).to(h_dtype).reshape(shape) if dh is not None else None
        dw = (dw * scale).to(w_dtype) if dw is not None else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_bytes: int = 512 * 2**20,
) -> torch.Tensor:
    """`linear_cross_entropy_reference`'s loss (fp32 scalar) without materialising the logits:
    at most `chunk_bytes` of logits (in hidden's dtype) exist at a time, where the unfused path holds
    the logits, their fp32 copy, the log-softmax and its gradient (~14 bytes per logit).

    hidden: (..., H), fp32/fp16/bf16, any strides; weight: (V, H), frozen or trained (then its grad is
    accumulated in fp32); labels: int, hidden's leading dims, in [0, V) or `ignore_index`.
    The gradient is computed during forward (under no_grad, only the loss: one GEMM a chunk). Checks
    the labels' range (one host sync).
    """
    _check_cross_entropy(hidden, weight, labels)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but the output weight is {weight.dtype}: cast one to the other")
    _check_labels_in_range(labels, weight.shape[0], ignore_index)
    if not kernels_available(hidden):
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, num_items_in_batch)
    return LinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, num_items_in_batch, chunk_bytes,
                                            torch.is_grad_enabled())
