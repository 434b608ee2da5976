"""The persistent TMA GEMM with the LoRA epilogue (`gemm_lora_tma`) against cuBLAS, and the whole op with
each base GEMM, GPU time alone (CUDA-graph replay), bf16, in one run.

    python benchmarks/profile_gemm.py [--quick]

Part 1 checks the kernel against fp64 (bf16 and fp16, odd sizes, bias, both weight layouts, every tile
config; xa computed in the GEMM; the backward epilogue with and without the dropout mask (as bits), with dA, in 1,
2 and 4 column parts).
Part 2 times, per shape (r16; the forward also r64): the forward through cuBLAS alone (the floor), the xa
pass then the TMA GEMM adding xa·Bᵀ, and the TMA GEMM computing xa itself; the backward dx through cuBLAS
alone (the floor) and, without and with dropout, the earlier paths (TMA GEMM + the dA pass; the masked
term and dA from one pass, then cuBLAS adds dy·W) against the TMA GEMM with dA in its epilogue. With dropout that
GEMM reads the mask from bits made once beforehand: the op runs instead `lora_grad_a` (dA and the bits) and then
the GEMM without dA, so those columns leave out the mask's generation (sweep_mask_bits.py times the op's path).
Part 7's masked rows likewise.
Part 3 times lora_linear fwd+bwd and forward with the base GEMM "cublas" and "auto" (the default).
Part 4 (only with --parts 4) times dx with dA under tile configs with one or two persistent programs per SM.
Part 5 (only with --parts 5) checks against fp64 and times the forward's xa computed inside the TMA GEMM once
per unit of CHUNK_N column blocks, against the separate pass (`lora_down`) and one computation per tile.
Part 7 (only with --parts 7) checks against fp64 and times the backward dx GEMM with dA summed over units of
CHUNK_M row blocks (one atomic add per unit) against one tile at a time.
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
from lora_engine.ops import dropout_keep_mask, lora_linear, set_base_gemm

SHAPES = [(8192, 4096, 4096), (8192, 4096, 1024), (8192, 4096, 14336), (2048, 2048, 2048)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, EPI_SPLIT)
CONFIGS = [
    (128, 256, 64, 8, 3, 2),
    (128, 256, 64, 8, 3, 1),
    (128, 256, 64, 8, 3, 4),
    (256, 128, 64, 8, 3, 2),
]


def cfg_dict(c):
    bm, bn, bk, w, s, split = c
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EPI_SPLIT=split, num_warps=w, num_stages=s)


def gpu_ms(fn) -> float:
    return do_bench_cudagraph(fn, rep=60, return_mode="median")


def rel(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def keep_bits(seed: int, x: torch.Tensor, p: float) -> torch.Tensor | None:
    """The dropout keep-mask of x's shape as the TMA GEMM reads it, packed by `lora_grad_a` (None for p = 0)."""
    if not p:
        return None
    m, k = x.shape
    bits = torch.empty(m, (k + 7) // 8, device=x.device, dtype=torch.uint8)
    K.lora_grad_a(torch.zeros(m, 1, device=x.device), x, 1.0, torch.zeros(1, k, device=x.device),
                  mask_seed=torch.tensor([seed], device=x.device), threshold=K.dropout_threshold(p), keep_bits=bits)
    return bits


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
            # xa computed inside the GEMM (down fp32, rounded to the operand dtype)
            down = torch.randn(r, k, device="cuda", generator=g) / math.sqrt(k)
            out, xa = K.gemm_lora_tma(a, b, bi, None, d, 0.5, dtype, down=down)
            xa_ref = 0.5 * a.double() @ down.to(dtype).double().T
            ref = a.double() @ b.double().T + xa.double() @ d.to(dtype).double().T + (bi.double() if bias else 0)
            for name, o, rf in (("xa", xa, xa_ref), ("y+xa", out, ref)):
                e = rel(o, rf)
                assert o.isfinite().all() and e <= tol, (name, dtype, m, k, n, r, e)
                worst = max(worst, e)
            # the backward epilogue: dx of shape (m, n) from dy (m, k) and W viewed (k, n); dA from x (m, n)
            x = torch.randn(m, n, device="cuda", dtype=dtype, generator=g)
            gr = torch.randn(m, r, device="cuda", generator=g)
            la = torch.randn(r, n, device="cuda", generator=g) / math.sqrt(n)
            for p in (0.0, 0.05):
                bits = keep_bits(7 + i, x, p)
                keep = (dropout_keep_mask(7 + i, m, n, p, device="cuda").double() if p else 1.0)
                g_op = gr.to(dtype).double()
                dx_ref = a.double() @ b.double().T + keep * (g_op @ la.to(dtype).double())
                da_ref = g_op.T @ (keep * x.double())
                for split in (1, 2, 4):
                    da = torch.zeros(r, n, device="cuda")
                    dx = K.gemm_lora_tma(a, b, None, gr, la.t(), 1.0, dtype, mask_bits=bits, da=da, da_x=x,
                                         config=K._tma_config() | dict(EPI_SPLIT=split))
                    for name, o, rf in (("dx", dx, dx_ref), ("da", da, da_ref)):
                        e = rel(o, rf)
                        assert o.isfinite().all() and e <= tol, (name, p, split, dtype, m, k, n, r, e)
                        worst = max(worst, e)
    return worst


def part2_row(m, k, n, r=16) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    a = torch.randn(r, k, device="cuda") / math.sqrt(k)
    b = torch.randn(n, r, device="cuda") / math.sqrt(r)
    a64 = torch.randn(64, k, device="cuda") / math.sqrt(k)
    b64 = torch.randn(n, 64, device="cuda") / 8
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, r, device="cuda", dtype=torch.float32)
    da = torch.zeros(r, k, device="cuda")
    seed = torch.tensor([5], device="cuda")
    thr = K.dropout_threshold(0.05)

    def fwd_pass(a=a, b=b):
        xa = K.lora_down(x, a, 2.0, x.dtype)
        K.gemm_lora_tma(x, w, None, xa, b, 1.0, x.dtype)

    def dx_pass():  # p = 0 before: the TMA GEMM adds g·A, then the dA pass
        K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, x.dtype)
        K.lora_grad_a(g, x, 1.0, da)

    def dx_masked_pass():  # p > 0 before: the masked term and dA from one pass, then cuBLAS adds dy·W
        dx = torch.empty_like(x)
        K.lora_grad_a(g, x, 1.0, da, lora_a=a, dx=dx, mask_seed=seed, threshold=thr)
        dx.addmm_(dy, w)

    bits = keep_bits(5, x, 0.05)

    def dx_fused(split, masked):
        cfg = K._tma_config() | dict(EPI_SPLIT=split)
        return lambda: K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, x.dtype, mask_bits=bits if masked else None,
                                       da=da, da_x=x, config=cfg)

    row = dict(shape=f"{m}x{k}->{n}", fwd_base=gpu_ms(lambda: F.linear(x, w)), fwd_pass=gpu_ms(fwd_pass),
               fwd_down=gpu_ms(lambda: K.gemm_lora_tma(x, w, None, None, b, 2.0, x.dtype, down=a)),
               fwd_pass64=gpu_ms(lambda: fwd_pass(a64, b64)),
               fwd_down64=gpu_ms(lambda: K.gemm_lora_tma(x, w, None, None, b64, 2.0, x.dtype, down=a64)),
               xa_pass=gpu_ms(lambda: K.lora_down(x, a, 2.0, x.dtype)),
               bwd_base=gpu_ms(lambda: dy @ w), dx_pass=gpu_ms(dx_pass), dxp_pass=gpu_ms(dx_masked_pass),
               da_pass=gpu_ms(lambda: K.lora_grad_a(g, x, 1.0, da)))
    for split in (2, 4):
        for masked in (False, True):
            try:
                row[f"dx{'p' if masked else ''}_fused{split}"] = gpu_ms(dx_fused(split, masked))
            except triton.runtime.errors.OutOfResources as e:
                print(f"# split {split} masked {masked} at {row['shape']}: {str(e)[:120]}")
    print(row, flush=True)
    return row


def ratio(row, key, base) -> str:
    """`row[key]` in ms and its ratio to `row[base]` (nan where the config did not fit)."""
    v = row.get(key, float("nan"))
    return f"{v:.3f} ({v / row[base]:.2f})"


def print_head(head: list[str]) -> None:
    print("\n| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))


def print_row(cells: list[str]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def part2(shapes):
    rows = [part2_row(m, k, n) for m, k, n in shapes]
    print_head(["shape", "fwd cuBLAS ms", "xa pass ms", "r16: xa pass + TMA GEMM (×)", "r16: TMA GEMM computing xa (×)",
                "r64: pass + GEMM (×)", "r64: GEMM computing xa (×)"])
    for row in rows:
        print_row([row["shape"], f"{row['fwd_base']:.3f}", f"{row['xa_pass']:.3f}",
                   *(ratio(row, key, "fwd_base") for key in ("fwd_pass", "fwd_down", "fwd_pass64", "fwd_down64"))])
    print_head(["shape", "dx cuBLAS ms", "dA pass ms", "p=0: TMA GEMM + dA pass (×)", "p=0: dA in epilogue, halves (×)",
                "quarters (×)", "p=.05: masked pass + cuBLAS (×)", "p=.05: ready bits, halves (×)", "quarters (×)"])
    for row in rows:
        print_row([row["shape"], f"{row['bwd_base']:.3f}", f"{row['da_pass']:.3f}",
                   *(ratio(row, key, "bwd_base")
                     for key in ("dx_pass", "dx_fused2", "dx_fused4", "dxp_pass", "dxp_fused2", "dxp_fused4"))])
    return rows


# dx with dA in the epilogue, p = 0: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, EPI_SPLIT, programs per SM).
# Two programs per SM (smaller tiles, two stages) let one program's epilogue overlap the other's K-loop.
DX_CONFIGS = [
    (128, 256, 64, 8, 3, 2, 1),
    (128, 128, 64, 8, 3, 1, 1),
    (128, 128, 64, 8, 2, 1, 2),
    (128, 128, 64, 4, 2, 1, 2),
    (64, 256, 64, 4, 2, 2, 2),
]


def part4_row(m, k, n, r=16) -> None:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    a = torch.randn(r, k, device="cuda") / math.sqrt(k)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, r, device="cuda", dtype=torch.float32)
    da = torch.zeros(r, k, device="cuda")
    base = gpu_ms(lambda: dy @ w)
    ref = dy.double() @ w.double() + g.to(x.dtype).double() @ a.to(x.dtype).double()

    def dx(cfg):
        return K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, x.dtype, da=da, da_x=x, config=cfg)

    cells = []
    for bm, bn, bk, wp, st, split, per_sm in DX_CONFIGS:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EPI_SPLIT=split, num_warps=wp, num_stages=st,
                   programs_per_sm=per_sm)
        try:
            e = rel(dx(cfg), ref)
            t = gpu_ms(lambda cfg=cfg: dx(cfg))
            cells.append(f"{t:.3f} ({t / base:.2f}; err {e:.0e})")
        except triton.runtime.errors.OutOfResources as exc:
            cells.append(f"out of resources ({str(exc)[:40]})")
    print_row([f"{m}x{k}->{n}", f"{base:.3f}", *cells])


def part4(shapes):
    print_head(["shape", "dx cuBLAS ms", *(str(c) for c in DX_CONFIGS)])
    for m, k, n in shapes:
        part4_row(m, k, n)


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
    steps = [ratio(res, mode, "base") for mode in ("cublas", "auto", "cublas_p", "auto_p")]
    forwards = [ratio(res, mode, "base_f") for mode in ("cublas_f", "auto_f")]
    print_row([f"{m}x{k}->{n}", f"{base:.3f}", *steps, f"{base_f:.3f}", *forwards])


def part3(shapes):
    print_head(["shape", "base fwd+bwd ms", "cuBLAS path (×)", "auto (×)", "cuBLAS p=.05 (×)", "auto p=.05 (×)",
                "base fwd ms", "cuBLAS fwd (×)", "auto fwd (×)"])
    for m, k, n in shapes:
        part3_row(m, k, n)


def check_units() -> float:
    """The forward with xa computed in the TMA GEMM in units of 1, 2, 3 column blocks and the default, against
    fp64 (bf16 and fp16, odd sizes)."""
    worst = 0.0
    gen = torch.Generator(device="cuda").manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        for m, k, n, r in [(1000, 520, 1800, 7), (4104, 4096, 1032, 64), (333, 1032, 2056, 1), (2048, 2048, 2048, 16),
                           (8200, 4096, 4104, 16)]:
            rnd = lambda *shape, dt=dtype: torch.randn(*shape, device="cuda", dtype=dt, generator=gen)
            x, w = rnd(m, k), rnd(n, k) / math.sqrt(k)
            a, b = rnd(r, k, dt=torch.float32) / math.sqrt(k), rnd(n, r, dt=torch.float32) / math.sqrt(r)
            for chunk in (1, 2, 3, None):
                cfg = None if chunk is None else K._tma_config() | dict(CHUNK_N=chunk)
                out, xa = K.gemm_lora_tma(x, w, None, None, b, 2.0, dtype, down=a, config=cfg)
                xa_ref = 2.0 * x.double() @ a.to(dtype).double().T
                ref = x.double() @ w.double().T + xa.double() @ b.to(dtype).double().T
                for name, o, rf in (("xa", xa, xa_ref), ("y", out, ref)):
                    e = rel(o, rf)
                    assert o.isfinite().all() and e <= tol, (name, dtype, m, k, n, r, chunk, e)
                    worst = max(worst, e)
    return worst


def part5_row(m, k, n, r=16) -> None:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    a = (torch.randn(r, k, device="cuda") / math.sqrt(k)).to(x.dtype)
    b = (torch.randn(n, r, device="cuda") / math.sqrt(r)).to(x.dtype)
    cfg = K._tma_config()
    num_m, num_n = math.ceil(m / cfg["BLOCK_M"]), math.ceil(n / cfg["BLOCK_N"])
    auto = K._unit_blocks(num_m, num_n, K.num_sms(x.device, 4))

    def fwd_pass():
        xa = K.lora_down(x, a, 2.0, x.dtype)
        K.gemm_lora_tma(x, w, None, xa, b, 1.0, x.dtype)

    def fwd_units(chunk):
        c = cfg | dict(CHUNK_N=chunk)
        return lambda: K.gemm_lora_tma(x, w, None, None, b, 2.0, x.dtype, down=a, config=c)

    base = gpu_ms(lambda: F.linear(x, w))
    fwd = {"xa pass + GEMM": gpu_ms(fwd_pass)}
    for chunk in sorted({1, 2, 4, 7, 8, 14, auto}):
        if num_n % chunk == 0:
            fwd[f"units of {chunk}" + (" (auto)" if chunk == auto else "")] = gpu_ms(fwd_units(chunk))
    print(f"{m}x{k}->{n} r{r}: forward, x cuBLAS {base:.3f} ms: "
          + "; ".join(f"{name} {t:.3f} ({t / base:.3f})" for name, t in fwd.items()), flush=True)


def part5(shapes):
    print(f"check vs fp64, units (bf16, fp16): worst rel err {check_units():.2e}", flush=True)
    for m, k, n in shapes:
        part5_row(m, k, n)
    part5_row(8192, 4096, 4096, r=64)


def check_row_units() -> float:
    """dx with dA summed over units of 1, 2, 3 row blocks and the default, p = 0 and .05, against fp64 (bf16 and
    fp16, odd sizes)."""
    worst = 0.0
    gen = torch.Generator(device="cuda").manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        for m, n_out, k, r in [(1000, 520, 1800, 7), (4104, 1032, 4096, 64), (333, 1032, 2056, 1),
                               (2048, 2048, 2048, 16), (8200, 1024, 4104, 16)]:
            rnd = lambda *shape, dt=dtype: torch.randn(*shape, device="cuda", dtype=dt, generator=gen)
            dy, w, x = rnd(m, n_out), rnd(n_out, k) / math.sqrt(n_out), rnd(m, k)
            g, a = rnd(m, r, dt=torch.float32), rnd(r, k, dt=torch.float32) / math.sqrt(k)
            for p in (0.0, 0.05):
                bits = keep_bits(17 + m, x, p)
                keep = dropout_keep_mask(17 + m, m, k, p, device="cuda").double()
                g_op = g.to(dtype).double()
                dx_ref = dy.double() @ w.double() + keep * (g_op @ a.to(dtype).double())
                da_ref = g_op.T @ (keep * x.double())
                for chunk_m in (1, 2, 3, None):
                    cfg = K._tma_config() | ({} if chunk_m is None else dict(CHUNK_M=chunk_m))
                    da = torch.zeros(r, k, device="cuda")
                    dx = K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, dtype, mask_bits=bits, da=da, da_x=x,
                                         config=cfg)
                    for name, o, rf, t in (("dx", dx, dx_ref, tol), ("dA", da, da_ref, 1e-3)):
                        e = rel(o, rf)
                        assert o.isfinite().all() and e <= t, (name, dtype, m, n_out, k, r, p, chunk_m, e)
                        worst = max(worst, e)
    return worst


def part7_row(m, k, n, r=16) -> None:
    """dx = dy·W (+ g·A) with dA in the epilogue: (M, n) · (n, k), units of row blocks against one tile at a time."""
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, r, device="cuda", dtype=torch.float32)
    a = torch.randn(r, k, device="cuda") / math.sqrt(k)
    da = torch.zeros(r, k, device="cuda")
    bits = keep_bits(5, x, 0.05)
    cfg = K._tma_config()
    auto = K._unit_blocks(math.ceil(k / cfg["BLOCK_N"]), math.ceil(m / cfg["BLOCK_M"]), K.num_sms(x.device, 4))

    def dx(chunk_m, masked):
        c = K._tma_config() | dict(CHUNK_M=chunk_m)
        return lambda: K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, x.dtype, mask_bits=bits if masked else None,
                                       da=da, da_x=x, config=c)

    base = gpu_ms(lambda: dy @ w)
    res = {}
    for masked in (False, True):
        for chunk_m in sorted({1, auto}):
            res[f"{'p=.05' if masked else 'p=0'} units of {chunk_m}"] = gpu_ms(dx(chunk_m, masked))
    print(f"dx {m}x{n}->{k} r{r}: x cuBLAS {base:.3f} ms: "
          + "; ".join(f"{name} {v:.3f} ({v / base:.3f})" for name, v in res.items()), flush=True)


def part7(shapes):
    print(f"check vs fp64, dA over units of row blocks (bf16, fp16): worst rel err {check_row_units():.2e}",
          flush=True)
    for m, k, n in shapes:
        part7_row(m, k, n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--parts", default="123", help="which parts to run, e.g. 13 (default: 123)")
    args = ap.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    if "1" in args.parts:
        print(f"check vs fp64 (bf16, fp16; every config): worst rel err {check():.2e}", flush=True)
    if "2" in args.parts:
        part2(shapes)
    if "3" in args.parts:
        part3(shapes)
    if "4" in args.parts:
        part4(shapes)
    if "5" in args.parts:
        part5(shapes)
    if "7" in args.parts:
        part7(shapes)


if __name__ == "__main__":
    main()
