"""Where the host time of a small lora_linear goes, and the GPU time alone (CUDA graphs), in one run.

    python benchmarks/profile_launch.py

Part 1: host microseconds per call (no sync inside the loop) of every piece of fwd+bwd, each in a
loop of its own, and of a Triton kernel launched through the JIT (`kernel[grid](...)`) against the
same kernel through `lora_engine.kernels.launch` (cached, direct). Part 3: the same pieces timed in
context, inside whole fwd+bwd steps. Part 2: fwd+bwd and forward medians of base / ours / PEFT-style
replayed from a CUDA graph, so no host time is in them (dropout 0: our seed copy is not capturable).
"""

from __future__ import annotations

import collections
import statistics
import time

import torch
import torch.nn.functional as F
import triton
from bench_kernels import make  # benchmarks/ is sys.path[0] when this script runs
from triton.testing import do_bench, do_bench_cudagraph

from lora_engine.kernels import lora_linear as K
from lora_engine.kernels.launch import launch
from lora_engine.ops import LoRALinearFunction, lora_linear


def host_us(fn, n=50, batches=9, reduce=statistics.median):
    """Median (or `reduce`) over batches of the host time per call, no sync inside a batch (the VMs are noisy)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
        torch.cuda.synchronize()
    return reduce(times) * 1e6


class Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


def down_args(x, a, out, b, y):
    """Runtime arguments and constexprs of `_lora_down_kernel` with the up-projection (no dropout)."""
    m, k = x.shape
    args = (x, a, out, b, out, y, m, k, a.shape[0], b.shape[0], x.stride(0), x.stride(1), a.stride(0), a.stride(1),
            out.stride(0), out.stride(1), b.stride(0), b.stride(1), y.stride(0), y.stride(1), 1.0, out, 0)
    flags = dict(HAS_DROPOUT=False, HAS_UP=True, HAS_BIAS=False, UPCAST=False, PRECISION="tf32",
                 R_PAD=K._rank_pad(a.shape[0]), BLOCK_M=32, BLOCK_K=128, BLOCK_N=64)
    return args, flags


def step_fns(x, w, a, b, dy):
    def ours(p):
        def f():
            x.grad = a.grad = b.grad = None
            lora_linear(x, w, None, a, b, 2.0, p).backward(dy)
        return f

    def base():
        x.grad = None
        F.linear(x, w).backward(dy)

    def unfused():
        x.grad = a.grad = b.grad = None
        (F.linear(x, w) + 2.0 * F.linear(F.linear(x, a), b)).backward(dy)

    return ours, base, unfused


def part1(m, k, n, r):
    """Host µs per call of each piece, each in a loop of its own."""
    x, w, a, b, dy = make(m, k, n, r)
    xd, ad, bd = x.detach(), a.detach(), b.detach()
    xa = K.lora_down(xd, ad, 1.0, xd.dtype)
    g = torch.zeros(m, r, device="cuda")
    db = torch.zeros(n, r, device="cuda")
    da = torch.zeros(r, k, device="cuda")
    dx = torch.empty(m, k, device="cuda", dtype=xd.dtype)
    out = torch.empty(m, r, device="cuda", dtype=xd.dtype)
    y = torch.empty(m, n, device="cuda", dtype=xd.dtype)
    args, flags = down_args(xd, ad, out, bd, y)
    grid = (triton.cdiv(m, 32),)
    ours, base, unfused = step_fns(x, w, a, b, dy)

    def ident():
        x.grad = None
        Identity.apply(x).backward(x.detach())

    with torch.no_grad():
        pieces = {
            "torch.empty (m, r)": lambda: torch.empty(m, r, device="cuda", dtype=xd.dtype),
            "torch.zeros (workspace)": lambda: torch.zeros(m * r + n * r + r * k, device="cuda"),
            "seed draw + H2D copy": lambda: torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).to(
                "cuda", non_blocking=True),
            "cuBLAS xa @ b.T": lambda: xa @ bd.t(),
            "cuBLAS y.addmm_(x, W.T)": lambda: dx.addmm_(dy, w),
            "F.linear(x, W)": lambda: F.linear(xd, w),
            "lora_down+up kernel[grid] (JIT)": lambda: K._lora_down_kernel[grid](*args, **flags, num_warps=4),
            "lora_down+up launch() (cached)": lambda: launch(K._lora_down_kernel, grid, args, flags, num_warps=4),
            "lora_down+up launcher": lambda: K.lora_down(xd, ad, 1.0, xd.dtype, lora_b=bd),
            "lora_dy launcher": lambda: K.lora_dy(dy, bd, xa, 1.0, 2.0, g, db),
            "lora_grad_a+dx launcher": lambda: K.lora_grad_a(g, xd, 1.0, da, lora_a=ad, dx=dx),
            "ours fwd (no grad)": lambda: lora_linear(xd, w, None, ad, bd, 2.0, 0.0, training=False),
        }
        rows = [(name, host_us(fn)) for name, fn in pieces.items()]
    rows += [
        ("ours fwd (grad, no bwd)", host_us(lambda: lora_linear(x, w, None, a, b, 2.0, 0.0))),
        ("identity Function fwd+bwd", host_us(ident)),
        ("base fwd+bwd", host_us(base)),
        ("PEFT-style fwd+bwd", host_us(unfused)),
        ("ours fwd+bwd p=0", host_us(ours(0.0))),
        ("ours fwd+bwd p=0.05", host_us(ours(0.05))),
    ]
    print(f"\n## host µs per call, {m}×{k}→{n} r{r}, bf16 adapters")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


def part3(m, k, n, r, adapter_dtype):
    """Host µs per fwd+bwd with the time inside each launcher and each Function body summed (in context)."""
    x, w, a, b, dy = make(m, k, n, r)
    a = a.detach().to(adapter_dtype).requires_grad_()
    b = b.detach().to(adapter_dtype).requires_grad_()
    acc = collections.defaultdict(float)
    saved = {}

    def timed(obj, name, label):
        f = getattr(obj, name)
        saved[(obj, name)] = f

        def g(*args, **kw):
            t = time.perf_counter()
            res = f(*args, **kw)
            acc[label] += time.perf_counter() - t
            return res

        setattr(obj, name, staticmethod(g) if isinstance(obj, type) else g)

    for name in ("lora_down", "lora_dy", "lora_grad_a"):
        timed(K, name, name)
    timed(LoRALinearFunction, "forward", "Function.forward body")
    timed(LoRALinearFunction, "backward", "Function.backward body")
    try:
        for p in (0.0, 0.05):
            def one(p=p):
                x.grad = a.grad = b.grad = None
                t0 = time.perf_counter()
                y = lora_linear(x, w, None, a, b, 2.0, p)
                t1 = time.perf_counter()
                y.backward(dy)
                acc["lora_linear call"] += t1 - t0
                acc[".backward() call"] += time.perf_counter() - t1

            for _ in range(5):
                one()
            torch.cuda.synchronize()
            acc.clear()
            for _ in range(200):
                one()
            torch.cuda.synchronize()
            print(f"\n## host µs per fwd+bwd, in context, {m}×{k}→{n} r{r} p{p}, {adapter_dtype} adapters")
            for label, v in acc.items():
                print(f"| {label} | {v / 200 * 1e6:.1f} |")
    finally:
        for (obj, name), f in saved.items():
            setattr(obj, name, staticmethod(f) if isinstance(obj, type) else f)


def bench_shape(m, k, n, r):
    x, w, a, b, dy = make(m, k, n, r)
    ours, base, unfused = step_fns(x, w, a, b, dy)
    res = {}
    for name, f in (("base", base), ("ours", ours(0.0)), ("unf", unfused)):
        f()  # warm up (autotune, allocator) outside the capture
        torch.cuda.synchronize()
        res[name] = (do_bench_cudagraph(f, rep=100, return_mode="median"),
                     do_bench(f, warmup=25, rep=100, return_mode="median"))
    with torch.no_grad():
        fwds = (("base_fwd", lambda: F.linear(x, w)),
                ("ours_fwd", lambda: lora_linear(x, w, None, a, b, 2.0, 0.0, training=False)))
        for name, f in fwds:
            f()
            res[name] = (do_bench_cudagraph(f, rep=100, return_mode="median"),
                         do_bench(f, warmup=25, rep=100, return_mode="median"))
    return res


def part2(shapes, r):
    """GPU time alone: CUDA-graph replay medians, with eager do_bench medians beside them."""
    print(f"\n## GPU time only (CUDA graph replay), r{r}, p=0, ms; [eager do_bench, ×]")
    print("| shape | base fwd+bwd | ours (×) | PEFT-style (×) | base fwd | ours fwd (×) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m, k, n in shapes:
        res = bench_shape(m, k, n, r)

        def cell(nm, ref, res=res):
            return (f"{res[nm][0]:.3f} ({res[nm][0] / res[ref][0]:.2f}×) "
                    f"[{res[nm][1]:.3f}, {res[nm][1] / res[ref][1]:.2f}×]")

        print(f"| {m}×{k}→{n} | {res['base'][0]:.3f} [{res['base'][1]:.3f}] | {cell('ours', 'base')} "
              f"| {cell('unf', 'base')} | {res['base_fwd'][0]:.3f} [{res['base_fwd'][1]:.3f}] "
              f"| {cell('ours_fwd', 'base_fwd')} |")


def main():
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    part1(8192, 4096, 1024, 16)
    part1(2048, 2048, 2048, 16)
    part3(8192, 4096, 1024, 16, torch.bfloat16)
    part3(8192, 4096, 1024, 16, torch.float32)
    part2([(8192, 4096, 4096), (8192, 4096, 1024), (8192, 4096, 14336), (2048, 2048, 2048)], 16)


if __name__ == "__main__":
    main()
