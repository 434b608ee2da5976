"""Where the AdamW8bit update spends its time: stage-removal variants, timed in one run (GPU).

Issue 4's first kernel ran at ~2.8x its memory floor (H100). This script times the committed update
kernel and an experimental copy of it whose stages can be switched or swapped for cheap stand-ins,
so the differences place the time without hardware counters:

    DEQ    0: dequantize by gathers from the 256-entry maps (as committed); 1: stand-in
           arithmetic; 4: `tl.gather` from the map loaded into registers
    QUANT  0: requantize by the 64 K-entry LUT + midpoint gathers (the kernel); 1: stand-in
    ALIGN  0: addresses from a pointer table (alignment unknown to the compiler, the first kernel);
           1: base pointer + offsets in 16-byte units (the compiler can prove 16-byte alignment)
    SPLIT  0: every access masked (the first kernel); 1: chunks inside their tensor unmasked
    FLAG   0: no skip flag; 1: read first, gating everything (as committed); 2: read beside the
           table row, gating only the stores
    HINTS  streaming loads bypass L1 (.cg), stores stream (.cs), table gathers evict last
    maxnreg  the register cap a thread (None: the compiler's choice)

Stand-in variants compute wrong states: they are for timing only. The others are checked against
the committed kernel's result (bit for bit) before timing. It also prints each variant's global
memory instructions from the PTX (vector widths) and registers, and with --ncu-subset it runs only
a ~0.3B subset once, for `ncu` to profile.

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


@triton.jit
def _body(row, offs, blk, numel, p_ptr, g_ptr, s1_ptr, s2_ptr, step_size, sqrt_bc2,
          map1_ptr, mid1_ptr, lut1_ptr, map2_ptr, mid2_ptr, lut2_ptr,
          beta1, beta2, omb1, omb2, eps, decay, go,
          DEQ: tl.constexpr, QUANT: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr,
          HINTS: tl.constexpr):
    a1_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    a2_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    if MASKED:
        mask = offs < numel
        blk_ok = blk * BLOCK < numel
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(s1_ptr + offs, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(s2_ptr + offs, mask=mask, other=0).to(tl.int32)
        a1 = tl.load(a1_ptr + blk, mask=blk_ok, other=0.0)
        a2 = tl.load(a2_ptr + blk, mask=blk_ok, other=0.0)
    elif HINTS:
        p = tl.load(p_ptr + offs, cache_modifier=".cg").to(tl.float32)
        g = tl.load(g_ptr + offs, cache_modifier=".cg").to(tl.float32)
        c1 = tl.load(s1_ptr + offs, cache_modifier=".cg").to(tl.int32)
        c2 = tl.load(s2_ptr + offs, cache_modifier=".cg").to(tl.int32)
        a1 = tl.load(a1_ptr + blk)
        a2 = tl.load(a2_ptr + blk)
    else:
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        c1 = tl.load(s1_ptr + offs).to(tl.int32)
        c2 = tl.load(s2_ptr + offs).to(tl.int32)
        a1 = tl.load(a1_ptr + blk)
        a2 = tl.load(a2_ptr + blk)
    if DEQ == 0 and HINTS:
        m = tl.load(map1_ptr + c1, eviction_policy="evict_last") * a1[:, None]
        v = tl.load(map2_ptr + c2, eviction_policy="evict_last") * a2[:, None]
    elif DEQ == 0:
        m = tl.load(map1_ptr + c1) * a1[:, None]
        v = tl.load(map2_ptr + c2) * a2[:, None]
    elif DEQ == 4:
        idx = tl.arange(0, BLOCK)
        t1 = tl.broadcast_to(tl.load(map1_ptr + idx)[None, :], c1.shape)
        t2 = tl.broadcast_to(tl.load(map2_ptr + idx)[None, :], c2.shape)
        m = tl.gather(t1, c1, axis=1) * a1[:, None]
        v = tl.gather(t2, c2, axis=1) * a2[:, None]
    else:
        m = (c1.to(tl.float32) - 127.0) * (a1[:, None] * 0.007874)
        v = c2.to(tl.float32) * (a2[:, None] * 0.003921)
    if MASKED:
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
    m = m * beta1 + g * omb1
    v = v * beta2 + (g * g) * omb2
    p = p * decay
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), sqrt_bc2) + eps
    p = p - step_size * tl.math.div_rn(m, denom)
    n1 = tl.max(tl.abs(m), axis=1)
    n2 = tl.max(v, axis=1)
    one = tl.full(n1.shape, 1.0, tl.float32)
    inv1 = tl.where(n1 > 0, tl.math.div_rn(one, tl.where(n1 > 0, n1, 1.0)), 0.0)
    inv2 = tl.where(n2 > 0, tl.math.div_rn(one, tl.where(n2 > 0, n2, 1.0)), 0.0)
    if QUANT == 0:
        q1 = K._nearest_code(m * inv1[:, None], mid1_ptr, lut1_ptr)
        q2 = K._nearest_code(v * inv2[:, None], mid2_ptr, lut2_ptr)
    else:
        q1 = (m * inv1[:, None] * 127.0 + 127.5).to(tl.uint8)
        q2 = (v * inv2[:, None] * 255.0).to(tl.uint8)
    bits = p.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    p = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    if go:
        if MASKED:
            tl.store(s1_ptr + offs, q1, mask=mask)
            tl.store(s2_ptr + offs, q2, mask=mask)
            tl.store(a1_ptr + blk, n1, mask=blk_ok)
            tl.store(a2_ptr + blk, n2, mask=blk_ok)
            tl.store(p_ptr + offs, p.to(tl.bfloat16), mask=mask)
        elif HINTS:
            tl.store(s1_ptr + offs, q1, cache_modifier=".cs")
            tl.store(s2_ptr + offs, q2, cache_modifier=".cs")
            tl.store(a1_ptr + blk, n1)
            tl.store(a2_ptr + blk, n2)
            tl.store(p_ptr + offs, p.to(tl.bfloat16), cache_modifier=".cs")
        else:
            tl.store(s1_ptr + offs, q1)
            tl.store(s2_ptr + offs, q2)
            tl.store(a1_ptr + blk, n1)
            tl.store(a2_ptr + blk, n2)
            tl.store(p_ptr + offs, p.to(tl.bfloat16))


@triton.jit
def _exp_kernel(table_ptr, prog_ptr, scal_ptr, flag_ptr, offs_ptr, pbase, gbase, s1base, s2base,
                map1_ptr, mid1_ptr, lut1_ptr, map2_ptr, mid2_ptr, lut2_ptr,
                beta1, beta2, omb1, omb2, eps, decay,
                DEQ: tl.constexpr, QUANT: tl.constexpr, ALIGN: tl.constexpr, SPLIT: tl.constexpr,
                FLAG: tl.constexpr, HINTS: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """The update (bf16 params and grads, 8-bit states), stages switchable. FLAG 0: no skip flag;
    1: read first, gating everything (as committed); 2: read beside the row, gating the stores.
    HINTS: streaming loads bypass L1 (.cg), stores stream (.cs), table gathers evict last.

    table: the committed kernel's table with raw addresses in its first four columns."""
    if FLAG == 1:
        if tl.load(flag_ptr) == 0:
            _exp_chunk(table_ptr, prog_ptr, scal_ptr, flag_ptr, offs_ptr, pbase, gbase, s1base, s2base,
                       map1_ptr, mid1_ptr, lut1_ptr, map2_ptr, mid2_ptr, lut2_ptr,
                       beta1, beta2, omb1, omb2, eps, decay, True, DEQ, QUANT, ALIGN, SPLIT, HINTS, BLOCKS, BLOCK)
    elif FLAG == 2:
        _exp_chunk(table_ptr, prog_ptr, scal_ptr, flag_ptr, offs_ptr, pbase, gbase, s1base, s2base,
                   map1_ptr, mid1_ptr, lut1_ptr, map2_ptr, mid2_ptr, lut2_ptr,
                   beta1, beta2, omb1, omb2, eps, decay, tl.load(flag_ptr) == 0,
                   DEQ, QUANT, ALIGN, SPLIT, HINTS, BLOCKS, BLOCK)
    else:
        _exp_chunk(table_ptr, prog_ptr, scal_ptr, flag_ptr, offs_ptr, pbase, gbase, s1base, s2base,
                   map1_ptr, mid1_ptr, lut1_ptr, map2_ptr, mid2_ptr, lut2_ptr,
                   beta1, beta2, omb1, omb2, eps, decay, True, DEQ, QUANT, ALIGN, SPLIT, HINTS, BLOCKS, BLOCK)


@triton.jit
def _exp_chunk(table_ptr, prog_ptr, scal_ptr, flag_ptr, offs_ptr, pbase, gbase, s1base, s2base,
               map1_ptr, mid1_ptr, lut1_ptr, map2_ptr, mid2_ptr, lut2_ptr,
               beta1, beta2, omb1, omb2, eps, decay, go,
               DEQ: tl.constexpr, QUANT: tl.constexpr, ALIGN: tl.constexpr, SPLIT: tl.constexpr,
               HINTS: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t_idx = tl.load(prog_ptr + pid).to(tl.int64)
    row = table_ptr + t_idx * 10
    numel = tl.load(row + 7)
    chunk = pid - tl.load(row + 8)
    blk = chunk * BLOCKS + tl.arange(0, BLOCKS)
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    step_size = tl.load(scal_ptr + 2 * t_idx)
    sqrt_bc2 = tl.load(scal_ptr + 2 * t_idx + 1)
    if ALIGN:
        orow = offs_ptr + t_idx * 4  # offsets from the base pointers, in 16-byte units
        p_ptr = pbase + tl.load(orow) * 8
        g_ptr = gbase + tl.load(orow + 1) * 8
        s1_ptr = s1base + tl.load(orow + 2) * 16
        s2_ptr = s2base + tl.load(orow + 3) * 16
    else:
        p_ptr = tl.load(row).to(tl.pointer_type(tl.bfloat16))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.bfloat16))
        s1_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
        s2_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
    args = (row, offs, blk, numel, p_ptr, g_ptr, s1_ptr, s2_ptr, step_size, sqrt_bc2,
            map1_ptr, mid1_ptr, lut1_ptr, map2_ptr, mid2_ptr, lut2_ptr,
            beta1, beta2, omb1, omb2, eps, decay, go)
    if SPLIT:
        if (chunk + 1) * (BLOCKS * BLOCK) <= numel:
            _body(*args, DEQ=DEQ, QUANT=QUANT, MASKED=False, BLOCK=BLOCK, HINTS=HINTS)
        else:
            _body(*args, DEQ=DEQ, QUANT=QUANT, MASKED=True, BLOCK=BLOCK, HINTS=HINTS)
    else:
        _body(*args, DEQ=DEQ, QUANT=QUANT, MASKED=True, BLOCK=BLOCK, HINTS=HINTS)


def raw_table(tab, params, grads, states):
    """The launch table with the param, grad, state1, state2 addresses instead of offsets."""
    raw = tab.table.clone()
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        raw[i, :4] = torch.tensor([p.data_ptr(), g.data_ptr(), s["state1"].data_ptr(), s["state2"].data_ptr()])
    return raw


def offsets_table(tab, params, grads, states):
    """int64 (n, 4): each tensor's offset from the first one's address in 16-byte units."""
    cols = [[t.data_ptr() for t in params], [t.data_ptr() for t in grads],
            [s["state1"].data_ptr() for s in states], [s["state2"].data_ptr() for s in states]]
    bases = [c[0] for c in cols]
    for c, b in zip(cols, bases):
        assert all((a - b) % 16 == 0 for a in c), "addresses not 16-byte aligned relative to the first"
    rows = [[(c[i] - b) // 16 for c, b in zip(cols, bases)] for i in range(len(params))]
    return torch.tensor(rows, dtype=torch.int64, device=params[0].device)


def launch(tab, raw, offs_tab, params, grads, states, maps, flag, deq, quant, align, split, maxnreg,
           flag_mode=0, hints=False):
    return _exp_kernel[(tab.n_programs,)](
        raw, tab.programs, tab.scalars, flag, offs_tab, params[0], grads[0],
        states[0]["state1"], states[0]["state2"],
        maps.map1, maps.mid1, maps.lut1, maps.map2, maps.mid2, maps.lut2,
        0.9, 0.999, 0.1, 0.001, 1e-8, 1.0 - 1e-4 * 0.01,
        DEQ=deq, QUANT=quant, ALIGN=align, SPLIT=split, FLAG=flag_mode, HINTS=hints,
        BLOCKS=tab.blocks, BLOCK=tab.block, num_warps=4, enable_fp_fusion=False,
        **({"maxnreg": maxnreg} if maxnreg else {}),
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
    opt = AdamW8bit(params, lr=1e-4, min_8bit_size=0)
    for _ in range(2):
        opt.step()
    key = next(iter(opt._tables))
    tab = opt._tables[key][1]
    grads = [p.grad for p in params]
    states = [opt.state[p] for p in params]
    qm = quant_maps("cuda")
    maps = qm.kernel_args()
    offs_tab = offsets_table(tab, params, grads, states)
    raw = raw_table(tab, params, grads, states)
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
          f"| {len(params)} tensors, {n / 1e9:.3f} B params, {tab.n_programs} programs")

    def committed():
        K.adamw_step_(tab, flag, maps, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)

    def check():
        K.nonfinite_check_(tab, flag)

    variants = [("committed kernel", committed, None), ("inf/NaN check", check, None)]
    for deq, quant, align, split, maxnreg, fl, hints in [
        (0, 0, 0, 0, None, 1, False), (0, 0, 1, 0, None, 1, False), (0, 0, 1, 1, None, 1, False),
        (0, 0, 1, 1, 64, 1, False), (0, 0, 1, 1, 56, 1, False), (0, 0, 1, 1, 72, 1, False),
        (0, 0, 1, 1, 64, 0, False), (0, 0, 1, 1, 64, 2, False), (0, 0, 1, 1, 64, 1, True),
        (4, 0, 1, 1, 64, 1, False), (1, 0, 1, 1, 64, 1, False), (1, 1, 1, 1, 64, 1, False),
    ]:
        name = f"DEQ={deq} QUANT={quant} ALIGN={align} SPLIT={split} FLAG={fl} HINTS={int(hints)} maxnreg {maxnreg}"
        variants.append((name, lambda c=(deq, quant, align, split, maxnreg, fl, hints): launch(
            tab, raw, offs_tab, params, grads, states, qm, flag, *c), (deq, quant, align, split)))

    if args.ncu_subset:
        for _, fn, _ in variants:
            fn()
        torch.cuda.synchronize()
        return

    # Exactness of the real (non-stand-in) variants against the committed kernel, one step each.
    snap = [t.clone() for t in params] + [s[k].clone() for s in states for k in ("state1", "state2", "absmax1",
                                                                                   "absmax2", "step")]

    def restore():
        i = 0
        for t in params:
            t.data.copy_(snap[i])
            i += 1
        for s in states:
            for k in ("state1", "state2", "absmax1", "absmax2", "step"):
                s[k].copy_(snap[i])
                i += 1

    def result():
        return [t.detach().clone() for t in params] + [s[k].clone() for s in states for k in ("state1", "state2")]

    restore()
    committed()
    ref = result()
    for name, fn, cfg in variants[2:]:
        if cfg[0] != 1 and cfg[1] == 0:
            restore()
            fn()
            same = all(torch.equal(a, b) for a, b in zip(result(), ref))
            print(f"{name}: {'bit-exact' if same else 'DIFFERS'} against the committed kernel")
    # Restore the committed kernel's own result, then time (each timed call repeats the same step).
    restore()

    for name, fn, _ in variants[2:]:
        compiled = fn()
        if compiled is not None:
            print(f"{name}: {ptx_memory_ops(compiled)}, {compiled.n_regs} registers")

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
    print(f"{'variant':<72}{'ms':>8}{'x floor':>9}")
    for name, t, r in rows:
        print(f"{name:<72}{t:8.3f}{r:9.2f}")


if __name__ == "__main__":
    main()
