"""Fused LoRA linear against the frozen base linear (the floor), the unfused PEFT-style path and
PEFT's own LoRA layer: fwd+bwd and forward-only medians, bf16, in one run on one GPU.

    LORA_ENGINE_AUTOTUNE=1 python benchmarks/bench_kernels.py [--quick] [--gpu-time] [--out results.jsonl]

Each row first checks our output and dx against an fp64 reference on the same inputs, then times.
Ratios are against the frozen base `F.linear` measured in the same run. Times are eager wall-clock medians (host
launch costs included), or with --gpu-time the GPU's time alone (CUDA-graph replay).
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from lora_engine.ops import BASE_GEMMS, lora_linear, lora_linear_reference, set_base_gemm

SHAPES = [(8192, 4096, 4096), (8192, 4096, 1024), (8192, 4096, 14336), (2048, 2048, 2048)]
RANKS = [8, 16, 64]
DROPOUTS = [0.0, 0.05]

try:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear
except Exception:  # peft is an optional peer here
    PeftLoraLinear = None


GPU_TIME = False  # set by --gpu-time


def median_ms(fn) -> float:
    if GPU_TIME:
        return do_bench_cudagraph(fn, rep=60, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def make(m, k, n, r, dtype=torch.bfloat16, lora_dtype=None):
    """x (requires grad), frozen w, LoRA a and b (in lora_dtype, default x's; require grad), and dy."""
    lora_dtype = lora_dtype or dtype
    x = torch.randn(m, k, device="cuda", dtype=dtype).requires_grad_()
    w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
    a = (torch.randn(r, k, device="cuda", dtype=lora_dtype) / math.sqrt(k)).requires_grad_()
    b = (torch.randn(n, r, device="cuda", dtype=lora_dtype) / math.sqrt(r)).requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    return x, w, a, b, dy


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(x, w, a, b, dy, s, p):
    """Relative error of y and dx against the fp64 reference with the same dropout mask."""
    torch.manual_seed(0)
    y = lora_linear(x, w, None, a, b, s, p)
    (dx,) = torch.autograd.grad(y, [x], dy)
    x64 = x.detach().double().requires_grad_()
    torch.manual_seed(0)
    y64 = lora_linear_reference(x64, w.double(), None, a.detach().double(), b.detach().double(), s, p)
    (dx64,) = torch.autograd.grad(y64, [x64], dy.double())
    return max(rel(y, y64), rel(dx, dx64))


def fwd_bwd(fn, x, params, dy):
    def step():
        for t in params:
            t.grad = None
        fn().backward(dy)

    return step


def bench_row(m, k, n, r, p):
    x, w, a, b, dy = make(m, k, n, r)
    s = 2.0
    err = check(x, w, a, b, dy, s, p)
    row = dict(m=m, k=k, n=n, r=r, p=p, rel_err=err)
    base = lambda: F.linear(x, w)
    ours = lambda: lora_linear(x, w, None, a, b, s, p)

    def unfused():
        xd = F.dropout(x, p) if p > 0 else x
        return F.linear(x, w) + s * F.linear(F.linear(xd, a), b)

    row["base"] = median_ms(fwd_bwd(base, x, [x], dy))
    row["ours"] = median_ms(fwd_bwd(ours, x, [x, a, b], dy))
    row["unfused"] = median_ms(fwd_bwd(unfused, x, [x, a, b], dy))
    if PeftLoraLinear is not None:
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p)
        layer = PeftLoraLinear(lin, "default", config=config, r=r, lora_alpha=2 * r)
        layer.to(device="cuda", dtype=torch.bfloat16)
        layer.requires_grad_(False)
        layer.lora_A["default"].weight.requires_grad_(True)
        layer.lora_B["default"].weight.requires_grad_(True)
        lp = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        row["peft"] = median_ms(fwd_bwd(lambda: layer(x), x, lp, dy))
    with torch.no_grad():
        row["base_fwd"] = median_ms(base)
        row["ours_fwd"] = median_ms(lambda: lora_linear(x, w, None, a, b, s, p, training=False))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first shape only, ranks 16, no dropout")
    ap.add_argument("--out", default=None, help="write rows as JSON lines here")
    ap.add_argument("--base-gemm", default="auto", choices=BASE_GEMMS,
                    help="how lora_linear runs the frozen base GEMM (see lora_engine.ops.set_base_gemm)")
    ap.add_argument("--gpu-time", action="store_true", help="time CUDA-graph replays: GPU time without the host's")
    ap.add_argument("--ranks", default=None, help="comma-separated LoRA ranks instead of the issue's 8,16,64")
    args = ap.parse_args()
    global GPU_TIME
    GPU_TIME = args.gpu_time
    set_base_gemm(args.base_gemm)
    shapes, ranks, drops = (SHAPES[:1], [16], [0.0]) if args.quick else (SHAPES, RANKS, DROPOUTS)
    if args.ranks:
        try:
            ranks = [int(r) for r in args.ranks.split(",")]
        except ValueError:
            ap.error(f"--ranks takes comma-separated integers, got {args.ranks!r}")
        if any(r < 1 for r in ranks):
            ap.error(f"--ranks must be at least 1, got {args.ranks!r}")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} "
          f"| python {platform.python_version()} | peft layer: {PeftLoraLinear is not None} "
          f"| base GEMM: {args.base_gemm} | {'GPU time (CUDA graphs)' if GPU_TIME else 'eager'}")
    rows = []
    for m, k, n in shapes:
        for r in ranks:
            for p in drops:
                row = bench_row(m, k, n, r, p)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    hdr = ("| M×K→N | r | p | rel err | base fwd+bwd ms | ours ms (×base) | PEFT-style ms (×) "
           "| PEFT layer ms (×) | fwd base ms | fwd ours (×) |")
    print("\n" + hdr)
    print("|" + " --- |" * (hdr.count("|") - 1))
    for r in rows:
        peft = f"{r['peft']:.3f} ({r['peft'] / r['base']:.2f}×)" if "peft" in r else "n/a"
        print(f"| {r['m']}×{r['k']}→{r['n']} | {r['r']} | {r['p']} | {r['rel_err']:.1e} | {r['base']:.3f} "
              f"| {r['ours']:.3f} ({r['ours'] / r['base']:.2f}×) "
              f"| {r['unfused']:.3f} ({r['unfused'] / r['base']:.2f}×) | {peft} "
              f"| {r['base_fwd']:.3f} | {r['ours_fwd']:.3f} ({r['ours_fwd'] / r['base_fwd']:.2f}×) |")


if __name__ == "__main__":
    main()
