"""lora_linear (fused Triton kernels) against an fp64 reference, forward and every gradient.

CPU: the kernels run under TRITON_INTERPRET=1 on small shapes, fp32 and fp16.
GPU (`-m gpu`): bf16 and fp16 on large and odd shapes, with every output element checked written.
"""

import math
from unittest import mock

import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine import ops
from lora_engine.kernels import lora_linear as K
from lora_engine.ops import (
    BASE_GEMMS,
    dropout_keep_mask,
    kernels_available,
    lora_linear,
    lora_linear_reference,
    set_base_gemm,
)

# Relative-error tolerances (‖out − ref‖ / ‖ref‖) against an fp64 reference on the same inputs.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(params=BASE_GEMMS)
def base_gemm(request):
    """Run a test with each way of computing the frozen base GEMM."""
    set_base_gemm(request.param)
    yield request.param
    set_base_gemm("auto")


def make_inputs(lead, k, n, r, dtype, device="cpu", bias=True, lora_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=g).to(device=device, dtype=dtype).requires_grad_() if bias else None
    a = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(device=device, dtype=lora_dtype).requires_grad_()
    bb = (torch.randn(n, r, generator=g) / math.sqrt(r)).to(device=device, dtype=lora_dtype).requires_grad_()
    return x, w, b, a, bb


def run_both(x, w, b, a, bb, scaling, p, training=True, seed=1234):
    """Forward + backward of the op and of the fp64 reference with the same dropout seed."""
    torch.manual_seed(seed)
    y = lora_linear(x, w, b, a, bb, scaling, p, training)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y)
    leaves = [t for t in (x, a, bb, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, a64, bb64 = leaves64[:3]
    b64 = leaves64[3] if b is not None else None
    torch.manual_seed(seed)
    y64 = lora_linear_reference(x64, w.double(), b64, a64, bb64, scaling, p, training)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    return (y, *grads), (y64, *grads64)


def assert_close(outs, refs, tol):
    names = ["y", "dx", "dA", "dB", "dbias"]
    for name, o, r in zip(names, outs, refs):
        assert o.shape == r.shape, name
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        err = rel_err(o, r)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [1, 4, 16, 33, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_matches_fp64_reference(dtype, r, bias, p, base_gemm):
    """Adapters in x's dtype with dropout off (their fp32 gradients cast back in one launch), fp32 adapters
    (patch_model's) with dropout on."""
    lora_dtype = dtype if p == 0 else torch.float32
    x, w, b, a, bb = make_inputs((19,), 45, 37, r, dtype, bias=bias, seed=r, lora_dtype=lora_dtype)
    outs, refs = run_both(x, w, b, a, bb, scaling=2.0 / r, p=p)
    assert_close(outs, refs, TOL[dtype])


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 70),
    k=st.integers(1, 90),
    n=st.integers(1, 90),
    r=st.integers(1, 64),
    p=st.sampled_from([0.0, 0.3]),
)
def test_random_shapes(m, k, n, r, p):
    x, w, b, a, bb = make_inputs((m,), k, n, r, torch.float32, seed=m * 7 + k)
    outs, refs = run_both(x, w, b, a, bb, scaling=0.5, p=p)
    assert_close(outs, refs, TOL[torch.float32])


def test_3d_input_and_rank_256():
    """The largest rank the issue names, 3-D x and dropout: the wide path (whatever the base-GEMM setting, which
    ranks above 64 do not reach)."""
    x, w, b, a, bb = make_inputs((2, 5), 40, 24, 256, torch.float32)
    outs, refs = run_both(x, w, b, a, bb, scaling=1 / 16, p=0.2)
    assert outs[0].shape == (2, 5, 24)
    assert_close(outs, refs, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [65, 128])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_ranks_above_64_run_the_lora_products_through_torch_matmuls(dtype, r, p):
    """Above `ops._WIDE_RANK` the LoRA products are torch matmuls around the kernels' dropout mask: y and every grad
    against fp64, 3-D x with a column count that is no multiple of 8, bias grads, fp32 adapters."""
    x, w, b, a, bb = make_inputs((3, 7), 83, 40, r, dtype)
    with mock.patch.object(ops, "_wide_backward", wraps=ops._wide_backward) as wide:
        outs, refs = run_both(x, w, b, a, bb, scaling=0.25, p=p)
    assert wide.call_count == 1
    assert_close(outs, refs, TOL[dtype])


def test_rank_64_stays_on_the_fused_kernels_and_a_strided_x_runs_wide():
    """The switch is between ranks 64 and 65; the wide path takes x through its strides (a sliced view)."""
    x, w, b, a, bb = make_inputs((9,), 40, 24, 64, torch.float32)
    with mock.patch.object(ops, "_wide_forward", wraps=ops._wide_forward) as wide:
        outs, refs = run_both(x, w, b, a, bb, scaling=0.5, p=0.1)
        assert wide.call_count == 0
        assert_close(outs, refs, TOL[torch.float32])
        _, w, b, a, bb = make_inputs((1,), 24, 17, 70, torch.float32)
        sliced = torch.randn(40, 31)[:, 3:27].requires_grad_()
        outs, refs = run_both(sliced, w, b, a, bb, scaling=2.0, p=0.1)
        assert wide.call_count == 1
        assert_close(outs, refs, TOL[torch.float32])


def test_fp32_x_takes_the_wide_path_on_a_gpu_only():
    """`ops._wide`: ranks above 64 anywhere; fp32 x on CUDA (the kernels' tiles are sized for 2-byte operands); fp32 on
    the CPU stays on the kernels, so that the interpreter's tests check them."""
    from types import SimpleNamespace

    cpu32 = torch.empty(2, 3)
    assert not ops._wide(cpu32, 64) and ops._wide(cpu32, 65)
    assert ops._wide(SimpleNamespace(dtype=torch.float32, is_cuda=True), 8)
    assert not ops._wide(SimpleNamespace(dtype=torch.bfloat16, is_cuda=True), 64)


def test_dropout_apply_is_the_reference_mask_in_and_out_of_place():
    """`dropout_apply` zeroes what `dropout_keep_mask` drops (no rescaling), for a strided x with a column tail, into
    a new tensor or in place; an empty x launches nothing."""
    x = torch.randn(37, 100)[:, 5:88]
    seed, p = 5, 0.3
    keep = dropout_keep_mask(seed, 37, 83, p)
    out = K.dropout_apply(x, torch.tensor([seed]), K.dropout_threshold(p))
    assert out.is_contiguous() and torch.equal(out, torch.where(keep, x, 0.0))
    y = x.clone()
    assert K.dropout_apply(y, torch.tensor([seed]), K.dropout_threshold(p), out=y) is y
    assert torch.equal(y, out)
    col_major = x.t().contiguous().t()  # strides (1, 37): masked in place through its strides
    assert K.dropout_apply(col_major, torch.tensor([seed]), K.dropout_threshold(p), out=col_major) is col_major
    assert col_major.stride() == (1, 37) and torch.equal(col_major, out)
    assert K.dropout_apply(torch.empty(0, 9), torch.tensor([seed]), 100).shape == (0, 9)


def test_dropout_mask_is_philox_4x32_in_7_rounds():
    """Column 8j of row m keeps when the low half of the first output of Philox-4x32-7 at counter m·ceil(cols/8) + j
    is at least round(p·2¹⁶): pins the generator the kernels and the reference share (RESULTS.md, stop 25)."""
    rows, cols, seed, p = 16, 83, 2**33 + 7, 0.4
    ctr = torch.arange(rows)[:, None] * 11 + torch.arange(11)
    r0 = ops._philox4x(seed, ctr, 7)[0]
    assert torch.equal(dropout_keep_mask(seed, rows, cols, p)[:, 0::8], (r0 & 0xFFFF) >= K.dropout_threshold(p))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_wide_rank_grads_of_fp32_adapters_are_not_rounded_to_fp16(device):
    """fp16 x, fp32 adapters, rank 65: dB = Σ_m dy·xa = 2048 · 40 = 81920, past fp16's 65504. It comes back finite
    and exact, as on the fused path (the products' outputs are fp32)."""
    m, k, n, r = 2048, 72, 24, 65
    x = torch.ones(m, k, device=device, dtype=torch.float16)
    w = torch.zeros(n, k, device=device, dtype=torch.float16)
    a = torch.full((r, k), 1 / 72, device=device).requires_grad_()
    b = torch.zeros(n, r, device=device).requires_grad_()
    y = lora_linear(x, w, None, a, b, 1.0)
    y.backward(torch.full_like(y, 40.0))
    assert b.grad.dtype == torch.float32 and torch.allclose(b.grad, torch.full_like(b.grad, 81920.0), rtol=2e-3)


def test_non_contiguous_x(base_gemm):
    """A sliced view (row stride > k) and a column-major x both run without a copy of x."""
    _, w, b, a, bb = make_inputs((1,), 24, 17, 8, torch.float32)
    sliced = torch.randn(40, 31)[:, 3:27]
    col_major = torch.randn(24, 40).t()
    for x in (sliced, col_major):
        assert not x.is_contiguous()
        outs, refs = run_both(x.requires_grad_(), w, b, a, bb, scaling=2.0, p=0.1)
        assert_close(outs, refs, TOL[torch.float32])


def test_rank_1_adapters_of_any_strides(base_gemm):
    """Rank-1 adapters built as transposed views: lora_a (1, k) of strides (1, 1), lora_b (n, 1) of strides (1, n)."""
    x, w, b, _, _ = make_inputs((40,), 64, 48, 1, torch.float32)
    a = (torch.randn(64, 1) / 8).t().requires_grad_()
    bb = torch.randn(1, 48).t().requires_grad_()
    assert a.stride() == (1, 1) and bb.stride() == (1, 48)
    outs, refs = run_both(x, w, b, a, bb, scaling=2.0, p=0.0)
    assert_close(outs, refs, TOL[torch.float32])


def test_transposed_view_weight():
    """A GPT-2 Conv1D keeps its weight as (in, out): the op takes `weight.t()` without a copy."""
    x, w, b, a, bb = make_inputs((13,), 20, 28, 4, torch.float32)
    w_t = w.t().contiguous().t()
    assert not w_t.is_contiguous()
    outs, refs = run_both(x, w_t, b, a, bb, scaling=1.0, p=0.0)
    assert_close(outs, refs, TOL[torch.float32])


# Shapes of the TMA GEMM tests: any row count, sizes in whole 16-byte rows (8 elements), ranks 1..64.
TMA_CASES = dict(m=st.integers(1, 80), k8=st.integers(1, 12), n8=st.integers(1, 12), r=st.integers(1, 64),
                 dtype=st.sampled_from([torch.float32, torch.float16]))


@settings(max_examples=10, deadline=None)
@given(**TMA_CASES, bias=st.booleans(), rows_out=st.booleans(), lora=st.booleans(), prefetch=st.booleans())
def test_tma_gemm_matches_fp64(m, k8, n8, r, dtype, bias, rows_out, lora, prefetch):
    """The persistent TMA GEMM: any row count, sizes in whole 16-byte rows, W as (out, in) or a transposed
    view of (in, out), with and without bias and the LoRA term (d in fp32, rounded to the operand dtype; its
    operands loaded before or after the K-loop)."""
    k, n = 8 * k8, 8 * n8
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, k, generator=g) if rows_out else torch.randn(k, n, generator=g).t()).to(dtype) / math.sqrt(k)
    c = torch.randn(m, r, generator=g).to(dtype) if lora else None
    d = torch.randn(n, r, generator=g) / math.sqrt(r) if lora else None
    bi = torch.randn(n, generator=g).to(dtype) if bias else None
    assert K.tma_gemm_available(a, b)
    out = K.gemm_lora_tma(a, b, bi, c, d, 1.0, dtype, config=K._tma_config() | dict(PREFETCH=prefetch))
    ref = a.double() @ b.double().T
    if lora:
        ref = ref + c.double() @ d.to(dtype).double().T
    if bias:
        ref = ref + bi.double()
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]


def test_tma_gemm_needs_16_byte_rows_and_a_unit_stride():
    """Where TMA cannot address an operand, `gemm_lora` runs the pointer kernel instead: same result."""
    half = torch.randn(16, 20).half()  # 40-byte rows
    w = torch.randn(24, 32)
    assert not K.tma_gemm_available(half, torch.randn(24, 20).half())
    assert not K.tma_gemm_available(torch.randn(40, 16).t(), w[:, :16])  # a column-major
    assert not K.tma_gemm_available(torch.randn(16, 36)[:, 1:33], w)  # base 4 bytes off 16-byte alignment
    assert not K.tma_gemm_available(torch.randn(16, 32), torch.randn(23, 32))  # 92-byte output rows
    assert not K.tma_gemm_available(torch.randn(0, 32), w)  # nothing to compute
    assert K.tma_gemm_available(torch.randn(16, 32), w) and K.tma_gemm_available(torch.randn(16, 32), w.t().t())
    x = torch.randn(16, 36)[:, 1:33]
    out = K.gemm_lora(x, w, None, None, None, 1.0, torch.float32)
    assert rel_err(out, x.double() @ w.double().T) <= TOL[torch.float32]


@settings(max_examples=10, deadline=None)
@given(**TMA_CASES, bias=st.booleans(), rows_out=st.booleans())
def test_tma_gemm_computes_xa_from_its_own_tiles(m, k8, n8, r, dtype, bias, rows_out):
    """With `down`, the TMA GEMM computes xa = round(scale · a·downᵀ) in its K-loop (down fp32, rounded to
    the operand dtype), returns it, and adds xa·dᵀ to a·bᵀ: both against fp64."""
    k, n = 8 * k8, 8 * n8
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n + r)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, k, generator=g) if rows_out else torch.randn(k, n, generator=g).t()).to(dtype) / math.sqrt(k)
    down = torch.randn(r, k, generator=g) / math.sqrt(k)
    d = torch.randn(n, r, generator=g) / math.sqrt(r)
    bi = torch.randn(n, generator=g).to(dtype) if bias else None
    out, xa = K.gemm_lora_tma(a, b, bi, None, d, 0.5, dtype, down=down)
    xa_ref = 0.5 * a.double() @ down.to(dtype).double().T
    assert xa.shape == (m, r) and xa.dtype == dtype
    assert rel_err(xa, xa_ref) <= TOL[dtype]
    ref = a.double() @ b.double().T + xa.double() @ d.to(dtype).double().T + (bi.double() if bias else 0)
    assert rel_err(out, ref) <= TOL[dtype]


def test_tma_gemm_loads_the_lora_operands_before_the_k_loop_where_that_measured_faster():
    """PREFETCH (c's rows and d's columns loaded before the K-loop) on the paths and ranks where it measured faster
    on an H200: the forward with a given xa and dx with dA, up to rank 16; not with a down-projection, the mask's
    bits, dx without dA, or rank 64 (which also overflowed shared memory with dA or a down-projection)."""
    def prefetch(r, *, down=False, masked=False, da=False, rows_out=True):
        flags = (False, True, down, masked, da, rows_out, False, "tf32")
        return K._tma_plan(8192, 4096, 4096, r, flags, 132, None)[0]["PREFETCH"]

    assert prefetch(16) and prefetch(1) and prefetch(16, da=True, rows_out=False)
    assert not prefetch(17) and not prefetch(64) and not prefetch(64, da=True, rows_out=False)
    assert not prefetch(16, down=True) and not prefetch(16, masked=True, rows_out=False)
    assert not prefetch(16, rows_out=False)  # dx without dA
    config = tuple((K._tma_config() | dict(PREFETCH=False)).items())
    assert not K._tma_plan(8192, 4096, 4096, 16, (False, True, False, False, False, True, False, "tf32"), 132,
                           config)[0]["PREFETCH"]


def _dx_operands(m, n_out, k, r, dtype):
    """The backward dx GEMM's operands, seeded by the shape: dy (m, n_out), W (n_out, k), x (m, k) in dtype, and fp32
    g (m, r) and A (r, k)."""
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n_out + r)
    dy = torch.randn(m, n_out, generator=gen).to(dtype)
    w = (torch.randn(n_out, k, generator=gen) / math.sqrt(n_out)).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return dy, w, x, torch.randn(m, r, generator=gen), torch.randn(r, k, generator=gen) / math.sqrt(k)


def _unpack_bits(bits, k):
    """(M, k) bool from packed keep bits (M, ceil(k / 8)) uint8: column c is bit c % 8 of byte c // 8."""
    lanes = (bits.to(torch.int32)[:, :, None] >> torch.arange(8, device=bits.device)) & 1
    return lanes.reshape(bits.shape[0], -1)[:, :k].bool()


def _pack_bits(keep):
    """`_unpack_bits`' inverse: (M, k) bool -> (M, ceil(k / 8)) uint8."""
    m, k = keep.shape
    lanes = torch.nn.functional.pad(keep.to(torch.int32), (0, -k % 8)).reshape(m, -1, 8)
    return (lanes << torch.arange(8, device=keep.device)).sum(-1).to(torch.uint8)


@settings(max_examples=16, deadline=None)
@given(**TMA_CASES, p=st.sampled_from([0.0, 0.3]), split=st.sampled_from([1, 2, 4]), chunk_m=st.integers(1, 3),
       prefetch=st.booleans())
def test_tma_gemm_backward_epilogue_masks_the_term_and_takes_grad_a(m, k8, n8, r, dtype, p, split, chunk_m, prefetch):
    """The dx role: dx = dy·W + keep ⊙ (g·A) with the dropout mask read from bits in the epilogue (in 1, 2 or 4
    column parts), and dA += gᵀ·(keep ⊙ x) from the x tiles the epilogue loads, summed over units of 1-3 row
    blocks (a shorter last unit) before it is added, g and A loaded before or after the K-loop; both against
    fp64."""
    n_out, k = 8 * n8, 8 * k8
    dy, w, x, gr, la = _dx_operands(m, n_out, k, r, dtype)
    keep = dropout_keep_mask(99 + m, m, k, p) if p else torch.ones(m, k, dtype=torch.bool)
    assert torch.equal(_unpack_bits(_pack_bits(keep), k), keep)
    config = K._tma_config() | dict(BLOCK_N=64 if split == 4 else 32, EPI_SPLIT=split, BLOCK_M=16, CHUNK_M=chunk_m,
                                    PREFETCH=prefetch)
    da = torch.zeros(r, k)
    dx = K.gemm_lora_tma(dy, w.t(), None, gr, la.t(), 1.0, dtype, mask_bits=_pack_bits(keep) if p else None,
                         da=da, da_x=x, config=config)
    keep = keep.double()
    g_op = gr.to(dtype).double()
    assert rel_err(dx, dy.double() @ w.double() + keep * (g_op @ la.to(dtype).double())) <= TOL[dtype]
    assert rel_err(da, g_op.T @ (keep * x.double())) <= TOL[torch.float32]


@settings(max_examples=12, deadline=None)
@given(**TMA_CASES, p=st.sampled_from([0.05, 0.5]), split=st.sampled_from([1, 2, 4]))
def test_dropout_mask_travels_as_bits_from_grad_a_to_the_tma_gemm(m, k8, n8, r, dtype, p, split):
    """lora_grad_a writes the keep-mask it generates for dA as bits (8 columns a byte, any width: the last byte is
    partial), equal to `dropout_keep_mask`; the TMA GEMM reads them for dx's masked term (in 1, 2 or 4 column
    parts) and matches fp64."""
    n_out, k = 8 * n8, 8 * k8 + (m % 8 if dtype == torch.float32 else 0)  # fp32 rows: any width is 16-byte aligned
    if (k * torch.finfo(dtype).bits // 8) % 16:
        k += 8 - k % 8
    dy, w, x, gr, la = _dx_operands(m, n_out, k, r, dtype)
    keep = dropout_keep_mask(31 + m, m, k, p)
    bits = torch.full((m, (k + 7) // 8), 0xAA, dtype=torch.uint8)  # poisoned: every byte must be written
    da = torch.zeros(r, k)
    K.lora_grad_a(gr, x, 1.0, da, mask_seed=torch.tensor([31 + m]), threshold=K.dropout_threshold(p), keep_bits=bits)
    assert torch.equal(_unpack_bits(bits, k), keep)
    g_op = gr.to(dtype).double()
    assert rel_err(da, g_op.T @ (keep.double() * x.double())) <= TOL[torch.float32]
    config = K._tma_config() | dict(BLOCK_N=64 if split == 4 else 32, EPI_SPLIT=split, BLOCK_M=16)
    dx = K.gemm_lora_tma(dy, w.t(), None, gr, la.t(), 1.0, dtype, mask_bits=bits, config=config)
    assert rel_err(dx, dy.double() @ w.double() + keep.double() * (g_op @ la.to(dtype).double())) <= TOL[dtype]


@pytest.mark.parametrize("r", [1, 16, 29, 40, 100])
@pytest.mark.parametrize("has_dx", [False, True])
def test_grad_a_with_each_tiling_it_uses_on_a_gpu(monkeypatch, r, has_dx):
    """The tilings `_grad_a_tiles` picks on a GPU for each rank class (up to 16, up to 32, up to 64, above), mode (with
    or without dx's term or the mask's bits) and x's element size (2 and 4 bytes), run under the interpreter on a
    width that leaves a partial last tile: dA, dx's masked term and the mask's bits are right."""
    monkeypatch.setattr(K, "_INTERPRET", False)
    tilings = [K._grad_a_tiles(K._rank_pad(r), has_dx, itemsize, bits) for itemsize in (2, 4)
               for bits in ((False,) if has_dx else (False, True))]
    monkeypatch.undo()
    assert all(t[0] * t[1] <= 32 * 128 for t in tilings[len(tilings) // 2:])  # fp32 x: tiles no larger than before
    m, k, p = 70, 8 * 37, 0.3
    x, g, a = torch.randn(m, k), torch.randn(m, r), torch.randn(r, k)
    keep = dropout_keep_mask(5, m, k, p)
    for tiles in tilings:
        assert tiles[1] % 8 == 0  # a tile never splits a group of eight columns (one Philox call, one byte of bits)
        da = torch.zeros(r, k)
        dx = torch.empty(m, k) if has_dx else None
        bits = torch.full((m, k // 8), 0xAA, dtype=torch.uint8)
        K.lora_grad_a(g, x, 1.0, da, mask_seed=torch.tensor([5]), threshold=K.dropout_threshold(p),
                      lora_a=a if has_dx else None, dx=dx, keep_bits=bits, tiles=tiles)
        assert torch.equal(_unpack_bits(bits, k), keep)
        assert rel_err(da, g.double().T @ (keep.double() * x.double())) <= TOL[torch.float32]
        if has_dx:
            assert rel_err(dx, keep.double() * (g.double() @ a.double())) <= TOL[torch.float32]


def test_grad_a_picks_its_tiles_by_rank_mode_and_element_size(monkeypatch):
    """Without `tiles=`, lora_grad_a asks `_grad_a_tiles` with the padded rank, whether it writes dx's term, x's
    element size and whether it writes the mask's bits."""
    seen, real = [], K._grad_a_tiles
    monkeypatch.setattr(K, "_grad_a_tiles", lambda *args: seen.append(args) or real(*args))
    m, k = 20, 24
    for dtype, has_dx, r, bits in ((torch.float16, True, 40, False), (torch.float32, False, 3, False),
                                   (torch.float16, False, 9, True)):
        x, g = torch.randn(m, k).to(dtype), torch.randn(m, r)
        K.lora_grad_a(g, x, 1.0, torch.zeros(r, k), lora_a=torch.randn(r, k) if has_dx else None,
                      dx=torch.empty(m, k, dtype=dtype) if has_dx else None,
                      mask_seed=torch.tensor([1]) if bits else None, threshold=K.dropout_threshold(0.5),
                      keep_bits=torch.empty(m, k // 8, dtype=torch.uint8) if bits else None)
    assert seen == [(64, True, 2, False), (16, False, 4, False), (16, False, 2, True)]


def test_lora_dy_takes_larger_row_blocks_at_ranks_32_and_64_where_they_mean_fewer_atomics(monkeypatch):
    """On a GPU, `_dy_tiles` gives ranks 32 and 64 blocks of 256 rows where dB's and g's atomics then add up to fewer
    (the 8192-row shapes with N of 4096 and 14336), and 128 rows elsewhere (N = 1024 ties, 2048² has more, rank 16 is
    bound by dy's read); with Hopper-class shared memory, 512 rows in two stages where they cut the count by a quarter
    more (8192×14336 only). On an A100 (163 KB a block) the 256-row blocks keep three stages; on consumer GPUs (99 KB)
    rank 64 takes two, since three need 106,496 bytes. Each tiling it picks computes g and dB right under the
    interpreter, on an odd shape."""
    monkeypatch.setattr(K, "_INTERPRET", False)
    K._dy_tiles.cache_clear()
    shapes = ((8192, 4096), (8192, 14336), (8192, 1024), (2048, 2048))
    tiles_on = lambda smem: {(m, n, r): K._dy_tiles(m, n, r, 132, smem) for m, n in shapes for r in (16, 32, 64)}
    picks, hopper, consumer = tiles_on(166_912), tiles_on(232_448), tiles_on(101_376)
    big = K._dy_tiles(300, 90, 128, 132, 232_448)
    monkeypatch.undo()
    K._dy_tiles.cache_clear()
    assert {key for key, tiles in picks.items() if tiles[0] == 256} == {
        (8192, n, r) for n in (4096, 14336) for r in (32, 64)}
    assert set(picks.values()) == {(256, 64, 8, 3), (128, 64, 4, 3)}
    assert {key: tiles for key, tiles in hopper.items() if tiles != picks[key]} == {
        (8192, 14336, r): (512, 64, 8, 2) for r in (32, 64)}
    assert {key: tiles for key, tiles in consumer.items() if tiles != picks[key]} == {
        (8192, n, 64): (256, 64, 8, 2) for n in (4096, 14336)}
    m, n = 300, 90
    for tiles, r in ((big, 70), (picks[8192, 4096, 32], 29), (picks[8192, 1024, 64], 7),
                     (hopper[8192, 14336, 64], 33)):
        dy, b, xa = torch.randn(m, n), torch.randn(n, r), torch.randn(m, r)
        g, db = torch.zeros(m, r), torch.zeros(n, r)
        K.lora_dy(dy, b, xa, 0.5, 2.0, g, db, tiles=tiles)
        assert rel_err(g, 2.0 * dy.double() @ b.double()) <= TOL[torch.float32]
        assert rel_err(db, 0.5 * dy.double().T @ xa.double()) <= TOL[torch.float32]


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_down_splits_k_and_sums_xa_with_atomics(splits, p):
    """With an fp32 output, lora_down may split K over programs that add their shares of xa with atomics: right for
    splits that leave a partial last block (232 columns in blocks of 32) and more splits than blocks (8 asked, 8
    blocks), masked or not."""
    m, k, r = 37, 8 * 29, 5
    x, a = torch.randn(m, k), torch.randn(r, k)
    seed = torch.tensor([3]) if p else None
    xa = K.lora_down(x, a, 0.5, torch.float32, mask_seed=seed, threshold=K.dropout_threshold(p), splits=splits)
    keep = dropout_keep_mask(3, m, k, p).double() if p else 1.0
    assert xa.dtype == torch.float32
    assert rel_err(xa, 0.5 * (keep * x.double()) @ a.double().T) <= TOL[torch.float32]


def test_lora_down_splits_only_into_fp32_without_the_up_projection():
    """Atomics sum in fp32 and the up-projection needs the whole xa: a split asked with a half-precision output (and
    no may_split) or with lora_b is refused, with what it needs. With may_split, a half-precision pass comes back in
    fp32 where it splits (masked, under the interpreter: more than one 32-column block) and in its own dtype where
    it does not."""
    x, a, b = torch.randn(20, 64), torch.randn(4, 64), torch.randn(8, 4)
    needs = "may_split=True or out_dtype=torch.float32, and no lora_b"
    with pytest.raises(ValueError, match=needs):
        K.lora_down(x.half(), a, 1.0, torch.float16, splits=2)
    with pytest.raises(ValueError, match=needs):
        K.lora_down(x, a, 1.0, torch.float32, lora_b=b, splits=2)
    xa, y = K.lora_down(x, a, 1.0, torch.float32, lora_b=b, splits=1)
    assert rel_err(y, x.double() @ a.double().T @ b.double().T) <= TOL[torch.float32]
    seed, thr = torch.tensor([6]), K.dropout_threshold(0.25)
    for k, dtype in ((64, torch.float32), (32, torch.float16)):
        xh = x[:, :k].half()
        xa = K.lora_down(xh, a[:, :k], 1.0, torch.float16, mask_seed=seed, threshold=thr, may_split=True)
        assert xa.dtype == dtype
        keep = dropout_keep_mask(6, 20, k, 0.25).double()
        assert rel_err(xa, (keep * xh.double()) @ a[:, :k].half().double().T) <= TOL[torch.float16]
    assert K.lora_down(x.half(), a, 1.0, torch.float16, may_split=True).dtype == torch.float16  # unmasked: no split
    with pytest.raises(ValueError, match="splits must be at least 1, got 0"):
        K.lora_down(x, a, 1.0, torch.float32, splits=0)
    empty = K.lora_down(x[:, :0], a[:, :0], 1.0, torch.float32, mask_seed=seed, threshold=thr, splits=3)
    assert empty.shape == (20, 4) and not empty.any()  # no columns: xa = 0, whatever the splits


def test_lora_down_plan_splits_the_masked_pass_where_it_measured_faster(monkeypatch):
    """On a GPU, `_down_plan` splits K for the masked pass into fp32 at ranks up to 32 (8 splits at 8192×4096 and
    2048²) and at rank 64 where the row blocks do not fill the GPU (2048², 4 splits); never unmasked or where the
    output cannot take atomics. Each tiling it picks is right under the interpreter, on an odd shape."""
    monkeypatch.setattr(K, "_INTERPRET", False)
    K._down_plan.cache_clear()
    plan = {(m, k, r, masked, ok): K._down_plan(m, k, r, masked, ok, 132) for m, k in ((8192, 4096), (2048, 2048))
            for r in (16, 64) for masked in (False, True) for ok in (False, True)}
    monkeypatch.undo()
    K._down_plan.cache_clear()
    assert {key: tiles for key, tiles in plan.items() if tiles[3] > 1} == {
        (8192, 4096, 16, True, True): (64, 64, 4, 8), (2048, 2048, 16, True, True): (64, 64, 4, 8),
        (2048, 2048, 64, True, True): (32, 128, 4, 4)}
    m, k, r, p = 70, 8 * 37, 13, 0.3
    x, a = torch.randn(m, k), torch.randn(r, k)
    keep = dropout_keep_mask(4, m, k, p).double()
    for bm, bk, warps, splits in set(plan.values()):
        xa = K.lora_down(x, a, 2.0, torch.float32, mask_seed=torch.tensor([4]), threshold=K.dropout_threshold(p),
                         tiles=(bm, bk, warps), splits=splits)
        assert rel_err(xa, 2.0 * (keep * x.double()) @ a.double().T) <= TOL[torch.float32]


def test_gemm_lora_with_a_mask_runs_the_pointer_kernel(monkeypatch):
    """gemm_lora with a dropout mask, at shapes the TMA kernel could take: the pointer kernel generates the mask (the
    TMA kernel only reads it as bits) and lora_grad_a computes dA; both match fp64."""
    monkeypatch.setattr(K, "gemm_lora_tma", lambda *args, **kw: pytest.fail("the TMA kernel cannot generate a mask"))
    m, n_out, k, r, p = 40, 32, 48, 5, 0.3
    dy, w, x, gr, la = _dx_operands(m, n_out, k, r, torch.float32)
    assert K.tma_gemm_available(dy, w.t())
    da = torch.zeros(r, k)
    dx = K.gemm_lora(dy, w.t(), None, gr, la.t(), 1.0, torch.float32, mask_seed=torch.tensor([11]),
                     threshold=K.dropout_threshold(p), da=da, da_x=x)
    keep = dropout_keep_mask(11, m, k, p).double()
    assert rel_err(dx, dy.double() @ w.double() + keep * (gr.double() @ la.double())) <= TOL[torch.float32]
    assert rel_err(da, gr.double().T @ (keep * x.double())) <= TOL[torch.float32]


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 100), k8=st.integers(1, 12), n8=st.integers(1, 24), r=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.float16]), chunk=st.integers(1, 4), prefetch=st.booleans())
def test_tma_gemm_reuses_xa_across_a_unit_of_column_blocks(m, k8, n8, r, dtype, chunk, prefetch):
    """Walked in units of `chunk` column blocks (the last unit of a row may be shorter), the forward computes
    xa once per unit and every tile of the unit adds xa·dᵀ (d's columns loaded before or after each tile's K-loop);
    xa is stored once per row block."""
    k, n = 8 * k8, 8 * n8
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n + r)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
    down = torch.randn(r, k, generator=g) / math.sqrt(k)
    d = torch.randn(n, r, generator=g) / math.sqrt(r)
    config = K._tma_config() | dict(BLOCK_N=16, CHUNK_N=chunk, PREFETCH=prefetch)
    out, xa = K.gemm_lora_tma(a, b, None, None, d, 2.0, dtype, down=down, config=config)
    assert rel_err(xa, 2.0 * a.double() @ down.to(dtype).double().T) <= TOL[dtype]
    assert rel_err(out, a.double() @ b.double().T + xa.double() @ d.to(dtype).double().T) <= TOL[dtype]


def test_tma_descriptors_are_validated_copies_that_keep_no_tensor():
    """`_descriptor` hands back what Triton's constructor would, copied from the first one validated for the
    same (dtype, shape, strides, block), with its own base; the cache holds no reference to any tensor."""
    import gc
    import weakref

    from triton.tools.tensor_descriptor import TensorDescriptor

    K._DESCRIPTORS.clear()
    first = torch.randn(48, 40)
    gone = weakref.ref(first)
    K._descriptor(first, (48, 40), (40, 1), (16, 8))
    del first
    gc.collect()
    assert gone() is None
    t = torch.randn(48, 40)
    copy = K._descriptor(t, (48, 40), (40, 1), (16, 8))
    fresh = TensorDescriptor(t, [48, 40], [40, 1], [16, 8])
    assert type(copy) is TensorDescriptor and copy.base is t
    assert {k: v for k, v in vars(copy).items() if k != "base"} == {k: v for k, v in vars(fresh).items() if k != "base"}
    with pytest.raises(ValueError, match="power of 2"):  # the first of a kind still runs Triton's checks
        K._descriptor(t, (48, 40), (40, 1), (16, 12))
    narrow = torch.randn(48, 4)  # 16-byte rows in fp32, 8-byte rows in fp16: the dtype is part of the key
    K._descriptor(narrow, (48, 4), (4, 1), (16, 4))
    with pytest.raises(AssertionError, match="16-byte"):
        K._descriptor(narrow.half(), (48, 4), (4, 1), (16, 4))


def test_tma_gemm_refuses_conflicting_lora_operands():
    a, b = torch.randn(16, 32), torch.randn(24, 32)
    with pytest.raises(ValueError, match="exclude each other"):
        K.gemm_lora_tma(a, b, None, torch.randn(16, 4), torch.randn(24, 4), 1.0, a.dtype, da=torch.zeros(4, 24),
                        da_x=torch.randn(16, 24), config=K._tma_config() | dict(CHUNK_M=2, CHUNK_N=2))
    with pytest.raises(ValueError, match="they need da and da_x"):
        K.gemm_lora_tma(a, b, None, torch.randn(16, 4), torch.randn(24, 4), 1.0, a.dtype,
                        config=K._tma_config() | dict(CHUNK_M=2))
    with pytest.raises(ValueError, match="pass c or down, not both"):
        K.gemm_lora_tma(a, b, None, torch.randn(16, 4), torch.randn(24, 4), 1.0, a.dtype, down=torch.randn(4, 32))
    with pytest.raises(ValueError, match=r"down must be \(R, 32\)"):
        K.gemm_lora_tma(a, b, None, None, torch.randn(24, 4), 1.0, a.dtype, down=torch.randn(4, 40))
    with pytest.raises(ValueError, match="unknown config keys"):
        K.gemm_lora_tma(a, b, None, None, None, 1.0, a.dtype, config=K._tma_config() | dict(EPI_SPLT=2))
    with pytest.raises(ValueError, match="da needs the LoRA operands"):
        K.gemm_lora_tma(a, b, None, None, None, 1.0, a.dtype, da=torch.zeros(4, 24), da_x=torch.randn(16, 24))
    with pytest.raises(ValueError, match=r"mask_bits must be a \(16, 3\) uint8 tensor"):
        K.gemm_lora_tma(a, b, None, torch.randn(16, 4), torch.randn(24, 4), 1.0, a.dtype,
                        mask_bits=torch.zeros(16, 24, dtype=torch.uint8))
    with pytest.raises(ValueError, match="needs mask_seed"):
        K.lora_grad_a(torch.randn(16, 4), a, 1.0, torch.zeros(4, 32), keep_bits=torch.zeros(16, 4, dtype=torch.uint8))


def test_tma_gemm_refuses_da_beyond_the_shared_memory_of_a_hopper_block(monkeypatch):
    """On a GPU, dA in the TMA GEMM's epilogue at rank pad 256 needs 294,912 bytes of shared memory (Hopper has
    232,448): the launcher refuses it by name, with the limit and the way around it, and writes nothing. Rank pad 128
    (180,248 bytes) is accepted; the interpreter has no such limit."""
    a, b = torch.randn(16, 32), torch.randn(24, 32)
    da = torch.zeros(129, 24)
    interpreted = K._INTERPRET
    monkeypatch.setattr(K, "_INTERPRET", False)
    with pytest.raises(ValueError, match=r"dA in the epilogue at rank 129 \(padded to 256\).*up to rank 128"):
        K.gemm_lora_tma(a, b, None, torch.randn(16, 129), torch.randn(24, 129), 1.0, a.dtype, da=da,
                        da_x=torch.randn(16, 24))
    assert not da.any()
    if not interpreted:
        return
    monkeypatch.setattr(K, "_INTERPRET", True)
    out = K.gemm_lora_tma(a, b, None, torch.randn(16, 129), torch.randn(24, 129), 1.0, a.dtype, da=da,
                          da_x=torch.randn(16, 24))
    assert out.shape == (16, 24) and da.any()


def test_gemm_lora_keeps_da_beyond_rank_128_off_the_tma_gemm():
    """`gemm_lora` hands dA to the TMA GEMM's epilogue only up to rank pad 128 (past it the GEMM's shared memory runs
    out on a GPU): beyond, the pointer kernel and `lora_grad_a`, with the same result; at rank 16 the TMA GEMM."""
    m, n, k = 24, 16, 40
    for r, tma_expected in ((129, False), (16, True)):
        a, b, c, d = torch.randn(m, k), torch.randn(n, k), torch.randn(m, r), torch.randn(n, r)
        x = torch.randn(m, n)
        da = torch.zeros(r, n)
        with mock.patch.object(K, "gemm_lora_tma", wraps=K.gemm_lora_tma) as tma, \
                mock.patch.object(K, "tma_gemm_available", lambda *_: True):
            out = K.gemm_lora(a, b, None, c, d, 0.5, torch.float32, da=da, da_x=x)
        assert tma.called == tma_expected
        assert rel_err(out, a.double() @ b.double().T + 0.5 * c.double() @ d.double().T) <= TOL[torch.float32]
        assert rel_err(da, 0.5 * c.double().T @ x.double()) <= TOL[torch.float32]


def test_tma_needs_hopper_class_shared_memory(monkeypatch):
    """Compute capability 9 or more is not enough for the TMA GEMM: consumer Blackwell (sm_120) has ~100 KB of shared
    memory a block, and its tiles need 180 KB. With less than Hopper's, the op takes the cuBLAS path."""
    props = {"shared_memory_per_block_optin": 101_376}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("Props", (), props)())
    dev = torch.device("cuda", 0)
    K._has_tma.cache_clear(), K._smem_per_block.cache_clear()
    try:
        assert not K._has_tma(dev)
        props["shared_memory_per_block_optin"] = 232_448  # H100 / H200 / B200
        K._has_tma.cache_clear(), K._smem_per_block.cache_clear()
        assert K._has_tma(dev)
        # A torch that does not report it: CUDA's figure for the compute capability.
        for cap, smem in (((9, 0), 232_448), ((8, 0), 166_912), ((8, 6), 101_376), ((12, 0), 101_376)):
            props.clear()
            props.update(major=cap[0], minor=cap[1])
            K._smem_per_block.cache_clear()
            assert K._smem_per_block(dev) == smem
    finally:
        K._has_tma.cache_clear(), K._smem_per_block.cache_clear()


def test_wrong_mask_bits_are_refused_before_anything_is_written():
    """A keep_bits or mask_bits buffer of the wrong shape or dtype is refused with its message before any launch: the
    buffers handed in (bits, dA) are as they were."""
    a, b, g = torch.randn(16, 32), torch.randn(24, 32), torch.randn(16, 4)
    da = torch.zeros(4, 32)
    for bits in (torch.full((16, 3), 0xAA, dtype=torch.uint8), torch.full((16, 4), 0xAA, dtype=torch.int16)):
        before = bits.clone()
        with pytest.raises(ValueError, match=r"keep_bits must be a \(16, 4\) uint8 tensor"):
            K.lora_grad_a(g, a, 1.0, da, mask_seed=torch.tensor([1]), threshold=K.dropout_threshold(0.5),
                          keep_bits=bits)
        assert torch.equal(bits, before) and not da.any()
    bits = torch.full((16, 4), 0xAA, dtype=torch.uint8)  # (16, ceil(24 / 8)) = (16, 3) expected
    with pytest.raises(ValueError, match=r"mask_bits must be a \(16, 3\) uint8 tensor"):
        K.gemm_lora_tma(a, b, None, g, torch.randn(24, 4), 1.0, a.dtype, mask_bits=bits)
    assert torch.equal(bits, torch.full((16, 4), 0xAA, dtype=torch.uint8))


def test_auto_fuses_large_aligned_gemms(monkeypatch):
    """"auto" runs one Triton GEMM (the TMA kernel) at TMA-aligned shapes of at least `_TRITON_MIN_MACS`. On that
    path the forward computes xa inside the GEMM when there is no dropout mask and `down_in_gemm` says it pays, and
    the backward takes dA in the dx GEMM's epilogue where that GEMM's K-loop (dy's columns) is at least
    `_DA_IN_EPILOGUE_MIN_K` long, else from its own pass over x. With dropout, dA's pass writes
    the mask as bits for the dx GEMM, at any rank. The op matches fp64 on every path."""
    from lora_engine import ops

    a, b = torch.randn(64, 32), torch.randn(48, 32)
    set_base_gemm("auto")
    calls = []
    for name in ("lora_down", "lora_dy", "lora_grad_a"):
        fn = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *args, _fn=fn, _name=name, **kw: calls.append(
            _name + (" with bits" if kw.get("keep_bits") is not None else "")) or _fn(*args, **kw))
    x, w, bias, la, lb = make_inputs((2, 9), 40, 24, 8, torch.float32, seed=5)
    assert K.down_in_gemm(x.reshape(-1, 40), w, 8)

    def passes(p):
        calls.clear()
        outs, refs = run_both(x, w, bias, la, lb, scaling=2.0, p=p)
        assert_close(outs, refs, TOL[torch.float32])
        return list(calls)

    try:
        assert not ops._fused_gemm(a, b)  # below the size where the fused GEMM pays
        monkeypatch.setattr(ops, "_TRITON_MIN_MACS", 0)
        assert ops._fused_gemm(a, b) == "tma"
        assert not ops._fused_gemm(torch.randn(64, 30), torch.randn(48, 30))
        monkeypatch.setattr(ops, "_DA_IN_EPILOGUE_MIN_K", 25)  # dy's 24 columns, a short K-loop: dA's own pass
        assert passes(0.0) == ["lora_dy", "lora_grad_a"]
        monkeypatch.setattr(ops, "_DA_IN_EPILOGUE_MIN_K", 24)
        assert passes(0.0) == ["lora_dy"]
        # the masked dx term from the mask dA's pass writes as bits; without them, the cuBLAS path
        assert passes(0.2) == ["lora_down", "lora_dy", "lora_grad_a with bits"]
        monkeypatch.setattr(ops, "_MASK_BITS", False)
        assert passes(0.2) == ["lora_down", "lora_dy", "lora_grad_a"]
        monkeypatch.setattr(ops, "_MASK_BITS", True)
        x, w, bias, la, lb = make_inputs((2, 9), 40, 24, 40, torch.float32, seed=6)  # rank 40: the same path
        assert passes(0.2) == ["lora_down", "lora_dy", "lora_grad_a with bits"]
        x, w, bias, la, lb = make_inputs((2, 9), 40, 24, 8, torch.float32, seed=5)
        monkeypatch.setattr(K, "_DOWN_IN_GEMM_MAX_BLOCKS", 0)  # xa as its own pass, the GEMM adds xa·Bᵀ
        assert passes(0.0) == ["lora_down", "lora_dy"]
        set_base_gemm("cublas")
        assert not ops._fused_gemm(a, b)
        set_base_gemm("triton")
        assert ops._fused_gemm(a, b) == "tma"
        # where TMA cannot address the operands, the pointer kernel masks dx's term itself; dA from its own pass
        x, w, bias, la, lb = make_inputs((2, 9), 36, 21, 8, torch.float32, seed=7)  # rows of 84 bytes
        assert ops._fused_gemm(torch.randn(18, 21), w.t()) == "pointer"
        assert passes(0.2) == ["lora_down", "lora_dy", "lora_grad_a"]
    finally:
        set_base_gemm("auto")


def test_unknown_base_gemm_is_named_and_changes_nothing():
    from lora_engine import ops

    before = ops._base_gemm
    with pytest.raises(ValueError, match=r"unknown base GEMM 'cutlass'; choose one of \('auto', 'cublas', 'triton'\)"):
        set_base_gemm("cutlass")
    assert ops._base_gemm == before


def test_dropout_is_reproducible_and_has_the_right_rate():
    x, w, b, a, bb = make_inputs((64,), 128, 16, 8, torch.float32)
    torch.manual_seed(7)
    y1 = lora_linear(x, w, b, a, bb, 1.0, 0.5)
    torch.manual_seed(7)
    y2 = lora_linear(x, w, b, a, bb, 1.0, 0.5)
    y3 = lora_linear(x, w, b, a, bb, 1.0, 0.5)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    keep = dropout_keep_mask(123, 256, 512, 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.01


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_mask_has_its_rate_and_no_correlation_between_neighbours_or_seeds(p):
    """The kernels' mask (equal to `dropout_keep_mask`, tested above and on the GPU) from 7-round Philox: its keep rate
    in each of the eight lanes of a Philox call within 6 binomial sigmas of 1 - p, and no correlation (|r| within 6
    sigmas of n independent pairs, 6/√n) between an element and its right neighbour in the same call or across
    calls, the element below it, or the same element under the next seed."""
    rows, cols = 512, 1024
    keeps = [dropout_keep_mask(seed, rows, cols, p).double() for seed in (2024, 2025)]
    keep = keeps[0]
    sigma = math.sqrt(p * (1 - p) / (rows * cols / 8))
    lane_rates = keep.view(rows, cols // 8, 8).mean(dim=(0, 1))
    assert (lane_rates - (1 - p)).abs().max().item() < 6 * sigma, lane_rates

    def corr(u, v):
        u, v = u.flatten() - u.mean(), v.flatten() - v.mean()
        return (u @ v / (u.norm() * v.norm())).item()

    pairs = {
        "right neighbour, same call": (keep[:, 0::8], keep[:, 1::8]),
        "right neighbour, next call": (keep[:, 7:-1:8], keep[:, 8::8]),
        "below": (keep[:-1], keep[1:]),
        "next seed": (keeps[0], keeps[1]),
    }
    for name, (u, v) in pairs.items():
        assert abs(corr(u, v)) < 6 / math.sqrt(u.numel()), (name, corr(u, v))


def test_eval_mode_has_no_dropout():
    x, w, b, a, bb = make_inputs((9,), 16, 8, 4, torch.float32)
    y_eval = lora_linear(x, w, b, a, bb, 1.0, 0.9, training=False)
    y_none = lora_linear_reference(x, w, b, a, bb, 1.0, 0.0)
    assert rel_err(y_eval, y_none) < 1e-6


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_without_grad_the_forward_is_the_same_and_records_nothing(p):
    """Under no_grad (or with nothing requiring grad) the op runs the same kernels without an autograd node:
    the same y, bit for bit, as the differentiable call with the same dropout seed, against fp64 too."""
    x, w, b, a, bb = make_inputs((3, 7), 40, 24, 8, torch.float32)
    torch.manual_seed(3)
    y_grad = lora_linear(x, w, b, a, bb, 2.0, p)
    torch.manual_seed(3)
    with torch.no_grad():
        y = lora_linear(x, w, b, a, bb, 2.0, p)
    torch.manual_seed(3)
    y_detached = lora_linear(x.detach(), w, None if b is None else b.detach(), a.detach(), bb.detach(), 2.0, p)
    assert y_grad.grad_fn is not None and y.grad_fn is None and y_detached.grad_fn is None
    assert torch.equal(y, y_grad) and torch.equal(y_detached, y_grad)
    torch.manual_seed(3)
    ref = lora_linear_reference(x.double(), w.double(), None if b is None else b.double(), a.double(), bb.double(),
                                2.0, p)
    assert rel_err(y, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_an_empty_batch_runs_forward_and_backward(monkeypatch, p):
    """No tokens (a leading dim of 0): an empty y and x.grad, and zero grads for A, B and the bias, as the reference
    gives; the GPU's grid plans size empty ranges to one part instead of dividing by zero."""
    x, w, b, a, bb = make_inputs((2, 0), 32, 24, 4, torch.float32)
    y = lora_linear(x, w, b, a, bb, 2.0, p)
    y.sum().backward()
    assert y.shape == (2, 0, 24) and x.grad.shape == x.shape
    assert not a.grad.any() and not bb.grad.any() and not b.grad.any()
    monkeypatch.setattr(K, "_INTERPRET", False)
    try:
        assert K._dy_tiles(0, 4104, 64, 132, 232_448) == (128, 64, 4, 3)
        assert K._down_plan(0, 4104, 16, True, True, 132)[3] >= 1
        assert K._down_plan(8200, 0, 64, True, True, 132)[3] == 1
    finally:  # tiles picked as on a GPU stay out of the interpreter's caches
        K._dy_tiles.cache_clear(), K._down_plan.cache_clear()


def test_no_grad_input_skips_dx():
    x, w, b, a, bb = make_inputs((9,), 16, 8, 4, torch.float32)
    x = x.detach()
    y = lora_linear(x, w, None, a, bb, 1.0)
    y.sum().backward()
    assert a.grad is not None and bb.grad is not None


def test_lora_params_keep_their_dtype():
    x, w, b, a, bb = make_inputs((9,), 16, 8, 4, torch.float16, lora_dtype=torch.float32)
    y = lora_linear(x, w, b, a, bb, 1.0)
    y.float().sum().backward()
    assert y.dtype == torch.float16
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32


def test_frozen_weight_is_required():
    x, w, b, a, bb = make_inputs((3,), 8, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="requires_grad"):
        lora_linear(x, w.requires_grad_(), b, a, bb, 1.0)


def test_bad_shapes_are_named():
    x, w, b, a, bb = make_inputs((3,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="lora_a"):
        lora_linear(x, w, b, a[:, :5], bb, 1.0)
    with pytest.raises(ValueError, match="features"):
        lora_linear(x[:, :5], w, b, a, bb, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, b, a, bb, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="autocast"):
        lora_linear(x.half(), w, b, a, bb, 1.0)


def test_kernels_run_on_ampere_or_newer_gpus_only(monkeypatch):
    """CUDA tensors take the kernels on sm_80 and newer; a T4 (sm_75) or V100 (sm_70) takes the torch reference (no bf16
    dots there, and the tiles need more shared memory than a T4 block has)."""
    caps = {0: (7, 5), 1: (8, 0), 2: (9, 0), 3: (12, 0), 4: (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("Props", (), {"major": caps[device.index][0]})())
    on = lambda i: kernels_available(type("CudaTensor", (), {"is_cuda": True, "device": torch.device("cuda", i)})())
    ops._ampere_or_newer.cache_clear()
    try:
        assert [on(i) for i in caps] == [False, True, True, True, False]
    finally:
        ops._ampere_or_newer.cache_clear()


def test_reference_fallback_matches_kernels():
    """The CPU fallback (no interpreter) is the reference: same mask, same numbers."""
    assert kernels_available(torch.zeros(1))  # this suite runs the kernels interpreted
    x, w, b, a, bb = make_inputs((11,), 24, 12, 4, torch.float32)
    torch.manual_seed(3)
    y = lora_linear(x, w, b, a, bb, 0.5, 0.25)
    torch.manual_seed(3)
    y_ref = lora_linear_reference(x, w, b, a, bb, 0.5, 0.25)
    assert rel_err(y, y_ref) < 1e-6


# ---------------------------------------------------------------------------------------------- GPU


def _poison_cache(nbytes=1 << 30):
    """Fill the caching allocator's free blocks with NaN so an unwritten output element shows."""
    torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).fill_(float("nan"))
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [
        ((4096,), 4096, 4096, 16),
        ((2, 2048), 1024, 1032, 16),  # on Hopper: xa inside the forward GEMM, a column tail
        ((2, 1023), 2049, 1537, 8),
        ((777,), 4095, 14335, 64),
        ((3, 5, 7), 100, 200, 256),
    ],
)
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_gpu_against_fp64(dtype, shape, p, base_gemm):
    """Adapters in x's dtype with dropout off; fp32 adapters (what patch_model creates, rounded to x's
    dtype in-kernel as the reference rounds them) with dropout on."""
    lead, k, n, r = shape
    lora_dtype = torch.float32 if p > 0 else dtype
    x, w, b, a, bb = make_inputs(lead, k, n, r, dtype, device="cuda", lora_dtype=lora_dtype, seed=k + n)
    _poison_cache()
    outs, refs = run_both(x, w, b, a, bb, scaling=2.0, p=p)
    assert_close(outs, refs, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [((4096,), 4096, 4096, 256), ((2, 1000), 1032, 4104, 128), ((777,), 4095, 1537, 65)])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_gpu_ranks_above_64_against_fp64(dtype, shape, p):
    """The wide-rank path (torch matmuls around the kernels' mask) on CUDA, fp32 adapters, poisoned cache. Rank 256
    at 4096² once ran the fused TMA dx GEMM with dA, which needed more shared memory than an H200 has."""
    lead, k, n, r = shape
    x, w, b, a, bb = make_inputs(lead, k, n, r, dtype, device="cuda", lora_dtype=torch.float32, seed=k + r)
    _poison_cache()
    outs, refs = run_both(x, w, b, a, bb, scaling=0.5, p=p)
    assert_close(outs, refs, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [((2, 2048), 4096, 4104, 16), ((777,), 4095, 1537, 64)])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_gpu_fp32_x_against_fp64(shape, p):
    """fp32 x, weight and adapters on CUDA at a size the fused path would run on the TMA GEMM: the wide path
    (`ops._wide`), y and every grad against fp64 at fp32's tolerance, poisoned cache."""
    lead, k, n, r = shape
    x, w, b, a, bb = make_inputs(lead, k, n, r, torch.float32, device="cuda", seed=k + r)
    _poison_cache()
    outs, refs = run_both(x, w, b, a, bb, scaling=0.5, p=p)
    assert_close(outs, refs, TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [7, 32, 64])
def test_gpu_fp32_adapters_in_the_forward_gemm(dtype, r):
    """fp32 adapters (patch_model's) with xa computed inside the TMA GEMM (A cast to x's dtype first), ranks up
    to its limit of 64: forward and every gradient against fp64."""
    x, w, b, a, bb = make_inputs((2, 1024), 1024, 1032, r, dtype, device="cuda", seed=r)
    x2 = x.detach().reshape(-1, 1024)
    if not K.down_in_gemm(x2, w, r):
        pytest.skip("xa runs inside the GEMM on Hopper only")
    _poison_cache()
    outs, refs = run_both(x, w, b, a, bb, scaling=2.0, p=0.0)
    assert_close(outs, refs, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1000, 520, 1800, 7), (4104, 1032, 4096, 64), (333, 1032, 2056, 1),
                                   (8200, 1024, 4104, 16), (2056, 4104, 1032, 29)])
def test_gpu_dropout_mask_as_bits(dtype, shape):
    """lora_grad_a's bits equal the reference mask and the TMA GEMM's dx from them matches fp64, at Hopper tile sizes
    and odd shapes, on a poisoned cache."""
    m, n_out, k, r = shape
    gen = torch.Generator(device="cuda").manual_seed(m + r)
    rnd = lambda *s, dt=dtype: torch.randn(*s, device="cuda", dtype=dt, generator=gen)
    dy, w, x = rnd(m, n_out), rnd(n_out, k) / math.sqrt(n_out), rnd(m, k)
    g, la = rnd(m, r, dt=torch.float32), rnd(r, k, dt=torch.float32) / math.sqrt(k)
    if not K.tma_gemm_available(dy, w.t()):
        pytest.skip("the TMA GEMM runs on Hopper or newer")
    _poison_cache()
    keep = dropout_keep_mask(3 + m, m, k, 0.05, device="cuda")
    bits = torch.empty(m, (k + 7) // 8, device="cuda", dtype=torch.uint8)
    da = torch.zeros(r, k, device="cuda")
    K.lora_grad_a(g, x, 1.0, da, mask_seed=torch.tensor([3 + m], device="cuda"), threshold=K.dropout_threshold(0.05),
                  keep_bits=bits)
    assert torch.equal(_unpack_bits(bits, k), keep)
    dx = K.gemm_lora_tma(dy, w.t(), None, g, la.t(), 1.0, dtype, mask_bits=bits)
    g_op = g.to(dtype).double()
    assert rel_err(dx, dy.double() @ w.double() + keep.double() * (g_op @ la.to(dtype).double())) <= TOL[dtype]
    assert rel_err(da, g_op.T @ (keep.double() * x.double())) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [(8200, 14344, 64), (8200, 14344, 29), (8192, 4104, 61), (8192, 4104, 32), (2056, 2048, 64), (777, 4104, 7)],
)
def test_gpu_lora_dy_default_tiles_against_fp64(dtype, shape):
    """lora_dy on the tiles `_dy_tiles` picks on this GPU (on an H200: 512-row blocks in two stages, 256- and
    128-row blocks), g and dB against fp64, odd sizes."""
    m, n, r = shape
    gen = torch.Generator(device="cuda").manual_seed(m + r)
    dy = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
    b = torch.randn(n, r, device="cuda", generator=gen) / math.sqrt(r)
    xa = torch.randn(m, r, device="cuda", dtype=dtype, generator=gen)
    g, db = torch.zeros(m, r, device="cuda"), torch.zeros(n, r, device="cuda")
    K.lora_dy(dy, b, xa, 0.5, 2.0, g, db)
    assert rel_err(g, 2.0 * dy.double() @ b.to(dtype).double()) <= TOL[dtype]
    assert rel_err(db, 0.5 * dy.double().T @ xa.double()) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("base_gemm_name", ["auto", "triton", "cublas"])
def test_gpu_an_empty_batch_runs_forward_and_backward(p, base_gemm_name):
    """No tokens on the GPU, on every base-GEMM path: an empty y and x.grad and zero grads for A, B and the bias
    (the kernels' grids get one part for an empty range; zero-program launches are skipped)."""
    x, w, b, a, bb = make_inputs((2, 0), 4096, 1024, 16, torch.bfloat16, device="cuda")
    set_base_gemm(base_gemm_name)
    try:
        y = lora_linear(x, w, b, a, bb, 2.0, p)
        y.float().sum().backward()
    finally:
        set_base_gemm("auto")
    torch.cuda.synchronize()
    assert y.shape == (2, 0, 1024) and x.grad.shape == x.shape
    assert not a.grad.any() and not bb.grad.any() and not b.grad.any()


@pytest.mark.gpu
def test_gpu_compiles_without_graph_break_with_dropout():
    """The dropout seed is a device tensor read in-kernel: no `.item()`, so fullgraph compiles."""
    x, w, b, a, bb = make_inputs((64,), 128, 96, 8, torch.bfloat16, device="cuda", lora_dtype=torch.float32)
    fn = torch.compile(lambda x_: lora_linear(x_, w, b, a, bb, 2.0, 0.1, True), fullgraph=True)
    y = fn(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all() and a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, r", [(torch.bfloat16, 128), (torch.float32, 16)])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_gpu_compiled_wide_path_matches_fp64(dtype, r, p):
    """The wide path (ranks above 64, fp32 x on a GPU) under torch.compile: cuBLAS matmuls around the kernels' mask,
    with `dropout_apply` masking dx's term in place; forward and every gradient against fp64, fullgraph."""
    x, w, b, a, bb = make_inputs((2, 512), 1024, 1032, r, dtype, device="cuda", lora_dtype=torch.float32, seed=r)
    assert ops._wide(x.detach().reshape(-1, 1024), r)
    compiled = torch.compile(lambda *t: lora_linear(*t, 2.0, p), fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(7)
        y = compiled(x, w, b, a, bb)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb, b), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, bb, b)]
    torch.manual_seed(7)
    y64 = lora_linear_reference(leaves64[0], w.double(), leaves64[3], leaves64[1], leaves64[2], 2.0, p)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    assert_close((y, *grads), (y64, *grads64), TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["auto", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_gpu_compiled_matches_fp64(mode, p):
    """Under torch.compile the op traces without a graph break and its forward and every gradient match fp64
    ("triton" runs the pointer-based fused GEMM there: Dynamo cannot trace the TMA kernel's alignment check).
    A shared workspace of views gave wrong dA and dB here before the backward's buffers were split."""
    x, w, b, a, bb = make_inputs((2, 512), 1024, 1032, 16, torch.bfloat16, device="cuda", seed=5)
    compiled = torch.compile(lambda *t: lora_linear(*t, 2.0, p), fullgraph=True)
    set_base_gemm(mode)
    try:  # fallback_random: the compiled graph draws the dropout seed as eager torch (and the reference) does
        with torch._inductor.config.patch(fallback_random=True):
            torch.manual_seed(7)
            y = compiled(x, w, b, a, bb)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, a, bb, b), dy)
    finally:
        set_base_gemm("auto")
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, bb, b)]
    torch.manual_seed(7)
    y64 = lora_linear_reference(leaves64[0], w.double(), leaves64[3], leaves64[1], leaves64[2], 2.0, p)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    assert_close((y, *grads), (y64, *grads64), TOL[torch.bfloat16])
