"""Plots bench_e2e.py's rows: tokens/s and peak GiB per row, one panel each, grouped by model + LoRA.

    python benchmarks/plot_e2e.py e2e.jsonl benchmarks/e2e.png

Needs matplotlib (a benchmark-only dependency: `pip install matplotlib`).
"""

from __future__ import annotations

import json
import sys


def load_rows(path: str) -> tuple[dict, list[dict]]:
    env, rows = {}, []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "env":
                env = rec
            elif rec.get("kind") == "row" and rec.get("status") == "ok":
                rows.append(rec)
    return env, rows


def label(r: dict) -> str:
    ckpt = r["ckpt"] + (f" {r['ckpt_layers']}/{r['layers']}" if "ckpt_layers" in r else "")
    return f"{r['model']} {r['lora']} | {r['impl']} | ckpt {ckpt}"


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_e2e.py needs matplotlib: pip install matplotlib") from None
    env, rows = load_rows(sys.argv[1])
    if not rows:
        raise SystemExit(f"{sys.argv[1]} holds no successful rows")
    names = [label(r) for r in rows]
    colors = ["tab:gray" if r["impl"] == "peft" else "tab:blue" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.38 * len(rows) + 1.6), sharey=True)
    y = list(range(len(rows)))[::-1]
    ax1.barh(y, [r["tokens_per_s"] / 1e3 for r in rows], color=colors)
    ax1.set_xlabel("tokens/s (thousands)")
    ax1.set_yticks(y, names, fontsize=8)
    ax2.barh(y, [r["peak_gib"] for r in rows], color=colors)
    ax2.set_xlabel("peak memory (GiB, max_memory_allocated)")
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"LoRA training step, seq {rows[0]['seq']}, bf16 — {env.get('gpu', '?')}, torch {env.get('torch')}, "
                 f"transformers {env.get('transformers')}, peft {env.get('peft')} (gray: PEFT)", fontsize=9)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
