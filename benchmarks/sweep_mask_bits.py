"""With dropout, the backward's masked dx term two ways, whole op fwd+bwd in one run:
- "bits" (the default, `ops._MASK_BITS`): dA's pass over x (`lora_grad_a`) writes the keep-mask it generates as
  bits, and the TMA GEMM adds the masked term from them;
- "cuBLAS path": `lora_grad_a` writes the masked term (M×in), cuBLAS adds dy·W onto it.
(A third way, the mask generated in the TMA GEMM's epilogue with dA beside it, was removed after it tied with bits;
this script at commit 0dee151 times it.) GPU time alone (CUDA-graph replay) × the frozen base, bf16 x, fp32 adapters,
p = .05, the variants alternating, two rounds; then eager time (`do_bench`, host included) at the host-bound shapes,
bf16 adapters as bench_kernels.py, against PEFT-style.

`python benchmarks/sweep_mask_bits.py`
"""

import torch
import torch.nn.functional as F
from bench_kernels import SHAPES, fwd_bwd, make, median_ms  # benchmarks/ is sys.path[0] when this script runs
from profile_gemm import gpu_ms

from lora_engine import ops
from lora_engine.kernels import lora_linear as K

VARIANTS = {"bits": True, "cuBLAS path": False}  # ops._MASK_BITS


def use(variant):
    ops._MASK_BITS = VARIANTS[variant]


def step(x, w, a, b, dy):
    return fwd_bwd(lambda: ops.lora_linear(x, w, None, a, b, 2.0, 0.05), x, [x, a, b], dy)


def gpu_row(m, k, n, r):
    x, w, a, b, dy = make(m, k, n, r, lora_dtype=torch.float32)
    base = gpu_ms(fwd_bwd(lambda: F.linear(x, w), x, [x], dy))
    cells = []
    for _ in range(2):
        for variant in VARIANTS:
            use(variant)
            ms = gpu_ms(step(x, w, a, b, dy))
            cells.append(f"{ms:.3f} ({ms / base:.2f})")
    print(f"| {m}x{k}->{n} | {r} | {base:.3f} | " + " | ".join(cells) + " |", flush=True)


def eager_row(m, k, n, r):
    x, w, a, b, dy = make(m, k, n, r)

    def peft_style():
        return F.linear(x, w) + 2.0 * F.linear(F.linear(F.dropout(x, 0.05), a), b)

    for _ in range(3):
        base = median_ms(fwd_bwd(lambda: F.linear(x, w), x, [x], dy))
        cells = []
        for variant in ("bits", "cuBLAS path"):
            use(variant)
            cells.append(median_ms(step(x, w, a, b, dy)))
        cells.append(median_ms(fwd_bwd(peft_style, x, [x, a, b], dy)))
        print(f"| {m}x{k}->{n} | {r} | {base:.3f} | " + " | ".join(f"{c:.3f} ({c / base:.2f})" for c in cells) + " |",
              flush=True)


def kernel_row(m, k, n, r=16):
    """The backward's two kernels alone at dx = (m, n)·(n, k): lora_grad_a (dA; with the masked term; with bits) and
    the TMA dx GEMM (from bits; unmasked), µs."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    g, a = torch.randn(m, r, device="cuda"), torch.randn(r, k, device="cuda")
    da = torch.zeros(r, k, device="cuda")
    dx = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    bits = torch.empty(m, (k + 7) // 8, device="cuda", dtype=torch.uint8)
    seed, t = torch.tensor([3], device="cuda"), K.dropout_threshold(0.05)
    cases = {
        "grad_a dA": lambda: K.lora_grad_a(g, x, 1.0, da, mask_seed=seed, threshold=t),
        "grad_a dA+term": lambda: K.lora_grad_a(g, x, 1.0, da, mask_seed=seed, threshold=t, lora_a=a, dx=dx),
        "grad_a dA+bits": lambda: K.lora_grad_a(g, x, 1.0, da, mask_seed=seed, threshold=t, keep_bits=bits),
        "cuBLAS dy·W + term": lambda: dx.addmm_(dy, w),
        "TMA bits": lambda: K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, x.dtype, mask_bits=bits),
        "TMA unmasked": lambda: K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, x.dtype),
    }
    print(f"{m}x{n}->{k} r{r}: " + "; ".join(f"{name} {gpu_ms(fn) * 1e3:.1f}" for name, fn in cases.items()) + " µs",
          flush=True)


def main():
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}")
    for m, k, n in SHAPES:
        kernel_row(m, k, n)
    names = " | ".join(f"{v} (×)" for v in VARIANTS)
    print(f"| shape | r | base ms | {names} | {names} |")
    print("|" + " --- |" * (3 + 2 * len(VARIANTS)))
    try:
        for m, k, n in SHAPES:
            for r in (16, 64):
                gpu_row(m, k, n, r)
        print("\n| shape | r | base ms | bits ms (×) | cuBLAS path ms (×) | PEFT-style ms (×) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for m, k, n in (SHAPES[1], SHAPES[3]):
            eager_row(m, k, n, 16)
    finally:
        use("bits")


if __name__ == "__main__":
    main()
