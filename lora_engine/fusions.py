"""Fused replacements for the memory-bound parts of supported architectures (Llama, Mistral, Qwen2).

`fuse_model(model)` swaps, on the module instances it recognises, the forward of:
- "cross_entropy": the causal LM's head + loss. When the model is called in training mode with
  `labels`, the loss comes from `ops.linear_cross_entropy` (chunked; the logits are never held in
  full) and `outputs.logits` is None. Without labels, in eval mode or under no_grad, the model's own
  forward runs and returns logits as usual.
- "rms_norm": every RMSNorm, through `ops.rms_norm` (one kernel each way; keeps x and one fp32 per row).
- "swiglu": every gated MLP's `silu(gate) * up`, through `ops.silu_mul` (keeps gate and up only).

The replacements compute the same function (the tests hold them to the unfused model's logits, loss
and gradients) and leave parameters and state_dict untouched, so saving, merging and PEFT's file
layout are unaffected. `unfuse_model` restores the original forwards. Modules are recognised by class
name; anything else (other architectures, a LoRA-wrapped or biased lm_head, a custom loss, sharded
weights under FSDP) keeps its own forward.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

from lora_engine import ops

__all__ = ["FUSIONS", "check_fusions", "fuse_model", "unfuse_model", "fused_ops", "fused_lm_loss"]

FUSIONS = ("cross_entropy", "rms_norm", "swiglu")
_ARCHS = ("Llama", "Mistral", "Qwen2")
_NORMS = {f"{a}RMSNorm" for a in _ARCHS}
_MLPS = {f"{a}MLP" for a in _ARCHS}
_CAUSAL_LMS = {f"{a}ForCausalLM" for a in _ARCHS}
_TAG = "_lora_engine_fused"


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _head_is_plain(model: nn.Module) -> bool:
    """True when the lm_head can be multiplied out by hand: a bias-free nn.Linear with a plain
    (not FSDP-sharded) weight, and the model's loss is transformers' causal-LM cross-entropy."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    if type(head.weight.data).__name__ == "DTensor" or type(head.weight).__name__ == "DTensor":
        return False
    loss_fn = getattr(model, "loss_function", None)
    return getattr(loss_fn, "__name__", "") == "ForCausalLMLoss"


def fused_lm_loss(model: nn.Module) -> bool:
    """True when `model(..., labels=...)` in training mode takes the fused head + loss path."""
    return getattr(model, _TAG, None) == "cross_entropy" and _head_is_plain(model)


def _causal_lm_forward(self, *args, **kwargs):
    """The causal LM's forward; in training with labels, the loss without materialising logits."""
    original = type(self).forward
    bound = inspect.signature(original).bind(self, *args, **kwargs)
    call = dict(bound.arguments)
    call.pop("self")
    extra = call.pop("kwargs", {})
    labels = call.get("labels")
    if (labels is None or not self.training or not torch.is_grad_enabled() or call.get("logits_to_keep", 0) != 0
            or extra.get("return_dict") is False or not _head_is_plain(self)):
        return original(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    extra = dict(extra)
    num_items = extra.pop("num_items_in_batch", None)
    ignore_index = extra.pop("ignore_index", -100)
    shift_labels = extra.pop("shift_labels", None)
    for key in ("labels", "logits_to_keep"):
        call.pop(key, None)
    outputs = self.model(**call, **extra)
    hidden = outputs.last_hidden_state
    if shift_labels is None:  # as transformers' ForCausalLMLoss: position t predicts labels[t + 1]
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = ops.linear_cross_entropy(hidden, self.lm_head.weight, shift_labels.to(hidden.device), ignore_index,
                                num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _targets(model: nn.Module, fusions) -> list[tuple[nn.Module, str]]:
    found = []
    for module in model.modules():
        name = type(module).__name__
        if "rms_norm" in fusions and name in _NORMS and hasattr(module, "variance_epsilon"):
            found.append((module, "rms_norm"))
        elif ("swiglu" in fusions and name in _MLPS and _is_silu(getattr(module, "act_fn", None))
              and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))):
            found.append((module, "swiglu"))
        elif "cross_entropy" in fusions and name in _CAUSAL_LMS and hasattr(module, "model"):
            found.append((module, "cross_entropy"))
    return found


_FORWARDS = {"rms_norm": _rms_norm_forward, "swiglu": _swiglu_forward, "cross_entropy": _causal_lm_forward}


def check_fusions(fusions) -> tuple[str, ...]:
    """`fusions` as a tuple of names: True means all of FUSIONS, False or None none.
    Raises ValueError naming the choices for an unknown name."""
    if fusions is True:
        return FUSIONS
    if fusions is False or fusions is None:
        return ()
    if isinstance(fusions, str):
        fusions = [fusions]
    fusions = tuple(fusions)
    unknown = sorted(set(fusions) - set(FUSIONS))
    if unknown:
        raise ValueError(f"unknown fusion(s) {unknown}; choose from {list(FUSIONS)}, or True / False")
    return fusions


def fuse_model(model: nn.Module, fusions=True) -> dict[str, int]:
    """Installs the fused forwards named in `fusions` (True: all of FUSIONS; or a list of names) on the
    modules of `model` that support them, in place; returns how many modules got each.
    Idempotent. Raises ValueError, changing nothing, for an unknown fusion name."""
    fusions = check_fusions(fusions)
    counts = dict.fromkeys(fusions, 0)
    for module, kind in _targets(model, fusions):
        if getattr(module, _TAG, None) != kind:
            module.forward = types.MethodType(_FORWARDS[kind], module)
            setattr(module, _TAG, kind)
        counts[kind] += 1
    return counts


def unfuse_model(model: nn.Module) -> None:
    """Restores the original forward of every module `fuse_model` changed."""
    for module in model.modules():
        if getattr(module, _TAG, None) is not None:
            module.__dict__.pop("forward", None)
            delattr(module, _TAG)


def fused_ops(model: nn.Module) -> dict[str, int]:
    """How many modules of `model` run each fused forward now."""
    counts: dict[str, int] = {}
    for module in model.modules():
        kind = getattr(module, _TAG, None)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return counts
