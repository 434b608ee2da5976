"""benchmarks/bench_e2e.py's core on CPU: a 2-layer tiny Llama, PEFT and ours, 2 steps each, and the
loss check for 3 steps (ours runs the Triton kernels under the interpreter here; tiny shapes keep it fast)."""

import importlib.util
import math
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "bench_e2e", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, batch=2)
CPU = torch.device("cpu")


def test_train_step_both_peers_two_steps():
    for impl in ("peft", "ours"):
        for lora in bench.LORAS.values():
            model = bench.add_lora(bench.build_model(TINY, CPU, seq=16), impl, lora, bench.DROPOUT, True)
            opt = bench.make_optimizer(bench.trainable(model), CPU)
            ids = torch.randint(0, TINY["vocab_size"], (2, 16))
            losses = [float(bench.train_step(model, ids, opt)) for _ in range(2)]
            assert all(math.isfinite(x) for x in losses), (impl, losses)


def test_loss_check_passes():
    result = bench.loss_check(TINY, CPU, seq=16, layers=2, batch=2, steps=3)
    assert result["passed"], result  # tolerance: CHECK_RTOL (2e-2) of max(loss, 1) per step
