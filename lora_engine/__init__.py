"""lora-engine: kernel-accelerated LoRA fine-tuning for Hugging Face transformers."""

from lora_engine.adapters import load_adapter, merge, save_adapter, unmerge, unpatch_model
from lora_engine.layers import LoRALinear
from lora_engine.ops import lora_linear, lora_linear_reference, set_base_gemm
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
__all__ += ["Trainer", "TrainConfig"]
__version__ = "0.1.0"
