"""Two checks of where the op stands outside the issue's bf16 grid, in one run on one GPU.

    python benchmarks/host_floor.py [fp32] [host]

fp32: fp32 x, weight and adapters (the trainer's default precision), which take the wide path (cuBLAS matmuls around
the kernels' mask) on a GPU: y and dx against fp64, then eager fwd+bwd medians of the frozen base, ours and PEFT-style.
host: at two shapes where the host bounds a step (bf16, r16, p = 0), five interleaved rounds of eager do_bench
medians and host µs per call (no sync inside a batch of 50) of the base, PEFT-style, ours (p = 0 and .05), a leaner
PEFT-style formulation in three autograd ops (`torch.addmm(F.linear(x, W), F.linear(x, A), Bᵀ, alpha=s)`: no
Python autograd.Function, no Triton launch) and an identity autograd.Function (what a Python Function costs alone);
then each one's GPU time (CUDA-graph replay; not for p = .05).
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F
from bench_kernels import fwd_bwd, make, rel  # benchmarks/ is sys.path[0] when this script runs
from profile_launch import Identity, host_us
from triton.testing import do_bench, do_bench_cudagraph

from lora_engine.ops import lora_linear, lora_linear_reference


def step(fn, params, dy):
    return fwd_bwd(fn, None, params, dy)


def eager_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_min_us(fn):
    """The least host time per call over 7 batches of 50 calls, no sync inside a batch."""
    return host_us(fn, batches=7, reduce=min)


def part_fp32():
    print("\n## fp32 x, weight and adapters (the wide path), eager fwd+bwd ms (× base); rel. error of y, dx vs fp64")
    print("| shape | r | p | rel err | base | ours (×) | PEFT-style (×) |\n| --- | --- | --- | --- | --- | --- | --- |")
    for m, k, n in ((8192, 4096, 4096), (8192, 4096, 1024), (2048, 2048, 2048)):
        for p in (0.0, 0.05):
            r, s = 16, 2.0
            x, w, a, b, dy = make(m, k, n, r, torch.float32)
            torch.manual_seed(0)
            (dx,) = torch.autograd.grad(y := lora_linear(x, w, None, a, b, s, p), [x], dy)
            x64 = x.detach().double().requires_grad_()
            torch.manual_seed(0)
            y64 = lora_linear_reference(x64, w.double(), None, a.detach().double(), b.detach().double(), s, p)
            (dx64,) = torch.autograd.grad(y64, [x64], dy.double())
            err = max(rel(y, y64), rel(dx, dx64))

            def peft_style(x=x, w=w, a=a, b=b, p=p, s=s):
                xd = F.dropout(x, p) if p > 0 else x
                return F.linear(x, w) + s * F.linear(F.linear(xd, a), b)

            base = eager_ms(step(lambda x=x, w=w: F.linear(x, w), [x], dy))
            ours = eager_ms(step(lambda x=x, w=w, a=a, b=b, p=p, s=s: lora_linear(x, w, None, a, b, s, p),
                                 [x, a, b], dy))
            unf = eager_ms(step(peft_style, [x, a, b], dy))
            print(f"| {m}×{k}→{n} | {r} | {p} | {err:.1e} | {base:.3f} | {ours:.3f} ({ours / base:.2f}×) "
                  f"| {unf:.3f} ({unf / base:.2f}×) |", flush=True)


def host_table(m, k, n, r=16, s=2.0):
    x, w, a, b, dy = make(m, k, n, r, torch.bfloat16)
    variants = {
        "frozen base": (lambda: F.linear(x, w), [x], dy),
        "PEFT-style": (lambda: F.linear(x, w) + s * F.linear(F.linear(x, a), b), [x, a, b], dy),
        "ours, p = 0": (lambda: lora_linear(x, w, None, a, b, s, 0.0), [x, a, b], dy),
        "ours, p = .05": (lambda: lora_linear(x, w, None, a, b, s, 0.05), [x, a, b], dy),
        "three autograd ops (addmm)": (lambda: torch.addmm(F.linear(x, w), F.linear(x, a), b.t(), alpha=s),
                                       [x, a, b], dy),
        "identity autograd.Function": (lambda: Identity.apply(x), [x], x.detach()),
    }
    steps = {name: step(*v) for name, v in variants.items()}
    rounds = [{name: (eager_ms(f), host_min_us(f)) for name, f in steps.items()} for _ in range(5)]
    gpu = {name: do_bench_cudagraph(f, rep=60, return_mode="median")
           for name, f in steps.items() if name != "ours, p = .05"}
    print(f"\n{m}×{k}→{n} r{r}\n")
    print("| variant | eager ms, per round | median × PEFT-style (same round) | host µs, per round | GPU time ms |")
    print("| --- | --- | --- | --- | --- |")
    for name in variants:
        ratio = statistics.median(rd[name][0] / rd["PEFT-style"][0] for rd in rounds)
        eager = " ".join(f"{rd[name][0]:.3f}" for rd in rounds)
        host = " ".join(f"{rd[name][1]:.0f}" for rd in rounds)
        cell = f"{gpu[name]:.3f}" if name in gpu else "n/a"
        print(f"| {name} | {eager} | {ratio:.2f} | {host} | {cell} |", flush=True)


def part_host():
    print("\n## Host-bound shapes, bf16, r16: eager do_bench ms and host µs, five interleaved rounds")
    for m, k, n in ((2048, 2048, 2048), (8192, 4096, 1024)):
        host_table(m, k, n)


if __name__ == "__main__":
    parts = {"fp32": part_fp32, "host": part_host}
    for part in sys.argv[1:] or list(parts):
        if part not in parts:
            sys.exit(f"unknown part {part!r}; choose from {', '.join(parts)}")
        parts[part]()
