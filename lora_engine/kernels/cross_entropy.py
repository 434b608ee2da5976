"""Triton kernel for cross-entropy over a block of logits that overwrites them with their gradient,
and its launcher.

For each row of `logits` (R, V) with target `label`:

    loss[row]   = logsumexp(logits[row]) - logits[row, label]
    logits[row] = softmax(logits[row]) - onehot(label)          (the gradient of loss[row])

Rows whose label is `ignore_index` get loss 0 and a zero gradient. The gradient replaces the logits
in place, so a chunked linear + cross-entropy never holds more than one chunk of logits: the caller
multiplies it by the hidden states (dh) and the weight (dW) and drops it. One read of the row finds
its max and sum of exponentials (online), a second read writes the gradient.
"""


import torch
import triton
import triton.language as tl

from lora_engine.kernels.launch import INTERPRET as _INTERPRET
from lora_engine.kernels.launch import launch, next_power_of_2


@triton.jit
def _ce_grad_kernel(logits_ptr, stride_row, labels_ptr, loss_ptr, V, ignore_index, BLOCK: tl.constexpr):
    """One program per row: loss_ptr[row] = lse - x[label]; x[row, :] = softmax(x) - onehot(label)."""
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    offs = tl.arange(0, BLOCK)

    # Online max and sum of exp, one running value per lane, combined at the end.
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw only padding stay at 0
        s = s * tl.exp(m - base) + tl.exp(x - base)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))

    valid = label != ignore_index
    target = tl.load(ptr + label, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))

    keep = tl.where(valid, 1.0, 0.0)
    for start in range(0, V, BLOCK):
        cols = start + offs
        in_row = cols < V
        x = tl.load(ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        g = tl.exp(x - lse)
        g = tl.where(cols == label, g - 1.0, g) * keep
        tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=in_row)


def cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row cross-entropy (fp32, shape (R,)) of `logits` (R, V; rows contiguous) against `labels`
    (R,) int64; overwrites `logits` with the gradient softmax - onehot (zero rows where ignored).
    Labels must lie in [0, V) or equal `ignore_index` (the caller checks)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be 2-D with contiguous rows")
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss
    block = min(next_power_of_2(vocab), 1024 if _INTERPRET else 4096)
    launch(
        _ce_grad_kernel, (rows,), (logits, logits.stride(0), labels, loss, vocab, ignore_index),
        dict(BLOCK=block), num_warps=8 if block >= 4096 else 4,
    )
    return loss
