"""AdamW8bit against torch AdamW (fused, foreach) and bitsandbytes AdamW8bit, on one GPU.

1. Correctness: the compiled kernel against the pure-torch reference, one step from the same
   warmed-up state, fp32 / bf16 / fp16 params (relative error of the update, codes flipped).
2. Speed and memory: every parameter of a 1.1B Llama-shape model (hidden 2048, 22 layers, MLP
   5632, 32 heads / 4 KV heads, vocab 32000, untied embeddings; 201 tensors, bf16) with random
   grads: median step time (triton.testing.do_bench, no CUDA graphs) and optimizer-state bytes
   per parameter (ours also with IEEE sqrt/division, and without the inf/NaN check); the
   memory-bandwidth floor of each (nominal bytes moved per step / the device-to-device copy
   bandwidth measured in this run) and the ratio to it.

    python benchmarks/bench_optim.py [--rep-ms 2000]
"""

import argparse
import gc

import torch
import triton

from lora_engine.kernels import adamw8bit as K
from lora_engine.optim import AdamW8bit

HIDDEN, LAYERS, MLP, HEADS, KV_HEADS, VOCAB = 2048, 22, 5632, 32, 4, 32000


def llama_1b_shapes():
    head_dim = HIDDEN // HEADS
    kv = KV_HEADS * head_dim
    shapes = [(VOCAB, HIDDEN)]
    for _ in range(LAYERS):
        shapes += [(HIDDEN, HIDDEN), (kv, HIDDEN), (kv, HIDDEN), (HIDDEN, HIDDEN),
                   (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP), (HIDDEN,), (HIDDEN,)]
    shapes += [(HIDDEN,), (VOCAB, HIDDEN)]
    return shapes


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def correctness():
    print("== correctness: kernel vs reference, one step from the same state ==")
    shapes = [(2048, 2048), (4097, 33), (5632, 64), (1000,), (3, 5000), (128,)]
    ok = True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        g = torch.Generator(device="cuda").manual_seed(0)
        base = [torch.randn(s, device="cuda", generator=g).to(dtype).requires_grad_() for s in shapes]
        warm = AdamW8bit(base, lr=1e-3, use_kernel=False)
        for _ in range(4):
            for p in base:
                p.grad = (torch.randn(p.shape, device="cuda", generator=g) * 1e-2).to(dtype)
            warm.step()
        grads = [(torch.randn(p.shape, device="cuda", generator=g) * 1e-2).to(dtype) for p in base]
        runs = []
        for use_kernel in (True, False):
            ps = [p.detach().clone().requires_grad_() for p in base]
            opt = AdamW8bit(ps, lr=1e-3, use_kernel=use_kernel)
            opt.load_state_dict(warm.state_dict())
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
            runs.append((ps, opt))
        (pk, ok_), (pr, or_) = runs
        worst_ulps, worst_apart, worst_flip, worst_state = 0.0, 0.0, 0.0, 0.0
        for a, b, a0 in zip(pk, pr, base):
            # Params: distance in ulps of the param dtype (fp32: plus 8 ulp of the update, for the GPU's
            # FMA contraction), and the share of elements apart at all (16-bit params only).
            ulp = torch.finfo(dtype).eps * torch.maximum(a.abs(), b.abs()).float() + 1e-30
            if dtype == torch.float32:
                ulp = ulp + 8 * torch.finfo(dtype).eps * (b.float() - a0.float()).abs()
            diff = (a.float() - b.float()).abs()
            worst_ulps = max(worst_ulps, (diff / ulp).max().item())
            worst_apart = max(worst_apart, (diff > 0).float().mean().item())
            sa, sb = ok_.state[a], or_.state[b]
            if "state1" in sa:
                for s, am in (("state1", "absmax1"), ("state2", "absmax2")):
                    worst_flip = max(worst_flip, (sa[s] != sb[s]).float().mean().item())
                    worst_state = max(worst_state, rel(sa[am], sb[am]))
            else:
                worst_state = max(worst_state, rel(sa["exp_avg"], sb["exp_avg"]))
        apart_ok = dtype == torch.float32 or worst_apart < 1e-2
        good = worst_ulps <= 1.0 and apart_ok and worst_flip < 1e-3 and worst_state < 1e-5
        ok &= good
        print(f"{str(dtype):>15}: params max {worst_ulps:.2f} ulp apart, {worst_apart:.1e} of them apart; "
              f"codes flipped {worst_flip:.1e}; absmax/fp32-state rel err {worst_state:.1e}  "
              f"{'OK' if good else 'FAIL'}")
    return ok


def state_bytes_per_param(opt, n_params):
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step" and v.numel() > 1:
                total += v.numel() * v.element_size()
    return total / n_params


def copy_bandwidth(nbytes=2 << 30):
    """Device-to-device copy bandwidth (bytes read + written per second): the floor's yardstick."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=500, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def time_step(opt, rep_ms):
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    return triton.testing.do_bench(opt.step, warmup=100, rep=rep_ms, return_mode="median")


def kernel_breakdown(opt, steps=5):
    """GPU time per kernel of one optimizer step (torch.profiler, averaged over `steps`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append((e.key, us / steps / 1e3, e.count / steps))
    rows.sort(key=lambda r: -r[1])
    print(f"  GPU time of one step by kernel ({steps} steps, torch.profiler): total {sum(r[1] for r in rows):.3f} ms")
    for name, ms, count in rows[:10]:
        print(f"    {name[:70]:<70}{ms:9.3f} ms  ×{count:g}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep-ms", type=int, default=2000)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    correct = correctness()

    shapes = llama_1b_shapes()
    params = [(torch.randn(s, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_() for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, device="cuda") * 1e-3).to(torch.bfloat16)
    n = sum(p.numel() for p in params)
    n_small = sum(p.numel() for p in params if p.numel() < 4096)
    print(f"\n== 1.1B Llama-shape: {len(params)} tensors, {n / 1e9:.3f} B params, bf16 ==")

    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s")

    # Nominal bytes a step moves: bf16 p read+write, g read, states read+write.
    nb = sum(-(-p.numel() // 256) for p in params if p.numel() >= 4096)
    ours_update = (n - n_small) * (2 + 2 + 2 + 2 + 2) + nb * 16 + n_small * (6 + 16)
    check = 2 * n
    torch_bytes = n * (2 + 2 + 2 + 2 * 2 + 2 * 2)
    rows = []

    def record(name, ms, bpp, nbytes):
        floor = nbytes / bw * 1e3
        rows.append((name, ms, bpp, nbytes / n, floor, ms / floor))

    # Ours, with a small sweep of launch shapes (the optimizer uses K.CHUNK / K.NUM_WARPS).
    default = (K.CHUNK, K.NUM_WARPS)
    opt = AdamW8bit(params, lr=1e-4)
    bpp = None
    for chunk, warps in [default, (2048, 8), (512, 4)]:
        K.CHUNK, K.NUM_WARPS = chunk, warps
        opt._tables.clear()
        ms = time_step(opt, args.rep_ms)
        bpp = state_bytes_per_param(opt, n)
        tag = " (default)" if (chunk, warps) == default else ""
        print(f"ours chunk={chunk:5d} warps={warps:2d}: {ms:.3f} ms{tag}")
        if (chunk, warps) == default:
            record("ours AdamW8bit", ms, bpp, ours_update + check)
    K.CHUNK, K.NUM_WARPS = default
    opt._tables.clear()
    kernel_breakdown(opt)
    ieee_default, K.IEEE_MATH = K.IEEE_MATH, True
    record("ours, IEEE sqrt/div", time_step(opt, args.rep_ms), bpp, ours_update + check)
    K.IEEE_MATH = ieee_default
    opt.skip_nonfinite = False
    record("ours, no inf/NaN check", time_step(opt, args.rep_ms), bpp, ours_update)
    del opt
    gc.collect()
    torch.cuda.empty_cache()

    for name, kw in (("torch AdamW fused", dict(fused=True)), ("torch AdamW foreach", dict(foreach=True))):
        opt = torch.optim.AdamW(params, lr=1e-4, **kw)
        ms = time_step(opt, args.rep_ms)
        record(name, ms, state_bytes_per_param(opt, n), torch_bytes)
        del opt
        gc.collect()
        torch.cuda.empty_cache()

    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - any import failure means: not available here
        print(f"bitsandbytes AdamW8bit: skipped ({type(e).__name__}: {e})")
    else:
        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
        ms = time_step(opt, args.rep_ms)
        record(f"bnb AdamW8bit {bnb.__version__}", ms, state_bytes_per_param(opt, n), ours_update)
        del opt

    print("\nfloor = nominal bytes moved per step / measured copy bandwidth")
    print(f"{'optimizer':<28}{'ms/step':>9}{'state B/param':>15}{'moved B/param':>15}{'floor ms':>10}"
          f"{'x floor':>9}{'vs fused':>10}")
    fused = next(r[1] for r in rows if r[0] == "torch AdamW fused")
    for name, ms, bpp, moved, floor, ratio in rows:
        print(f"{name:<28}{ms:9.3f}{bpp:15.3f}{moved:15.2f}{floor:10.3f}{ratio:9.2f}{ms / fused:10.2f}")
    print(f"\ncorrectness: {'OK' if correct else 'FAIL'}")


if __name__ == "__main__":
    main()
