"""Activation checkpointing of transformer blocks: all, the first K, or as many as a memory budget needs.

Built on transformers' own per-block checkpointing (non-reentrant): each block that carries
`gradient_checkpointing = True` keeps only its input and recomputes the rest in backward. A block
left unchecked keeps its activations, which costs memory and saves the recompute (about a third of
the block's step time with frozen weights). `fit_checkpointing` measures what one block keeps and
the step's peak, then leaves as many blocks whole as the budget holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["CheckpointingError", "checkpointed_layers", "enable_gradient_checkpointing", "fit_checkpointing",
           "offloaded_checkpoint", "saved_bytes"]


class CheckpointingError(ValueError):
    """A model or setting that checkpointing cannot serve; the message says what to change."""


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks whose activations transformers can recompute, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_gradient_checkpointing(model: nn.Module, layers: int = 0, offload: bool = False) -> None:
    """HF's activation checkpointing, non-reentrant (frozen inputs need no requires_grad hack).

    layers: 0 recomputes every transformer block in backward; K > 0 only the first K, and the later
    blocks keep their activations. The later ones are left whole because backward reaches (and frees)
    them first.
    offload: the checkpointed blocks keep their input in pinned CPU memory instead of on the GPU
    (copied out on a side stream during forward, back just before the block's recompute), so a step
    holds one block's input on the GPU instead of all of them, for the time of the copies. For one
    GPU or DDP; blocks must return a tensor (Llama-family decoder layers do).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise CheckpointingError(f"{type(model).__name__} does not support gradient checkpointing")
    blocks = checkpointed_layers(model)
    if not 0 <= layers <= len(blocks):
        raise CheckpointingError(f"cannot checkpoint {layers} layers: the model has {len(blocks)}; "
                                 f"give 0..{len(blocks)} (0: all)")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if layers:
        for block in blocks[layers:]:
            block.gradient_checkpointing = False
    if offload:
        for block in blocks:
            block._gradient_checkpointing_func = offloaded_checkpoint


# ------------------------------------------------------------------------------------------------
# Checkpointing with the block input kept in CPU memory


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _autocast_state(device_type: str) -> dict:
    return dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                dtype=torch.get_autocast_dtype(device_type))


class _OffloadedCheckpoint(torch.autograd.Function):
    """y = run(x) computed without a graph; x goes to CPU (pinned, asynchronously on CUDA). Backward
    brings x back, recomputes run(x) with the RNG and autocast state of the forward, and backpropagates
    through it: parameter gradients accumulate as usual, x's gradient is returned. `anchor` is an empty
    tensor that requires grad, so backward runs even when x does not need a gradient (a frozen
    embedding's output feeding LoRA layers)."""

    @staticmethod
    def forward(ctx, run, anchor, x):
        ctx.run, ctx.x_requires_grad, ctx.device = run, x.requires_grad, x.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.autocast = _autocast_state(x.device.type)
        with torch.no_grad():
            y = run(x)
        if not isinstance(y, torch.Tensor):
            raise CheckpointingError(f"offloaded checkpointing needs blocks that return a tensor, not "
                                     f"{type(y).__name__}")
        if x.is_cuda:
            stream = _side_streams.setdefault(x.device, torch.cuda.Stream(x.device))
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                ctx.saved_x = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                ctx.saved_x.copy_(x, non_blocking=True)
                ctx.copied = stream.record_event()
            x.record_stream(stream)  # x's memory is not reused before the copy has read it
        else:
            ctx.saved_x, ctx.copied = x.detach().clone(), None
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.copied is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
        x = ctx.saved_x.to(ctx.device, non_blocking=True).requires_grad_(ctx.x_requires_grad)
        ctx.saved_x = None
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                y = ctx.run(x)
        torch.autograd.backward(y, dy)
        return None, None, x.grad if ctx.x_requires_grad else None


def offloaded_checkpoint(function: Callable, x: torch.Tensor, *args, **kwargs):
    """A drop-in for transformers' `_gradient_checkpointing_func(function, hidden_states, ...)`:
    recomputes `function` in backward, holding its input `x` in CPU memory meanwhile."""
    run = (lambda t: function(t, *args, **kwargs)) if (args or kwargs) else function
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _OffloadedCheckpoint.apply(run, anchor, x)


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while fn() runs (a tensor saved
    twice, or two views with one address, shape and stride, count once)."""
    seen = {}

    def pack(t: torch.Tensor):
        seen[(t.data_ptr(), t.dtype, tuple(t.shape), t.stride())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@contextlib.contextmanager
def _count_saved_bytes(block: nn.Module, params: set[int], counts: dict[int, int]):
    """While active, `counts` gathers the storages `block`'s forward saves for backward (parameters
    and the block's own input excluded), keyed by storage pointer."""
    hooks = []
    inputs: set[int] = set()

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in inputs:
            counts[ptr] = t.untyped_storage().nbytes()
        return t

    def pre(module, args, kwargs):
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                inputs.add(a.untyped_storage().data_ptr())
        ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        ctx.__enter__()
        hooks.append(ctx)

    def post(module, args, output):
        hooks.pop().__exit__(None, None, None)

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while hooks:
            hooks.pop().__exit__(None, None, None)


def fit_checkpointing(model: nn.Module, run_step: Callable[[], None], budget_bytes: int,
                      margin: float = 0.03, offload: bool = False) -> int:
    """Checkpoints as few transformer blocks as keep the step's peak memory under `budget_bytes`, and
    returns how many are checkpointed (the first K; the others keep their activations).

    run_step: one forward + backward of a representative batch (its gradients are the caller's to
    clear). It runs once, with every block checkpointed but the last, to measure the peak and the
    bytes the last block keeps; the rest is arithmetic: each further whole block adds that much.
    `margin` (a fraction of the budget) is kept free for variation between steps; `offload` as in
    `enable_gradient_checkpointing`.
    Raises CheckpointingError if even full checkpointing does not fit (the measured peak is named).
    """
    if not torch.cuda.is_available():
        raise CheckpointingError("fitting checkpointing to a memory budget needs a CUDA device")
    blocks = checkpointed_layers(model)
    if not blocks:
        raise CheckpointingError(f"{type(model).__name__} has no transformer blocks that can be checkpointed")
    enable_gradient_checkpointing(model, len(blocks) - 1, offload)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counts: dict[int, int] = {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with _count_saved_bytes(blocks[-1], params, counts):
        run_step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    per_block = max(1, sum(counts.values()))
    room = budget_bytes * (1.0 - margin) - peak
    if room < -per_block:  # not even all-but-one fits; all-checkpointed saves one block at most
        raise CheckpointingError(
            f"the step peaks at {peak / 2**30:.2f} GiB with all but one layer checkpointed, over the "
            f"budget of {budget_bytes / 2**30:.2f} GiB: raise the budget or lower the batch size")
    whole = 1 + int(room // per_block) if room >= 0 else 0
    k = max(0, len(blocks) - whole)
    enable_gradient_checkpointing(model, k, offload)
    if k == 0:  # everything fits whole
        for block in blocks:
            block.gradient_checkpointing = False
    return k
