"""lora-engine: kernel-accelerated LoRA fine-tuning for Hugging Face transformers."""

from lora_engine.ops import lora_linear, lora_linear_reference

__all__ = ["lora_linear", "lora_linear_reference"]
__version__ = "0.1.0"
