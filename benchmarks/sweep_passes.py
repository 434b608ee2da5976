"""The bandwidth-bound passes over x and where dA runs, each variant checked against fp64 first, then timed in GPU
time alone (CUDA-graph replay), µs unless said:
- r: what reading x can cost: a plain Triton read, `x.sum()`, and a copy (read + write), GB/s;
- d: the forward's masked pass (`lora_down`): the default plan (K split into an fp32 xa where it pays) against the
  unsplit tiles of before and other splits;
- g: dA's pass with the mask's bits (`lora_grad_a`, Hopper's dropout), fed an fp32 g as the op does: the default
  tiles against others;
- a: dA in the dx GEMM's epilogue or in its own pass: the kernels, then the whole op at p = 0 (× the frozen base,
  two rounds, `ops._DA_IN_EPILOGUE_MIN_K` switched).

`python benchmarks/sweep_passes.py [--parts rdga]`
"""

import argparse
import math
from unittest import mock

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bench_kernels import fwd_bwd, make  # benchmarks/ is sys.path[0] when this script runs
from profile_gemm import gpu_ms, rel

from lora_engine import ops
from lora_engine.kernels import lora_linear as K
from lora_engine.ops import dropout_keep_mask

SHAPES = [(8192, 4096, 4096), (8192, 4096, 1024), (8192, 4096, 14336), (2048, 2048, 2048)]
P = 0.05


def us(fn) -> float:
    return gpu_ms(fn) * 1e3


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)))


def read_row(rows: int) -> None:
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    nbytes, n, block = x.numel() * 2, x.numel(), 8192
    part = torch.empty(triton.cdiv(n, block), device="cuda")
    _read_kernel[(part.numel(),)](x, part, n, BLOCK=block, num_warps=8)
    assert rel(part.sum(), x.double().sum()) < 1e-4
    read = us(lambda: _read_kernel[(part.numel(),)](x, part, n, BLOCK=block, num_warps=8))
    cells = [nbytes / read / 1e3, nbytes / us(lambda: x.sum()) / 1e3, 2 * nbytes / us(lambda: x.clone()) / 1e3]
    print(f"| {nbytes >> 20} MB | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)


def part_read():
    print("\n| bf16 tensor | Triton read | x.sum() | copy (read + write) |")
    print("| --- | --- | --- | --- |")
    for rows in (8192, 32768):
        read_row(rows)


def down_case(m, k, r, seed, gen):
    """x, an fp32 A, and xa's fp64 reference with the keep-mask of seed and scale 0.5 / (1 - P)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    a = torch.randn(r, k, device="cuda", generator=gen) / math.sqrt(k)
    keep = dropout_keep_mask(seed, m, k, P, device="cuda").double()
    return x, a, 0.5 / (1 - P) * (keep * x.double()) @ a.to(x.dtype).double().T


DOWN_VARIANTS = [("default", None, None), ("before: bf16, unsplit", "before", 1), ("(64, 64, 4) x4", (64, 64, 4), 4),
                 ("(64, 64, 4) x8", (64, 64, 4), 8), ("(32, 128, 4) x4", (32, 128, 4), 4),
                 ("(32, 128, 4) x1", (32, 128, 4), 1)]


def down_run(tiles, splits, seed, thr):
    scale = 0.5 / (1 - P)
    if tiles == "before":  # the unsplit bf16 pass of before: (32, 128, 4) at these shapes
        return lambda x, a: K.lora_down(x, a, scale, torch.bfloat16, mask_seed=seed, threshold=thr, tiles=(32, 128, 4))
    return lambda x, a: K.lora_down(x, a, scale, torch.float32, mask_seed=seed, threshold=thr, tiles=tiles,
                                    splits=splits)


def down_row(m, k, r, gen) -> None:
    seed, thr = torch.tensor([11], device="cuda"), K.dropout_threshold(P)
    x, a, ref = down_case(m, k, r, 11, gen)
    odd = down_case(777, 1800, r - 3, 11, gen)
    cells = []
    for _, tiles, splits in DOWN_VARIANTS:
        run = down_run(tiles, splits, seed, thr)
        for xx, aa, rf in ((x, a, ref), odd):
            e = rel(run(xx, aa), rf)
            assert e < 1e-2, (m, k, r, tiles, splits, e)
        cells.append(f"{us(lambda run=run: run(x, a)):.1f}")
    plan = K._down_plan(m, k, K._rank_pad(r), True, True, K.num_sms(x.device, 4))
    print(f"| {m}x{k} | {r} | {cells[0]} {plan} | " + " | ".join(cells[1:]) + " |", flush=True)


def part_down():
    """The default plan, then (tiles, splits) variants into fp32 and the unsplit bf16 pass of before."""
    print("\n| masked lora_down (M x K) | r | default plan | " + " | ".join(v[0] for v in DOWN_VARIANTS[1:]) + " |")
    print("| --- | --- |" + " --- |" * len(DOWN_VARIANTS))
    gen = torch.Generator(device="cuda").manual_seed(1)
    for m, k in ((8192, 4096), (2048, 2048)):
        for r in (16, 64):
            down_row(m, k, r, gen)


GRAD_A_TILINGS = [None, (32, 256, 8), (32, 256, 4), (16, 256, 4), (16, 128, 4)]


def grad_a_row(x, keep, bits, r, gen) -> None:
    (m, k), seed, thr = x.shape, torch.tensor([12], device="cuda"), K.dropout_threshold(P)
    g = torch.randn(m, r, device="cuda", generator=gen)  # fp32, as the op's workspace hands it to the pass
    ref = g.to(x.dtype).double().T @ (keep.double() * x.double())
    da = torch.zeros(r, k, device="cuda")
    cells = []
    for tiles in GRAD_A_TILINGS:
        run = lambda t=tiles: K.lora_grad_a(g, x, 1.0, da, mask_seed=seed, threshold=thr, keep_bits=bits, tiles=t)
        da.zero_()
        run()
        assert rel(da, ref) < 1e-4, (m, k, r, tiles)
        lanes = (bits.to(torch.int32)[:, :, None] >> torch.arange(8, device="cuda")) & 1
        assert torch.equal(lanes.reshape(m, k) != 0, keep), (m, k, r, tiles)
        cells.append(f"{us(run):.1f}")
    cells[0] += f" {K._grad_a_tiles(K._rank_pad(r), False, 2, True)}"
    print(f"| {m}x{k} | {r} | " + " | ".join(cells) + " |", flush=True)


def part_grad_a():
    print("\n| lora_grad_a with bits (M x K) | r | default | " + " | ".join(map(str, GRAD_A_TILINGS[1:])) + " |")
    print("| --- | --- |" + " --- |" * len(GRAD_A_TILINGS))
    gen = torch.Generator(device="cuda").manual_seed(2)
    for m, k in ((8192, 4096), (8192, 1024), (2048, 2048)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        keep = dropout_keep_mask(12, m, k, P, device="cuda")
        bits = torch.empty(m, k // 8, device="cuda", dtype=torch.uint8)
        for r in (16, 32, 64):
            grad_a_row(x, keep, bits, r, gen)


def da_kernels_row(m, k, n, r) -> None:
    x, w, a, _, dy = make(m, k, n, r, lora_dtype=torch.float32)
    x, a = x.detach(), a.detach()
    g = torch.randn(m, r, device="cuda") / math.sqrt(r)
    da = torch.zeros(r, k, device="cuda")
    dx_ref = dy.double() @ w.double() + g.to(x.dtype).double() @ a.to(x.dtype).double()
    da_ref = g.to(x.dtype).double().T @ x.double()
    with_da = lambda: K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, x.dtype, da=da, da_x=x)
    without = lambda: K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, x.dtype)
    own = lambda: K.lora_grad_a(g, x, 1.0, da)
    for fn, has_da in ((with_da, True), (without, False), (own, True)):
        da.zero_()
        out = fn()
        if out is not None:
            assert rel(out, dx_ref) < 1e-2, (m, k, n, r)
        if has_da:
            assert rel(da, da_ref) < 1e-2, (m, k, n, r)
    cells = [us(lambda: dy @ w), us(with_da), us(without), us(own)]
    print(f"| {m}x{n}->{k} | {r} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


def da_whole_row(m, k, n, r) -> None:
    x, w, a, b, dy = make(m, k, n, r, lora_dtype=torch.float32)
    base = gpu_ms(fwd_bwd(lambda: F.linear(x, w), x, [x], dy))
    step = fwd_bwd(lambda: ops.lora_linear(x, w, None, a, b, 2.0), x, [x, a, b], dy)
    vals = []
    for _ in range(2):
        for min_k in (0, 1 << 30):
            with mock.patch.object(ops, "_DA_IN_EPILOGUE_MIN_K", min_k):
                vals.append(gpu_ms(step) / base)
    print(f"| {m}x{k}->{n} | {r} | {base:.3f} | " + " | ".join(f"{v:.3f}" for v in vals) + " |", flush=True)


def part_da():
    print("\n| dx GEMM (M x K-loop -> N) | r | cuBLAS dy·W | with dA | without dA | dA's own pass |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m, k, n in SHAPES:
        for r in (16, 32, 64):
            da_kernels_row(m, k, n, r)
    print("\n| shape | r | base ms | dA in epilogue | own pass | dA in epilogue | own pass |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m, k, n in SHAPES:
        for r in (16, 64):
            da_whole_row(m, k, n, r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="rdga", help="which parts to run (default: all)")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    parts = {"r": part_read, "d": part_down, "g": part_grad_a, "a": part_da}
    for key, fn in parts.items():
        if key in args.parts:
            fn()


if __name__ == "__main__":
    main()
