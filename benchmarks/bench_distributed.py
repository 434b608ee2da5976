"""The trainer on 1 and 2 GPUs under torchrun (issue 7): tokens/s and peak memory per GPU.

    python benchmarks/bench_distributed.py                         # both rows, on 2 GPUs (and 1)
    python benchmarks/bench_distributed.py --rows lora-1.1B --steps 10 --out dist.jsonl
    python benchmarks/bench_distributed.py --quick --device cpu    # code-path check: tiny model, gloo

Rows (Llama shapes built from `LlamaConfig`, random init, causal-LM on packed random tokens):
- lora-1.1B: TinyLlama-1.1B shape, LoRA q,v r8, seq 2048, pure bf16 base, gradient checkpointing,
  `--batch` rows per GPU; on 1 GPU and on 2 (LoRA grads all-reduced): target 2 GPUs ≥ 1.85× one.
- full-8B: Llama-3-8B shape, full fine-tune, FSDP2 + AdamW8bit + checkpointing, bf16-mixed
  (fp32 sharded master weights, bf16 all-gathers); 2 GPUs only; peak memory per GPU and tokens/s.

Each row is one `torchrun --nproc-per-node N` of this script in worker mode. The worker drives the
real `Trainer` (sharding, loss scaling, gradient all-reduce, optimizer) through `_train_step`, the
loop body, without checkpoints: a model directory holding only config.json and a small tokenizer,
and `load_model` swapped for building the model on the GPU from its config (no 16 GB download or
save). Timed: the median of `--steps` steps after `--warmup` (Triton compiles in the warm-up);
tokens/s counts all ranks' tokens; memory = max over ranks of `torch.cuda.max_memory_allocated`.
NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 for every process.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # the lent H200 machines must not use NVLink multicast
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

SHAPES: dict[str, dict] = {
    "1.1B": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    "8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
# name -> (shape, trainer options, GPU counts)
ROWS: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    "lora-1.1B": ("1.1B", dict(mode="lora", rank=8, targets=["q_proj", "v_proj"], precision="bf16",
                               gradient_checkpointing=True, optimizer="adamw"), (1, 2)),
    "full-8B": ("8B", dict(mode="full", precision="bf16-mixed", gradient_checkpointing=True,
                           optimizer="adamw8bit"), (2,)),
}
TARGET_SPEEDUP = 1.85


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row (default: 2048)")
    p.add_argument("--batch", type=int, default=None, help="rows per GPU (default: 8 for 1.1B, 2 for 8B)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--gpus", type=int, default=2, help="the most processes a row uses (default: 2)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo, for a code-path check")
    p.add_argument("--quick", action="store_true", help="tiny shape, seq 64, 2+2 steps (with --device cpu)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per row before it is killed")
    p.add_argument("--out", help="also append one JSON object per result to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set by the launcher: ROW under torchrun
    args = p.parse_args(argv)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.quick:
        args.seq, args.steps, args.warmup = 64, 2, 2
    return args


def row_batch(args, row: str) -> int:
    shape = ROWS[row][0]
    return args.batch or (1 if args.quick else 8 if shape == "1.1B" else 2)


# ------------------------------------------------------------------------------------------------
# Worker: one row on the torchrun world it was started in


def _model_dir(root: Path, shape: dict):
    """config.json + a 40-word tokenizer: all the Trainer reads from a model directory here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    LlamaConfig(max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                **shape).save_pretrained(root)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(40)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                            eos_token="[EOS]").save_pretrained(root)


def worker(args) -> None:
    import random
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import lora_engine.trainer as T
    from lora_engine import distributed

    world = distributed.launched()
    shape_name, options, _ = ROWS[args.worker]
    shape = SHAPES["tiny" if args.quick else shape_name]
    batch = row_batch(args, args.worker)
    root = Path(tempfile.mkdtemp(prefix=f"bench-dist-{world.rank}-"))
    _model_dir(root, shape)
    rng = random.Random(0)  # the same data on every rank; the trainer gives each rank its own rows
    n_rows = batch * world.size * (args.warmup + args.steps)
    # Each text is seq - 1 words + EOS: exactly one packed block of seq tokens (texts are cut at seq).
    texts = [" ".join(f"w{rng.randrange(40)}" for _ in range(args.seq - 1)) for _ in range(n_rows)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    dtype = torch.bfloat16 if options["precision"] == "bf16" else torch.float32

    def build(path, task, num_labels=None):  # on the rank's device, from the config: no weights file
        device = torch.device("cuda", world.local_rank) if args.device == "cuda" else torch.device("cpu")
        with device:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)

    T.load_model = build
    cfg = T.TrainConfig(model=str(root), data=str(data), task="causal-lm", pack=True, max_length=args.seq,
                        batch_size=batch, max_steps=args.warmup + args.steps, lr=1e-5, progress=False,
                        output=str(root / "out"), device=args.device, **options)
    trainer = T.Trainer(cfg)
    seconds, tokens = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = trainer._train_step()  # synchronises: it reads the loss and grad norm on the host
        if i >= args.warmup:
            # The row's tokens_per_s is all ranks' tokens over rank 0's step time; packed rows are full.
            tokens.append(batch * world.size * args.seq)
            seconds.append(tokens[-1] / row["tokens_per_s"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
    peak = distributed.all_reduce_max(peak, trainer.device)
    step_s = statistics.median(seconds)
    if world.main:
        print("RESULT " + json.dumps({
            "row": args.worker, "gpus": world.size, "seq": args.seq, "batch_per_gpu": batch,
            "tokens_per_s": tokens[0] / step_s, "step_s": step_s, "peak_gib_per_gpu": peak,
            "loss": row["loss"], "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        }), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    distributed.shutdown()


# ------------------------------------------------------------------------------------------------
# Launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, row: str, gpus: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), __file__, "--worker", row, "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    cmd += ["--batch", str(args.batch)] if args.batch else []
    cmd += ["--quick"] if args.quick else []
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"row": row, "gpus": gpus, "error": f"timed out after {args.timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
    return {"row": row, "gpus": gpus, "error": f"exit {done.returncode}: " + " | ".join(tail)}


def table(results: list[dict]) -> str:
    """The results as a text table; a 2-GPU row of a row also run on 1 GPU shows the speed-up."""
    one = {r["row"]: r["tokens_per_s"] for r in results if r.get("gpus") == 1 and "tokens_per_s" in r}
    lines = [f"{'row':<10} {'GPUs':>4} {'batch/GPU':>9} {'seq':>5} {'tokens/s':>10} {'step s':>7} "
             f"{'peak GiB/GPU':>12} {'vs 1 GPU':>9}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['row']:<10} {r['gpus']:>4}  error: {r['error'][:300]}")
            continue
        ratio = ""
        if r["gpus"] > 1 and r["row"] in one:
            x = r["tokens_per_s"] / one[r["row"]]
            ratio = f"{x:.2f}x" + (" ok" if x >= TARGET_SPEEDUP else f" <{TARGET_SPEEDUP}")
        lines.append(f"{r['row']:<10} {r['gpus']:>4} {r['batch_per_gpu']:>9} {r['seq']:>5} "
                     f"{r['tokens_per_s']:>10.0f} {r['step_s']:>7.3f} {r['peak_gib_per_gpu']:>12.1f} {ratio:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = []
    for row in args.rows.split(","):
        for gpus in ROWS[row][2]:
            if gpus > args.gpus:
                continue
            result = launch(args, row, gpus)
            print(json.dumps(result), flush=True)
            results.append(result)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(result) + "\n")
    print(table(results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
