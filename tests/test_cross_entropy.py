"""linear_cross_entropy (chunked head + loss, Triton per-row kernel) against an fp64 reference.

CPU: the kernel runs under TRITON_INTERPRET=1 on small shapes, fp32 and fp16, several chunk sizes
(one row per chunk up to all rows in one), ignored labels, both reductions, weight grad on and off.
GPU (`-m gpu`): bf16 and fp16 at a Llama-3 vocabulary, every gradient element written.
"""

import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine.ops import linear_cross_entropy, linear_cross_entropy_reference

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make(rows, hidden, vocab, dtype, device="cpu", ignore_every=0, weight_grad=False, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 4  # logits of a few units: a peaked softmax
    labels = torch.randint(0, vocab, (rows,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    if lead is not None:
        h, labels = h.reshape(*lead, hidden), labels.reshape(lead)
    h = h.to(device=device, dtype=dtype).requires_grad_()
    w = w.to(device=device, dtype=dtype).requires_grad_(weight_grad)
    return h, w, labels.to(device)


def check(h, w, labels, tol, num_items=None, chunk_bytes=512 * 2**20):
    loss = linear_cross_entropy(h, w, labels, num_items_in_batch=num_items, chunk_bytes=chunk_bytes)
    leaves = [t for t in (h, w) if t.requires_grad]
    grads = torch.autograd.grad(2.5 * loss, leaves)  # a non-unit upstream gradient
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (h, w)]
    ref = linear_cross_entropy_reference(*leaves64, labels, num_items_in_batch=num_items)
    grads64 = torch.autograd.grad(2.5 * ref, [t for t in leaves64 if t.requires_grad])
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel_err(loss, ref) <= tol, (loss.item(), ref.item())
    for name, o, r in zip(("dh", "dW"), grads, grads64):
        assert o.dtype == h.dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), name
        err = rel_err(o, r)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_matches_fp64_reference(dtype, chunk_rows, weight_grad):
    h, w, labels = make(37, 24, 203, dtype, ignore_every=5, weight_grad=weight_grad, seed=chunk_rows)
    check(h, w, labels, TOL[dtype], chunk_bytes=chunk_rows * 203 * h.element_size())


@pytest.mark.parametrize("num_items", [1, 50, torch.tensor(13)])
def test_sum_over_num_items(num_items):
    h, w, labels = make(20, 16, 70, torch.float32, ignore_every=3, lead=(4, 5))
    check(h, w, labels, TOL[torch.float32], num_items=num_items)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 40), hidden=st.integers(1, 33), vocab=st.integers(2, 1100), seed=st.integers(0, 99))
def test_shapes(rows, hidden, vocab, seed):
    h, w, labels = make(rows, hidden, vocab, torch.float32, seed=seed)
    check(h, w, labels, TOL[torch.float32], chunk_bytes=max(1, rows // 3) * vocab * 4)


def test_all_ignored_is_nan_like_torch():
    h, w, labels = make(6, 8, 30, torch.float32)
    labels[:] = -100
    loss = linear_cross_entropy(h, w, labels)
    ref = linear_cross_entropy_reference(h, w, labels)
    assert torch.isnan(loss) and torch.isnan(ref)  # 0 / 0, as transformers' mean gives


def test_extreme_logits_stay_finite():
    h, w, labels = make(9, 8, 50, torch.float32)
    with torch.no_grad():
        w.mul_(300.0)  # logits in the thousands: a naive exp overflows
    check(h, w, labels, TOL[torch.float32])


def test_no_grad_gives_the_same_loss():
    """Under no_grad only the loss is computed (no gradient GEMMs): the same value, no graph."""
    h, w, labels = make(20, 16, 70, torch.float32, weight_grad=True)
    with_grad = linear_cross_entropy(h, w, labels, chunk_bytes=8 * 70 * 4)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, chunk_bytes=8 * 70 * 4)
    assert not loss.requires_grad
    assert torch.equal(loss, with_grad.detach())


def test_non_contiguous_hidden():
    h, w, labels = make(16, 40, 90, torch.float32, lead=(4, 4))
    view = h.transpose(0, 1)  # (4, 4, 40) with swapped strides
    check(view, w, labels.transpose(0, 1), TOL[torch.float32])


def test_errors_name_the_problem():
    h, w, labels = make(6, 8, 30, torch.float32)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 30\)"):
        linear_cross_entropy(h, w, torch.full((6,), 30))
    with pytest.raises(ValueError, match="features"):
        linear_cross_entropy(h, w[:, :7], labels)
    with pytest.raises(ValueError, match="leading dims"):
        linear_cross_entropy(h, w, labels[:5])
    with pytest.raises(TypeError, match="integers"):
        linear_cross_entropy(h, w, labels.float())
    with pytest.raises(TypeError, match="cast"):
        linear_cross_entropy(h, w.double(), labels)


def test_saves_no_logits():
    """What autograd keeps is dh (rows × hidden) and a scalar: nothing of size rows × vocab."""
    h, w, labels = make(32, 16, 500, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy(h, w, labels)
    assert sum(saved) <= 32 * 16 + 1, saved


# ------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_gpu_llama3_vocab(dtype, weight_grad):
    # 1000 rows at vocab 128256 in chunks of ~300 rows (odd sizes, a partial last chunk).
    h, w, labels = make(1000, 512, 128256, dtype, device="cuda", ignore_every=7, weight_grad=weight_grad)
    check(h, w, labels, TOL[dtype], chunk_bytes=300 * 128256 * 2)


@pytest.mark.gpu
def test_gpu_every_gradient_written():
    h, w, labels = make(777, 256, 32000, torch.bfloat16, device="cuda")
    poison = torch.full((64 * 2**20,), float("nan"), device="cuda")  # freed blocks full of NaN
    del poison
    loss = linear_cross_entropy(h, w, labels, chunk_bytes=100 * 32000 * 2)
    (dh,) = torch.autograd.grad(loss, [h])
    assert torch.isfinite(dh).all() and torch.isfinite(loss)
