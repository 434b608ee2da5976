"""`LoRALinear`: a frozen nn.Linear (or GPT-2 `Conv1D`) plus named low-rank adapters.

Parameter names follow PEFT's LoRA layer, so state_dict keys interoperate:
`<path>.base_layer.weight`, `<path>.lora_A.<adapter>.weight` (r, in),
`<path>.lora_B.<adapter>.weight` (out, r). As PEFT does by default (`autocast_adapter_dtype=True`),
the LoRA weights are created in fp32 whatever the base dtype, so optimizer updates to them are not
lost to bf16 rounding; the fused op casts them to the activations' dtype for the matmuls.
`model.to(dtype)` afterwards casts them like any other parameter.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_engine.ops import lora_linear

__all__ = ["LoRALinear", "ModulesToSave", "is_linear", "linear_shape"]


def is_linear(module: nn.Module) -> bool:
    """True for the layers LoRA can wrap: nn.Linear and transformers' Conv1D (weight stored (in, out))."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear, a Conv1D (weight stored (in, out)) or a LoRALinear."""
    if isinstance(module, LoRALinear):
        return module.out_features, module.in_features
    out_f, in_f = module.weight.shape
    return (in_f, out_f) if isinstance(module, Conv1D) else (out_f, in_f)


class LoRALinear(nn.Module):
    """y = base(x) + scaling · dropout(x) Aᵀ Bᵀ for the active adapter; the base layer stays frozen.

    x: (..., in) -> y: (..., out). Several adapters can be held; only `active_adapter` applies
    (a layer without that adapter acts as its base layer).
    `merged` names the adapter folded into the base weight (then forward is the base layer alone);
    `disable_adapters` makes forward the base layer alone (a teacher at no extra memory).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"LoRALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.out_features, self.in_features = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged: str | None = None
        self.disable_adapters = False
        base_layer.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight as stored ((in, out) for Conv1D): model code reads its dtype/device."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in): a transposed view (no copy) for Conv1D's (in, out) storage."""
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        """Adds adapter `name` (A: kaiming-uniform(a=√5), B: zeros, as PEFT) and makes it active."""
        device = self.base_layer.weight.device
        lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        self.scaling[name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.lora_dropout[name] = float(dropout)
        self.active_adapter = name

    def remove_adapter(self, name: str) -> None:
        """Drops adapter `name`; the active adapter falls back to another one (or None)."""
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.lora_dropout[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable parameters of every adapter held (A and B weights)."""
        return [p for d in (self.lora_A, self.lora_B) for p in d.parameters()]

    def delta_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (r, in), B (out, r), scaling) of adapter `name`: the update is scaling · B A, (out, in)."""
        return self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if self.disable_adapters or self.merged is not None or name not in self.scaling:
            return self.base_layer(x)
        lora_a, lora_b, scaling = self.delta_weight(name)
        return lora_linear(
            x, self.base_weight(), self.base_layer.bias, lora_a, lora_b, scaling,
            dropout_p=self.lora_dropout[name], training=self.training,
        )

    def extra_repr(self) -> str:
        ranks = {n: a.out_features for n, a in self.lora_A.items()}
        active = self.active_adapter
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={active!r}"


class ModulesToSave(nn.Module):
    """A module trained in full next to the adapters (e.g. a new classification head).

    Keeps the frozen `original_module` and one trainable copy per adapter in `modules_to_save`
    (PEFT's names, so state_dict keys match `ModulesToSaveWrapper`). Forward uses the active
    adapter's copy, or the original when adapters are disabled or the active one has no copy.
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        original_module.requires_grad_(False)

    def add_adapter(self, name: str) -> None:
        """Adds a trainable copy of the original module for adapter `name` and makes it active."""
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(True)
        self.modules_to_save[name] = module
        self.active_adapter = name

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def active_module(self) -> nn.Module:
        name = self.active_adapter
        if self.disable_adapters or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        # Model code reads attributes of the wrapped module (e.g. `lm_head.weight`, `score.out_features`).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in _MODULES_TO_SAVE_OWN:
                raise
            return getattr(self.active_module(), name)


_MODULES_TO_SAVE_OWN = ("original_module", "modules_to_save", "active_adapter", "disable_adapters")
