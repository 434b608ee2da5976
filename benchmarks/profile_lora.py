"""Where the fused LoRA linear spends its time: GPU time per kernel (torch.profiler) and host time
per call, for a few shapes, bf16. `python benchmarks/profile_lora.py`"""

import math
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lora_engine.ops import lora_linear


def host_us(fn, n=50):
    """Host time per call without synchronising: the launch rate the GPU sees."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return host * 1e6


def profile_case(m, k, n, r, p):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    a = (torch.randn(r, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)).requires_grad_()
    b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step():
        lora_linear(x, w, None, a, b, 2.0, p).backward(dy)

    def fwd():
        with torch.no_grad():
            lora_linear(x, w, None, a, b, 2.0, p, training=False)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    base = host_us(lambda: F.linear(x.detach(), w))
    print(f"\n=== {m}x{k}->{n} r{r} p{p}: host per fwd {host_us(fwd):.0f} us, "
          f"per fwd+bwd {host_us(step):.0f} us, F.linear fwd host {base:.0f} us")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main():
    for case in [(8192, 4096, 4096, 16, 0.0), (8192, 4096, 4096, 16, 0.05), (8192, 4096, 1024, 16, 0.0),
                 (8192, 4096, 1024, 16, 0.05), (2048, 2048, 2048, 16, 0.0)]:
        profile_case(*case)


def host_breakdown():
    """Host microseconds per call of each piece of the forward, 2048x2048->2048 r16, no grad."""
    from lora_engine.kernels import lora_linear as K

    x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2048, 16, device="cuda", dtype=torch.bfloat16)
    xa = K.lora_down(x, a, 1.0, x.dtype)
    pieces = {
        "torch.empty": lambda: torch.empty(2048, 16, device="cuda", dtype=torch.bfloat16),
        "F.linear": lambda: F.linear(x, w),
        "lora_down": lambda: K.lora_down(x, a, 1.0, x.dtype),
        "gemm_lora fused": lambda: K.gemm_lora(x, w, None, xa, b, 2.0, x.dtype),
        "lora_linear eval": lambda: lora_linear(x, w, None, a, b, 2.0, 0.0, training=False),
    }
    with torch.no_grad():
        for name, fn in pieces.items():
            print(f"host {name:>18}: {host_us(fn, 200):7.1f} us")


def autotune_choices():
    from lora_engine.kernels import lora_linear as K

    for key, cfg in getattr(K._gemm_lora_autotuned, "cache", {}).items():
        print("autotune", key[:4], cfg)


if __name__ == "__main__":
    host_breakdown()
    main()
