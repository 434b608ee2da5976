"""Tilings of the backward's and forward's kernels, each variant checked against fp64 first (bf16 at the timed shape,
fp16 at an odd one), then timed in GPU time alone (CUDA-graph replay), µs:
- d: `lora_dy`'s (BLOCK_M, BLOCK_N, warps[, stages]) at ranks 16, 32 and 64;
- m: the TMA dx GEMM with dropout's term from bits, epilogue in quarters and in halves;
- f: the forward TMA GEMM computing xa in its K-loop, under four tilings;
- o: the whole op at rank 64, xa in the forward GEMM against its own pass (× the frozen base, two rounds);
- a: `lora_grad_a` with fp32 x on its GPU tiles, every mode, against fp64 (no timing);
- p: the TMA GEMM's LoRA operands loaded before its K-loop (`PREFETCH`) or after it, on the forward with a given xa,
  dx with dA, and dx alone (three rounds alternating, fp32 adapters).

`python benchmarks/sweep_tiles.py [--parts dmfoap]`
"""

import argparse
import math
from unittest import mock

import torch
import torch.nn.functional as F
from bench_kernels import fwd_bwd, make  # benchmarks/ is sys.path[0] when this script runs
from profile_gemm import gpu_ms, keep_bits, rel

from lora_engine import ops
from lora_engine.kernels import lora_linear as K
from lora_engine.ops import dropout_keep_mask

SHAPES = [(8192, 4096, 4096), (8192, 4096, 1024), (8192, 4096, 14336), (2048, 2048, 2048)]
DY_TILES = [None, (128, 64, 4), (64, 64, 4), (256, 64, 8), (256, 32, 8), (128, 128, 8), (128, 32, 4), (512, 64, 8, 2)]
FWD_TILES = [None, (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 2)]


def tol(dtype):
    return 1e-2 if dtype == torch.bfloat16 else 2e-3


def dy_case(m, n, r, dtype, gen):
    dy = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
    b = torch.randn(n, r, device="cuda", generator=gen) / math.sqrt(r)
    xa = torch.randn(m, r, device="cuda", dtype=dtype, generator=gen)
    return dy, b, xa


def check_dy(tiles, dy, b, xa):
    m, n = dy.shape
    r = b.shape[1]
    g, db = torch.zeros(m, r, device="cuda"), torch.zeros(n, r, device="cuda")
    K.lora_dy(dy, b, xa, 0.5, 2.0, g, db, tiles=tiles)
    e = max(rel(g, 2.0 * dy.double() @ b.to(dy.dtype).double()), rel(db, 0.5 * dy.double().T @ xa.double()))
    assert e < tol(dy.dtype), (tiles, dy.shape, b.shape, e)
    return e


def dy_row(m, n, r, gen) -> float:
    dy, b, xa = dy_case(m, n, r, torch.bfloat16, gen)
    odd = dy_case(777, 4104 if r == 64 else 1800, {16: 7, 32: 29}.get(r, 61), torch.float16, gen)
    g, db = torch.zeros(m, r, device="cuda"), torch.zeros(n, r, device="cuda")
    cells, worst = [], 0.0
    for t in DY_TILES:
        worst = max(worst, check_dy(t, dy, b, xa), check_dy(t, *odd))
        cells.append(f"{gpu_ms(lambda t=t: K.lora_dy(dy, b, xa, 0.5, 2.0, g, db, tiles=t)) * 1e3:.1f}")
    print(f"| {m}x{n} | {r} | " + " | ".join(cells) + " |", flush=True)
    return worst


def part_dy():
    gen = torch.Generator(device="cuda").manual_seed(1)
    print("| lora_dy (M x N) | r | " + " | ".join(str(t or "default") for t in DY_TILES) + " |")
    print("| --- | --- |" + " --- |" * len(DY_TILES))
    worst = max(dy_row(m, n, r, gen) for m, _, n in SHAPES for r in (16, 32, 64))
    print(f"# lora_dy worst rel err {worst:.2e}")


def masked_row(m, k, n, r, dtype, gen) -> None:
    rnd = lambda *s, dt=dtype: torch.randn(*s, device="cuda", dtype=dt, generator=gen)
    dy, w, x = rnd(m, n), rnd(n, k) / math.sqrt(n), rnd(m, k)
    g, a = rnd(m, r, dt=torch.float32), rnd(r, k, dt=torch.float32) / math.sqrt(k)
    bits = keep_bits(11, x, 0.05)
    keep = dropout_keep_mask(11, m, k, 0.05, device="cuda").double()
    ref = dy.double() @ w.double() + keep * (g.to(dtype).double() @ a.to(dtype).double())
    cells = [f"{gpu_ms(lambda: dy @ w) * 1e3:.1f}"]
    for split in (4, 2):
        cfg = K._tma_config() | dict(EPI_SPLIT=split)
        fn = lambda cfg=cfg: K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, dtype, mask_bits=bits, config=cfg)
        e = rel(fn(), ref)
        assert e < tol(dtype), (m, n, k, r, split, e)
        cells.append(f"{gpu_ms(fn) * 1e3:.1f}" if m >= 2048 else f"err {e:.1e}")
    print(f"| {m}x{n}->{k} {str(dtype)[6:]} | {r} | " + " | ".join(cells) + " |", flush=True)


def part_masked():
    print("\n| masked dx GEMM from bits (m x n -> k) | r | cuBLAS us | quarters | halves |")
    print("| --- | --- | --- | --- | --- |")
    gen = torch.Generator(device="cuda").manual_seed(2)
    for m, k, n in SHAPES + [(1000, 1800, 520), (4104, 4096, 1032)]:
        for r in (16, 64) if m >= 2048 else (7, 61):
            for dtype in (torch.bfloat16, torch.float16) if m < 2048 else (torch.bfloat16,):
                masked_row(m, k, n, r, dtype, gen)


def fwd_cfg(t):
    if t is None:
        return None
    bm, bn, bk, w, s = t
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EPI_SPLIT=2, num_warps=w, num_stages=s)


def check_fwd(t, m, k, n, r, dtype, gen):
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / math.sqrt(k)
    a = torch.randn(r, k, device="cuda", generator=gen) / math.sqrt(k)
    b = torch.randn(n, r, device="cuda", generator=gen) / math.sqrt(r)
    y, xa = K.gemm_lora_tma(x, w, None, None, b, 2.0, dtype, down=a, config=fwd_cfg(t))
    xa_ref = 2.0 * x.double() @ a.to(dtype).double().T
    y_ref = x.double() @ w.double().T + xa.double() @ b.to(dtype).double().T
    e = max(rel(xa, xa_ref), rel(y, y_ref))
    assert e < tol(dtype), (t, m, k, n, r, dtype, e)
    return x, w, a.to(dtype), b


def fwd_row(m, k, n, r, gen) -> None:
    cells = []
    for t in FWD_TILES:
        check_fwd(t, 1000, 520, 1800, r - 3, torch.float16, gen)
        x, w, a, b = check_fwd(t, m, k, n, r, torch.bfloat16, gen)
        fn = lambda t=t, x=x, w=w, a=a, b=b: K.gemm_lora_tma(x, w, None, None, b, 2.0, x.dtype, down=a,
                                                             config=fwd_cfg(t))
        cells.append(f"{gpu_ms(fn) * 1e3:.1f}")
    base = gpu_ms(lambda: x @ w.T) * 1e3
    print(f"| {m}x{k}->{n} | {r} | {base:.1f} | " + " | ".join(cells) + " |", flush=True)


def part_fwd():
    gen = torch.Generator(device="cuda").manual_seed(4)
    print("\n| forward, xa in GEMM (M x K -> N) | r | cuBLAS us | "
          + " | ".join(str(t or "default") for t in FWD_TILES) + " |")
    print("| --- | --- | --- |" + " --- |" * len(FWD_TILES))
    for m, k, n in SHAPES:
        for r in (64, 16):
            fwd_row(m, k, n, r, gen)


def ops_row(m, k, n) -> None:
    x, w, a, b, dy = make(m, k, n, 64, lora_dtype=torch.float32)
    base = gpu_ms(fwd_bwd(lambda: F.linear(x, w), x, [x], dy))
    with torch.no_grad():
        base_f = gpu_ms(lambda: F.linear(x, w))
    step = fwd_bwd(lambda: ops.lora_linear(x, w, None, a, b, 2.0), x, [x, a, b], dy)
    fwd = lambda: ops.lora_linear(x, w, None, a, b, 2.0, training=False)
    rows = {"p=0": [], "fwd": []}
    for _ in range(2):
        for max_rank in (64, 32):  # rank 64 runs xa in the GEMM up to _DOWN_IN_GEMM_MAX_RANK
            with mock.patch.object(K, "_DOWN_IN_GEMM_MAX_RANK", max_rank):
                rows["p=0"].append(gpu_ms(step) / base)
                with torch.no_grad():
                    rows["fwd"].append(gpu_ms(fwd) / base_f)
    for case, vals in rows.items():
        b_ms = base_f if case == "fwd" else base
        print(f"| {m}x{k}->{n} | 64 | {case} | {b_ms:.3f} | " + " | ".join(f"{v:.3f}" for v in vals) + " |",
              flush=True)


def part_ops():
    print("\n| shape | r | case | base ms | xa in GEMM | own pass | xa in GEMM | own pass |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, k, n in SHAPES:
        ops_row(m, k, n)


def part_grad_a_fp32():
    gen = torch.Generator(device="cuda").manual_seed(5)
    worst = 0.0
    for m, k, r in ((1000, 1800, 7), (4104, 4096, 61), (333, 2056, 100), (8192, 4096, 16)):
        x = torch.randn(m, k, device="cuda", generator=gen)
        g = torch.randn(m, r, device="cuda", generator=gen)
        a = torch.randn(r, k, device="cuda", generator=gen) / math.sqrt(k)
        keep = dropout_keep_mask(9, m, k, 0.05, device="cuda").double()
        for masked in (False, True):
            for has_dx in (False, True):
                da = torch.zeros(r, k, device="cuda")
                dx = torch.empty(m, k, device="cuda") if has_dx else None
                kw = dict(mask_seed=torch.tensor([9], device="cuda"), threshold=K.dropout_threshold(0.05)) if masked \
                    else {}
                K.lora_grad_a(g, x, 1.0, da, lora_a=a if has_dx else None, dx=dx, **kw)
                kk = keep if masked else 1.0
                errs = [rel(da, g.double().T @ (kk * x.double()))]
                if has_dx:
                    errs.append(rel(dx, kk * (g.double() @ a.double())))
                assert max(errs) < 1e-4, (m, k, r, masked, has_dx, errs)
                worst = max(worst, *errs)
    print(f"# lora_grad_a, fp32 x, GPU tiles: worst rel err vs fp64 {worst:.2e}", flush=True)


def prefetch_paths(m, k, n, r, dtype, gen) -> dict:
    """name -> (launch(prefetch), fp64 references, its cuBLAS GEMM) of the TMA GEMM's three unmasked LoRA roles, with
    fp32 A and B."""
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / math.sqrt(k)
    a = torch.randn(r, k, device="cuda", generator=gen) / math.sqrt(k)
    b = torch.randn(n, r, device="cuda", generator=gen) / math.sqrt(r)
    dy = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
    xa, g = (x.float() @ a.t()).to(dtype), dy.float() @ b
    da = torch.zeros(r, k, device="cuda")
    cfg = lambda pf: K._tma_config() | dict(PREFETCH=pf)
    dx_ref = dy.double() @ w.double() + g.to(dtype).double() @ a.to(dtype).double()

    def dx_da(pf):
        da.zero_()
        return K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, dtype, da=da, da_x=x, config=cfg(pf)), da

    return {
        "forward, xa given": (lambda pf: (K.gemm_lora_tma(x, w, None, xa, b, 1.0, dtype, config=cfg(pf)),),
                              (x.double() @ w.double().T + xa.double() @ b.to(dtype).double().T,),
                              lambda: x @ w.t()),
        "dx with dA": (dx_da, (dx_ref, g.to(dtype).double().T @ x.double()), lambda: dy @ w),
        "dx": (lambda pf: (K.gemm_lora_tma(dy, w.t(), None, g, a.t(), 1.0, dtype, config=cfg(pf)),), (dx_ref,),
               lambda: dy @ w),
    }


def prefetch_row(m, k, n, name, r, gen) -> None:
    fn, _, cublas = prefetch_paths(m, k, n, r, torch.bfloat16, gen)[name]
    cells = [gpu_ms(lambda pf=pf: fn(pf)) * 1e3 for _ in range(3) for pf in (False, True)]
    print(f"| {m}x{k}->{n} | {name} | {r} | {gpu_ms(cublas) * 1e3:.1f} | " + " | ".join(f"{c:.1f}" for c in cells)
          + " |", flush=True)


def part_prefetch():
    gen = torch.Generator(device="cuda").manual_seed(6)
    for dtype in (torch.bfloat16, torch.float16):  # both placements against fp64 at odd shapes first
        for m, k, n, r in ((1000, 520, 776, 7), (333, 1032, 264, 16), (2056, 1024, 4104, 13)):
            for name, (fn, refs, _) in prefetch_paths(m, k, n, r, dtype, gen).items():
                for pf in (False, True):
                    errs = [rel(o, ref) for o, ref in zip(fn(pf), refs)]
                    assert max(errs) < tol(dtype), (name, m, k, n, r, dtype, pf, errs)
    print("\n| TMA GEMM (M x K -> N) | path | r | cuBLAS us | after | before | after | before | after | before |")
    print("| --- " * 10 + "|")
    for m, k, n in SHAPES:
        for name, ranks in (("forward, xa given", (16, 64)), ("dx with dA", (16, 32)), ("dx", (16, 64))):
            for r in ranks:
                prefetch_row(m, k, n, name, r, gen)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="dmfoap", help="which parts to run (default: all)")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}")
    parts = {"a": part_grad_a_fp32, "d": part_dy, "m": part_masked, "f": part_fwd, "o": part_ops,
             "p": part_prefetch}
    for key, fn in parts.items():
        if key in args.parts:
            fn()


if __name__ == "__main__":
    main()
