"""Fused RMSNorm and SwiGLU product (silu(gate)·up) against what transformers runs: fwd+bwd medians
and saved-for-backward bytes, bf16, in one run on one GPU.

    python benchmarks/bench_layers.py [--quick] [--out results.jsonl]
    TRITON_INTERPRET=1 python benchmarks/bench_layers.py --device cpu --quick     (smoke test only)

RMSNorm: transformers' `LlamaRMSNorm` module against `ops.rms_norm`, with the weight frozen (LoRA)
and trainable (full fine-tuning). SwiGLU: `F.silu(gate) * up` (LlamaMLP's product) against
`ops.silu_mul`. Each row first checks our output and gradients against an fp64 reference on the same
inputs (rel err: the largest ‖out − ref‖/‖ref‖ among them), then times. Saved bytes count the distinct
tensors autograd keeps for backward (saved_tensors_hooks), the weight included.
On `--device cpu` the kernels run under Triton's interpreter when TRITON_INTERPRET=1 (else the ops
fall back to their torch references) and the times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from lora_engine.checkpointing import saved_bytes
from lora_engine.ops import kernels_available, rms_norm, rms_norm_reference, silu_mul, silu_mul_reference

SHAPES = [(16384, 2048, 5632), (8192, 4096, 14336)]  # (tokens M, hidden H, intermediate I)
CPU_SHAPES = [(48, 96, 160), (33, 100, 257)]
EPS = 1e-6


def median_ms(fn, device: str) -> float:
    if device == "cuda":
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def max_rel_err(fn, fn64, inputs, dy) -> float:
    """Largest relative error of fn's output and its grads (w.r.t. the inputs needing one) against
    fn64 on fp64 copies of the same inputs."""
    leaves = [t for t in inputs if t.requires_grad]
    y = fn(*inputs)
    outs = [y, *torch.autograd.grad(y, leaves, dy)]
    inputs64 = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    y64 = fn64(*inputs64)
    refs = [y64, *torch.autograd.grad(y64, [t for t in inputs64 if t.requires_grad], dy.double())]
    return max(rel(o, r) for o, r in zip(outs, refs))


def fwd_bwd(fn, params, dy):
    def step():
        for t in params:
            t.grad = None
        fn().backward(dy)

    return step


def bench_rms_norm(m, h, trainable, device, dtype=torch.bfloat16):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(m, h, device=device, dtype=dtype).requires_grad_()
    hf = LlamaRMSNorm(h, eps=EPS).to(device=device, dtype=dtype)
    with torch.no_grad():
        hf.weight.add_(0.1 * torch.randn_like(hf.weight))
    w = hf.weight.requires_grad_(trainable)
    dy = torch.randn(m, h, device=device, dtype=dtype)
    ours = lambda: rms_norm(x, w, EPS)
    row = dict(op="rms_norm", m=m, h=h, weight="trainable" if trainable else "frozen")
    row["rel_err"] = max_rel_err(lambda x_, w_: rms_norm(x_, w_, EPS), lambda x_, w_: rms_norm_reference(x_, w_, EPS),
                                 [x, w], dy)
    row["torch_ms"] = median_ms(fwd_bwd(lambda: hf(x), [x, w], dy), device)
    row["ours_ms"] = median_ms(fwd_bwd(ours, [x, w], dy), device)
    row["torch_saved"] = saved_bytes(lambda: hf(x))
    row["ours_saved"] = saved_bytes(ours)
    return row


def bench_silu_mul(m, i, device, dtype=torch.bfloat16):
    gate = (2 * torch.randn(m, i, device=device, dtype=dtype)).requires_grad_()
    up = torch.randn(m, i, device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(m, i, device=device, dtype=dtype)
    torch_fn = lambda: F.silu(gate) * up
    ours = lambda: silu_mul(gate, up)
    row = dict(op="silu_mul", m=m, h=i, weight="-")
    row["rel_err"] = max_rel_err(silu_mul, silu_mul_reference, [gate, up], dy)
    row["torch_ms"] = median_ms(fwd_bwd(torch_fn, [gate, up], dy), device)
    row["ours_ms"] = median_ms(fwd_bwd(ours, [gate, up], dy), device)
    row["torch_saved"] = saved_bytes(torch_fn)
    row["ours_saved"] = saved_bytes(ours)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--out", default=None, help="append rows as JSON lines here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: tiny shapes, to smoke-test the script (with TRITON_INTERPRET=1: the kernels too)")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: use --device cpu (with TRITON_INTERPRET=1) for a smoke test")
    shapes = SHAPES if device == "cuda" else CPU_SHAPES
    shapes = shapes[:1] if args.quick else shapes
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        path = "Triton interpreter" if kernels_available(torch.empty(0)) else "torch reference fallback"
        name = f"cpu, {path}"
    print(f"# {name} | torch {torch.__version__} | triton {triton.__version__} | python {platform.python_version()}")
    rows = []
    for m, h, i in shapes:
        torch.manual_seed(0)
        for row in (bench_rms_norm(m, h, False, device), bench_rms_norm(m, h, True, device),
                    bench_silu_mul(m, i, device)):
            row.update(device=name, dtype="bf16")
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    mib = 1 << 20
    print(f"\n{name}, bf16, torch {torch.__version__}, triton {triton.__version__}; fwd+bwd medians\n")
    print("| op | M×H (×I) | weight | rel err | torch ms | ours ms | speedup | torch saved MiB | ours saved MiB |")
    print("|" + " --- |" * 9)
    for r in rows:
        print(f"| {r['op']} | {r['m']}×{r['h']} | {r['weight']} | {r['rel_err']:.1e} | {r['torch_ms']:.3f} "
              f"| {r['ours_ms']:.3f} | {r['torch_ms'] / r['ours_ms']:.2f}× | {r['torch_saved'] / mib:.1f} "
              f"| {r['ours_saved'] / mib:.1f} |")
    return rows


if __name__ == "__main__":
    main()
