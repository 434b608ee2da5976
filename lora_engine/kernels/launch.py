"""Launching an already compiled Triton kernel without the JIT's per-call argument binding, and
plain-int grid helpers.

`kernel[grid](*args, **constexprs)` re-derives Triton's specialization of every argument on every
call: ~30 µs of host time on the GPU machines, three times what `cuLaunchKernelEx` costs
(benchmarks/RESULTS.md). Where the host bounds a step (small layers), that is most of the step.
`launch` keys the compiled kernel by a key finer than Triton's own and, after the first launch
through the JIT, calls the compiled kernel's launcher directly.

The key: the kernel, the current CUDA device, per tensor argument its dtype and whether its address
is 16-byte aligned (what Triton specializes pointers on), every int argument's value (Triton
specializes ints on == 1, divisibility by 16 and 32/64-bit range, all functions of the value), the
dtype and block shape of a TMA tensor descriptor, the type of any other argument (floats are not
specialized), the constexprs and the launch options.
Under the interpreter, under torch.compile (which traces `kernel[grid]` itself), or with a Triton
launch hook installed (profilers), every launch goes through the JIT.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

# Triton reads TRITON_INTERPRET when it is imported; every kernel module reads this one constant.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Distinct keys kept before the cache starts over (each int value is part of a key, so a workload
# whose sizes keep changing would otherwise grow it without bound).
_MAX_ENTRIES = 4096

# key -> (launcher, function handle, packed metadata)
_compiled: dict = {}

try:  # what Triton's own CUDA driver reads the current stream with
    from torch._C import _cuda_getCurrentRawStream as _current_stream
except ImportError:  # CPU-only torch: only the interpreter runs kernels there
    _current_stream = None

_Tensor = torch.Tensor


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (`triton.cdiv` is a JIT-callable wrapper: microseconds a call)."""
    return -(-a // b)


@functools.cache
def num_sms(device: torch.device, default: int) -> int:
    """Streaming multiprocessors of a CUDA device; `default` elsewhere (the interpreter), where a
    launcher's choice of it shapes which code paths small test shapes reach."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return default


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1; a plain int, like `cdiv`)."""
    return 1 << max(n - 1, 0).bit_length()


def _launch_hook_set() -> bool:
    """True when a Triton launch hook is installed (an empty HookChain, triton >= 3.5's default, is none)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return False
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(h is not None and bool(getattr(h, "calls", True)) for h in hooks)


def _check_order(fn, args: tuple, constexprs: dict) -> None:
    names = tuple(fn.arg_names)
    if len(args) + len(constexprs) != len(names) or names[len(args):] != tuple(constexprs):
        raise TypeError(
            f"{fn.__name__}: launch() takes the {len(names) - len(constexprs)} runtime arguments in signature order, "
            f"then every constexpr in signature order ({', '.join(names[len(args):])}); got {len(args)} runtime "
            f"arguments and constexprs ({', '.join(constexprs)})"
        )


def _other_key(v):
    # A TMA tensor descriptor specializes the kernel on its dtype and block shape; floats on nothing.
    if hasattr(v, "block_shape"):
        return (v.base.dtype, tuple(v.block_shape))
    return type(v)


def launch_key(fn, device: int, args: tuple, constexprs: dict, options: dict) -> tuple:
    """The cache key of a launch (see the module docstring)."""
    return (
        id(fn), device,
        *[v if type(v) is int else (v.dtype, v.data_ptr() % 16 == 0) if isinstance(v, _Tensor) else _other_key(v)
          for v in args],
        *constexprs.values(), *options.items(),
    )


def launch(fn, grid: tuple, args: tuple, constexprs: dict, **options) -> None:
    """Launch `fn[grid](*args, **constexprs, **options)`.

    args: the runtime arguments in signature order; constexprs: the constexpr arguments, which must
    all follow them in the signature (checked at the first launch); options: num_warps, num_stages...
    """
    if INTERPRET or torch.compiler.is_compiling() or _launch_hook_set():
        if not torch.compiler.is_compiling():
            _check_order(fn, args, constexprs)
        fn[grid](*args, **constexprs, **options)
        return
    key = launch_key(fn, torch.cuda.current_device(), args, constexprs, options)
    entry = _compiled.get(key)
    if entry is None:
        _check_order(fn, args, constexprs)
        kernel = fn[grid](*args, **constexprs, **options)
        if all(hasattr(kernel, k) for k in ("run", "function", "packed_metadata")):
            if len(_compiled) >= _MAX_ENTRIES:
                _compiled.clear()
            _compiled[key] = (kernel.run, kernel.function, kernel.packed_metadata)
        return
    run, function, metadata = entry
    g0, g1, g2 = (*grid, 1, 1)[:3]
    run(g0, g1, g2, _current_stream(key[1]), function, metadata, None, None, None, *args, *constexprs.values())
