"""The dynamic quantization maps, the kernel's nearest-code search, and block-wise error bounds."""

import math
import os

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine.kernels.adamw8bit import _nearest_code
from lora_engine.optim import _bits_to_float, dequantize_blockwise, dynamic_map, quant_maps, quantize_blockwise

# Largest gap between neighbouring entries of each map (its top decade, and -1 missing from the
# signed map): half of it bounds the error of a nearest-code quantization relative to the absmax.
HALF_GAP = {True: 0.9 / 64 / 2, False: 0.9 / 128 / 2}


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape(signed):
    q = dynamic_map(signed)
    assert q.shape == (256,) and q.dtype == torch.float32
    assert bool((q[1:] > q[:-1]).all())
    assert q.max().item() == 1.0 and (q == 0).sum().item() == 1
    pos = q[q > 0]
    # Decades 1e-6 … 1: 1, 2, …, 64 positive entries (signed) or 2, 4, …, 128 (unsigned), plus 1.
    for i in range(7):
        in_decade = ((pos >= 0.1 * 10.0 ** (i - 6)) & (pos < 10.0 ** (i - 6))).sum().item()
        assert in_decade == 2 ** (i if signed else i + 1)
    if signed:
        neg = -q[q < 0].flip(0)
        assert torch.equal(neg, pos[:-1])  # symmetric but for +1
        assert q.min().item() == pytest.approx(-(1 - 0.9 / 128), rel=1e-6)
    else:
        assert q.min().item() == 0.0
    assert torch.max(q[1:] - q[:-1]).item() == pytest.approx(2 * HALF_GAP[signed], rel=1e-4)


@triton.jit
def _codes_kernel(x_ptr, out_ptr, search_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, _nearest_code(x, search_ptr), mask=offs < n)


def _search_codes(x: torch.Tensor, search: torch.Tensor) -> torch.Tensor:
    """The kernel's one-load search (`_nearest_code`) in torch: codes int64 of fp32 x."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    entry = search.to(torch.int64)[bits >> 16]
    mid = _bits_to_float((bits & 0xFFFF0000) | (entry & 0xFFFF))
    return (entry >> 16) + (x > mid).long()


@pytest.mark.parametrize("signed", [True, False])
def test_search_table_is_exact_on_every_bucket_with_a_midpoint(signed):
    """The search table's rule (code = lo + (x > the bucket's midpoint)) equals searchsorted over
    the midpoints for every fp32 value of every bucket that holds a midpoint (255 · 65536 values,
    both signs), and on the buckets of ±0, ±1 and every map entry."""
    maps = quant_maps("cpu")
    q, mid, search = (maps.map1, maps.mid1, maps.search1) if signed else (maps.map2, maps.mid2, maps.search2)
    pts = torch.cat([mid[:255], q, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    high = torch.unique(pts.view(torch.int32).to(torch.int64) & 0xFFFF0000)
    bits = (high[:, None] | torch.arange(65536)[None, :]).reshape(-1)
    x = _bits_to_float(bits)
    x = x[torch.isfinite(x)]
    assert torch.equal(_search_codes(x, search), torch.searchsorted(mid, x))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("signed", [True, False])
def test_kernel_nearest_code_is_exact(signed):
    """The kernel's one-load search equals searchsorted over the midpoints, on every midpoint,
    its fp32 neighbours, every map entry, ±0 and values out to ±1.0000001 (ties go down)."""
    maps = quant_maps("cpu")
    q, mid, search = (maps.map1, maps.mid1, maps.search1) if signed else (maps.map2, maps.mid2, maps.search2)
    m = mid[:255]
    x = torch.cat([
        m, torch.nextafter(m, torch.full_like(m, 2.0)), torch.nextafter(m, torch.full_like(m, -2.0)), q,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 1e-30, -1e-30]),
        torch.rand(5000) * 2 - 1 if signed else torch.rand(5000),
        torch.rand(2000) ** 12,
    ])
    if not signed:
        x = x.abs()
    out = torch.empty(x.numel(), dtype=torch.uint8)
    _codes_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, search, x.numel(), BLOCK=1024)
    expect = torch.searchsorted(mid, x)
    assert torch.equal(out.long(), expect)
    # Nearest: no other entry is closer (up to the fp32 rounding of the midpoints).
    qd, xd = q.double(), x.double()
    err = (qd[expect] - xd).abs()
    slack = 2.0**-22 * xd.abs()
    assert bool((err <= (qd[(expect - 1).clamp(min=0)] - xd).abs() + slack).all())
    assert bool((err <= (qd[(expect + 1).clamp(max=255)] - xd).abs() + slack).all())


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    block=st.sampled_from([64, 256, 1024]),
    signed=st.booleans(),
    log_scale=st.floats(-20, 20),
    dist=st.sampled_from(["normal", "heavy", "sparse"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_blockwise_error_bounds(n, block, signed, log_scale, dist, seed):
    """Per block: absmax is max|x|; every element lands on its nearest code; the error is at most
    half the map's largest gap times the block's absmax, and each element's error at most half
    the gap around its own normalised value."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if dist == "heavy":
        x = x * torch.exp(3 * torch.randn(n, generator=g))
    elif dist == "sparse":
        x = x * (torch.rand(n, generator=g) < 0.1)
    x = x * math.exp(log_scale)
    if not signed:
        x = x * x
    codes, absmax = quantize_blockwise(x, signed=signed, block_size=block)
    nb = -(-n // block)
    assert codes.dtype == torch.uint8 and codes.shape == (n,) and absmax.shape == (nb,)
    xb = torch.nn.functional.pad(x, (0, nb * block - n)).view(nb, block)
    assert torch.equal(absmax, xb.abs().amax(dim=1))
    xhat = dequantize_blockwise(codes, absmax, signed=signed, block_size=block)
    blk_absmax = absmax.repeat_interleave(block)[:n]
    err = (xhat - x).abs()
    assert bool((err <= blk_absmax * (HALF_GAP[signed] * (1 + 1e-4)) + 1e-37).all())
    # Own-gap bound: x/absmax is within half a neighbouring gap of its code's value.
    q = quant_maps("cpu").map1 if signed else quant_maps("cpu").map2
    xn = torch.where(blk_absmax > 0, x / blk_absmax, torch.zeros_like(x))
    c = codes.long()
    gap = torch.maximum(q[(c + 1).clamp(max=255)] - q[c], q[c] - q[(c - 1).clamp(min=0)])
    assert bool(((xn - q[c]).abs() <= gap / 2 * (1 + 1e-5) + 1e-7).all())
