"""Tile sweep of the fused dA + dx-LoRA-term kernel (`lora_grad_a` with dx), dropout off and on,
8192×4096, r16, bf16, against lora_down (one read of x) as the bandwidth yardstick.
`python benchmarks/sweep_grad_a.py`"""

import torch
from triton.testing import do_bench

from lora_engine.kernels import lora_linear as K

TILES = [(64, 128, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8), (32, 64, 4), (128, 64, 8), (16, 128, 4)]


def main():
    m, k, r = 8192, 4096, 16
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, r, device="cuda", dtype=torch.float32)
    dx = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    da = torch.zeros(r, k, device="cuda", dtype=torch.float32)
    thr = K.dropout_threshold(0.05)
    print(f"{'tiles (BM, BK, warps)':>24} | {'p=0 us':>8} | {'p=.05 us':>8}")
    for t in TILES:
        row = []
        for seed in (None, 1234):
            fn = lambda s=seed, t=t: K.lora_grad_a(g, x, 1.0, da, mask_seed=s, threshold=thr, lora_a=a, dx=dx, tiles=t)
            row.append(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3)
        print(f"{str(t):>24} | {row[0]:8.1f} | {row[1]:8.1f}")
    for seed in (None, 1234):
        us = do_bench(lambda s=seed: K.lora_down(x, a, 1.0, x.dtype, mask_seed=s, threshold=thr),
                      warmup=25, rep=100, return_mode="median") * 1e3
        print(f"lora_down, dropout {seed is not None}: {us:.1f} us")


if __name__ == "__main__":
    main()
