"""AdamW with block-wise 8-bit optimizer states (Dettmers et al. 2021), its maps and its reference.

State of a parameter p with n = p.numel() elements (torch-visible in `optimizer.state[p]`):

    step        fp32 0-dim tensor on p's device (advanced on the device, so a skipped step, which
                the host does not wait to learn about, does not advance it)
    n >= min_8bit_size (2 + 8 / block_size bytes per element: 2.03 at block_size 256):
      state1    uint8 (n,): first moment m, as codes of the signed dynamic map
      state2    uint8 (n,): second moment v, as codes of the unsigned dynamic map
      absmax1   fp32 (ceil(n / block_size),): max |m| of each block of block_size elements
      absmax2   fp32 (ceil(n / block_size),): max v of each block
      (m ≈ map_signed[state1] · absmax1 of its block; v ≈ map_unsigned[state2] · absmax2)
    n < min_8bit_size (8 bytes per element; such tensors are few and small):
      exp_avg, exp_avg_sq   fp32, shaped like p

A step, per element: dequantize m, v; m = β1 m + (1-β1) g; v = β2 v + (1-β2) g²;
p = p (1 - lr·wd); p -= lr/bc1 · m / (√v / √bc2 + eps) with the fp32 m, v just computed; then the
new per-block absmax and nearest-code requantization. bc1, bc2 = 1 - β^t in fp64 from fp32 β.
16-bit params are updated in fp32 and rounded once (bf16: optionally stochastically).

FSDP2's sharded parameters (DTensors): each rank keeps and quantises the states of its own local
shard (`p.to_local()`, `grad.to_local()`), so blocks never straddle ranks; the state_dict holds
plain per-shard tensors and resumes on the same world size; the inf/NaN skip is decided over all
shards.

On CUDA, and on CPU under TRITON_INTERPRET=1, `lora_engine.kernels.adamw8bit` runs the step, one
launch per (param group, dtype, state kind). Elsewhere `adamw8bit_step_reference`, the pure-torch
twin of the kernel (same fp32 operations in the same order), runs per tensor. On the GPU the
kernel's square root and two divisions per element are the hardware's approximate ones (within
2 ulp; a quarter fewer instructions), so params agree with the reference to rounding while m, v
and the states stay bit-identical; `lora_engine.kernels.adamw8bit.IEEE_MATH = True` makes the
whole step bit-identical (4% slower on an H100, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
import os
import warnings

import torch

__all__ = [
    "AdamW8bit",
    "dynamic_map",
    "QuantMaps",
    "quant_maps",
    "quantize_blockwise",
    "dequantize_blockwise",
    "bias_corrections",
    "stochastic_round_bits",
    "adamw8bit_step_reference",
]

_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Quantization maps.


def dynamic_map(signed: bool) -> torch.Tensor:
    """The paper's 8-bit dynamic map: 256 sorted fp32 values in [-1, 1] (signed) or [0, 1].

    Seven decades 1e-6 … 1 (the exponent), each split linearly over [0.1, 1) of the decade (the
    fraction) into 2**i (signed, with both signs) or 2**(i+1) (unsigned) bins, valued at the
    bin centres; plus 0 and 1. Small magnitudes get relative precision, large ones absolute.
    """
    values = []
    for i in range(7):
        n = 2 ** (i if signed else i + 1)
        bounds = torch.linspace(0.1, 1.0, n + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10.0 ** (i - 6)) * means
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    out = torch.tensor(sorted(values), dtype=torch.float32)
    assert out.numel() == 256 and bool((out[1:] > out[:-1]).all())
    return out


def _bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns (held in int64) -> the fp32 values they encode."""
    return ((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32)


def _midpoints_and_search(qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mid fp32 (256,): midpoints of qmap, +inf last; search int32 (65536,): the kernel's
    one-load nearest-code table (`lora_engine.kernels.adamw8bit`), one entry per bucket of fp32
    values sharing their 16 high bits: (midpoints below the bucket) << 16 | the 16 low bits of the
    bucket's one midpoint, or of its largest value when it holds none."""
    mid = torch.cat([(qmap[:-1] + qmap[1:]) / 2.0, torch.tensor([math.inf])])
    high = torch.arange(65536, dtype=torch.int64) << 16
    neg = high >= 2**31
    first, last = _bits_to_float(high), _bits_to_float(high | 0xFFFF)  # by bit pattern
    smallest, largest = torch.where(neg, last, first), torch.where(neg, first, last)
    below = torch.searchsorted(mid, smallest)  # midpoints < the bucket's smallest value
    upto = torch.searchsorted(mid, largest, right=True)  # midpoints <= its largest
    finite = torch.isfinite(smallest) & torch.isfinite(largest)
    if int((upto - below)[finite].max()) > 1:
        raise ValueError("quantization map too dense for a 16-bit bucket index")
    lo = below.clamp(max=255)
    inside = (upto > below) & finite
    mid_bits = mid[lo].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if not bool(((mid_bits >> 16) == (high >> 16))[inside & (mid[lo] != 0)].all()):
        raise ValueError("a bucket's midpoint lies outside the bucket")
    low = torch.where(inside, mid_bits & 0xFFFF, torch.where(neg, 0, 0xFFFF))
    return mid, ((lo << 16) | low).to(torch.int32)


class QuantMaps:
    """The signed (first moment) and unsigned (second moment) maps with their search tables.

    map*: fp32 (256,); mid*: fp32 (256,) (the reference's search); search*: int32 (65536,) (the
    kernel's); all on `device`.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.map1 = dynamic_map(signed=True)
        self.map2 = dynamic_map(signed=False)
        self.mid1, self.search1 = _midpoints_and_search(self.map1)
        self.mid2, self.search2 = _midpoints_and_search(self.map2)
        for name in ("map1", "mid1", "search1", "map2", "mid2", "search2"):
            setattr(self, name, getattr(self, name).to(device))
        self.zero_code1 = int((self.map1 == 0).nonzero())
        self.zero_code2 = int((self.map2 == 0).nonzero())

    def kernel_args(self):
        return (self.map1, self.search1, self.map2, self.search2)


_MAPS: dict[str, QuantMaps] = {}


def quant_maps(device: torch.device | str = "cpu") -> QuantMaps:
    """QuantMaps on a device, built once per device."""
    key = str(torch.device(device))
    if key not in _MAPS:
        _MAPS[key] = QuantMaps(device)
    return _MAPS[key]


def _quantize(x: torch.Tensor, qmap_mid: torch.Tensor, block_size: int):
    """x fp32 (n,) -> codes uint8 (n,), absmax fp32 (ceil(n / block_size),): nearest code of
    x / max|x| per block (computed as x · (1 / max|x|), as the kernel does)."""
    n = x.numel()
    nb = -(-n // block_size)
    xb = torch.nn.functional.pad(x, (0, nb * block_size - n)).view(nb, block_size)
    absmax = xb.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    codes = torch.searchsorted(qmap_mid, (xb * inv[:, None]).contiguous())
    return codes.to(torch.uint8).view(-1)[:n], absmax


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block_size: int):
    n = codes.numel()
    idx = torch.arange(n, device=codes.device) // block_size
    return qmap[codes.long()] * absmax[idx]


def quantize_blockwise(x: torch.Tensor, signed: bool = True, block_size: int = 256):
    """Block-wise 8-bit quantization of x (any shape, flattened) with the dynamic map.

    Returns codes uint8 (x.numel(),) and absmax fp32 (ceil(numel / block_size),).
    """
    maps = quant_maps(x.device)
    return _quantize(x.detach().float().reshape(-1), maps.mid1 if signed else maps.mid2, block_size)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool = True,
                         block_size: int = 256) -> torch.Tensor:
    """fp32 (codes.numel(),): map[codes] times the absmax of each element's block."""
    maps = quant_maps(codes.device)
    return _dequantize(codes.reshape(-1), absmax, maps.map1 if signed else maps.map2, block_size)


# ----------------------------------------------------------------------------------------------
# The reference step.


def _f32(x: float) -> float:
    """x rounded to fp32 (as a kernel scalar argument is)."""
    return float(torch.tensor(x, dtype=torch.float32))


def bias_corrections(t: int, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """(lr / (1 - β1**t), sqrt(1 - β2**t)) rounded to fp32, from fp32-rounded lr and betas, in fp64
    by square-and-multiply: bit-for-bit what the kernel computes."""

    def power(base: float, e: int) -> float:
        acc = 1.0
        while e > 0:
            if e & 1:
                acc *= base
            base *= base
            e >>= 1
        return acc

    bc1 = 1.0 - power(_f32(beta1), t)
    bc2 = 1.0 - power(_f32(beta2), t)
    return _f32(_f32(lr) / bc1), _f32(math.sqrt(bc2))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def stochastic_round_bits(seed: int, t: int, n: int, device=None) -> torch.Tensor:
    """The kernel's 32 random bits of elements 0..n-1 of a tensor (int64 holding uint32)."""
    key = _mix32(torch.tensor((seed * 0x9E3779B9 + t) & _MASK32, dtype=torch.int64))
    offs = torch.arange(n, dtype=torch.int64, device=device) & _MASK32
    return _mix32(offs ^ key.to(device))


def _round_bf16_stochastic(p: torch.Tensor, seed: int, t: int) -> torch.Tensor:
    bits = p.view(torch.int32).to(torch.int64) & _MASK32
    r = stochastic_round_bits(seed, t, p.numel(), p.device)
    bits = (bits + (r & 0xFFFF)) & 0xFFFF0000
    return _bits_to_float(bits).to(torch.bfloat16)


@torch.no_grad()
def adamw8bit_step_reference(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float,
                             beta1: float, beta2: float, eps: float, weight_decay: float,
                             block_size: int = 256, stochastic_rounding: bool = False,
                             seed: int = 0) -> None:
    """One AdamW step of one tensor in place (param, state), in plain torch: the kernel's math.

    state: the layout of the module docstring (8-bit when it holds "state1", else fp32);
    seed: the tensor's stochastic-rounding stream (its index in the optimizer).
    """
    maps = quant_maps(param.device)
    f32 = lambda x: torch.tensor(_f32(x), dtype=torch.float32, device=param.device)
    t = int(state["step"].item()) + 1
    state["step"].fill_(t)
    step_size, sqrt_bc2 = bias_corrections(t, lr, beta1, beta2)
    g = grad.detach().reshape(-1).float()
    p = param.detach().reshape(-1).float()
    quantized = "state1" in state
    if quantized:
        m = _dequantize(state["state1"], state["absmax1"], maps.map1, block_size)
        v = _dequantize(state["state2"], state["absmax2"], maps.map2, block_size)
    else:
        m = state["exp_avg"].reshape(-1)
        v = state["exp_avg_sq"].reshape(-1)
    m = m * f32(beta1) + g * f32(1.0 - beta1)
    v = v * f32(beta2) + (g * g) * f32(1.0 - beta2)
    p = p * f32(1.0 - lr * weight_decay)
    # Correctly rounded fp32 sqrt (torch's vectorized CPU sqrt is not; the interpreter's is).
    denom = torch.sqrt(v.double()).float() / f32(sqrt_bc2) + f32(eps)
    p = p - f32(step_size) * (m / denom)
    if quantized:
        codes1, absmax1 = _quantize(m, maps.mid1, block_size)
        codes2, absmax2 = _quantize(v, maps.mid2, block_size)
        state["state1"].copy_(codes1)
        state["state2"].copy_(codes2)
        state["absmax1"].copy_(absmax1)
        state["absmax2"].copy_(absmax2)
    else:
        state["exp_avg"].copy_(m.view_as(state["exp_avg"]))
        state["exp_avg_sq"].copy_(v.view_as(state["exp_avg_sq"]))
    if stochastic_rounding and param.dtype == torch.bfloat16:
        new = _round_bf16_stochastic(p, seed, t)
    else:
        new = p.to(param.dtype)
    param.detach().copy_(new.view_as(param))


# ----------------------------------------------------------------------------------------------
# The optimizer.


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: updating it updates the DTensor); else t itself."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


def _shard_group(params):
    """The process group over which DTensor `params` are sharded (None: plain tensors)."""
    for p in params:
        if hasattr(p, "device_mesh"):
            return p.device_mesh.get_group()
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    # Imported on first use, as ops.py does: triton reads TRITON_INTERPRET when the kernels load.
    from lora_engine.kernels import adamw8bit

    return adamw8bit


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with both moments in block-wise 8 bits.

    A `torch.optim.Optimizer`: param groups, zero_grad, state_dict / load_state_dict (resuming
    continues bit-for-bit), LR schedulers. Parameters: fp32, bf16 or fp16, contiguous, dense
    gradients. Tensors with fewer than `min_8bit_size` elements keep fp32 states. With
    `stochastic_rounding`, bf16 params are rounded stochastically after the fp32 update.

    A step in which any gradient holds inf or NaN is skipped whole: no param, state or step
    count changes. `skip_nonfinite=False` drops that check (one extra read of the gradients),
    e.g. under a GradScaler, which checks already. The kernel path decides on the device, with
    no host sync: `skipped_steps` (reading it syncs) counts such steps, and a warning follows
    at the next `step()` once the device has reported it.

    use_kernel: None picks the Triton kernels on CUDA (or anywhere under TRITON_INTERPRET=1) and
    the pure-torch reference elsewhere; True/False forces one.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, block_size: int = 256,
                 min_8bit_size: int = 4096, stochastic_rounding: bool = False, *,
                 skip_nonfinite: bool = True, use_kernel: bool | None = None):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        block_size=block_size, min_8bit_size=min_8bit_size,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        self.skip_nonfinite = skip_nonfinite
        self.use_kernel = use_kernel
        self._tables: dict = {}  # launch-group key -> (address key, LaunchTable)
        self._flags: dict = {}  # device -> int32 (1,) skip flag of the current step
        self._skipped: dict = {}  # device -> int64 (1,) skipped steps
        self._skipped_host = 0  # skipped steps of the reference path
        self._pending: list = []  # (event, pinned copy of the skip count), not yet reported
        self._warned = 0

    # -- state --------------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if state:
            return state
        p = _local(p)  # the state is the shard's: keyed by the param, shaped by its local part
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        n = p.numel()
        if n >= group["min_8bit_size"]:
            maps = quant_maps(p.device)
            nb = -(-n // group["block_size"])
            state["state1"] = torch.full((n,), maps.zero_code1, dtype=torch.uint8, device=p.device)
            state["state2"] = torch.full((n,), maps.zero_code2, dtype=torch.uint8, device=p.device)
            state["absmax1"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, but states keep their own dtypes (uint8 codes, fp32 absmax and moments)
        instead of taking the param's, and are copied, so resuming is bit-exact."""
        # torch's load checks and restores the groups; its state cast (to the param dtype) is skipped.
        super().load_state_dict({**state_dict, "state": {}})
        saved_groups = state_dict["param_groups"]
        id_to_param = {
            pid: p for sg, g in zip(saved_groups, self.param_groups) for pid, p in zip(sg["params"], g["params"])
        }
        for pid, saved in state_dict["state"].items():
            if pid not in id_to_param:
                continue
            p = id_to_param[pid]
            self.state[p] = {
                k: (v.to(device=p.device, copy=True) if torch.is_tensor(v) else v) for k, v in saved.items()
            }
        self._tables.clear()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (syncs with the device on the kernel path)."""
        return self._skipped_host + sum(int(c.item()) for c in self._skipped.values())

    # -- step ---------------------------------------------------------------------------------

    def _kernel_path(self, device: torch.device) -> bool:
        if self.use_kernel is not None:
            return self.use_kernel
        return device.type == "cuda" or _interpreting()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._report_skips()
        # Launch groups: (group index, device, param dtype, grad dtype, 8-bit) -> [(index, p)].
        launch: dict = {}
        reference: list = []
        seed = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                seed += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                lp = _local(p)
                if lp.numel() == 0:  # a DTensor whose shard on this rank is empty
                    continue
                state = self._init_state(p, group)
                if self._kernel_path(lp.device):
                    if not lp.is_contiguous():
                        raise RuntimeError("AdamW8bit's kernel needs contiguous parameters")
                    key = (gi, lp.device, lp.dtype, p.grad.dtype, "state1" in state)
                    launch.setdefault(key, []).append((seed, p))
                else:
                    reference.append((group, seed, p, state))
        if reference:
            self._step_reference(reference)
        if launch:
            self._step_kernel(launch)
        return loss

    def _step_reference(self, items) -> None:
        if self.skip_nonfinite:
            finite = all(bool(torch.isfinite(_local(p.grad)).all()) for _, _, p, _ in items)
            shards = _shard_group(p for _, _, p, _ in items)
            if shards is not None:  # one verdict for all shards
                flag = torch.tensor([float(finite)], device=_local(items[0][2]).device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=shards)
                finite = bool(flag.item())
            if not finite:
                self._skipped_host += 1
                self._warn_skips(self.skipped_steps)
                return
        for group, seed, p, state in items:
            adamw8bit_step_reference(
                _local(p), _local(p.grad), state, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                eps=group["eps"], weight_decay=group["weight_decay"], block_size=group["block_size"],
                stochastic_rounding=group["stochastic_rounding"], seed=seed,
            )

    def _table(self, key, items, group):
        """The LaunchTable of a launch group (cached while its params and grads stay put), and the
        grads it points to (held by the caller until the launch is queued)."""
        states = [self.state[p] for _, p in items]
        params = [_local(p) for _, p in items]
        raw = [_local(p.grad) for _, p in items]
        grads = [g if g.is_contiguous() else g.contiguous() for g in raw]
        addr = tuple((p.data_ptr(), g.data_ptr(), p.numel()) for p, g in zip(params, grads))
        cached = self._tables.get(key)
        if cached is not None and cached[0] == addr:
            return cached[1], grads
        quantized = key[4]
        s1, s2 = ("state1", "state2") if quantized else ("exp_avg", "exp_avg_sq")
        tab = _kernels().make_table(
            params, grads, [s[s1] for s in states], [s[s2] for s in states],
            [s["absmax1"] for s in states] if quantized else None,
            [s["absmax2"] for s in states] if quantized else None,
            [s["step"] for s in states], [seed for seed, _ in items],
            group["block_size"], key[1],
            programs=cached[1].programs if cached is not None and [a[2] for a in cached[0]] == [a[2] for a in addr]
            else None,
        )
        # A fresh table holds grads that are not contiguous only by copy: do not cache it then.
        if all(g is r for r, g in zip(raw, grads)):
            self._tables[key] = (addr, tab)
        else:
            self._tables.pop(key, None)
        return tab, grads

    def _step_kernel(self, launch: dict) -> None:
        _k = _kernels()
        devices = {key[1] for key in launch}
        for d in devices:
            if d not in self._flags:
                self._flags[d] = torch.zeros(1, dtype=torch.int32, device=d)
                self._skipped[d] = torch.zeros(1, dtype=torch.int64, device=d)
            self._flags[d].zero_()
        tables = {}
        keep_alive = []
        for key, items in launch.items():
            tab, grads = self._table(key, items, self.param_groups[key[0]])
            tables[key] = tab
            keep_alive.append(grads)
            if self.skip_nonfinite:
                _k.nonfinite_check_(tab, self._flags[key[1]])
        shards = _shard_group(p for items in launch.values() for _, p in items) if self.skip_nonfinite else None
        if shards is not None:
            # One verdict for all shards of the params (on the device: no host sync).
            for d in devices:
                torch.distributed.all_reduce(self._flags[d], op=torch.distributed.ReduceOp.MAX, group=shards)
        if self.skip_nonfinite and len(devices) > 1:
            # One verdict for all devices: every flag becomes their maximum.
            ds = sorted(devices, key=str)
            total = torch.stack([self._flags[d].to(ds[0]) for d in ds]).amax(dim=0)
            for d in ds:
                self._flags[d].copy_(total)
        for key, tab in tables.items():
            group = self.param_groups[key[0]]
            _k.adamw_step_(
                tab, self._flags[key[1]], quant_maps(key[1]).kernel_args(),
                lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                weight_decay=group["weight_decay"], stochastic_rounding=group["stochastic_rounding"],
            )
        for d in devices:
            self._skipped[d] += self._flags[d]
        if self.skip_nonfinite:
            self._queue_skip_report(devices)

    # -- telling the user about skipped steps, without waiting for the device ----------------

    def _queue_skip_report(self, devices) -> None:
        d = next(iter(devices))
        if d.type != "cuda":
            self._warn_skips(self.skipped_steps)  # the interpreter ran synchronously: no wait
            return
        count = sum(self._skipped[x].to(d) for x in devices) if len(devices) > 1 else self._skipped[d]
        host = torch.empty(1, dtype=torch.int64, pin_memory=True)
        host.copy_(count, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(d))
        self._pending.append((event, host))

    def _report_skips(self) -> None:
        # Reports arrive in stream order: take every one the device has finished.
        total = None
        while self._pending and self._pending[0][0].query():
            total = int(self._pending.pop(0)[1].item())
        if total is not None:
            self._warn_skips(total)

    def _warn_skips(self, total: int) -> None:
        if total > self._warned:
            warnings.warn(
                f"AdamW8bit: {total - self._warned} step(s) skipped for inf/NaN gradients "
                f"({total} in all); params and optimizer states were left unchanged",
                RuntimeWarning, stacklevel=3,
            )
            self._warned = total
