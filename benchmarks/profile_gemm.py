"""The persistent TMA GEMM with the LoRA epilogue (`gemm_lora_tma`) against cuBLAS, and the whole op with
each base GEMM, GPU time alone (CUDA-graph replay), bf16, r16, in one run.

    python benchmarks/profile_gemm.py [--quick]

Part 1 checks the kernel against fp64 (bf16 and fp16, odd sizes, bias, both weight layouts).
Part 2 times, per shape: the forward y = x Wᵀ + xa·Bᵀ and the backward dx = dy W + g·A through cuBLAS
alone (the floor), our cuBLAS path (a Triton kernel writes the LoRA term, cuBLAS adds onto it) and the
TMA kernel under each tile config. Part 3 times lora_linear fwd+bwd and forward with the base GEMM
"cublas" and "auto" (the default).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton
from bench_kernels import make  # benchmarks/ is sys.path[0] when this script runs
from triton.testing import do_bench_cudagraph

from lora_engine.kernels import lora_linear as K
from lora_engine.ops import lora_linear, set_base_gemm

SHAPES = [(8192, 4096, 4096), (8192, 4096, 1024), (8192, 4096, 14336), (2048, 2048, 2048)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_STORE)
CONFIGS = [
    (128, 256, 64, 8, 3, True),
    (128, 256, 64, 8, 3, False),
    (256, 128, 64, 8, 3, True),
    (128, 128, 64, 8, 4, False),
]


def cfg_dict(c):
    bm, bn, bk, w, s, split = c
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_STORE=split, num_warps=w, num_stages=s)


def gpu_ms(fn) -> float:
    return do_bench_cudagraph(fn, rep=60, return_mode="median")


def rel(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def check() -> float:
    worst = 0.0
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        cases = [(1000, 520, 776, 7, False, True), (333, 1032, 264, 16, False, False),
                 (4104, 4096, 1032, 64, True, True), (129, 72, 4104, 1, True, False)]
        for i, (m, k, n, r, bias, rows_out) in enumerate(cases):
            a = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
            b = (torch.randn(n, k, device="cuda", dtype=dtype, generator=g) if rows_out
                 else torch.randn(k, n, device="cuda", dtype=dtype, generator=g).t()) / math.sqrt(k)
            c = torch.randn(m, r, device="cuda", dtype=dtype, generator=g)
            d = torch.randn(n, r, device="cuda", dtype=torch.float32, generator=g) / math.sqrt(r)
            bi = torch.randn(n, device="cuda", dtype=dtype, generator=g) if bias else None
            assert K.tma_gemm_available(a, b)
            for conf in CONFIGS if i == 0 else [None]:
                try:
                    out = K.gemm_lora_tma(a, b, bi, c, d, 1.0, dtype, config=cfg_dict(conf) if conf else None)
                except triton.runtime.errors.OutOfResources:
                    continue  # timed as missing below
                assert out.isfinite().all(), (dtype, m, k, n, conf)
                lora = c.double() @ d.to(dtype).double().T
                ref = a.double() @ b.double().T + lora + (bi.double() if bias else 0)
                e = rel(out, ref)
                tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
                assert e <= tol, (dtype, m, k, n, r, conf, e)
                worst = max(worst, e)
    return worst


def part2_row(m, k, n, r=16) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    a = torch.randn(r, k, device="cuda") / math.sqrt(k)
    b = torch.randn(n, r, device="cuda") / math.sqrt(r)
    xa = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, r, device="cuda", dtype=torch.float32)
    da = torch.zeros(r, k, device="cuda")

    def fwd_cublas_path():
        _, y = K.lora_down(x, a, 2.0, x.dtype, lora_b=b)
        y.addmm_(x, w.t())

    def bwd_cublas_path():
        dx = torch.empty_like(x)
        K.lora_grad_a(g, x, 1.0, da, lora_a=a, dx=dx)
        dx.addmm_(dy, w)

    row = dict(shape=f"{m}x{k}->{n}", fwd_base=gpu_ms(lambda: F.linear(x, w)), fwd_cur=gpu_ms(fwd_cublas_path),
               fwd_down=gpu_ms(lambda: K.lora_down(x, a, 2.0, x.dtype)),
               bwd_base=gpu_ms(lambda: dy @ w), bwd_cur=gpu_ms(bwd_cublas_path),
               bwd_grad_a=gpu_ms(lambda: K.lora_grad_a(g, x, 1.0, da)))
    for i, conf in enumerate(CONFIGS):
        cd = cfg_dict(conf)
        try:
            row[f"fwd_tma{i}"] = gpu_ms(lambda cd=cd: K.gemm_lora_tma(x, w, None, xa, b, 1.0, x.dtype, config=cd))
            row[f"gemm_tma{i}"] = gpu_ms(
                lambda cd=cd: K.gemm_lora_tma(x, w, None, None, None, 1.0, x.dtype, config=cd))
            row[f"bwd_tma{i}"] = gpu_ms(
                lambda cd=cd: K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, x.dtype, config=cd))
        except triton.runtime.errors.OutOfResources as e:  # a config that does not fit on this GPU
            print(f"# config {conf} at {row['shape']}: {type(e).__name__}: {str(e)[:120]}")
    print(row, flush=True)
    return row


def ratio(row, key, base):
    v = row.get(key, float("nan"))
    return f"{v:.3f} ({v / row[base]:.2f}"


def part2(shapes):
    rows = [part2_row(m, k, n) for m, k, n in shapes]
    print("\n| shape | fwd cuBLAS ms | fwd cuBLAS path (×) | xa pass ms | " +
          " | ".join(f"fwd tma{i} (×)" for i in range(len(CONFIGS))) + " |")
    for row in rows:
        gemm = [row.get(f"gemm_tma{i}", math.nan) / row["fwd_base"] for i in range(len(CONFIGS))]
        cells = [ratio(row, f"fwd_tma{i}", "fwd_base") + f"; gemm alone {gemm[i]:.2f})" for i in range(len(CONFIGS))]
        print(f"| {row['shape']} | {row['fwd_base']:.3f} | {ratio(row, 'fwd_cur', 'fwd_base')}) "
              f"| {row['fwd_down']:.3f} | " + " | ".join(cells) + " |")
    print("\n| shape | dx cuBLAS ms | dx cuBLAS path + dA (×) | dA pass ms | " +
          " | ".join(f"dx tma{i} (×)" for i in range(len(CONFIGS))) + " |")
    for row in rows:
        cells = [ratio(row, f"bwd_tma{i}", "bwd_base") + ")" for i in range(len(CONFIGS))]
        print(f"| {row['shape']} | {row['bwd_base']:.3f} | {ratio(row, 'bwd_cur', 'bwd_base')}) "
              f"| {row['bwd_grad_a']:.3f} | " + " | ".join(cells) + " |")
    return rows


def part3_row(m, k, n, r=16) -> None:
    x, w, a, b, dy = make(m, k, n, r, lora_dtype=torch.float32)

    def step(fn, params):
        def f():
            for t in params:
                t.grad = None
            fn().backward(dy)
        return f

    base = gpu_ms(step(lambda: F.linear(x, w), [x]))
    with torch.no_grad():
        base_f = gpu_ms(lambda: F.linear(x, w))
    res = {}
    for mode in ("cublas", "auto"):
        set_base_gemm(mode)
        res[mode] = gpu_ms(step(lambda: lora_linear(x, w, None, a, b, 2.0), [x, a, b]))
        try:  # the dropout seed is drawn on the device, inside the graph
            res[mode + "_p"] = gpu_ms(step(lambda: lora_linear(x, w, None, a, b, 2.0, 0.05), [x, a, b]))
        except Exception as e:
            print(f"# dropout under graph capture: {type(e).__name__}: {str(e)[:160]}")
        with torch.no_grad():
            res[mode + "_f"] = gpu_ms(lambda: lora_linear(x, w, None, a, b, 2.0, training=False))
    set_base_gemm("auto")
    res.update(base=base, base_f=base_f)
    print(f"| {m}x{k}->{n} | {base:.3f} | {ratio(res, 'cublas', 'base')}) | {ratio(res, 'auto', 'base')}) "
          f"| {ratio(res, 'cublas_p', 'base')}) | {ratio(res, 'auto_p', 'base')}) "
          f"| {base_f:.3f} | {ratio(res, 'cublas_f', 'base_f')}) | {ratio(res, 'auto_f', 'base_f')}) |", flush=True)


def part3(shapes):
    print("\n| shape | base fwd+bwd ms | cuBLAS path (×) | auto (×) | cuBLAS p=.05 (×) | auto p=.05 (×) "
          "| base fwd ms | cuBLAS fwd (×) | auto fwd (×) |")
    print("|" + " --- |" * 9)
    for m, k, n in shapes:
        part3_row(m, k, n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first shape only")
    args = ap.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"check vs fp64 (bf16, fp16; every config): worst rel err {check():.2e}", flush=True)
    part2(shapes)
    part3(shapes)


if __name__ == "__main__":
    main()
