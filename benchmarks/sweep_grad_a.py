"""Tile sweep of the two passes over x: `lora_grad_a` (dA, in each of the modes the backward uses) and `lora_down`
(the forward's xa), bf16, ranks 16 and 64, at 8192×4096 and 2048×2048; two rounds, do_bench medians in µs.

Modes of lora_grad_a: "dA" (p = 0, where the TMA GEMM does not take dA), "dA masked" (p = .05), "dA masked + bits"
(p = .05 on Hopper: the mask also written as bits for the dx GEMM), "dA + dx term" and "dA + dx term masked" (the
cuBLAS path). Each tiling is first checked against the default tiling (dA, the dx term, the bits).

With --whole, instead: the whole op fwd+bwd (GPU time alone, CUDA-graph replay, × the frozen base; bf16 x, fp32
adapters) at bench_kernels.py's shapes, ranks 16 and 64, p = .05 ("auto" routing) and p = 0 through the cuBLAS path,
with lora_grad_a's tiling of before (32, 128, 4 for ranks up to 64) and the current `_grad_a_tiles`, alternating,
two rounds.

`python benchmarks/sweep_grad_a.py [--whole]`
"""

import sys

import torch
import torch.nn.functional as F
from bench_kernels import SHAPES as OP_SHAPES  # benchmarks/ is sys.path[0] when this script runs
from bench_kernels import fwd_bwd, make
from profile_gemm import gpu_ms
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from lora_engine import ops
from lora_engine.kernels import lora_linear as K

TILES = [(32, 128, 4), (64, 128, 4), (32, 256, 8), (32, 256, 4), (64, 256, 8)]
SHAPES = [(8192, 4096, 16), (8192, 4096, 64), (2048, 2048, 16)]
MODES = {  # name: (dropout, bits, dx term)
    "dA": (False, False, False),
    "dA masked": (True, False, False),
    "dA masked + bits": (True, True, False),
    "dA + dx term": (False, False, True),
    "dA + dx term masked": (True, False, True),
}


def grad_a_call(m, k, r, dropout, bits, dx_term, tiles):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, k, device="cuda", dtype=torch.float32) / 64
    g = torch.randn(m, r, device="cuda", dtype=torch.float32) / 16
    da = torch.zeros(r, k, device="cuda", dtype=torch.float32)
    dx = torch.empty(m, k, device="cuda", dtype=torch.bfloat16) if dx_term else None
    keep_bits = torch.empty(m, (k + 7) // 8, device="cuda", dtype=torch.uint8) if bits else None
    seed = torch.tensor([4321], device="cuda", dtype=torch.int64) if dropout else None
    thr = K.dropout_threshold(0.05)

    def run():
        K.lora_grad_a(g, x, 1.0, da, mask_seed=seed, threshold=thr, lora_a=a if dx_term else None, dx=dx,
                      keep_bits=keep_bits, tiles=tiles)

    def outputs():
        da.zero_()
        run()
        return [t.clone() for t in (da, dx, keep_bits) if t is not None]

    return run, outputs


def check(outs, ref) -> str:
    worst = 0.0
    for o, e in zip(outs, ref):
        if o.dtype == torch.uint8:
            if not torch.equal(o, e):
                return "bits differ"
        else:
            worst = max(worst, ((o.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item())
    return "" if worst < 1e-2 else f"error {worst:.1e}"


def checked_times(run, outputs, ref) -> str:
    """A table cell: why the tiling is out (too large for the GPU, or its outputs differ from ref), else two
    do_bench medians of run, µs."""
    try:
        bad = check(outputs(), ref)
    except OutOfResources:
        bad = "too large"
    if bad:
        return bad
    return " / ".join(f"{do_bench(run, warmup=25, rep=150, return_mode='median') * 1e3:.1f}" for _ in range(2))


def sweep_grad_a():
    print("| lora_grad_a | shape | r | " + " | ".join(f"{t[0]}×{t[1]} w{t[2]}" for t in TILES) + " |", flush=True)
    print("| --- " * (len(TILES) + 3) + "|")
    for m, k, r in SHAPES:
        for name, (dropout, bits, dx_term) in MODES.items():
            torch.manual_seed(0)
            _, ref_out = grad_a_call(m, k, r, dropout, bits, dx_term, None)
            ref = ref_out()
            cells = []
            for t in TILES:
                torch.manual_seed(0)
                run, outputs = grad_a_call(m, k, r, dropout, bits, dx_term, t)
                cells.append(checked_times(run, outputs, ref))
            print(f"| {name} | {m}×{k} | {r} | " + " | ".join(cells) + " |", flush=True)


def sweep_down():
    thr = K.dropout_threshold(0.05)
    print("\n| lora_down | shape | r | " + " | ".join(f"{t[0]}×{t[1]} w{t[2]}" for t in TILES) + " |", flush=True)
    print("| --- " * (len(TILES) + 3) + "|")
    for m, k, r in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(r, k, device="cuda", dtype=torch.float32) / 64
        for seed in (None, torch.tensor([4321], device="cuda", dtype=torch.int64)):
            ref = K.lora_down(x, a, 1.0, x.dtype, mask_seed=seed, threshold=thr)
            cells = []
            for t in TILES:
                run = lambda t=t, s=seed, x=x, a=a: K.lora_down(x, a, 1.0, x.dtype, mask_seed=s, threshold=thr, tiles=t)
                cells.append(checked_times(run, lambda run=run: [run()], [ref]))
            name = "xa masked" if seed is not None else "xa"
            print(f"| {name} | {m}×{k} | {r} | " + " | ".join(cells) + " |", flush=True)
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    print(f"\nread floor, x.sum() at 8192×4096: {do_bench(lambda: x.sum(), warmup=25, rep=150) * 1e3:.1f} µs")


TILINGS = {
    "before": lambda r_pad, has_dx, itemsize=2: (32, 128, 4) if r_pad <= 64 else (32, 64, 8),
    "now": K._grad_a_tiles,
}


def whole_row(m, k, n, r):
    x, w, a, b, dy = make(m, k, n, r, lora_dtype=torch.float32)
    base = gpu_ms(fwd_bwd(lambda: F.linear(x, w), x, [x], dy))
    for case, p, gemm in (("p=.05, auto", 0.05, "auto"), ("p=0, cuBLAS path", 0.0, "cublas")):
        ops.set_base_gemm(gemm)
        step = fwd_bwd(lambda p=p: ops.lora_linear(x, w, None, a, b, 2.0, p), x, [x, a, b], dy)
        cells = []
        for _ in range(2):
            for tiling in TILINGS.values():
                K._grad_a_tiles = tiling
                ms = gpu_ms(step)
                cells.append(f"{ms:.3f} ({ms / base:.2f})")
        print(f"| {m}×{k}→{n} | {r} | {case} | {base:.3f} | " + " | ".join(cells) + " |", flush=True)


def whole_op():
    print("| shape | r | case | base ms | " + " | ".join(f"{t} (×)" for t in [*TILINGS] * 2) + " |", flush=True)
    print("| --- " * (4 + 2 * len(TILINGS)) + "|")
    try:
        for m, k, n in OP_SHAPES:
            for r in (16, 64):
                whole_row(m, k, n, r)
    finally:
        K._grad_a_tiles = TILINGS["now"]
        ops.set_base_gemm("auto")


if __name__ == "__main__":
    if "--whole" in sys.argv[1:]:
        whole_op()
    else:
        sweep_grad_a()
        sweep_down()
