"""Host-side (Python) profile of lora_linear fwd+bwd at a small shape, where the host bounds the step:
host time of each piece, of the whole op against PEFT-style and the frozen base (seven interleaved rounds),
and cProfile's top functions. `python benchmarks/profile_host.py [--rounds-only]`"""

import argparse
import cProfile
import pstats
import statistics

import torch
import torch.nn.functional as F
from profile_lora import host_us  # benchmarks/ is sys.path[0] when this script runs

from lora_engine.kernels import lora_linear as K
from lora_engine.ops import lora_linear


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds-only", action="store_true", help="only the interleaved rounds against PEFT-style")
    args = ap.parse_args()
    m = k = n = 2048
    r = 16
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    xa = K.lora_down(x.detach(), a.detach(), 1.0, x.dtype)
    g = torch.randn(m, r, device="cuda", dtype=torch.float32)
    a32 = a.detach().float().requires_grad_()  # patch_model's fp32 adapters
    b32 = b.detach().float().requires_grad_()

    def step():
        x.grad = a.grad = b.grad = None
        lora_linear(x, w, None, a, b, 2.0, 0.0).backward(dy)

    with torch.no_grad():
        pieces = {} if args.rounds_only else {
            "zeros": lambda: torch.zeros(m, r, device="cuda"),
            "lora_dy": lambda: K.lora_dy(dy, b, xa, 1.0, 2.0, torch.zeros(m, r, device="cuda"),
                                         torch.zeros(n, r, device="cuda")),
            "lora_grad_a + dx": lambda: K.lora_grad_a(g, x, 1.0, torch.zeros(r, k, device="cuda"), lora_a=a,
                                                      dx=torch.empty(m, k, device="cuda", dtype=x.dtype)),
            "lora_grad_a": lambda: K.lora_grad_a(g, x, 1.0, torch.zeros(r, k, device="cuda")),
            "gemm_lora_tma fwd, xa": lambda: K.gemm_lora_tma(x, w, None, None, b, 2.0, x.dtype, down=a),
            "gemm_lora dx + dA": lambda: K.gemm_lora(dy, w.t(), None, g, a.t(), 1.0, x.dtype,
                                                     da=torch.zeros(r, k, device="cuda"), da_x=x),
            "num_sms": lambda: K.num_sms(x.device, 4),
        }
        for name, fn in pieces.items():
            print(f"host {name:>20}: {host_us(fn):8.1f} us")

    def step_p():
        x.grad = a.grad = b.grad = None
        lora_linear(x, w, None, a, b, 2.0, 0.05).backward(dy)

    def step_fp32():
        x.grad = a32.grad = b32.grad = None
        lora_linear(x, w, None, a32, b32, 2.0, 0.0).backward(dy)

    def peft_style():
        x.grad = a.grad = b.grad = None
        (F.linear(x, w) + 2.0 * F.linear(F.linear(x, a), b)).backward(dy)

    def base():
        x.grad = None
        F.linear(x, w).backward(dy)

    def fwd():
        with torch.no_grad():
            lora_linear(x, w, None, a, b, 2.0, 0.0, training=False)

    def peft_fwd():
        with torch.no_grad():
            F.linear(x, w) + 2.0 * F.linear(F.linear(x, a), b)

    # The host's speed drifts by up to 2x between runs on the GPU machines: the cases take turns, seven rounds,
    # and each is compared with PEFT-style in the same round.
    cases = {"fwd+bwd": step, "fwd+bwd p=.05": step_p, "fwd+bwd fp32 A, B": step_fp32,
             "PEFT-style fwd+bwd": peft_style, "base fwd+bwd": base, "fwd": fwd, "PEFT-style fwd": peft_fwd}
    rounds = [{name: host_us(fn, 100) for name, fn in cases.items()} for _ in range(7)]
    for name in cases:
        us = [r[name] for r in rounds]
        peft = "PEFT-style fwd" if name in ("fwd", "PEFT-style fwd") else "PEFT-style fwd+bwd"
        ratio = statistics.median(r[name] / r[peft] for r in rounds)
        print(f"host {name:>20}: min {min(us):7.1f} us, median {statistics.median(us):7.1f} us, "
              f"{ratio:.2f}x PEFT-style (per round)")
    for fn in () if args.rounds_only else (step, step_p):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
