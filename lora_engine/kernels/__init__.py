"""Triton kernels and their launchers (installed as `lora_engine.kernels`); no autograd here."""
