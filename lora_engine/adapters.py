"""Adapters on disk in PEFT's layout, and merging them into the base weights.

Files: `adapter_config.json` (a PEFT `LoraConfig`) and `adapter_model.safetensors` with PEFT's
keys, `base_model.model.<module path>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r) and
`base_model.model.<module path>.<param>` for each modules_to_save module, so PEFT's
`PeftModel.from_pretrained` (and vLLM and others) load what `save_adapter` writes, and
`load_adapter` loads what PEFT writes. Files are written to a temporary name, then renamed.

Merging uses `lora_engine/kernels/merge.py`: W += scaling · B A in place, fp32 accumulation, one rounding;
`unpatch_model(model, merge=True)` exports the merged model as plain transformers modules.
Import note: `load_adapter` patches the model, so this module imports `lora_engine.patch` (never
the other way round).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_engine.fusions import unfuse_model
from lora_engine.kernels.merge import merge_lora_
from lora_engine.layers import LoRALinear, ModulesToSave, linear_shape
from lora_engine.patch import (
    AdapterSettings,
    _adapters,
    _apply,
    _check_can_add_adapter,
    _check_hyperparameters,
    _check_no_overlap,
    _forget_lora,
    _is_target_layer,
    _module_paths,
    _path_matches,
    _set_submodule,
    _wrappers,
    adapter_settings,
    remove_adapter,
)

__all__ = ["save_adapter", "load_adapter", "merge", "unmerge", "unpatch_model", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# LoraConfig options a file may set that change the math; lora-engine implements only their defaults.
_UNSUPPORTED = {
    "use_dora": False, "lora_bias": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
    "layers_to_transform": None, "exclude_modules": None, "layer_replication": None,
    "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
}

_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM", "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


# ------------------------------------------------------------------------------------------------
# Saving


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for the model's head class (None: a bare model, loaded as plain PeftModel)."""
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def adapter_config(model: nn.Module, adapter_name: str | None = None) -> dict:
    """The `adapter_config.json` contents (a PEFT LoraConfig) describing the adapter."""
    s = adapter_settings(model, adapter_name)
    config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "r": s.rank,
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "target_modules": s.target_modules,
        "use_rslora": s.use_rslora,
        "modules_to_save": s.modules_to_save,
        "fan_in_fan_out": s.fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        "layers_pattern": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "auto_mapping": None,
        **_UNSUPPORTED,
    }


def adapter_tensors(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys (adapter name removed), on CPU, contiguous."""
    s = adapter_settings(model, adapter_name)
    name = adapter_name if adapter_name is not None else model.__dict__["_lora_active"]
    out = {}
    for path in s.patched:
        layer = model.get_submodule(path)
        out[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight
        out[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight
    for path in s.saved:
        for key, tensor in model.get_submodule(path).modules_to_save[name].state_dict().items():
            out[f"{PREFIX}{path}.{key}"] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _write_atomically(target: Path, write) -> None:
    """Calls write(temp_path) for a temporary file beside target, then renames it onto target."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Writes adapter `adapter_name` (default: the active one) to directory `path` in PEFT's layout."""
    config = adapter_config(model, adapter_name)
    tensors = adapter_tensors(model, adapter_name)
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Weights first: a config on disk means the weights beside it are complete.
    _write_atomically(out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomically(out_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


# ------------------------------------------------------------------------------------------------
# Loading


def _read_config(directory: Path) -> dict:
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {str(directory)!r}: pass the directory save_adapter (or PEFT's "
            "save_pretrained) wrote."
        )
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the adapter is corrupt: save it again.") from err
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{file} is not a LoRA adapter config (peft_type {got!r}, expected 'LORA').")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{file} lacks the field {key!r}; the adapter config is incomplete.")
    used = [k for k, default in _UNSUPPORTED.items() if config.get(k, default) not in (default, None, {}, [])]
    if used:
        raise ValueError(
            f"{file} uses LoRA options lora-engine does not implement: "
            f"{ {k: config[k] for k in used} }. Only plain LoRA (and rsLoRA) adapters load."
        )
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"No {WEIGHTS_NAME} in {str(directory)!r} (found {found}); lora-engine reads safetensors "
            "adapters only: re-save it with save_adapter or PEFT's save_pretrained(safe_serialization=True)."
        )
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is corrupt or not a safetensors file ({err}): save it again.") from err
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"{file} has keys outside PEFT's '{PREFIX}' layout, e.g. {bad[0]!r}.")
    return {k[len(PREFIX):]: v for k, v in tensors.items()}


def _split_lora_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """({module path: (A, B)}, {other key: tensor}) from the file's keys (prefix removed)."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    other = {}
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                lora.setdefault(key[: -len(suffix)], {})[part] = tensor
                break
        else:
            other[key] = tensor
    incomplete = [p for p, ab in lora.items() if len(ab) != 2]
    if incomplete:
        raise ValueError(f"The adapter file has lora_A without lora_B (or the reverse) for {incomplete[:3]}.")
    return {p: (ab["lora_A"], ab["lora_B"]) for p, ab in lora.items()}, other


def _mismatch(base: str | None, detail: str) -> ValueError:
    return ValueError(
        f"The adapter does not fit this model: {detail}. It was saved for base model {base!r}; "
        "load it into that model (or a model of the same architecture and size)."
    )


def _check_lora_shapes(model: nn.Module, lora: dict[str, tuple], rank: int, base: str | None) -> None:
    modules = dict(_module_paths(model))
    for path, (a, b) in lora.items():
        layer = modules.get(path)
        if layer is None or not _is_target_layer(layer):
            what = "does not exist" if layer is None else f"is a {type(layer).__name__}, not a Linear"
            raise _mismatch(base, f"module {path!r} {what}")
        out_f, in_f = linear_shape(layer)
        if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise _mismatch(
                base, f"{path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, but r={rank} and the "
                f"layer is {in_f} -> {out_f}, so they must be ({rank}, {in_f}) / ({out_f}, {rank})"
            )


def _saved_module_paths(model: nn.Module, names, other: dict[str, torch.Tensor], base) -> dict[str, dict]:
    """{modules_to_save path: its state_dict from the file}, checked against the model's modules."""
    candidates = [p for p, _ in _module_paths(model) if p]
    paths = [p for p in candidates if any(_path_matches(p, n) for n in names or [])]
    found: dict[str, dict] = {}
    for key, tensor in other.items():
        path = next((p for p in paths if key.startswith(p + ".")), None)
        if path is None:
            raise _mismatch(base, f"the file holds {key!r}, neither a LoRA weight nor in modules_to_save")
        found.setdefault(path, {})[key[len(path) + 1:]] = tensor
    modules = dict(_module_paths(model))
    for path, state in found.items():
        module = modules[path]
        original = module.original_module if isinstance(module, ModulesToSave) else module
        expected = {k: tuple(v.shape) for k, v in original.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise _mismatch(base, f"modules_to_save {path!r} has tensors {got}, the model's has {expected}")
    return found


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Loads a PEFT-layout LoRA adapter from directory `path` as `adapter_name` and makes it active.

    An unpatched model is patched from the config (r, lora_alpha, lora_dropout, use_rslora,
    modules_to_save); the layers that get LoRA are those the file holds weights for.
    Raises FileNotFoundError / ValueError, leaving the model unchanged, on a missing or corrupt
    file, an unsupported config, or weights whose modules or shapes do not fit the model.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {str(directory)!r} does not exist.")
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    rank, alpha = config["r"], config["lora_alpha"]
    _check_hyperparameters(rank, alpha, config.get("lora_dropout", 0.0))
    _check_can_add_adapter(model, adapter_name)
    base = config.get("base_model_name_or_path")
    lora, other = _split_lora_keys(tensors)
    if not lora:
        raise ValueError(f"{directory / WEIGHTS_NAME} holds no lora_A/lora_B weights.")
    _check_lora_shapes(model, lora, rank, base)
    saved = _saved_module_paths(model, config.get("modules_to_save"), other, base)
    _check_no_overlap(list(lora), list(saved))
    settings = AdapterSettings(
        rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
        use_rslora=bool(config.get("use_rslora", False)), target_modules=config["target_modules"],
        modules_to_save=config.get("modules_to_save"),
    )
    _apply(model, adapter_name, list(lora), list(saved), settings)
    try:
        _copy_weights(model, adapter_name, lora, saved)
    except BaseException:
        remove_adapter(model, adapter_name)
        raise
    return model


@torch.no_grad()
def _copy_weights(model: nn.Module, name: str, lora: dict[str, tuple], saved: dict[str, dict]) -> None:
    for path, (a, b) in lora.items():
        layer = model.get_submodule(path)
        layer.lora_A[name].weight.copy_(a)
        layer.lora_B[name].weight.copy_(b)
    for path, state in saved.items():
        model.get_submodule(path).modules_to_save[name].load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------
# Merging


def _lora_layers(model: nn.Module) -> list[LoRALinear]:
    if not _adapters(model):
        raise ValueError("The model has no LoRA adapters (it is not patched); nothing to merge.")
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Folds the active adapter into each base weight in place (W += scaling · B A, one rounding).

    Forward then runs the base layers alone (same outputs, no LoRA cost); `unmerge` undoes it.
    Layers already merged are left as they are.
    """
    for layer in _lora_layers(model):
        name = layer.active_adapter
        if layer.merged is not None or name not in layer.scaling:
            continue
        merge_lora_(layer.base_weight(), *layer.delta_weight(name))
        layer.merged = name
    return model


_merge_model = merge  # unpatch_model's `merge` flag shadows the function inside it


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Subtracts each merged adapter from its base weight again (W -= scaling · B A).

    The weights come back within one rounding of W's dtype per merge/unmerge pair; a no-op where
    nothing is merged.
    """
    for layer in _lora_layers(model):
        if layer.merged is None:
            continue
        lora_a, lora_b, scaling = layer.delta_weight(layer.merged)
        merge_lora_(layer.base_weight(), lora_a, lora_b, -scaling)
        layer.merged = None
    return model


def unpatch_model(model: nn.Module, merge: bool = False) -> nn.Module:
    """Removes every adapter and returns the plain model (same object, in place).

    merge=False: the original weights and modules come back (a merged layer is unmerged first).
    merge=True: the active adapter is folded into the base weights (the Triton merge kernel, one
    rounding) and the active copy of each modules_to_save replaces the original: the result is a
    plain transformers model that `save_pretrained` writes and `from_pretrained` reloads.
    Fused forwards (`patch_model(fused=...)`) are removed too.
    """
    if not _adapters(model):
        raise ValueError("The model has no LoRA adapters (it is not patched); nothing to unpatch.")
    (_merge_model if merge else unmerge)(model)
    exported = []
    for path, wrapper in _wrappers(model):
        if isinstance(wrapper, LoRALinear):
            inner = wrapper.base_layer
        else:
            inner = wrapper.active_module() if merge else wrapper.original_module
            exported.append((wrapper.original_module, inner))
        _set_submodule(model, path, inner)
    _forget_lora(model)
    unfuse_model(model)
    for original, kept in exported:
        # An exported modules_to_save copy trains (or not) as the module it replaces did.
        for p_orig, p_kept in zip(original.parameters(), kept.parameters()):
            p_kept.requires_grad_(p_orig.requires_grad)
    return model
