"""Merge benchmark: `merge_lora_` (lora_engine/kernels/merge.py) against PEFT's `LoraLayer.merge`, bf16 weights.

For each weight shape (out × in) and rank r: the median time of one merge (W += s · B A) through
`triton.testing.do_bench`, and the max abs error of each merged bf16 weight against the merge
computed in fp64. LoRA weights are fp32, as PEFT keeps them by default. The "best" column is the
error of rounding the fp64 result to bf16 once, the floor any bf16 merge can reach; "not RN" is the
share of elements that differ from that correctly rounded result.

Run on a GPU: `python benchmarks/bench_merge.py` (PEFT's columns are skipped if peft is missing).
"""

from __future__ import annotations

import sys

import torch
import triton

from lora_engine.kernels.merge import merge_lora_

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out, in): attention, MLP up, MLP down
RANKS = [8, 16, 32, 64]
DTYPE = torch.bfloat16
ALPHA_OVER_R = 2.0

try:
    import peft
    from peft import LoraConfig, get_peft_model
except ImportError:  # the table still shows our kernel
    peft = None


class _OneLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="cuda", dtype=DTYPE)
        self.proj.weight.data.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def make_inputs(out_f: int, in_f: int, r: int, transposed: bool = False):
    """(W (out, in) bf16 — a transposed view for Conv1D's layout —, A (r, in), B (out, r) fp32)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    storage = torch.randn((in_f, out_f) if transposed else (out_f, in_f), device="cuda", generator=g) * 0.02
    weight = storage.to(DTYPE)
    weight = weight.t() if transposed else weight
    lora_a = torch.randn(r, in_f, device="cuda", generator=g) / in_f**0.5
    lora_b = torch.randn(out_f, r, device="cuda", generator=g) * 0.01
    return weight, lora_a, lora_b


def peft_layer(weight, lora_a, lora_b, scale):
    """PEFT's LoRA Linear around a copy of `weight`, holding A and B (fp32, PEFT's default)."""
    r = lora_a.shape[0]
    model = get_peft_model(_OneLinear(weight), LoraConfig(r=r, lora_alpha=scale * r, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    return layer


def peft_merge_once(layer) -> None:
    layer.merge()
    # PEFT refuses to merge an adapter twice; forget that it did, so each timed call is one merge.
    layer.merged_adapters.clear()


def errors(merged: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error vs fp64, share of elements not equal to the correctly rounded result)."""
    max_err = (merged.double() - ref).abs().max().item()
    not_rn = (merged != ref.to(DTYPE)).double().mean().item()
    return max_err, not_rn


def bench_one(out_f: int, in_f: int, r: int, transposed: bool = False) -> dict:
    weight, lora_a, lora_b = make_inputs(out_f, in_f, r, transposed)
    scale = ALPHA_OVER_R
    ref = weight.double() + scale * (lora_b.double() @ lora_a.double())
    row = {"shape": f"{out_f}x{in_f}" + (" (Conv1D)" if transposed else ""), "r": r}
    row["best"] = (ref.to(DTYPE).double() - ref).abs().max().item()

    ours = weight.clone() if not transposed else weight.t().clone().t()
    merge_lora_(ours, lora_a, lora_b, scale)
    row["ours_err"], row["ours_not_rn"] = errors(ours, ref)
    work = weight.clone() if not transposed else weight.t().clone().t()
    row["ours_ms"] = triton.testing.do_bench(lambda: merge_lora_(work, lora_a, lora_b, scale), return_mode="median")

    if peft is not None and not transposed:
        layer = peft_layer(weight, lora_a, lora_b, scale)
        peft_merge_once(layer)
        row["peft_err"], row["peft_not_rn"] = errors(layer.base_layer.weight.data, ref)
        row["peft_ms"] = triton.testing.do_bench(lambda: peft_merge_once(layer), return_mode="median")
    del ref
    torch.cuda.empty_cache()
    return row


def fmt(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def print_table(rows: list[dict]) -> None:
    head = ("weight (out x in)", "r", "ours ms", "peft ms", "speedup", "ours max err", "peft max err",
            "best (1 RN)", "ours not RN", "peft not RN")
    lines = [head]
    for row in rows:
        speedup = f"{row['peft_ms'] / row['ours_ms']:.2f}x" if "peft_ms" in row else "-"
        lines.append((row["shape"], str(row["r"]), fmt(row, "ours_ms", ".4f"), fmt(row, "peft_ms", ".4f"),
                      speedup, fmt(row, "ours_err", ".3e"), fmt(row, "peft_err", ".3e"), fmt(row, "best", ".3e"),
                      fmt(row, "ours_not_rn", ".2%"), fmt(row, "peft_not_rn", ".2%")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print(" | ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_merge.py needs a CUDA GPU (the merge kernel is timed on the device).")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"peft {peft.__version__ if peft else 'NOT INSTALLED: PEFT columns skipped'}")
    print(f"merge W (bf16) += {ALPHA_OVER_R} * B A (fp32 LoRA weights); times: do_bench median; "
          "errors: max |merged - fp64 merge|\n")
    rows = [bench_one(out_f, in_f, r) for out_f, in_f in SHAPES for r in RANKS]
    rows.append(bench_one(4096, 4096, 16, transposed=True))
    print_table(rows)


if __name__ == "__main__":
    main()
