"""With dropout, which backward dx path pays at each rank: the TMA GEMM with the masked LoRA term and dA in its
epilogue ("fused", what `ops._MASKED_MIN_K` allows for long K-loops), or cuBLAS onto the term that `lora_grad_a`
writes ("cuBLAS path"), and what "auto" picks (`ops._MASKED_MAX_RANK`). Whole op fwd+bwd GPU time (CUDA-graph
replay), × the frozen base, the three alternating, at 8192×4096→14336 (dx's K-loop: 14336).
`python benchmarks/sweep_masked_rank.py`"""

import torch
import torch.nn.functional as F
from bench_kernels import fwd_bwd, make  # benchmarks/ is sys.path[0] when this script runs
from profile_gemm import gpu_ms

from lora_engine import ops


def row(m, k, n, r):
    x, w, a, b, dy = make(m, k, n, r, lora_dtype=torch.float32)
    base = gpu_ms(fwd_bwd(lambda: F.linear(x, w), x, [x], dy))
    cells = []
    rules = ops._MASKED_MIN_K, ops._MASKED_MAX_RANK
    for _ in range(2):
        for min_k, max_rank in ((0, 1 << 30), (1 << 30, 0), rules):
            ops._MASKED_MIN_K, ops._MASKED_MAX_RANK = min_k, max_rank
            ms = gpu_ms(fwd_bwd(lambda: ops.lora_linear(x, w, None, a, b, 2.0, 0.05), x, [x, a, b], dy))
            cells.append(f"{ms:.3f} ({ms / base:.2f})")
    ops._MASKED_MIN_K, ops._MASKED_MAX_RANK = rules
    print(f"| {m}x{k}->{n} | {r} | {base:.3f} | " + " | ".join(cells) + " |", flush=True)


def main():
    print("| shape | r | base ms | fused (×) | cuBLAS path (×) | auto (×) | fused (×) | cuBLAS path (×) | auto (×) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in (16, 32, 64):
        row(8192, 4096, 14336, r)


if __name__ == "__main__":
    main()
