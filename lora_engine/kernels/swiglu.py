"""Triton kernels of the SwiGLU activation product silu(gate) · up (Llama's MLP), and their launchers.

Forward:  y      = silu(g) · u = g · σ(g) · u
Backward: d_up   = dy · silu(g)
          d_gate = dy · u · σ(g) · (1 + g · (1 − σ(g)))

σ(g) is recomputed from g in backward, so only g and u need to be kept (torch's `F.silu(g) * u`
keeps g, silu(g) and u). Elementwise over flat contiguous tensors, in fp32, rounded once on store.
"""


import torch
import triton
import triton.language as tl

from lora_engine.kernels.launch import cdiv, launch

from .merge import _cast, _rounds_bf16

_BLOCK = 2048
_NUM_WARPS = 4


@triton.jit
def _silu_mul_fwd_kernel(g_ptr, u_ptr, y_ptr, N, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    """y[N] = silu(g) · u."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _cast(g * tl.sigmoid(g) * u, y_ptr, ROUND_BF16), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, N, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    """dg[N] = dy · u · σ(g) · (1 + g·(1 − σ(g))), du[N] = dy · silu(g)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(du_ptr + offs, _cast(dy * g * s, du_ptr, ROUND_BF16), mask=mask)
    tl.store(dg_ptr + offs, _cast(dy * u * s * (1.0 + g * (1.0 - s)), dg_ptr, ROUND_BF16), mask=mask)


def silu_mul_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for contiguous gate and up of one shape and dtype: a new tensor like gate."""
    y = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    launch(
        _silu_mul_fwd_kernel, (cdiv(n, _BLOCK),), (gate, up, y, n),
        dict(BLOCK=_BLOCK, ROUND_BF16=_rounds_bf16(gate.dtype)), num_warps=_NUM_WARPS,
    )
    return y


def silu_mul_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up) for contiguous dy, gate, up of one shape: new tensors of gate's dtype."""
    dg = torch.empty_like(gate, memory_format=torch.contiguous_format)
    du = torch.empty_like(up, memory_format=torch.contiguous_format)
    n = gate.numel()
    launch(
        _silu_mul_bwd_kernel, (cdiv(n, _BLOCK),), (dy, gate, up, dg, du, n),
        dict(BLOCK=_BLOCK, ROUND_BF16=_rounds_bf16(gate.dtype)), num_warps=_NUM_WARPS,
    )
    return dg, du
