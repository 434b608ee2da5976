"""lora-engine: kernel-accelerated LoRA fine-tuning for Hugging Face transformers."""

from lora_engine.adapters import load_adapter, merge, save_adapter, unmerge, unpatch_model
from lora_engine.checkpointing import enable_gradient_checkpointing, fit_checkpointing, saved_bytes
from lora_engine.fusions import fuse_model, fused_ops, unfuse_model
from lora_engine.layers import LoRALinear
from lora_engine.ops import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
    lora_linear,
    lora_linear_reference,
    rms_norm,
    rms_norm_reference,
    set_base_gemm,
    silu_mul,
    silu_mul_reference,
)
from lora_engine.optim import AdamW8bit
from lora_engine.patch import (
    disable_adapters,
    lora_parameters,
    lora_state_dict,
    patch_model,
    set_adapter,
)
from lora_engine.trainer import TrainConfig, Trainer

__all__ = ["lora_linear", "lora_linear_reference", "set_base_gemm", "AdamW8bit"]
__all__ += [
    "LoRALinear", "patch_model", "unpatch_model", "lora_parameters", "lora_state_dict", "set_adapter",
    "disable_adapters", "save_adapter", "load_adapter", "merge", "unmerge",
]
__all__ += ["rms_norm", "rms_norm_reference", "silu_mul", "silu_mul_reference", "linear_cross_entropy",
            "linear_cross_entropy_reference"]
__all__ += ["fuse_model", "unfuse_model", "fused_ops", "enable_gradient_checkpointing", "fit_checkpointing",
            "saved_bytes"]
__all__ += ["Trainer", "TrainConfig"]
__version__ = "0.1.0"
