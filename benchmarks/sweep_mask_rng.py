"""What the dropout mask's generator costs, in a stand-alone copy of the masked down pass (xa = (mask ⊙ x)·Aᵀ,
8192×4096, r16, bf16), by generator: 0 none; 1 Philox-4x32-10 with a 16-bit half per column (what the kernels used
until stop 25, RESULTS.md); 2 Philox-7 halves (what the kernels use, checked against `lora_down` first); 3 Philox-10
with a byte per column (16 columns a call, p rounded to a multiple of 1/256); 4 Philox-7 bytes; 5 Philox-5 halves;
6 a 32-bit integer hash (two columns a call). Then the library's passes over x, for calibration. An experiment: only
generator 2 is in the library. do_bench medians, µs, two rounds.

`python benchmarks/sweep_mask_rng.py`
"""

import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from lora_engine.kernels import lora_linear as K
from lora_engine.kernels.lora_linear import _keep_from_groups


@triton.jit
def _bytes4(r):
    lo = 0xFF
    return tl.join(tl.join(r & lo, (r >> 8) & lo), tl.join((r >> 16) & lo, r >> 24))


@triton.jit
def _mask(seed, offs_m, k0, BLOCK_K: tl.constexpr, K, threshold, MODE: tl.constexpr, BLOCK_M: tl.constexpr):
    if MODE == 1 or MODE == 2 or MODE == 5:
        groups = (K + 7) // 8
        offs_g = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        ctr = offs_m.to(tl.int64)[:, None] * groups + offs_g.to(tl.int64)[None, :]
        if MODE == 1:
            r0, r1, r2, r3 = tl.randint4x(seed, ctr, 10)
        elif MODE == 2:
            r0, r1, r2, r3 = tl.randint4x(seed, ctr, 7)
        else:
            r0, r1, r2, r3 = tl.randint4x(seed, ctr, 5)
        keep = _keep_from_groups(r0, r1, r2, r3, threshold, BLOCK_M, BLOCK_K)
    elif MODE == 3 or MODE == 4:
        groups = (K + 15) // 16
        offs_g = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        ctr = offs_m.to(tl.int64)[:, None] * groups + offs_g.to(tl.int64)[None, :]
        if MODE == 3:
            r0, r1, r2, r3 = tl.randint4x(seed, ctr, 10)
        else:
            r0, r1, r2, r3 = tl.randint4x(seed, ctr, 7)
        b = tl.join(tl.join(_bytes4(r0), _bytes4(r1)), tl.join(_bytes4(r2), _bytes4(r3)))
        keep = tl.reshape(b, (BLOCK_M, BLOCK_K)).to(tl.int32) >= (threshold >> 8)
    else:
        groups = (K + 1) // 2
        offs_g = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        h = (offs_m[:, None] * groups + offs_g[None, :]).to(tl.uint32) ^ seed.to(tl.uint32)
        h ^= h >> 16
        h *= 0x7FEB352D
        h ^= h >> 15
        h *= 0x846CA68B
        h ^= h >> 16
        keep = tl.reshape(tl.join(h & 0xFFFF, h >> 16), (BLOCK_M, BLOCK_K)).to(tl.int32) >= threshold
    return keep


@triton.jit
def _down(x_ptr, a_ptr, out_ptr, M, K, R, seed_ptr, threshold, scale,
          MODE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * K + ks[None, :],
                    mask=(offs_m < M)[:, None] & (ks < K)[None, :], other=0.0)
        if MODE != 0:
            x = tl.where(_mask(seed, offs_m, k0, BLOCK_K, K, threshold, MODE, BLOCK_M), x, 0.0)
        at = tl.load(a_ptr + offs_r[:, None] * K + ks[None, :], mask=(offs_r < R)[:, None] & (ks < K)[None, :],
                     other=0.0)
        acc = tl.dot(x, tl.trans(at.to(x.dtype)), acc)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :], (acc * scale).to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_r < R)[None, :])


def main():
    torch.manual_seed(0)
    M, Kd, R = 8192, 4096, 16
    x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(R, Kd, device="cuda", dtype=torch.bfloat16) / 64
    seed = torch.tensor([12345], device="cuda", dtype=torch.int64)
    thr = K.dropout_threshold(0.05)
    out = torch.empty(M, R, device="cuda", dtype=torch.bfloat16)
    ref = K.lora_down(x, a, 1.0, torch.bfloat16, mask_seed=seed, threshold=thr)
    names = {0: "none", 1: "philox10 halves", 2: "philox7 halves", 3: "philox10 bytes", 4: "philox7 bytes",
             5: "philox5 halves", 6: "hash32 halves"}
    rows = []

    def run(mode, bm, bk, w):
        _down[(triton.cdiv(M, bm),)](x, a, out, M, Kd, R, seed, thr, 1.0, MODE=mode, R_PAD=16, BLOCK_M=bm,
                                    BLOCK_K=bk, num_warps=w, num_stages=3)

    run(2, 64, 128, 4)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print("mode 2 vs production lora_down rel err", err, flush=True)
    for rnd in range(2):
        for mode in names:
            for bm, bk, w in ((64, 128, 4), (32, 128, 4), (64, 128, 8), (128, 64, 8)):
                t = do_bench(lambda mode=mode, bm=bm, bk=bk, w=w: run(mode, bm, bk, w), warmup=50, rep=300) * 1e3
                rows.append((rnd, names[mode], (bm, bk, w), t))
                print(f"round {rnd} {names[mode]:18s} {bm}x{bk} w{w}: {t:7.1f} us", flush=True)
    g = torch.randn(M, R, device="cuda", dtype=torch.bfloat16)
    da = torch.zeros(R, Kd, device="cuda", dtype=torch.float32)
    bits = torch.empty(M, (Kd + 7) // 8, device="cuda", dtype=torch.uint8)
    prod = {
        "lora_down unmasked": lambda: K.lora_down(x, a, 1.0, torch.bfloat16),
        "lora_down masked": lambda: K.lora_down(x, a, 1.0, torch.bfloat16, mask_seed=seed, threshold=thr),
        "lora_grad_a unmasked": lambda: K.lora_grad_a(g, x, 1.0, da),
        "lora_grad_a masked": lambda: K.lora_grad_a(g, x, 1.0, da, mask_seed=seed, threshold=thr),
        "lora_grad_a masked+bits": lambda: K.lora_grad_a(g, x, 1.0, da, mask_seed=seed, threshold=thr,
                                                         keep_bits=bits),
        "x.sum (read floor)": lambda: x.sum(),
    }
    for name, fn in prod.items():
        t = do_bench(fn, warmup=50, rep=300) * 1e3
        print(f"production {name:26s}: {t:7.1f} us", flush=True)
    print("\n| generator | " + " | ".join(f"{c[0]}x{c[1]} w{c[2]}" for c in ((64, 128, 4), (32, 128, 4), (64, 128, 8),
                                                                               (128, 64, 8))) + " |")
    for mode in names:
        cells = []
        for cfg in ((64, 128, 4), (32, 128, 4), (64, 128, 8), (128, 64, 8)):
            ts = [t for r_, n, c, t in rows if n == names[mode] and c == cfg]
            cells.append(" / ".join(f"{t:.1f}" for t in ts))
        print(f"| {names[mode]} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
