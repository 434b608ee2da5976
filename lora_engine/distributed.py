"""Running under torchrun: the process group, who writes, sums over ranks, FSDP2 sharding.

    torchrun --nproc-per-node 2 -m lora_engine.cli train --model PATH --data train.jsonl ...

`setup` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), starts the process group
(NCCL on CUDA, gloo on CPU) and picks the rank's device. Outside torchrun every helper here is
a no-op on a world of one, so the trainer calls them unconditionally.

How the trainer uses the ranks (see `trainer.py`):
- LoRA: the trainable tensors (LoRA A/B, modules_to_save) are summed over ranks with one
  all-reduce per optimizer step, after the last micro-batch (`all_reduce_grads_`). We do not
  wrap the model in DDP: the gradients are a few MB, so DDP's overlap of communication with
  backward buys nothing, while its wrapper would have to be rebuilt whenever LoRA parameters are
  replaced (resume, loading the best weights) and sidestepped for the KD teacher's forward.
- Full fine-tuning (and LoRA with --fsdp): FSDP2, `fully_shard` on each transformer layer, then
  on the root; parameters become DTensors sharded on dim 0 across the ranks.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "setup", "shutdown", "barrier", "all_reduce_sum", "all_reduce_max", "all_reduce_grads_",
           "broadcast_params_", "gather_to_main", "is_dtensor", "local", "shard_model_", "full_params"]


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The one rank that writes files, prints and shows the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> World:
    """The torchrun world this process belongs to (size 1 outside torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(size, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str = "auto") -> tuple[World, torch.device]:
    """(world, this rank's device); starts the process group once when launched by torchrun.

    device: "auto" or "cuda" -> cuda:LOCAL_RANK when CUDA is available (auto: else cpu); "cpu".
    """
    world = launched()
    if not world.distributed:
        return world, torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        dev = torch.device("cpu")
    elif device in ("auto", "cuda"):
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
    else:
        raise ValueError(f"device {device!r} under torchrun: use auto, cuda (each rank takes cuda:LOCAL_RANK) or cpu")
    if not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return world, dev


def shutdown() -> None:
    """Ends the process group: NCCL's is destroyed (as NCCL asks); gloo's is left to process exit,
    because destroying it races with the other ranks' exit in torch 2.13 ("terminate called
    without an active exception" in about one CPU run of six)."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier()
        dist.destroy_process_group()


def exit_if_gloo(status: int) -> None:
    """Under a gloo process group, ends the process now with `status` once every rank got here.

    Torch 2.13's gloo threads abort the interpreter's normal teardown ("terminate called without
    an active exception", about one CPU run in six, whether or not the group is destroyed first):
    after a barrier, os._exit skips that teardown. Output is flushed first; nothing else is pending.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    try:
        dist.barrier()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _on():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums over ranks of a few numbers (fp64, so integer counts stay exact)."""
    if not _on():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    if not _on():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


@torch.no_grad()
def all_reduce_grads_(params: list[nn.Parameter]) -> None:
    """Sums the gradients of replicated `params` over ranks, in one flat buffer per dtype."""
    if not _on():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def broadcast_params_(params: list[nn.Parameter]) -> None:
    """Rank 0's values into every rank's copy (a guard: same seed and files give the same already)."""
    if _on():
        for p in params:
            dist.broadcast(p.data, src=0)


def gather_to_main(obj):
    """[each rank's obj] on rank 0 (None elsewhere); `obj` must be picklable (tensors on CPU)."""
    if not _on():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def scatter_from_main(objs):
    """Rank r gets objs[r] (objs is read on rank 0 only)."""
    if not _on():
        return objs[0]
    out = [None]
    dist.scatter_object_list(out, objs if dist.get_rank() == 0 else None, src=0)
    return out[0]


# ------------------------------------------------------------------------------------------------
# FSDP2


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: HF's `_no_split_modules` classes, else the children of
    ModuleLists named layers/layer/h/blocks/block."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    return [child for name, m in model.named_modules() if isinstance(m, nn.ModuleList)
            and name.rsplit(".", 1)[-1] in ("layers", "layer", "h", "blocks", "block") for child in m]


def shard_model_(model: nn.Module, param_dtype: torch.dtype | None = None) -> int:
    """FSDP2: `fully_shard` each transformer layer, then the root (embeddings, head, final norm).
    param_dtype: all-gather and compute in this dtype (bf16-mixed), reduce gradients in fp32.
    Returns the number of layers sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    layers = transformer_layers(model)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # FSDP2 averages gradients over ranks; the trainer wants their sum, and multiplies its loss by the
    # world size (set_gradient_divide_factor(1.0) would need PREMUL_SUM, which gloo lacks).
    return len(layers)


@contextlib.contextmanager
def full_params(model: nn.Module, params: list[nn.Parameter]):
    """Inside: each DTensor in `params` is replaced in its module by a plain full copy (an
    all-gather, so every rank must enter), e.g. to save the small LoRA tensors of a sharded
    model with code that reads plain tensors; the DTensors go back on exit."""
    ids = {id(p) for p in params if is_dtensor(p)}
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in ids:
                full = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
                module._parameters[name] = full
                swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
