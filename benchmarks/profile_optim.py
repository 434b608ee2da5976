"""Where the AdamW8bit update spends its time: variants of one experimental copy of the update
kernel, timed in one run (GPU).

The committed kernel (`lora_engine.kernels.adamw8bit`) runs beside a copy whose stages can be
switched or swapped for cheap stand-ins, so the differences place the time without hardware
counters. Every copy addresses memory as the committed kernel does (16-byte offsets, unmasked
chunks inside their tensor, the skip flag read first); the switches:

    DEQ    0: dequantize by gathers from the 256-entry maps (as committed); 1: stand-in arithmetic
    QUANT  0: requantize by two loads (a 64 K-entry uint8 LUT on an order-preserving key, then the
           midpoint: the previous kernel); 2: one load of the int32 search table (as committed);
           1: stand-in
    IEEE   1: correctly rounded sqrt and divisions (bit for bit the torch reference); 0: the
           hardware's approximate ones (as committed)
    CVT    1: round to bf16 by the hardware conversion (as committed); 0: on the bits
    maxnreg  the register cap a thread (None: the compiler's choice)

Stand-in variants compute wrong states: they are for timing only. The others are checked against
the committed kernel with the same IEEE setting (bit for bit) before timing. It also prints each
variant's registers and global memory instructions from the PTX, and with --ncu-subset it runs
only a ~0.3B subset once, for `ncu` to profile. The ALIGN / SPLIT / FLAG / HINTS variants of the
earlier rows in RESULTS.md are in this file's history (commit d714d96).

    python benchmarks/profile_optim.py [--rep-ms 300] [--ncu-subset]
"""

import argparse
import re
from collections import Counter

import torch
import triton
import triton.language as tl

from lora_engine.kernels import adamw8bit as K
from lora_engine.optim import AdamW8bit, quant_maps

HIDDEN, MLP, KV, VOCAB = 2048, 5632, 256, 32000


def shapes(layers):
    out = [(VOCAB, HIDDEN)]
    for _ in range(layers):
        out += [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
                (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]
    return out + [(VOCAB, HIDDEN)]


def two_load_lut(mid: torch.Tensor) -> torch.Tensor:
    """The previous kernel's uint8 (65536,) LUT: midpoints below each bucket of fp32 values sharing
    the 16 high bits of their order-preserving key (negative floats reversed below the positive)."""
    key = torch.arange(65536, dtype=torch.int64) << 16
    to_float = lambda k: (((torch.where(k >= 2**31, k & 0x7FFFFFFF, ~k & 0xFFFFFFFF)) + 2**31) % 2**32
                          - 2**31).to(torch.int32).view(torch.float32)
    below = torch.searchsorted(mid.cpu(), to_float(key))
    return below.clamp(max=255).to(torch.uint8).to(mid.device)


@triton.jit
def _two_load_code(x, mid_ptr, lut_ptr):
    bits = x.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    lo = tl.load(lut_ptr + (key >> 16).to(tl.int32)).to(tl.int32)
    mid = tl.load(mid_ptr + lo)
    return (lo + (x > mid).to(tl.int32)).to(tl.uint8)


@triton.jit
def _exp_kernel(table_ptr, prog_ptr, scal_ptr, flag_ptr, p_anchor, g_anchor, s1_anchor, s2_anchor,
                map1_ptr, search1_ptr, mid1_ptr, lut1_ptr, map2_ptr, search2_ptr, mid2_ptr, lut2_ptr,
                beta1, beta2, omb1, omb2, eps, decay,
                DEQ: tl.constexpr, QUANT: tl.constexpr, IEEE: tl.constexpr, CVT: tl.constexpr,
                BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """The update of bf16 params and grads with 8-bit states, stages switchable (unmasked chunks
    only: the benchmark's tensors are whole numbers of chunks)."""
    if tl.load(flag_ptr) == 0:
        row, t_idx, numel, blk = K._chunk(table_ptr, prog_ptr, tl.program_id(0), BLOCKS, BLOCK, False)
        offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        step_size = tl.load(scal_ptr + 2 * t_idx)
        sqrt_bc2 = tl.load(scal_ptr + 2 * t_idx + 1)
        p_ptr = p_anchor + tl.load(row + 0) * 8
        g_ptr = g_anchor + tl.load(row + 1) * 8
        s1_ptr = s1_anchor + tl.load(row + 2) * 16
        s2_ptr = s2_anchor + tl.load(row + 3) * 16
        a1_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        a2_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        c1 = tl.load(s1_ptr + offs).to(tl.int32)
        c2 = tl.load(s2_ptr + offs).to(tl.int32)
        a1 = tl.load(a1_ptr + blk)
        a2 = tl.load(a2_ptr + blk)
        if DEQ == 0:
            m = tl.load(map1_ptr + c1) * a1[:, None]
            v = tl.load(map2_ptr + c2) * a2[:, None]
        else:
            m = (c1.to(tl.float32) - 127.0) * (a1[:, None] * 0.007874)
            v = c2.to(tl.float32) * (a2[:, None] * 0.003921)
        m = m * beta1 + g * omb1
        v = v * beta2 + (g * g) * omb2
        p = p * decay
        if IEEE:
            denom = tl.math.div_rn(tl.math.sqrt_rn(v), sqrt_bc2) + eps
            p = p - step_size * tl.math.div_rn(m, denom)
        else:
            denom = tl.math.fdiv(tl.sqrt(v), sqrt_bc2) + eps
            p = p - step_size * tl.math.fdiv(m, denom)
        n1 = tl.max(tl.abs(m), axis=1)
        n2 = tl.max(v, axis=1)
        one = tl.full(n1.shape, 1.0, tl.float32)
        inv1 = tl.where(n1 > 0, tl.math.div_rn(one, tl.where(n1 > 0, n1, 1.0)), 0.0)
        inv2 = tl.where(n2 > 0, tl.math.div_rn(one, tl.where(n2 > 0, n2, 1.0)), 0.0)
        if QUANT == 0:
            q1 = _two_load_code(m * inv1[:, None], mid1_ptr, lut1_ptr)
            q2 = _two_load_code(v * inv2[:, None], mid2_ptr, lut2_ptr)
        elif QUANT == 2:
            q1 = K._nearest_code(m * inv1[:, None], search1_ptr)
            q2 = K._nearest_code(v * inv2[:, None], search2_ptr)
        else:
            q1 = (m * inv1[:, None] * 127.0 + 127.5).to(tl.uint8)
            q2 = (v * inv2[:, None] * 255.0).to(tl.uint8)
        if not CVT:
            bits = p.to(tl.uint32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            p = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(s1_ptr + offs, q1)
        tl.store(s2_ptr + offs, q2)
        tl.store(a1_ptr + blk, n1)
        tl.store(a2_ptr + blk, n2)
        tl.store(p_ptr + offs, p.to(tl.bfloat16))


def launch(tab, flag, qm, luts, deq, quant, ieee, cvt, maxnreg):
    return _exp_kernel[(tab.n_full,)](
        tab.table, tab.programs, tab.scalars, flag, *tab.anchors,
        qm.map1, qm.search1, qm.mid1, luts[0], qm.map2, qm.search2, qm.mid2, luts[1],
        0.9, 0.999, 0.1, 0.001, 1e-8, 1.0 - 1e-4 * 0.01,
        DEQ=deq, QUANT=quant, IEEE=ieee, CVT=cvt, BLOCKS=tab.blocks, BLOCK=tab.block,
        num_warps=4, enable_fp_fusion=False, **({"maxnreg": maxnreg} if maxnreg else {}),
    )


def copy_bandwidth(nbytes=2 << 30):
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def ptx_memory_ops(compiled):
    ptx = compiled.asm["ptx"]
    ops = Counter(m.group(1) for m in re.finditer(r"\b((?:ld|st)\.global[\.\w]*)", ptx))
    return ", ".join(f"{k}×{v}" for k, v in sorted(ops.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--ncu-subset", action="store_true", help="4 layers, one launch of each kernel")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = 4 if args.ncu_subset else 22
    params = [(torch.randn(s, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_() for s in shapes(layers)]
    for p in params:
        p.grad = (torch.randn(p.shape, device="cuda") * 1e-3).to(torch.bfloat16)
    n = sum(p.numel() for p in params)
    assert all(p.numel() % K.CHUNK == 0 for p in params), "the copy runs unmasked chunks only"
    opt = AdamW8bit(params, lr=1e-4, min_8bit_size=0)
    for _ in range(2):
        opt.step()
    key = next(iter(opt._tables))
    tab = opt._tables[key][1]
    assert tab.units == (8, 8, 16, 16), tab.units
    states = [opt.state[p] for p in params]
    qm = quant_maps("cuda")
    luts = (two_load_lut(qm.mid1), two_load_lut(qm.mid2))
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
          f"| {len(params)} tensors, {n / 1e9:.3f} B params, {tab.n_programs} programs")

    def committed(ieee):
        return lambda: K.adamw_step_(tab, flag, qm.kernel_args(), lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                                     weight_decay=0.01, ieee=ieee)

    def committed_with(**constants):
        """The committed kernel with some of its module constants changed for the call."""
        def run():
            saved = {k: getattr(K, k) for k in constants}
            for k, v in constants.items():
                setattr(K, k, v)
            try:
                committed(False)()
            finally:
                for k, v in saved.items():
                    setattr(K, k, v)
        return run

    variants = [("committed kernel (approximate sqrt/div)", committed(False), None),
                ("committed kernel, IEEE sqrt/div", committed(True), None),
                ("inf/NaN check", lambda: K.nonfinite_check_(tab, flag), None)]
    extra = [("maxnreg 56", dict(MAXNREG=56)), ("no L2 prefetch", dict(PREFETCH_AHEAD=0)),
             ("prefetch 512 ahead", dict(PREFETCH_AHEAD=512)), ("prefetch 2048 ahead", dict(PREFETCH_AHEAD=2048)),
             ("prefetch 4096 ahead", dict(PREFETCH_AHEAD=4096))]
    variants += [(f"committed kernel, {name}", committed_with(**c), None) for name, c in extra]
    n_committed = len(variants)
    for cfg in [
        dict(deq=0, quant=0, ieee=1, cvt=0, maxnreg=64),  # the previous committed kernel
        dict(deq=0, quant=2, ieee=1, cvt=0, maxnreg=64),
        dict(deq=0, quant=2, ieee=1, cvt=1, maxnreg=64),
        dict(deq=0, quant=0, ieee=0, cvt=1, maxnreg=64),
        dict(deq=0, quant=2, ieee=0, cvt=1, maxnreg=64),  # the committed kernel
        dict(deq=0, quant=2, ieee=0, cvt=1, maxnreg=56),
        dict(deq=0, quant=2, ieee=0, cvt=1, maxnreg=72),
        dict(deq=0, quant=2, ieee=0, cvt=1, maxnreg=None),
        dict(deq=1, quant=2, ieee=0, cvt=1, maxnreg=64),
        dict(deq=1, quant=1, ieee=0, cvt=1, maxnreg=64),
    ]:
        name = " ".join(f"{k.upper() if k != 'maxnreg' else k}={v}" for k, v in cfg.items())
        variants.append((name, lambda c=cfg: launch(tab, flag, qm, luts, **c), cfg))

    if args.ncu_subset:
        for _, fn, _ in variants:
            fn()
        torch.cuda.synchronize()
        return

    keys = ("state1", "state2", "absmax1", "absmax2", "step")
    snap = [t.detach().clone() for t in params] + [s[k].clone() for s in states for k in keys]

    def restore():
        for t, v in zip(params + [s[k] for s in states for k in keys], snap):
            t.data.copy_(v)

    def result():
        return [t.detach().clone() for t in params] + [s[k].clone() for s in states for k in ("state1", "state2")]

    # Exactness: each real variant against the committed kernel with its IEEE setting, one step each.
    refs = {}
    for ieee in (True, False):
        restore()
        committed(ieee)()
        refs[ieee] = result()
    apart = [(a != b).sum().item() for a, b in zip(refs[True][:len(params)], refs[False][:len(params)])]
    ulps = max((((a.float() - b.float()).abs() / (torch.finfo(torch.bfloat16).eps * b.float().abs()))).max().item()
               for a, b in zip(refs[True][:len(params)], refs[False][:len(params)]))
    states_same = all(torch.equal(a, b) for a, b in zip(refs[True][len(params):], refs[False][len(params):]))
    print(f"approximate vs IEEE sqrt/div: {sum(apart)} of {n} bf16 params apart (max {ulps:.2f} ulp), "
          f"states {'identical' if states_same else 'DIFFER'}")
    for name, fn, cfg in variants[n_committed:]:
        if cfg["deq"] == 0 and cfg["quant"] != 1:
            restore()
            fn()
            same = all(torch.equal(a, b) for a, b in zip(result(), refs[bool(cfg["ieee"])]))
            print(f"{name}: {'bit-exact' if same else 'DIFFERS'} against the committed kernel")
    # Restore, then time (each timed call repeats the same step from its own result).
    restore()

    for name, fn, _ in variants[n_committed:]:
        compiled = fn()
        print(f"{name}: {compiled.n_regs} registers, {compiled.n_spills} spills; {ptx_memory_ops(compiled)}")

    bw = copy_bandwidth()
    floor_update = n * 10 / bw * 1e3
    floor_check = n * 2 / bw * 1e3
    rows = []
    for name, fn, _ in variants:
        t = triton.testing.do_bench(fn, warmup=50, rep=args.rep_ms, return_mode="median")
        floor = floor_check if name == "inf/NaN check" else floor_update
        rows.append((name, t, t / floor))
    print(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s; floors: update {floor_update:.3f} ms (10 B/param), "
          f"check {floor_check:.3f} ms (2 B/param)")
    print(f"{'variant':<60}{'ms':>8}{'x floor':>9}")
    for name, t, r in rows:
        print(f"{name:<60}{t:8.3f}{r:9.2f}")


if __name__ == "__main__":
    main()
