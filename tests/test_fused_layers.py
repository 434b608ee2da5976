"""rms_norm and silu_mul (fused Triton kernels) against fp64 references, forward and every gradient.

CPU: the kernels run under TRITON_INTERPRET=1 on small shapes, fp32 and fp16 (bf16 where cheap).
GPU (`-m gpu`): bf16 and fp16 on large and odd shapes, with every output element checked written.

Same-dtype check of rms_norm against `rms_norm_reference` (transformers' formula): the fp32 sums
of squares may differ in their last bit, which can flip the rounding of the normalised value n to
x's dtype, moving w·n by at most eps(x dtype)·|y|; the final rounding adds at most one ulp of y's
dtype. So |y − ref| <= eps_x·|y| + ulp_y(|y|) elementwise, and at least 99% of elements identical.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine import ops
from lora_engine.checkpointing import saved_bytes
from lora_engine.kernels import rmsnorm as rmsnorm_kernels
from lora_engine.ops import rms_norm, rms_norm_reference, silu_mul, silu_mul_reference

# Relative-error tolerances (‖out − ref‖ / ‖ref‖) against an fp64 reference on the same inputs.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
EPS = 1e-6


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (the smallest normal's spacing below it)."""
    info = torch.finfo(dtype)
    mag = x.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def assert_close(outs, refs, tol, names):
    for name, o, r in zip(names, outs, refs, strict=True):
        assert o.shape == r.shape, name
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        err = rel_err(o, r)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def randn(shape, dtype, device="cpu", seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ RMSNorm


def rms_inputs(shape, dtype, w_dtype=None, w_grad=True, device="cpu", seed=0):
    x = randn(shape, dtype, device, seed).requires_grad_()
    w = randn(shape[-1], w_dtype or dtype, device, seed + 1, scale=0.5, shift=1.0).requires_grad_(w_grad)
    return x, w


def run_rms(x, w, eps=EPS, seed=1):
    """Forward + backward of rms_norm and of the fp64 reference; grads of x and w where they require it."""
    y = rms_norm(x, w, eps)
    dy = randn(y.shape, y.dtype, y.device, seed)
    leaves = [t for t in (x, w) if t.requires_grad]
    grads = torch.autograd.grad(y, leaves, dy)
    x64, w64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, w))
    y64 = rms_norm_reference(x64, w64, eps)
    grads64 = torch.autograd.grad(y64, [t for t in (x64, w64) if t.requires_grad], dy.double())
    names = ["y"] + [n for n, t in (("dx", x), ("dw", w)) if t.requires_grad]
    return (y, *grads), (y64, *grads64), names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h", [1, 3, 100, 129, 1000])
@pytest.mark.parametrize("w_grad", [False, True])
def test_rms_norm_matches_fp64(dtype, h, w_grad):
    x, w = rms_inputs((13, h), dtype, w_grad=w_grad, seed=h)
    # With H = 1, dx = w·dy·eps·rstd³ is a difference of two nearly equal terms (1 − n², n² ≈ 1):
    # its relative error is about fp32 eps · x²/eps. A large eps keeps that case well conditioned.
    outs, refs, names = run_rms(x, w, eps=0.5 if h == 1 else EPS)
    assert outs[0].dtype == dtype and outs[1].dtype == dtype
    if w_grad:
        assert outs[2].dtype == dtype
    assert_close(outs, refs, TOL[dtype], names)


def test_rms_norm_non_contiguous_dy():
    """dy arrives expanded (stride 0, from a sum) or transposed (from a matmul on y.t())."""
    x, w = rms_inputs((12, 50), torch.float32)
    a = randn((12, 3), torch.float32, seed=4)
    for loss in (lambda y: y.sum(), lambda y: (y.t() @ a.to(y)).square().sum()):
        grads = torch.autograd.grad(loss(rms_norm(x, w, EPS)), [x, w])
        x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
        grads64 = torch.autograd.grad(loss(rms_norm_reference(x64, w64, EPS)), [x64, w64])
        assert_close(grads, grads64, TOL[torch.float32], ["dx", "dw"])


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_rms_norm_3d_and_mixed_dtypes(x_dtype, w_dtype):
    """The output has torch's promoted dtype (fp32 weight × half x -> fp32), as in transformers."""
    x, w = rms_inputs((2, 5, 100), x_dtype, w_dtype)
    outs, refs, names = run_rms(x, w)
    assert outs[0].shape == (2, 5, 100)
    assert outs[0].dtype == torch.promote_types(x_dtype, w_dtype)
    assert outs[1].dtype == x_dtype and outs[2].dtype == w_dtype
    assert_close(outs, refs, max(TOL[x_dtype], TOL[w_dtype]), names)


def test_rms_norm_non_contiguous_x():
    """A sliced view (row stride > H), a column-major x and a permuted 3-D x."""
    views = [
        randn((40, 131), torch.float32)[:, 3:103],
        randn((100, 40), torch.float32).t(),
        randn((100, 4, 5), torch.float32).permute(1, 2, 0),
    ]
    for x in views:
        assert not x.is_contiguous()
        w = randn(100, torch.float32, seed=2, shift=1.0).requires_grad_()
        outs, refs, names = run_rms(x.requires_grad_(), w)
        assert outs[0].shape == x.shape and outs[1].shape == x.shape
        assert_close(outs, refs, TOL[torch.float32], names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h", [64, 100, 129])
@pytest.mark.parametrize("w_grad", [False, True])
def test_rms_norm_rows_longer_than_a_block(monkeypatch, dtype, h, w_grad):
    """Rows wider than MAX_BLOCK go through the chunked loops (on a GPU: H > 8192)."""
    monkeypatch.setattr(rmsnorm_kernels, "MAX_BLOCK", 32)
    x, w = rms_inputs((2, 7, h), dtype, w_grad=w_grad, seed=h)
    outs, refs, names = run_rms(x, w)
    assert_close(outs, refs, TOL[dtype], names)


def test_rms_norm_weight_grad_only():
    """Full fine-tuning of the norm alone: x needs no grad, weight does."""
    x, w = rms_inputs((9, 50), torch.float32)
    x = x.detach()
    y = rms_norm(x, w, EPS)
    dy = randn(y.shape, y.dtype, seed=3)
    (dw,) = torch.autograd.grad(y, [w], dy)
    w64 = w.detach().double().requires_grad_()
    (dw64,) = torch.autograd.grad(rms_norm_reference(x.double(), w64, EPS), [w64], dy.double())
    assert rel_err(dw, dw64) <= TOL[torch.float32]


def assert_matches_transformers(x, w):
    """rms_norm against transformers' formula in the same dtypes (bound in the module docstring)."""
    with torch.no_grad():
        y = rms_norm(x, w, EPS)
        ref = rms_norm_reference(x, w, EPS)
    assert y.dtype == ref.dtype
    diff = (y.double() - ref.double()).abs()
    mag = torch.maximum(y.double().abs(), ref.double().abs())
    bound = torch.finfo(x.dtype).eps * mag + ulp(mag, y.dtype)
    assert (diff <= bound).all(), f"max diff {diff.max().item():.3e}"
    assert (diff == 0).double().mean().item() >= 0.99


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rms_norm_same_dtype_as_transformers(x_dtype, w_dtype):
    x, w = rms_inputs((64, 1000), x_dtype, w_dtype, w_grad=False, seed=5)
    assert_matches_transformers(x, w)


@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    h=st.integers(2, 300),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    w_grad=st.booleans(),
)
def test_rms_norm_random_shapes(lead, h, dtype, w_grad):
    x, w = rms_inputs((*lead, h), dtype, w_grad=w_grad, seed=h + len(lead))
    outs, refs, names = run_rms(x, w)
    assert_close(outs, refs, TOL[dtype], names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_saves_x_and_rstd_only(dtype):
    m, h = 24, 100
    x, w = rms_inputs((4, 6, h), dtype)
    ours = saved_bytes(lambda: rms_norm(x, w, EPS))
    elt = torch.tensor([], dtype=dtype).element_size()
    assert ours == m * h * elt + 4 * m + h * elt  # x, rstd (fp32 per row) and the weight itself
    reference = saved_bytes(lambda: rms_norm_reference(x, w, EPS))
    assert reference >= ours + m * h * elt  # transformers' formula also keeps the normalised rows


def test_rms_norm_dispatch_and_fallback(monkeypatch):
    x, w = rms_inputs((5, 33), torch.float32)
    y = rms_norm(x, w, EPS)
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"  # the kernels ran (interpreted)
    monkeypatch.setattr(ops, "kernels_available", lambda t: False)
    y_ref = rms_norm(x, w, EPS)
    assert type(y_ref.grad_fn).__name__ != "RMSNormFunctionBackward"
    assert torch.equal(y_ref, rms_norm_reference(x, w, EPS))
    assert rel_err(y, y_ref) <= TOL[torch.float32]


def test_rms_norm_empty_and_bad_shapes():
    x, w = rms_inputs((0, 8), torch.float32)
    assert rms_norm(x, w, EPS).shape == (0, 8)
    x, w = rms_inputs((3, 8), torch.float32)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, w[:7], EPS)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, w.reshape(2, 4), EPS)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x[0, 0], w, EPS)
    with pytest.raises(ValueError, match="weight is on meta"):
        rms_norm(x, w.to("meta"), EPS)


# ------------------------------------------------------------------------------------------- SwiGLU


def swiglu_inputs(shape, dtype, device="cpu", seed=0, scale=2.0):
    gate = randn(shape, dtype, device, seed, scale=scale).requires_grad_()
    up = randn(shape, dtype, device, seed + 1).requires_grad_()
    return gate, up


def run_swiglu(gate, up, seed=2):
    y = silu_mul(gate, up)
    dy = randn(y.shape, y.dtype, y.device, seed)
    grads = torch.autograd.grad(y, [gate, up], dy)
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate, up))
    y64 = silu_mul_reference(g64, u64)
    grads64 = torch.autograd.grad(y64, [g64, u64], dy.double())
    return (y, *grads), (y64, *grads64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (3, 1500), (2, 5, 129), (4, 2048)])
def test_silu_mul_matches_fp64(dtype, shape):
    gate, up = swiglu_inputs(shape, dtype, seed=len(shape))
    outs, refs = run_swiglu(gate, up)
    assert all(o.dtype == dtype for o in outs)
    assert_close(outs, refs, TOL[dtype], ["y", "d_gate", "d_up"])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's exp(-g), g ≪ 0: σ = 0
def test_silu_mul_large_gates_stay_finite():
    """σ(g) saturates for |g| ≫ 1: silu(g) → 0 or g, and the gradients stay finite."""
    gate, up = swiglu_inputs((8, 300), torch.float32, scale=40.0)
    outs, refs = run_swiglu(gate, up)
    assert_close(outs, refs, TOL[torch.float32], ["y", "d_gate", "d_up"])


def test_silu_mul_non_contiguous():
    """Halves of a fused gate_up projection (row stride 2I), and transposed views."""
    gate_up = randn((17, 2 * 90), torch.float32, scale=2.0).requires_grad_()
    gate_t, up_t = (randn((90, 17), torch.float32, seed=s).requires_grad_() for s in (1, 2))
    for g, u in (gate_up.chunk(2, dim=-1), (gate_t.t(), up_t.t())):
        assert not g.is_contiguous() and not u.is_contiguous()
        outs, refs = run_swiglu(g, u)
        assert_close(outs, refs, TOL[torch.float32], ["y", "d_gate", "d_up"])


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_silu_mul_random_shapes(shape, dtype):
    gate, up = swiglu_inputs(tuple(shape), dtype, seed=sum(shape))
    outs, refs = run_swiglu(gate, up)
    assert_close(outs, refs, TOL[dtype], ["y", "d_gate", "d_up"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_saves_gate_and_up_only(dtype):
    gate, up = swiglu_inputs((4, 6, 50), dtype)
    nbytes = gate.numel() * gate.element_size()
    assert saved_bytes(lambda: silu_mul(gate, up)) == 2 * nbytes
    assert saved_bytes(lambda: silu_mul_reference(gate, up)) == 3 * nbytes  # + silu(gate)


def test_silu_mul_one_input_needs_grad():
    gate, up = swiglu_inputs((5, 40), torch.float32)
    up = up.detach()
    y = silu_mul(gate, up)
    y.sum().backward()  # dy is an expanded (stride 0) tensor here
    g64 = gate.detach().double().requires_grad_()
    silu_mul_reference(g64, up.double()).sum().backward()
    assert type(y.grad_fn).__name__ == "SiLUMulFunctionBackward"
    assert rel_err(gate.grad, g64.grad) <= TOL[torch.float32]


def test_silu_mul_bad_inputs():
    gate, up = swiglu_inputs((3, 8), torch.float32)
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(gate, up[:, :7])
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(gate, up.half())
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(gate, up.reshape(8, 3))


def test_bench_layers_smoke(tmp_path, capsys):
    """benchmarks/bench_layers.py's checks, saved-bytes counts and table on tiny CPU shapes."""
    spec = importlib.util.spec_from_file_location(
        "bench_layers", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_layers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.jsonl"
    rows = bench.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    kinds = [("rms_norm", "frozen"), ("rms_norm", "trainable"), ("silu_mul", "-")]
    assert [(r["op"], r["weight"]) for r in rows] == kinds
    m, h, i = bench.CPU_SHAPES[0]
    assert rows[0]["ours_saved"] == m * h * 2 + 4 * m + h * 2  # bf16 x, fp32 rstd, bf16 weight
    assert rows[0]["torch_saved"] == m * h * 4 + 4 * m + h * 2  # an fp32 copy of x instead
    assert rows[2]["ours_saved"] == 2 * m * i * 2 and rows[2]["torch_saved"] == 3 * m * i * 2
    assert all(r["rel_err"] <= TOL[torch.bfloat16] for r in rows)
    assert "| rms_norm | 48×96 | frozen |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- GPU


def _poison_cache(nbytes=2 << 30):
    """Fill the caching allocator's free blocks with NaN so an unwritten output element shows."""
    torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).fill_(float("nan"))
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# (1100, 12288): rows longer than MAX_BLOCK (chunked loops), and more row blocks than backward's
# programs (4 per SM), so the dw partial sums accumulate across a program's rows.
@pytest.mark.parametrize("shape", [(16384, 2048), (8192, 4096), (3001, 5120), (1100, 12288)])
@pytest.mark.parametrize("w_grad", [False, True])
def test_gpu_rms_norm_against_fp64(dtype, shape, w_grad):
    x, w = rms_inputs(shape, dtype, w_grad=w_grad, device="cuda", seed=shape[-1])
    _poison_cache()
    outs, refs, names = run_rms(x, w)
    assert_close(outs, refs, TOL[dtype], names)
    assert_matches_transformers(x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16384, 5632), (4097, 14336)])
def test_gpu_silu_mul_against_fp64(dtype, shape):
    gate, up = swiglu_inputs(shape, dtype, device="cuda", seed=shape[0])
    _poison_cache()
    outs, refs = run_swiglu(gate, up)
    assert_close(outs, refs, TOL[dtype], ["y", "d_gate", "d_up"])


@pytest.mark.gpu
def test_gpu_saved_bytes():
    x, w = rms_inputs((4096, 4096), torch.bfloat16, w_grad=False, device="cuda")
    assert saved_bytes(lambda: rms_norm(x, w, EPS)) == x.numel() * 2 + 4 * 4096 + 4096 * 2
    gate, up = swiglu_inputs((4096, 1000), torch.bfloat16, device="cuda")
    assert saved_bytes(lambda: silu_mul(gate, up)) == 2 * gate.numel() * 2
    assert saved_bytes(lambda: silu_mul_reference(gate, up)) == 3 * gate.numel() * 2
