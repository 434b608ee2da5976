"""Shared memory of the fused LoRA linear's pointer-based kernels on other CUDA GPUs, from the compiler alone: each
launcher runs on CPU tensors with its launch captured (nothing executes), and the captured kernel, with the tiles the
launcher chose for that GPU, is compiled for the GPU's architecture with Triton's bundled ptxas. The shared memory
each needs is set against what a block may use there (`shared_memory_per_block_optin`). The issue asks for configs
"tuned for Hopper, valid on other CUDA GPUs"; the TMA GEMM (Hopper-class GPUs only) is `smem_tma.py`'s.

    python benchmarks/smem_kernels.py [--arch 80,86,89,90,120]

Run it without TRITON_INTERPRET (the launchers pick the interpreter's small tiles under it).
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lora_engine.kernels import lora_linear as K

# Compute capability -> (name, bytes of shared memory a block may opt in to, SMs of a representative part).
ARCHS = {
    75: ("T4 (fp16 only: no bf16 dot before sm_80)", 65_536, 40),
    80: ("A100", 166_912, 108),
    86: ("RTX 3090 / A10", 101_376, 82),
    89: ("RTX 4090 / L4 / L40", 101_376, 128),
    90: ("H100 / H200", 232_448, 132),
    120: ("RTX 5090", 101_376, 170),
}
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
          torch.int64: "i64", torch.int32: "i32"}


def capture(calls, sms: int, smem: int, autotune: bool = False) -> list:
    """[(label, kernel, args, constexprs, options)] of the launches `calls` make with a GPU of `sms` SMs whose blocks
    may use `smem` bytes of shared memory, none executed. autotune: each config of the pointer GEMM's autotune list."""
    launches, current = [], [""]

    def fake_launch(fn, grid, args, constexprs, **options):
        launches.append((current[0], fn, args, constexprs, options))

    with mock.patch.object(K, "launch", fake_launch), mock.patch.object(K, "_INTERPRET", False), \
            mock.patch.object(K, "num_sms", lambda device, default: sms), \
            mock.patch.object(K, "_smem_per_block", lambda device: smem), mock.patch.object(K, "_AUTOTUNE", False):
        for fn in (K._dy_tiles, K._down_plan):
            fn.cache_clear()
        try:
            for current[0], call in calls:
                call()
        finally:
            for fn in (K._dy_tiles, K._down_plan):
                fn.cache_clear()
    if autotune:  # each config of the autotune list on each distinct pointer-GEMM launch (its rank pad, flags)
        gemms = {tuple((k, v) for k, v in x[3].items() if not k.startswith("BLOCK") and k != "GROUP_M"): x
                 for x in launches if x[1] is K._gemm_lora_kernel}
        for base in gemms.values():
            for cfg in K._gemm_configs():
                launches.append((f"gemm_lora autotune {tuple(cfg.kwargs.values())[:3]} w{cfg.num_warps} "
                                 f"s{cfg.num_stages}", base[1], base[2], dict(base[3]) | cfg.kwargs,
                                 dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    return launches


def shared_bytes(fn, args, constexprs, options, cc: int) -> int:
    """The kernel's shared memory, compiled for compute capability cc."""
    names = list(fn.arg_names)
    sig, values = {}, dict(zip(names, list(args) + list(constexprs.values())))
    for n in names:
        v = values[n]
        if n in constexprs:
            sig[n] = "constexpr"
        elif isinstance(v, torch.Tensor):
            sig[n] = "*" + _TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[n] = "i1"
        elif isinstance(v, int):
            sig[n] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            sig[n] = "fp32"
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    opts = {k: v for k, v in options.items() if k in ("num_warps", "num_stages")}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts).metadata.shared


def launcher_calls(dtype: torch.dtype) -> list:
    """(label, call) for each way the op reaches a pointer-based kernel, at 8192 and 2048 rows and ranks 16 and 64
    (ranks above 64 run as torch matmuls but for the mask), with and without dropout."""
    seed = torch.tensor([1])
    thr = K.dropout_threshold(0.05)
    calls = []
    for m, k, n in ((8192, 4096, 4096), (2048, 2048, 2048)):
        for r in (16, 32, 64):
            x, a = torch.empty(m, k, dtype=dtype), torch.empty(r, k)
            b, dy = torch.empty(n, r), torch.empty(m, n, dtype=dtype)
            xa, g = torch.empty(m, r, dtype=dtype), torch.empty(m, r)
            w = torch.empty(n, k, dtype=dtype)
            tag = f"{m}x{k}->{n} r{r}"
            calls += [
                (f"lora_down {tag}", lambda x=x, a=a: K.lora_down(x, a, 1.0, x.dtype)),
                (f"lora_down masked, split {tag}", lambda x=x, a=a: K.lora_down(
                    x, a, 1.0, x.dtype, mask_seed=seed, threshold=thr, may_split=True)),
                (f"lora_down + up, bias {tag}", lambda x=x, a=a, b=b: K.lora_down(
                    x, a, 1.0, x.dtype, lora_b=b, bias=torch.empty(b.shape[0], dtype=x.dtype))),
                (f"lora_dy {tag}", lambda dy=dy, b=b, xa=xa, g=g: K.lora_dy(
                    dy, b, xa, 1.0, 2.0, g, torch.empty(b.shape), torch.empty(b.shape[0]))),
                (f"lora_grad_a {tag}", lambda g=g, x=x: K.lora_grad_a(g, x, 1.0, torch.empty(g.shape[1], x.shape[1]))),
                (f"lora_grad_a masked + dx {tag}", lambda g=g, x=x, a=a: K.lora_grad_a(
                    g, x, 1.0, torch.empty(a.shape), mask_seed=seed, threshold=thr, lora_a=a,
                    dx=torch.empty_like(x))),
                (f"lora_grad_a masked + bits {tag}", lambda g=g, x=x, a=a: K.lora_grad_a(
                    g, x, 1.0, torch.empty(a.shape), mask_seed=seed, threshold=thr,
                    keep_bits=torch.empty(x.shape[0], (x.shape[1] + 7) // 8, dtype=torch.uint8))),
                (f"gemm_lora (pointer) masked {tag}", lambda x=x, w=w, xa=xa, b=b: K.gemm_lora(
                    x, w, None, xa, b, 1.0, x.dtype, mask_seed=seed, threshold=thr)),
            ]
        calls.append((f"dropout_apply {m}x{k}", lambda x=x: K.dropout_apply(x, seed, thr)))
    for r in (32, 64):  # N = 14336: lora_dy's 512-row blocks where a block has Hopper-class shared memory
        m, n = 8192, 14336
        dy, b = torch.empty(m, n, dtype=dtype), torch.empty(n, r)
        calls.append((f"lora_dy {m}x{n} r{r}", lambda dy=dy, b=b, r=r: K.lora_dy(
            dy, b, torch.empty(dy.shape[0], r, dtype=dtype), 1.0, 2.0, torch.empty(dy.shape[0], r),
            torch.empty(b.shape))))
    return calls


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the launchers pick the interpreter's tiles under it")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(str(a) for a in ARCHS if a >= 80),
                    help="compute capabilities, comma-separated (75 for the T4)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    archs = [int(a) for a in args.arch.split(",")]
    print(f"# triton {triton.__version__}, {args.dtype} x; the largest shared memory of each kernel and mode over "
          "the shapes and ranks of `launcher_calls`")
    print("| GPU | kernel and mode | tiles (worst) | shared bytes | limit | fits |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cc in archs:
        name, limit, sms = ARCHS[cc]
        worst: dict = {}
        for label, fn, a, consts, opts in capture(launcher_calls(dtype), sms, limit, autotune=True):
            kind = label.split(" 8192")[0].split(" 2048")[0]
            key = (fn, tuple(consts.items()), tuple(opts.items()))
            if key in worst.get(kind, {}).get("seen", set()):
                continue
            try:
                b = shared_bytes(fn, a, consts, opts, cc)
            except Exception as e:  # the compiler refuses some layouts outright
                b = f"{type(e).__name__}"
            entry = worst.setdefault(kind, {"seen": set(), "bytes": -1, "tiles": ""})
            entry["seen"].add(key)
            tiles = ", ".join(f"{k}={v}" for k, v in consts.items() if k.startswith("BLOCK")) + \
                f", w{opts.get('num_warps')}, s{opts.get('num_stages', 3)}"
            if isinstance(b, str) or (isinstance(entry["bytes"], int) and b > entry["bytes"]):
                entry.update(bytes=b, tiles=tiles)
        for kind, e in worst.items():
            b = e["bytes"]
            fits = "compile error" if isinstance(b, str) else ("yes" if b <= limit else "**no**")
            shown = b if isinstance(b, str) else f"{b:,}"
            print(f"| sm_{cc} {name} | {kind} | {e['tiles']} | {shown} | {limit:,} | {fits} |", flush=True)


if __name__ == "__main__":
    main()
