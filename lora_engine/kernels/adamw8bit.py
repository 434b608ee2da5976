"""Triton kernels of the AdamW step over block-wise 8-bit states, and their launchers.

One launch updates every tensor of a launch group (same param group, device, param/grad dtype and
state kind), whatever their number and sizes. The group is described by a pointer table:

    table     int64 (n_tensors, NCOLS): per tensor the offsets of param, grad, state1 and state2
              from their anchors (see below), the addresses of absmax1, absmax2 and step, then
              numel, the first program id of its whole chunks and its seed index
    programs  int32 (n_full + n_tails,): the table row each program works on: first one program per
              whole chunk, then one per tensor whose numel is not a whole number of chunks (its
              last, partial chunk)
    scalars   fp32 (n_tensors, 2): step_size and sqrt(bias_correction2) of this step, per tensor

Addressing: each stream's tensors are reached as `anchor + offset * UNIT`, the anchor a small tensor
of the stream's dtype passed as a kernel argument. When every address of the group is a multiple
of 16 bytes the offsets are in 16-byte units (UNIT = 16 / element size), so the compiler can prove
the alignment and load and store 16 bytes at a time; otherwise they are in elements (UNIT = 1).
Whole chunks run unmasked in one launch; the partial chunks, masked, in a second launch (`TAIL`),
so the first kernel's code holds only the unmasked path (on an H100 one kernel with both paths took
6.45 ms, a copy with the unmasked path alone 6.05 and the split kernel 6.10-6.20).

The update kernel is bound by latency (ncu, H100: half of a warp's cycles wait on L1TEX, i.e. on
its DRAM loads and table gathers; 50% occupancy), so three things speed it up, each measured by
benchmarks/profile_optim.py (NOTES_optim.md): at most `MAXNREG` registers a thread (8 programs an
SM instead of 6), the 16-byte unmasked accesses above, and an L2 prefetch: each program asks L2
for the lines of the chunk `PREFETCH_AHEAD` programs on, which then starts with its data in L2
rather than in DRAM (bf16 update of a 1.1B model on an H100: 6.10 ms without, 5.39 with). Fused
multiply-adds are off (no cost measured): m and v round as the torch reference's do.

Each program owns `BLOCKS` consecutive quantization blocks of `BLOCK` elements of one tensor, so a
block's absmax never leaves the program. Per element the update kernel reads param, grad, two
state bytes and writes param and two state bytes; nothing else is read from memory but the
per-block absmax and two small tables per map (the 256-entry map and a 64 K-entry search table,
both L1/L2 resident).

State kinds (QUANTIZED):
- True:  state1/state2 uint8 (numel,): codes of m in the signed dynamic map and of v in the
         unsigned one; absmax1/absmax2 fp32 (ceil(numel / BLOCK),): the scale of each block.
- False: state1/state2 fp32 (numel,): m and v themselves (tensors too small to be worth 8 bits).

Nearest code: for fp32 x, the code is the number of map midpoints below x (ties go to the lower
code). The 16 high bits of x select a bucket of fp32 values that holds at most one midpoint
(checked when the table is built); `search[bucket]` (int32) holds in its high half the number of
midpoints below the bucket, lo, and in its low half the 16 low bits of the bucket's midpoint (or of
its largest value when it holds none), so code = lo + (x > that midpoint): one table load, exact.

Arithmetic: with `IEEE` (the interpreter always is) the square root and the two divisions per
element are correctly rounded, and the step equals the torch reference bit for bit. Without it
(the GPU default, `IEEE_MATH`), they are the hardware's approximate ones (sqrt.approx, div.full:
within 2 ulp), which take a quarter of the kernel's instructions fewer: the param then differs from
the reference's by rounding only, and m, v, the codes and the absmax stay exact (they do not depend
on those operations).

Skipping: `flag` (int32, 1 element) is set by `nonfinite_check_` when a gradient holds inf/NaN;
every later kernel of the step reads it first and does nothing, so a skipped step needs no host
sync and changes no param, state or step count.

Bias correction is computed once per tensor per step (`_advance_steps_kernel`) in fp64 from the
fp32-rounded hyperparameters, by square-and-multiply: the torch reference repeats it exactly.
"""

import struct

import torch
import triton
import triton.language as tl

from lora_engine.kernels.launch import INTERPRET as _INTERPRET
from lora_engine.kernels.launch import cdiv, launch

# Columns of the pointer table.
COL_PARAM = tl.constexpr(0)
COL_GRAD = tl.constexpr(1)
COL_STATE1 = tl.constexpr(2)
COL_STATE2 = tl.constexpr(3)
COL_ABSMAX1 = tl.constexpr(4)
COL_ABSMAX2 = tl.constexpr(5)
COL_STEP = tl.constexpr(6)
COL_NUMEL = tl.constexpr(7)
COL_FIRST_PROG = tl.constexpr(8)
COL_SEED = tl.constexpr(9)
NCOLS = tl.constexpr(10)

# Elements a program updates (a whole number of quantization blocks) and its warps: 1024 over 4 warps
# is 8 per thread (one 16-byte access of a 16-bit stream). 512/4 and 2048/4 were slower on an H100.
CHUNK = 1024
NUM_WARPS = 4
# Registers a thread of the update kernel may use (None: the compiler's choice, 80 for bf16): 64
# runs 8 programs an SM instead of 6; 6.7 against 7.9 ms on an H100 (56: 6.8, 72: 7.2).
MAXNREG = 64
# Chunks ahead whose lines a program of the 8-bit update asks L2 for (0: none): about the number
# of programs resident at once (8 an SM).
PREFETCH_AHEAD = 1024
# Whole chunks the inf/NaN check reads a program (their loads all in flight at once).
CHECK_CHUNKS = 8
# Correctly rounded sqrt and division in the update on the GPU (see the module docstring).
IEEE_MATH = False
# The interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest even.
_CAST_TRUNCATES = tl.constexpr(_INTERPRET)

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ----------------------------------------------------------------------------------------------
# Device helpers.


@triton.jit
def _mix32(x):
    """A 32-bit integer hash (lowbias32): uint32 -> uint32, well mixed in every bit."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _nearest_code(x, search_ptr):
    """uint8 index of the map entry nearest to fp32 x (ties to the lower entry)."""
    bits = x.to(tl.uint32, bitcast=True)
    entry = tl.load(search_ptr + (bits >> 16).to(tl.int32)).to(tl.uint32, bitcast=True)
    mid = ((bits & 0xFFFF0000) | (entry & 0xFFFF)).to(tl.float32, bitcast=True)
    return ((entry >> 16) + (x > mid).to(tl.uint32)).to(tl.uint8)


@triton.jit
def _prefetch_l2(p_ptr, g_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, blk, numel,
                 AHEAD: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """Asks L2 for every line of the chunk AHEAD chunks on in the same tensor (param, grad, both
    code streams, both absmax), if that chunk is whole: its program, which starts about one
    program's lifetime later, then finds its data in L2 instead of waiting on DRAM. One line a
    thread, 128 lines at most: all of a 1024-element chunk (82 lines with fp32 params and grads);
    the chunks of block sizes over 1024 only in part."""
    CHUNK: tl.constexpr = BLOCKS * BLOCK
    P_STEP: tl.constexpr = 128 // (p_ptr.dtype.element_ty.primitive_bitwidth // 8)
    G_STEP: tl.constexpr = 128 // (g_ptr.dtype.element_ty.primitive_bitwidth // 8)
    P_END: tl.constexpr = CHUNK // P_STEP
    G_END: tl.constexpr = P_END + CHUNK // G_STEP
    S1_END: tl.constexpr = G_END + CHUNK // 128
    S2_END: tl.constexpr = S1_END + CHUNK // 128
    first = tl.min(blk, axis=0) + AHEAD * BLOCKS
    start = first * BLOCK
    i = tl.arange(0, 128).to(tl.int64)
    addr = tl.where(i < P_END, (p_ptr + start + i * P_STEP).to(tl.int64), 0)
    addr = tl.where((i >= P_END) & (i < G_END), (g_ptr + start + (i - P_END) * G_STEP).to(tl.int64), addr)
    addr = tl.where((i >= G_END) & (i < S1_END), (s1_ptr + start + (i - G_END) * 128).to(tl.int64), addr)
    addr = tl.where((i >= S1_END) & (i < S2_END), (s2_ptr + start + (i - S1_END) * 128).to(tl.int64), addr)
    addr = tl.where(i == S2_END, (a1_ptr + first).to(tl.int64), addr)
    addr = tl.where(i == S2_END + 1, (a2_ptr + first).to(tl.int64), addr)
    addr = tl.where((first + BLOCKS) * BLOCK <= numel, addr, 0)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b64 p, $1, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _pow_f64(base, e):
    """base**e for fp64 base and int32 e >= 0, by square-and-multiply."""
    acc = tl.full((), 1.0, tl.float64)
    while e > 0:
        if (e & 1) != 0:
            acc = acc * base
        base = base * base
        e = e >> 1
    return acc


@triton.jit
def _chunk(table_ptr, prog_ptr, pid, BLOCKS: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """Program pid's table row, tensor index, numel and the block ids of its chunk: a whole chunk,
    or with TAIL its tensor's partial last one."""
    t_idx = tl.load(prog_ptr + pid).to(tl.int64)
    row = table_ptr + t_idx * NCOLS
    numel = tl.load(row + COL_NUMEL)
    if TAIL:
        chunk = numel // (BLOCKS * BLOCK)
    else:
        chunk = pid - tl.load(row + COL_FIRST_PROG)
    blk = chunk * BLOCKS + tl.arange(0, BLOCKS)
    return row, t_idx, numel, blk


# ----------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _nonfinite_kernel(table_ptr, prog_ptr, flag_ptr, g_anchor, prog_base, prog_end,
                      G_UNIT: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr,
                      CHUNKS: tl.constexpr):
    """flag = 1 when any gradient element of this program's CHUNKS chunks (those of update programs
    prog_base + CHUNKS·pid … , clamped below prog_end; TAIL: one partial chunk) is inf or NaN."""
    bad = tl.zeros((BLOCKS, BLOCK), dtype=tl.int1)
    for j in tl.static_range(CHUNKS):
        pid = tl.minimum(prog_base + tl.program_id(0) * CHUNKS + j, prog_end - 1)
        row, t_idx, numel, blk = _chunk(table_ptr, prog_ptr, pid, BLOCKS, BLOCK, TAIL)
        offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        g_ptr = g_anchor + tl.load(row + COL_GRAD) * G_UNIT
        if TAIL:
            g = tl.load(g_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        else:
            g = tl.load(g_ptr + offs).to(tl.float32)
        # NaN fails every comparison, inf fails this one.
        bad = bad | ~(tl.abs(g) <= 3.4028234663852886e38)
    if tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) > 0:
        tl.store(flag_ptr, 1)


@triton.jit
def _advance_steps_kernel(table_ptr, scal_ptr, flag_ptr, lr, beta1, beta2):
    """Unless the step is skipped: step += 1 and scalars[i] = (lr / bc1, sqrt(bc2)) of tensor i."""
    if tl.load(flag_ptr) == 0:
        i = tl.program_id(0)
        step_ptr = tl.load(table_ptr + i * NCOLS + COL_STEP).to(tl.pointer_type(tl.float32))
        t = tl.load(step_ptr) + 1.0
        tl.store(step_ptr, t)
        e = t.to(tl.int32)
        # fp64: 1 - beta2**t cancels badly in fp32 for small t.
        bc1 = 1.0 - _pow_f64(tl.cast(beta1, tl.float64), e)
        bc2 = 1.0 - _pow_f64(tl.cast(beta2, tl.float64), e)
        tl.store(scal_ptr + 2 * i, (tl.cast(lr, tl.float64) / bc1).to(tl.float32))
        tl.store(scal_ptr + 2 * i + 1, tl.sqrt(bc2).to(tl.float32))


@triton.jit
def _adamw_chunk(
    row, offs, blk, numel, p_ptr, g_ptr, s1_ptr, s2_ptr, step_size, sqrt_bc2,
    map1_ptr, search1_ptr, map2_ptr, search2_ptr,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay,
    P_DTYPE: tl.constexpr, QUANTIZED: tl.constexpr, STOCHASTIC: tl.constexpr, IEEE: tl.constexpr,
    BLOCKS: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One AdamW step of one chunk: dequantize, update, requantize. MASKED: the chunk passes the
    tensor's end (lanes past it read zeros and write nothing). PREFETCH > 0: also ask L2 for the
    chunk that many chunks on (`_prefetch_l2`). Loads first, stores last: the order of
    benchmarks/profile_optim.py's fastest variant."""
    if QUANTIZED:
        a1_ptr = tl.load(row + COL_ABSMAX1).to(tl.pointer_type(tl.float32))
        a2_ptr = tl.load(row + COL_ABSMAX2).to(tl.pointer_type(tl.float32))
    if MASKED:
        mask = offs < numel
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        mask = None
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
    if QUANTIZED:
        if MASKED:
            blk_ok = blk * BLOCK < numel
            c1 = tl.load(s1_ptr + offs, mask=mask, other=0).to(tl.int32)
            c2 = tl.load(s2_ptr + offs, mask=mask, other=0).to(tl.int32)
            a1 = tl.load(a1_ptr + blk, mask=blk_ok, other=0.0)
            a2 = tl.load(a2_ptr + blk, mask=blk_ok, other=0.0)
        else:
            blk_ok = None
            c1 = tl.load(s1_ptr + offs).to(tl.int32)
            c2 = tl.load(s2_ptr + offs).to(tl.int32)
            a1 = tl.load(a1_ptr + blk)
            a2 = tl.load(a2_ptr + blk)
            if PREFETCH > 0:
                _prefetch_l2(p_ptr, g_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, blk, numel, PREFETCH, BLOCKS, BLOCK)
        m = tl.load(map1_ptr + c1) * a1[:, None]
        v = tl.load(map2_ptr + c2) * a2[:, None]
        if MASKED:
            # Lanes past the end hold 0 (g is 0 there too), so they do not count in the new absmax.
            m = tl.where(mask, m, 0.0)
            v = tl.where(mask, v, 0.0)
    else:
        if MASKED:
            m = tl.load(s1_ptr + offs, mask=mask, other=0.0)
            v = tl.load(s2_ptr + offs, mask=mask, other=0.0)
        else:
            m = tl.load(s1_ptr + offs)
            v = tl.load(s2_ptr + offs)

    # The torch reference performs these same fp32 operations in this order.
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    p = p * decay
    if IEEE:
        denom = tl.math.div_rn(tl.math.sqrt_rn(v), sqrt_bc2) + eps
        p = p - step_size * tl.math.div_rn(m, denom)
    else:
        denom = tl.math.fdiv(tl.sqrt(v), sqrt_bc2) + eps
        p = p - step_size * tl.math.fdiv(m, denom)

    if QUANTIZED:
        n1 = tl.max(tl.abs(m), axis=1)
        n2 = tl.max(v, axis=1)
        one = tl.full(n1.shape, 1.0, tl.float32)
        inv1 = tl.where(n1 > 0, tl.math.div_rn(one, tl.where(n1 > 0, n1, 1.0)), 0.0)
        inv2 = tl.where(n2 > 0, tl.math.div_rn(one, tl.where(n2 > 0, n2, 1.0)), 0.0)
        q1 = _nearest_code(m * inv1[:, None], search1_ptr)
        q2 = _nearest_code(v * inv2[:, None], search2_ptr)

    if P_DTYPE == tl.bfloat16 and (STOCHASTIC or _CAST_TRUNCATES):
        # Round to bf16 on the bits: add 16 bits below bf16's last bit (random ones, or half an
        # ulp and the tie-to-even bit), truncate.
        bits = p.to(tl.uint32, bitcast=True)
        if STOCHASTIC:
            step_ptr = tl.load(row + COL_STEP).to(tl.pointer_type(tl.float32))
            t = tl.load(step_ptr).to(tl.uint32)
            seed = tl.load(row + COL_SEED).to(tl.uint32)
            r = _mix32(offs.to(tl.uint32) ^ _mix32(seed * 0x9E3779B9 + t))
            bits = bits + (r & 0xFFFF)
        else:
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
        p = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)

    if QUANTIZED:
        tl.store(s1_ptr + offs, q1, mask=mask)
        tl.store(s2_ptr + offs, q2, mask=mask)
        tl.store(a1_ptr + blk, n1, mask=blk_ok)
        tl.store(a2_ptr + blk, n2, mask=blk_ok)
    else:
        tl.store(s1_ptr + offs, m, mask=mask)
        tl.store(s2_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


@triton.jit
def _adamw_kernel(
    table_ptr, prog_ptr, scal_ptr, flag_ptr, p_anchor, g_anchor, s1_anchor, s2_anchor,
    map1_ptr, search1_ptr, map2_ptr, search2_ptr,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, prog_base,
    P_DTYPE: tl.constexpr, P_UNIT: tl.constexpr, G_UNIT: tl.constexpr, S_UNIT: tl.constexpr,
    QUANTIZED: tl.constexpr, STOCHASTIC: tl.constexpr, IEEE: tl.constexpr, BLOCKS: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One AdamW step of BLOCKS·BLOCK elements of one tensor (TAIL: fewer, masked), unless the
    step is skipped. prog_base: the program id of the launch's first program."""
    if tl.load(flag_ptr) == 0:
        row, t_idx, numel, blk = _chunk(table_ptr, prog_ptr, prog_base + tl.program_id(0), BLOCKS, BLOCK, TAIL)
        offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        step_size = tl.load(scal_ptr + 2 * t_idx)
        sqrt_bc2 = tl.load(scal_ptr + 2 * t_idx + 1)
        p_ptr = p_anchor + tl.load(row + COL_PARAM) * P_UNIT
        g_ptr = g_anchor + tl.load(row + COL_GRAD) * G_UNIT
        s1_ptr = s1_anchor + tl.load(row + COL_STATE1) * S_UNIT
        s2_ptr = s2_anchor + tl.load(row + COL_STATE2) * S_UNIT
        args = (row, offs, blk, numel, p_ptr, g_ptr, s1_ptr, s2_ptr, step_size, sqrt_bc2,
                map1_ptr, search1_ptr, map2_ptr, search2_ptr,
                beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay)
        _adamw_chunk(*args, P_DTYPE=P_DTYPE, QUANTIZED=QUANTIZED, STOCHASTIC=STOCHASTIC, IEEE=IEEE,
                     BLOCKS=BLOCKS, BLOCK=BLOCK, MASKED=TAIL, PREFETCH=PREFETCH)


# ----------------------------------------------------------------------------------------------
# Launchers.


def _f32(x: float) -> float:
    # Scalars reach compiled kernels as fp32 but the interpreter as Python floats: round here.
    return struct.unpack("f", struct.pack("f", x))[0]


_ANCHORS: dict = {}


def _anchor(device, dtype) -> torch.Tensor:
    """A small tensor of `dtype` on `device`, kept for the process: the base address every stream
    of that dtype is reached from (its address never changes, so launch tables stay valid)."""
    key = (str(torch.device(device)), dtype)
    if key not in _ANCHORS:
        _ANCHORS[key] = torch.zeros(64, dtype=dtype, device=device)
    return _ANCHORS[key]


class LaunchTable:
    """The device-side description of one launch group (see the module docstring).

    Built once per set of tensor addresses; `quantized` says which state kind the rows hold,
    `anchors` the (param, grad, state1, state2) base tensors and `units` the elements per offset
    unit of each stream (16 bytes' worth when `aligned`, else 1). `n_full` programs run whole
    chunks, `n_tails` the partial last chunks.
    """

    def __init__(self, table, programs, scalars, n_full, n_tails, blocks, block, quantized, anchors, units):
        self.table = table
        self.programs = programs
        self.scalars = scalars
        self.n_full = n_full
        self.n_tails = n_tails
        self.n_programs = n_full + n_tails
        self.n_tensors = table.shape[0]
        self.blocks = blocks
        self.block = block
        self.quantized = quantized
        self.anchors = anchors
        self.units = units
        self.aligned = any(u > 1 for u in units)

    def launches(self):
        """(programs, first program id, TAIL) of each launch the group needs (one or two)."""
        return [(n, base, tail) for n, base, tail in ((self.n_full, 0, False), (self.n_tails, self.n_full, True))
                if n > 0]


def chunk_blocks(block_size: int) -> int:
    """Quantization blocks per program for a block size (a power of two)."""
    return max(1, CHUNK // block_size)


def make_table(params, grads, states1, states2, absmax1, absmax2, steps, seeds, block_size, device,
               programs=None):
    """LaunchTable for tensors given as equal-length lists (absmax1/absmax2 None for fp32 states).

    params: contiguous, any of fp32/bf16/fp16 (one dtype per table); grads: contiguous, one dtype;
    states1/states2: uint8 or fp32 (numel,); absmax*: fp32 (ceil(numel / block_size),);
    steps: fp32 0-dim; seeds: ints (stochastic-rounding stream of each tensor).
    `programs` may pass back a previous table's program map when the numels are unchanged.
    """
    blocks = chunk_blocks(block_size)
    chunk = blocks * block_size
    quantized = absmax1 is not None
    streams = (params, grads, states1, states2)
    anchors = tuple(_anchor(device, s[0].dtype) for s in streams)
    aligned = all(t.data_ptr() % 16 == 0 for s in streams for t in s)
    units = tuple(16 // a.element_size() if aligned else 1 for a in anchors)
    rows, first, counts, tails = [], 0, [], []
    for i, p in enumerate(params):
        n = p.numel()
        offsets = [(s[i].data_ptr() - a.data_ptr()) // (a.element_size() * u)
                   for s, a, u in zip(streams, anchors, units)]
        rows.append([
            *offsets,
            absmax1[i].data_ptr() if quantized else 0, absmax2[i].data_ptr() if quantized else 0,
            steps[i].data_ptr(), n, first, seeds[i],
        ])
        counts.append(n // chunk)
        first += n // chunk
        if n % chunk:
            tails.append(i)
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    if programs is None or programs.numel() != first + len(tails):
        programs = torch.cat([
            torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), torch.tensor(counts)),
            torch.tensor(tails, dtype=torch.int32),
        ]).to(device, non_blocking=True)
    scalars = torch.zeros((len(rows), 2), dtype=torch.float32, device=device)
    return LaunchTable(table, programs, scalars, first, len(tails), blocks, block_size, quantized, anchors, units)


def nonfinite_check_(tab: LaunchTable, flag: torch.Tensor) -> None:
    """Sets flag (int32, (1,)) to 1 if any gradient of the table holds inf or NaN; never clears it."""
    for n, base, tail in tab.launches():
        chunks = 1 if tail else CHECK_CHUNKS
        launch(_nonfinite_kernel, (cdiv(n, chunks),), (tab.table, tab.programs, flag, tab.anchors[1], base, base + n),
               dict(G_UNIT=tab.units[1], BLOCKS=tab.blocks, BLOCK=tab.block, TAIL=tail, CHUNKS=chunks),
               num_warps=NUM_WARPS)


def adamw_step_(tab: LaunchTable, flag, maps, *, lr, beta1, beta2, eps, weight_decay,
                stochastic_rounding=False, num_warps=None, ieee=None):
    """One AdamW step, in place, of every tensor of the table, unless flag (int32, (1,)) is set.
    The param dtype is the table's (its param anchor's).

    maps: (map1, search1, map2, search2) on the device: fp32 (256,) and int32 (65536,) for the
    signed (first moment) and the unsigned (second moment) map; unused when the table holds fp32
    states. ieee: correctly rounded sqrt and division (None: `IEEE_MATH`; always under the
    interpreter). Hyperparameters are rounded to fp32 on the way in.
    """
    param_dtype = tab.anchors[0].dtype
    launch(_advance_steps_kernel, (tab.n_tensors,),
           (tab.table, tab.scalars, flag, _f32(lr), _f32(beta1), _f32(beta2)), {}, num_warps=1)
    args = (tab.table, tab.programs, tab.scalars, flag, *tab.anchors, *maps,
            _f32(beta1), _f32(beta2), _f32(1.0 - beta1), _f32(1.0 - beta2), _f32(eps), _f32(1.0 - lr * weight_decay))
    constexprs = dict(
        P_DTYPE=_TL_DTYPE[param_dtype], P_UNIT=tab.units[0], G_UNIT=tab.units[1], S_UNIT=tab.units[2],
        QUANTIZED=tab.quantized, STOCHASTIC=bool(stochastic_rounding) and param_dtype == torch.bfloat16,
        IEEE=_INTERPRET or bool(IEEE_MATH if ieee is None else ieee), BLOCKS=tab.blocks, BLOCK=tab.block,
    )
    options = dict(num_warps=num_warps or NUM_WARPS, enable_fp_fusion=False,
                   **({"maxnreg": MAXNREG} if MAXNREG else {}))
    for n, base, tail in tab.launches():
        # The prefetch is PTX: not under the interpreter, nor on ROCm.
        prefetch = 0 if tail or _INTERPRET or torch.version.hip or not tab.quantized else PREFETCH_AHEAD
        launch(_adamw_kernel, (n,), (*args, base), dict(constexprs, TAIL=tail, PREFETCH=prefetch), **options)
