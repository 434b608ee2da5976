"""Inject LoRA into a Hugging Face model in place, and take it out again.

`patch_model` swaps each targeted nn.Linear / Conv1D for a `LoRALinear` wrapping it (and each
`modules_to_save` module for a `ModulesToSave`), freezes everything else, and records the adapter's
settings on the model (`model._lora_adapters`) so it can be saved in PEFT's format. Every input is
validated before the model is touched: on a ValueError the model is exactly as it was.

Target matching follows PEFT: a list of names matches a module whose dotted path equals a name or
ends with `.name`; a string is a regex that must match the whole path; `"all-linear"` is every
Linear/Conv1D except the output head (and the `modules_to_save`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lora_engine.fusions import check_fusions, fuse_model
from lora_engine.layers import LoRALinear, ModulesToSave, is_linear

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "AdapterSettings",
    "patch_model",
    "lora_parameters",
    "lora_state_dict",
    "set_adapter",
    "disable_adapters",
    "remove_adapter",
    "adapter_settings",
    "linear_module_names",
]

# Attention query and value projections per `config.model_type` (PEFT's defaults for these).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt"],
                    ["q_proj", "v_proj"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], ["query", "value"]),
    "gpt2": ["c_attn"],
    **dict.fromkeys(["gpt_neox", "falcon"], ["query_key_value"]),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
}

ALL_LINEAR = "all-linear"


@dataclass
class AdapterSettings:
    """What `patch_model` was asked for, resolved: enough to write PEFT's `adapter_config.json`."""

    rank: int
    alpha: float
    dropout: float
    use_rslora: bool
    target_modules: list[str] | str  # as PEFT stores it: names, a regex, or the full paths for all-linear
    modules_to_save: list[str] | None
    patched: list[str] = field(default_factory=list)  # dotted paths of the LoRALinear layers
    saved: list[str] = field(default_factory=list)  # dotted paths of the ModulesToSave wrappers
    fan_in_fan_out: bool = False  # True when the targets are GPT-2 Conv1D layers (weight stored (in, out))


# ------------------------------------------------------------------------------------------------
# Finding modules


def _module_paths(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(dotted path, module) for every module a user can target: the insides of our wrappers
    (base_layer, lora_A.x, original_module, ...) are skipped, the wrappers themselves are kept."""
    skip: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (LoRALinear, ModulesToSave)):
            skip.append(path + ".")
        yield path, module


def _is_target_layer(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, LoRALinear)


def linear_module_names(model: nn.Module) -> list[str]:
    """Dotted paths of every layer LoRA can wrap (nn.Linear, Conv1D, or already a LoRALinear)."""
    return [path for path, module in _module_paths(model) if path and _is_target_layer(module)]


def _path_matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _short_list(names: list[str], limit: int = 12) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")
    return f"[{shown}] (e.g. {names[0]!r})" if names else "[] (the model has no nn.Linear or Conv1D layer)"


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return set()
    if isinstance(head, ModulesToSave):
        head = head.original_module
    return {p for p, m in _module_paths(model) if m is head or getattr(m, "base_layer", None) is head}


def _default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"No default LoRA targets for model_type {model_type!r} (known: "
            f"{', '.join(sorted(DEFAULT_TARGET_MODULES))}). Pass target_modules=[...] with names from "
            f"{_short_list(linear_module_names(model))}, a regex, or 'all-linear'."
        )
    return DEFAULT_TARGET_MODULES[model_type]


def _resolve_targets(model: nn.Module, target_modules, exclude: set[str],
                     require_each: bool) -> tuple[list[str], list[str] | str]:
    """(paths of the layers to wrap, target_modules as PEFT stores it). Raises ValueError on no match."""
    linear = linear_module_names(model)
    if target_modules is None:
        target_modules = _default_targets(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        skip = exclude | _output_head_names(model)
        paths = [p for p in linear if not any(p == s or p.startswith(s + ".") for s in skip)]
        spec: list[str] | str = paths
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules regex {target_modules!r} does not compile: {err}") from None
        paths = [p for p, _ in _module_paths(model) if p and pattern.fullmatch(p)]
        spec = target_modules
    elif isinstance(target_modules, (list, tuple, set)) and target_modules and all(
        isinstance(t, str) and t for t in target_modules
    ):
        names = list(dict.fromkeys(target_modules))
        paths = [p for p, _ in _module_paths(model) if p and any(_path_matches(p, n) for n in names)]
        missing = [n for n in names if not any(_path_matches(p, n) for p in paths)]
        if require_each and missing and paths:
            raise ValueError(
                f"target_modules {missing} match no module of {type(model).__name__}. "
                f"Linear layers that exist: {_short_list(linear)}. Fix or drop those names."
            )
        spec = names
    else:
        raise ValueError(
            f"target_modules must be None, a list of module names, a regex string or 'all-linear'; "
            f"got {target_modules!r}"
        )
    if not paths:
        raise ValueError(
            f"target_modules {target_modules!r} match no module of {type(model).__name__}. "
            f"Linear layers that exist: {_short_list(linear)}. Pass names from that list, a regex, "
            f"or 'all-linear'."
        )
    modules = dict(model.named_modules())
    not_linear = [f"{p} ({type(modules[p]).__name__})" for p in paths if not _is_target_layer(modules[p])]
    if not_linear:
        raise ValueError(
            f"target_modules {target_modules!r} match modules LoRA cannot wrap: {not_linear[:5]}. "
            "Only nn.Linear and Conv1D layers can be targeted; use more specific names or a stricter regex."
        )
    return paths, spec


def _resolve_modules_to_save(model: nn.Module, modules_to_save) -> list[str]:
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str) or not all(isinstance(n, str) and n for n in modules_to_save):
        raise ValueError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    candidates = [(p, m) for p, m in _module_paths(model) if p]
    paths = []
    for name in modules_to_save:
        found = [p for p, _ in candidates if _path_matches(p, name)]
        if not found:
            children = sorted(n for n, _ in model.named_children())
            raise ValueError(
                f"modules_to_save entry {name!r} matches no module of {type(model).__name__}. "
                f"Top-level modules: {children}; pass the name (or dotted path) of the head to train."
            )
        paths += found
    return list(dict.fromkeys(paths))


# ------------------------------------------------------------------------------------------------
# Patching


def _adapters(model: nn.Module) -> dict[str, AdapterSettings]:
    return model.__dict__.get("_lora_adapters", {})


def adapter_settings(model: nn.Module, adapter_name: str | None = None) -> AdapterSettings:
    """The settings of adapter `adapter_name` (default: the active one). Raises ValueError if absent."""
    adapters = _adapters(model)
    name = adapter_name if adapter_name is not None else model.__dict__.get("_lora_active")
    if name not in adapters:
        raise ValueError(
            f"The model has no LoRA adapter {name!r} (adapters: {sorted(adapters)}); call patch_model first."
        )
    return adapters[name]


def _check_hyperparameters(rank, alpha, dropout) -> float:
    """alpha resolved (None -> 2 · rank); ValueError naming the bad value otherwise."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    alpha = 2 * rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number (or None for 2 * rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return alpha


def _check_can_add_adapter(model: nn.Module, adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    if adapter_name in _adapters(model):
        raise ValueError(
            f"The model already has a LoRA adapter named {adapter_name!r}. Pass another adapter_name to "
            f"add a second adapter, or call unpatch_model(model) first to start over."
        )
    if any(getattr(m, "merged", None) is not None for _, m in _wrappers(model)):
        raise ValueError("The model has a merged adapter; call lora_engine.unmerge(model) before adding one.")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("The model has parameters on the meta device; load its weights before patching.")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _remember_requires_grad(model: nn.Module) -> None:
    # Restored by unpatch_model, so patching then unpatching leaves the model as it was.
    if "_lora_requires_grad" not in model.__dict__:
        model.__dict__["_lora_requires_grad"] = [(p, p.requires_grad) for p in model.parameters()]


def patch_model(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    adapter_name: str = "default",
    use_rslora: bool = False,
    modules_to_save: list[str] | None = None,
    fused=True,
) -> nn.Module:
    """Adds LoRA adapter `adapter_name` to `model` in place, makes it active, and returns the model.

    rank: r of A (r, in) and B (out, r); alpha: None means 2 · rank; scaling = alpha / r
    (alpha / √r with `use_rslora`). target_modules: None (the attention query/value projections
    for `model.config.model_type`), a list of names (suffix match), a regex (full match) or
    "all-linear". modules_to_save: modules trained in full (e.g. a new classification head).
    All other parameters are frozen. Call again with another `adapter_name` to add an adapter.
    fused: True (default) also installs every fused kernel of `lora_engine.fusions` the architecture
    supports (Llama, Mistral, Qwen2: RMSNorm, SwiGLU, and the LM head + loss, which returns no logits
    when called in training with labels); False leaves the rest of the model's forward as it is; or a
    list of names from `fusions.FUSIONS`.
    Raises ValueError, leaving the model unchanged, on any bad input.
    """
    fusions = check_fusions(fused)
    alpha = _check_hyperparameters(rank, alpha, dropout)
    _check_can_add_adapter(model, adapter_name)
    save_paths = _resolve_modules_to_save(model, modules_to_save)
    paths, spec = _resolve_targets(model, target_modules, set(save_paths), require_each=True)
    _check_no_overlap(paths, save_paths)
    _apply(model, adapter_name, paths, save_paths, AdapterSettings(
        rank=rank, alpha=alpha, dropout=float(dropout), use_rslora=bool(use_rslora), target_modules=spec,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    ))
    fuse_model(model, fusions)
    return model


def _check_no_overlap(paths: list[str], save_paths: list[str]) -> None:
    both = [p for p in paths if any(p == s or p.startswith(s + ".") for s in save_paths)]
    if both:
        raise ValueError(
            f"{both[:5]} are both LoRA targets and modules_to_save: a module is either trained in full "
            "(modules_to_save) or through LoRA (target_modules); remove it from one of the two."
        )


def _apply(model: nn.Module, name: str, paths: list[str], save_paths: list[str],
           settings: AdapterSettings) -> nn.Module:
    """Mutates the model (inputs already validated): wraps, adds the adapter, freezes the rest."""
    _remember_requires_grad(model)
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for path in paths:
        layer = modules[path]
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            _set_submodule(model, path, layer)
        layer.add_adapter(name, settings.rank, settings.alpha, settings.dropout, settings.use_rslora)
        layer.train(layer.base_layer.training)  # new modules start in train mode; follow the model
        settings.fan_in_fan_out |= layer.fan_in_fan_out
    for path in save_paths:
        wrapper = modules[path]
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            _set_submodule(model, path, wrapper)
        wrapper.add_adapter(name)
        wrapper.train(wrapper.original_module.training)
    settings.patched, settings.saved = list(paths), list(save_paths)
    model.__dict__.setdefault("_lora_adapters", {})[name] = settings
    set_adapter(model, name)
    return model


def _wrappers(model: nn.Module) -> list[tuple[str, LoRALinear | ModulesToSave]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, (LoRALinear, ModulesToSave))]


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Makes `adapter_name` the one that applies and trains; the other adapters are frozen and unused."""
    adapter_settings(model, adapter_name)
    merged = [p for p, m in _wrappers(model) if getattr(m, "merged", None) not in (None, adapter_name)]
    if merged:
        raise ValueError(
            f"Another adapter is merged into {merged[0]!r} (and {len(merged) - 1} more layers); call "
            f"lora_engine.unmerge(model) before switching to {adapter_name!r}."
        )
    for _, module in _wrappers(model):
        module.active_adapter = adapter_name
        for param_name, param in module.named_parameters():
            if not param_name.startswith(("base_layer.", "original_module.")):
                param.requires_grad_(param_name.split(".")[1] == adapter_name)  # lora_A.<name>.weight
    model.__dict__["_lora_active"] = adapter_name


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base model's outputs (e.g. a distillation teacher).

    No weights are copied; the adapters come back on exit. A merged model must be unmerged first.
    """
    wrappers = [m for _, m in _wrappers(model)]
    if not wrappers:
        raise ValueError("The model has no LoRA adapters to disable; call patch_model first.")
    if any(isinstance(m, LoRALinear) and m.merged is not None for m in wrappers):
        raise ValueError("The model has a merged adapter; call lora_engine.unmerge(model) before disabling.")
    previous = [m.disable_adapters for m in wrappers]
    for m in wrappers:
        m.disable_adapters = True
    try:
        yield model
    finally:
        for m, flag in zip(wrappers, previous):
            m.disable_adapters = flag


def lora_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The parameters adapter `adapter_name` (default: the active one) trains and saves:
    its lora_A/lora_B weights and its copies of the modules_to_save."""
    tensors = lora_state_dict(model, adapter_name, keep_vars=True).values()
    return [t for t in tensors if isinstance(t, nn.Parameter)]


def lora_state_dict(model: nn.Module, adapter_name: str | None = None,
                    keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own state_dict keys, e.g.
    `...q_proj.lora_A.default.weight` (r, in) and `classifier.modules_to_save.default.weight`."""
    settings = adapter_settings(model, adapter_name)
    name = adapter_name if adapter_name is not None else model.__dict__["_lora_active"]
    out: dict[str, torch.Tensor] = {}
    for path in settings.patched + settings.saved:
        module = model.get_submodule(path)
        attrs = ("lora_A", "lora_B") if isinstance(module, LoRALinear) else ("modules_to_save",)
        for attr in attrs:
            for key, tensor in getattr(module, attr)[name].state_dict(keep_vars=keep_vars).items():
                out[f"{path}.{attr}.{name}.{key}"] = tensor
    return out


# ------------------------------------------------------------------------------------------------
# Unpatching


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Deletes adapter `adapter_name`; layers left without any adapter go back to the plain module."""
    settings = adapter_settings(model, adapter_name)
    for path in settings.patched + settings.saved:
        wrapper = model.get_submodule(path)
        if isinstance(wrapper, LoRALinear) and wrapper.merged == adapter_name:
            raise ValueError(f"Adapter {adapter_name!r} is merged; call lora_engine.unmerge(model) first.")
    for path in settings.patched + settings.saved:
        wrapper = model.get_submodule(path)
        wrapper.remove_adapter(adapter_name)
        remaining = wrapper.lora_A if isinstance(wrapper, LoRALinear) else wrapper.modules_to_save
        if not remaining:
            inner = wrapper.base_layer if isinstance(wrapper, LoRALinear) else wrapper.original_module
            _set_submodule(model, path, inner)
    adapters = _adapters(model)
    del adapters[adapter_name]
    if adapters:
        set_adapter(model, next(iter(adapters)))
    else:
        _forget_lora(model)


def _forget_lora(model: nn.Module) -> None:
    for param, flag in model.__dict__.pop("_lora_requires_grad", []):
        param.requires_grad_(flag)
    for key in ("_lora_adapters", "_lora_active"):
        model.__dict__.pop(key, None)
