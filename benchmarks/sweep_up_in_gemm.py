"""The backward's g = dy·B, dB (and db) inside the TMA dx GEMM's K-loop ("in GEMM", one launch) against lora_dy's
pass over dy before it ("lora_dy"), switched by `ops._UP_IN_GEMM_MAX_MACS`, in one run:

1. GPU time alone (CUDA-graph replay) of lora_linear fwd+bwd × the frozen base, r16 and r64, bf16 x with fp32
   adapters: "auto" at p = 0 and .05, and base GEMM "triton" at p = .05 (the masked term in the epilogue at every
   shape); the two variants alternate, two rounds.
2. Eager time (`do_bench`, host included) at the host-bound shapes, bf16 adapters as bench_kernels.py: both
   variants, the PEFT-style path and the frozen base, three rounds.
3. Host time of one fwd+bwd at 2048² r16 (no sync), both variants and PEFT-style, seven rounds; the median of
   each round's ratio to PEFT-style.

`python benchmarks/sweep_up_in_gemm.py`
"""

import statistics

import torch
import torch.nn.functional as F
from bench_kernels import SHAPES, fwd_bwd, make, median_ms  # benchmarks/ is sys.path[0] when this script runs
from profile_gemm import gpu_ms
from profile_lora import host_us

from lora_engine import ops

VARIANTS = {"in GEMM": 1 << 62, "lora_dy": -1}


def ours(x, w, a, b, p):
    return lambda: ops.lora_linear(x, w, None, a, b, 2.0, p)


def gpu_row(m, k, n, r):
    x, w, a, b, dy = make(m, k, n, r, lora_dtype=torch.float32)
    base = gpu_ms(fwd_bwd(lambda: F.linear(x, w), x, [x], dy))
    for mode, p in (("auto", 0.0), ("auto", 0.05), ("triton", 0.05)):
        ops.set_base_gemm(mode)
        cells = []
        for _ in range(2):
            for limit in VARIANTS.values():
                ops._UP_IN_GEMM_MAX_MACS = limit
                ms = gpu_ms(fwd_bwd(ours(x, w, a, b, p), x, [x, a, b], dy))
                cells.append(f"{ms:.3f} ({ms / base:.2f})")
        print(f"| {m}x{k}->{n} | {r} | {mode} | {p} | {base:.3f} | " + " | ".join(cells) + " |", flush=True)
    ops.set_base_gemm("auto")


def eager_row(m, k, n, mode, p):
    x, w, a, b, dy = make(m, k, n, 16)
    ops.set_base_gemm(mode)

    def peft_style():
        xd = F.dropout(x, p) if p > 0 else x
        return F.linear(x, w) + 2.0 * F.linear(F.linear(xd, a), b)

    for rnd in range(3):
        base = median_ms(fwd_bwd(lambda: F.linear(x, w), x, [x], dy))
        cells = []
        for limit in VARIANTS.values():
            ops._UP_IN_GEMM_MAX_MACS = limit
            cells.append(median_ms(fwd_bwd(ours(x, w, a, b, p), x, [x, a, b], dy)))
        cells.append(median_ms(fwd_bwd(peft_style, x, [x, a, b], dy)))
        print(f"| {m}x{k}->{n} | 16 | {mode} | {p} | {rnd} | {base:.3f} | "
              + " | ".join(f"{c:.3f} ({c / base:.2f})" for c in cells) + " |", flush=True)
    ops.set_base_gemm("auto")


def host_rounds():
    x, w, a, b, dy = make(2048, 2048, 2048, 16)
    cases = {}
    for name, limit in VARIANTS.items():
        def step(limit=limit):
            ops._UP_IN_GEMM_MAX_MACS = limit
            x.grad = a.grad = b.grad = None
            ops.lora_linear(x, w, None, a, b, 2.0).backward(dy)
        cases[name] = step

    def peft_style():
        x.grad = a.grad = b.grad = None
        (F.linear(x, w) + 2.0 * F.linear(F.linear(x, a), b)).backward(dy)

    cases["PEFT-style"] = peft_style
    rounds = [{name: host_us(fn, 100) for name, fn in cases.items()} for _ in range(7)]
    print("\nhost time of one fwd+bwd, 2048² r16 bf16, seven rounds:")
    for name in cases:
        us = [r[name] for r in rounds]
        ratio = statistics.median(r[name] / r["PEFT-style"] for r in rounds)
        print(f"  {name:>10}: min {min(us):7.1f} us, median {statistics.median(us):7.1f} us, "
              f"{ratio:.2f}x PEFT-style (median of the rounds' ratios)", flush=True)


def main():
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}")
    host_rounds()
    print("| shape | r | mode | p | base ms | in GEMM (×) | lora_dy (×) | in GEMM (×) | lora_dy (×) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, k, n in SHAPES:
        for r in (16, 64):
            gpu_row(m, k, n, r)
    print("\n| shape | r | mode | p | round | base ms | in GEMM ms (×) | lora_dy ms (×) | PEFT-style ms (×) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, k, n in (SHAPES[1], SHAPES[3]):
        for mode, p in (("auto", 0.0), ("auto", 0.05), ("triton", 0.05)):
            eager_row(m, k, n, mode, p)
    ops._UP_IN_GEMM_MAX_MACS = VARIANTS["in GEMM"]


if __name__ == "__main__":
    main()
