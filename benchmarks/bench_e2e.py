"""Whole LoRA training steps, PEFT against ours (`patch_model`), on random-init Llama-shape models:
tokens/s and peak memory per row, plus a loss-curve check (issue 6). One run, one GPU.

    python benchmarks/bench_e2e.py [--rows 1.1B:qv-r8:on:peft+ours,8B:all-r16:fit:ours] [--steps 8] [--out e2e.jsonl]
    python benchmarks/bench_e2e.py --quick --device cpu --seq 64 --batch 1      # code-path check

Each row builds the model from `LlamaConfig` directly on the device (bf16, HF's normal(0, 0.02) init,
which is fast on the GPU), adds LoRA (PEFT's `get_peft_model` or our `patch_model`) and runs the
same plain loop: forward with labels -> loss -> backward -> fused AdamW(lr 1e-4) on the trainable
(fp32, as both create them) LoRA weights -> zero_grad. Timed: the median over `--steps` steps after
`--warmup` steps (Triton compiles in the warm-up); tokens/s = batch · seq / median;
memory = `torch.cuda.max_memory_allocated` over the timed steps (weights and optimizer state included).
Every (row, peer) gets a fresh model, so no hook or state of one peer leaks into the other
(PEFT registers an input-requires-grad hook on the embeddings when checkpointing is on).

Ours runs in variants, so every gain is attributed: `ours-plain` (the fused LoRA linear alone),
`ours-ce` (+ the chunked linear + cross-entropy head), `ours` (+ fused RMSNorm and SwiGLU: every
fusion). Checkpointing per row: off, on (every layer), offload (every layer, its input kept in CPU
memory), kN (the first N layers), or fit (as few layers
as keep the peak under PEFT-with-checkpointing's peak for that model and LoRA measured earlier in
the same run, else under --budget-gib; `lora_engine.checkpointing.fit_checkpointing`).

The loss check trains PEFT and ours from the same base weights and the same LoRA A/B (B set non-zero,
dropout 0) on the same batches, and compares the loss at every step.
"""

from __future__ import annotations

import os

# Set before torch initialises CUDA. Rows of very different sizes (a 1.1B model, then 16 GB of 8B weights)
# are built and freed in one process: expandable segments let freed blocks be remapped instead of
# fragmenting the cache, so a later row does not OOM on memory that is free but split. It does not
# change `max_memory_allocated` (bytes held by live tensors), the figure reported; both peers share it.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import lora_engine as le  # noqa: E402
from lora_engine.checkpointing import fit_checkpointing  # noqa: E402
from lora_engine.trainer import enable_gradient_checkpointing  # noqa: E402

try:
    import peft
    from peft import LoraConfig, get_peft_model
except Exception:  # the peer is optional: its rows print n/a without it
    peft = None

# Llama-shape models (issue 6): TinyLlama-1.1B and Llama-3-8B sizes, each with its benchmark batch.
SHAPES: dict[str, dict] = {
    "1.1B": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, batch=8),
    "8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, batch=4),
}
LORAS: dict[str, dict] = {
    "qv-r8": dict(targets=["q_proj", "v_proj"], rank=8, alpha=16),
    "all-r16": dict(targets="all-linear", rank=16, alpha=32),  # every linear but lm_head, in both peers
}
DROPOUT = 0.05
LR = 1e-4
# (model, LoRA, checkpointing, peers): PEFT with checkpointing is the reference of each model + LoRA.
DEFAULT_ROWS = [
    ("1.1B", "qv-r8", "off", ("peft", "ours")),
    ("1.1B", "qv-r8", "on", ("peft", "ours-plain", "ours-ce", "ours")),
    ("1.1B", "qv-r8", "fit", ("ours",)),
    ("1.1B", "all-r16", "on", ("peft", "ours-plain", "ours")),
    ("1.1B", "all-r16", "fit", ("ours",)),
    ("8B", "qv-r8", "on", ("peft", "ours-plain", "ours-ce", "ours")),
    ("8B", "qv-r8", "fit", ("ours",)),
    ("8B", "qv-r8", "offload", ("ours",)),
    ("8B", "all-r16", "on", ("peft", "ours-plain", "ours")),
    ("8B", "all-r16", "fit", ("ours",)),
    ("8B", "all-r16", "offload", ("ours",)),
]
# Our variants: which of lora_engine.fusions' fused forwards patch_model installs.
OURS = {"ours-plain": False, "ours-ce": ["cross_entropy"], "ours": True}
IMPLS = ("peft", *OURS)

# Loss check: the 1.1B shape cut to 4 layers, all-r16 (every LoRA layer shape), dropout 0.
# lr 3e-4 over a pool of 4 batches cycled, so the curve moves (the model memorises them) and a wrong
# gradient shows in the loss. The tolerance covers bf16 rounding of two different (correct) paths;
# it is relative to max(loss, 1) because once a tiny pool is memorised (loss < 1, seen on CPU at
# seq 256 with lr 1e-3) the two runs drift apart by ~1e-2 absolute, chaotically, not by a bug.
CHECK_LAYERS, CHECK_BATCH, CHECK_STEPS, CHECK_LR, CHECK_POOL = 4, 2, 50, 3e-4, 4
CHECK_RTOL = 2e-2  # |loss_ours - loss_peft| / max(|loss_peft|, 1) at every step


# ------------------------------------------------------------------------------------------------
# Model, LoRA, step


def build_model(shape: dict, device: torch.device, seq: int, layers: int | None = None, seed: int = 0):
    """A random-init LlamaForCausalLM of `shape` (bf16, on `device`, train mode, no KV cache)."""
    cfg = LlamaConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=layers or shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], vocab_size=shape["vocab_size"],
        max_position_embeddings=max(seq, 2048), use_cache=False, tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    # Parameters are created (and HF-initialised) on the device itself: no CPU copy, no slow CPU init.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.train()


def add_lora(model, impl: str, lora: dict, dropout: float, checkpointing: bool | int, offload: bool = False):
    """The model with LoRA `lora` added by `impl` ("peft" or one of OURS), checkpointing as asked
    (False, True: every layer, or N: the first N layers).

    Checkpointing is HF's, non-reentrant, switched on before the adapters as users do (PEFT then adds
    its input-requires-grad hook itself; non-reentrant checkpointing does not need it).
    """
    if checkpointing is not False:
        enable_gradient_checkpointing(model, 0 if checkpointing is True else int(checkpointing), offload)
    if impl == "peft":
        if peft is None:
            raise RuntimeError("peft is not importable")
        config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=dropout,
                            target_modules=lora["targets"], bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    elif impl in OURS:
        le.patch_model(model, rank=lora["rank"], alpha=lora["alpha"], dropout=dropout, target_modules=lora["targets"],
                       fused=OURS[impl])
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return model.train()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, device: torch.device, lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")


def train_step(model, input_ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One step of the plain loop; returns the (detached) causal-LM loss. input_ids: (batch, seq)."""
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# One benchmark row


def bench_row(shape_name: str, lora_name: str, ckpt: str, impl: str, args, device: torch.device,
              deadline: float, budget_gib: float | None = None) -> dict:
    """Builds, adds LoRA, warms up, times. ckpt: off, on, kN or fit (under `budget_gib`).
    Returns the row (status "ok", "OOM" or "error: ...")."""
    shape = SHAPES[shape_name]
    batch = args.batch or shape["batch"]
    row = dict(kind="row", model=shape_name, lora=lora_name, ckpt=ckpt, impl=impl, batch=batch, seq=args.seq,
               layers=args.layers or shape["num_hidden_layers"], status="ok")
    t_start = time.perf_counter()
    model = optimizer = params = None
    try:
        if ckpt == "fit" and (impl == "peft" or budget_gib is None):
            raise ValueError("ckpt fit is for our variants and needs a budget (a PEFT ckpt-on row first, "
                             "or --budget-gib)")
        model = build_model(shape, device, args.seq, args.layers)
        checkpointing = {"off": False, "on": True, "fit": False, "offload": True}.get(ckpt) if ckpt[0] != "k" \
            else int(ckpt[1:])
        model = add_lora(model, impl, LORAS[lora_name], DROPOUT, checkpointing, offload=ckpt == "offload")
        params = trainable(model)
        row["trainable_params"] = sum(p.numel() for p in params)
        optimizer = make_optimizer(params, device)
        sync(device)
        row["build_s"] = round(time.perf_counter() - t_start, 2)
        gen = torch.Generator(device=device).manual_seed(1234)
        batches = lambda: torch.randint(0, shape["vocab_size"], (batch, args.seq), generator=gen, device=device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            loss = train_step(model, batches(), optimizer)
        if ckpt == "fit":
            ids = batches()

            def forward_backward():
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.zero_grad(set_to_none=True)

            row["budget_gib"] = round(budget_gib, 3)
            row["ckpt_layers"] = fit_checkpointing(model, forward_backward, int(budget_gib * 2**30))
            loss = train_step(model, batches(), optimizer)  # one step in the chosen set-up before timing
        sync(device)
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(args.steps):
            input_ids = batches()
            sync(device)
            t = time.perf_counter()
            loss = train_step(model, input_ids, optimizer)
            sync(device)
            times.append(time.perf_counter() - t)
            if time.perf_counter() > deadline and i + 1 >= min(5, args.steps):
                row["steps_cut_short"] = True  # out of time budget: keep what is measured (≥ 5 steps)
                break
        median = statistics.median(times)
        row.update(steps=len(times), step_ms=round(1e3 * median, 2), step_ms_min=round(1e3 * min(times), 2),
                   tokens_per_s=round(batch * args.seq / median, 1), loss=round(float(loss), 4))
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # one broken row must not lose the others
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        traceback.print_exc(file=sys.stderr)
    finally:
        model = optimizer = params = None  # noqa: F841 (drop the references before freeing the cache)
        free_memory(device)
    row["wall_s"] = round(time.perf_counter() - t_start, 2)
    return row


# ------------------------------------------------------------------------------------------------
# Loss-curve check


def _lora_tensors(model, impl: str) -> dict[str, torch.Tensor]:
    """LoRA A/B parameters keyed by the plain model's module path (`...q_proj.lora_A.default.weight`)."""
    if impl == "ours":
        return dict(le.lora_state_dict(model, keep_vars=True))
    prefix = "base_model.model."
    return {n[len(prefix):]: p for n, p in model.named_parameters() if "lora_" in n and n.startswith(prefix)}


def train_losses(model, pool: list[torch.Tensor], steps: int, device: torch.device) -> list[float]:
    optimizer = make_optimizer(trainable(model), device, lr=CHECK_LR)
    torch.manual_seed(0)
    losses = [float(train_step(model, pool[i % len(pool)], optimizer)) for i in range(steps)]
    del optimizer
    return losses


def loss_check(shape: dict, device: torch.device, seq: int, layers: int, batch: int, steps: int,
               lora_name: str = "all-r16") -> dict:
    """Ours and PEFT over the same `steps` steps and batches from the same base weights and LoRA init
    (A as PEFT draws it, B non-zero so the adapter acts from step 0), dropout 0, no checkpointing."""
    lora = LORAS[lora_name]
    base = build_model(shape, device, seq, layers)
    peft_model = add_lora(copy.deepcopy(base), "peft", lora, 0.0, False)
    ours_model = add_lora(base, "ours", lora, 0.0, False)
    gen = torch.Generator(device=device).manual_seed(7)
    with torch.no_grad():
        src, dst = _lora_tensors(peft_model, "peft"), _lora_tensors(ours_model, "ours")
        if sorted(src) != sorted(dst):
            missing = sorted(set(src) ^ set(dst))[:4]
            raise RuntimeError(f"PEFT and ours wrap different layers ({len(src)} vs {len(dst)} tensors, "
                               f"e.g. {missing})")
        for key, p in src.items():
            if ".lora_B." in key:
                p.normal_(0.0, 0.02, generator=gen)
            dst[key].copy_(p)
    del src, dst
    pool = [torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen, device=device)
            for _ in range(CHECK_POOL)]
    losses_peft = train_losses(peft_model, pool, steps, device)
    del peft_model
    free_memory(device)
    losses_ours = train_losses(ours_model, pool, steps, device)
    del ours_model
    free_memory(device)
    rel = [abs(o - p) / max(abs(p), 1.0) for o, p in zip(losses_ours, losses_peft)]
    worst = max(range(steps), key=rel.__getitem__)
    return dict(kind="loss_check", layers=layers, lora=lora_name, batch=batch, seq=seq, steps=steps, lr=CHECK_LR,
                rtol=CHECK_RTOL, max_rel_diff=max(rel), worst_step=worst + 1,
                max_abs_diff=max(abs(o - p) for o, p in zip(losses_ours, losses_peft)),
                peft_first=losses_peft[0], peft_last=losses_peft[-1], ours_first=losses_ours[0],
                ours_last=losses_ours[-1], passed=max(rel) <= CHECK_RTOL,
                losses_peft=[round(x, 5) for x in losses_peft], losses_ours=[round(x, 5) for x in losses_ours])


# ------------------------------------------------------------------------------------------------
# Output


def emit(record: dict, out: str | None) -> None:
    shown = {k: v for k, v in record.items() if not k.startswith("losses_")}
    print(json.dumps(shown), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def _tok(r: dict | None) -> str:
    if r is None:
        return "–"
    return f"{r['tokens_per_s'] / 1e3:.1f}k" if r["status"] == "ok" else r["status"].split(":")[0]


def _gib(r: dict | None) -> str:
    return f"{r['peak_gib']:.1f}" if r is not None and r["status"] == "ok" and "peak_gib" in r else "–"


def print_table(rows: list[dict]) -> None:
    """One line per row; ratios against PEFT with checkpointing for the same model and LoRA."""
    ref = {(r["model"], r["lora"]): r for r in rows
           if r["impl"] == "peft" and r["ckpt"] == "on" and r["status"] == "ok"}
    hdr = ("| model | LoRA | impl | ckpt | tokens/s | peak GiB "
           "| tokens/s ÷ PEFT-ckpt | memory ÷ PEFT-ckpt |")
    print("\n" + hdr)
    print("|" + " --- |" * (hdr.count("|") - 1))
    for r in rows:
        p = ref.get((r["model"], r["lora"]))
        ok = p is not None and r["status"] == "ok"
        speed = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}×" if ok else "–"
        mem = f"{r['peak_gib'] / p['peak_gib']:.2f}×" if ok and "peak_gib" in r and "peak_gib" in p else "–"
        ckpt = r["ckpt"] + (f" ({r['ckpt_layers']} of {r['layers']})" if "ckpt_layers" in r else "")
        print(f"| {r['model']}, bs {r['batch']} | {r['lora']} | {r['impl']} | {ckpt} | {_tok(r)} | {_gib(r)} "
              f"| {speed} | {mem} |", flush=True)


def parse_rows(text: str | None) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """MODEL:LORA:CKPT[:IMPL+IMPL...] items, comma-separated (default: DEFAULT_ROWS)."""
    if not text or text == "default":
        return list(DEFAULT_ROWS)
    rows = []
    for item in text.split(","):
        parts = item.strip().split(":")
        impls = tuple(parts[3].split("+")) if len(parts) == 4 else ("peft", "ours")
        ckpt_ok = len(parts) >= 3 and (parts[2] in ("on", "off", "fit", "offload") or
                                       (parts[2][:1] == "k" and parts[2][1:].isdigit()))
        if (len(parts) not in (3, 4) or parts[0] not in SHAPES or parts[1] not in LORAS or not ckpt_ok
                or any(i not in IMPLS for i in impls)):
            raise SystemExit(f"--rows: bad row {item!r}; write MODEL:LORA:CKPT[:IMPL+IMPL] with MODEL in "
                             f"{list(SHAPES)}, LORA in {list(LORAS)}, CKPT on|off|fit|offload|kN, "
                             f"IMPL in {list(IMPLS)}")
        rows.append((parts[0], parts[1], parts[2], impls))
    return rows


def environment(device: torch.device) -> dict:
    env = dict(kind="env", device=str(device), torch=torch.__version__, cuda=torch.version.cuda,
               transformers=transformers.__version__, peft=getattr(peft, "__version__", None),
               lora_engine=le.__version__, python=platform.python_version(),
               alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    return env


def main():
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=None,
                    help="comma-separated MODEL:LORA:CKPT, e.g. 1.1B:qv-r8:off,8B:all-r16:on (default: the issue's 5)")
    ap.add_argument("--impls", default=None,
                    help=f"run only these peers of each row, comma-separated, from {list(IMPLS)}")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="memory budget of ckpt=fit rows with no PEFT ckpt-on row before them")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 8; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="2-layer models, 2 timed steps, 5-step loss check")
    ap.add_argument("--layers", type=int, default=None, help="override every model's layer count")
    ap.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    ap.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--loss-steps", type=int, default=None, help=f"loss-check steps (default {CHECK_STEPS}; 0: skip)")
    ap.add_argument("--budget", type=float, default=480.0,
                    help="seconds from start after which rows are skipped or cut to 5 steps (default 480)")
    ap.add_argument("--out", default=None, help="append rows as JSON lines here")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.quick:
        args.layers = args.layers or 2
    args.steps = args.steps or (2 if args.quick else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    loss_steps = args.loss_steps if args.loss_steps is not None else (5 if args.quick else CHECK_STEPS)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()] if args.impls else list(IMPLS)
    if not impls or any(i not in IMPLS for i in impls):
        raise SystemExit(f"--impls: choose from {IMPLS}")
    rows_wanted = parse_rows(args.rows)
    deadline = t_start + args.budget

    env = environment(device)
    print(f"# {env.get('gpu', str(device))} | torch {env['torch']} (CUDA {env['cuda']}) | triton {env['triton']} "
          f"| transformers {env['transformers']} | peft {env['peft']} | lora_engine {env['lora_engine']} "
          f"| python {env['python']} | seq {args.seq} | {args.warmup} warm-up + {args.steps} timed steps "
          f"| alloc {env['alloc_conf']}", flush=True)
    emit(env, args.out)

    check = None
    if loss_steps > 0 and peft is not None and "peft" in impls and any(i in OURS for i in impls):
        layers = min(args.layers or CHECK_LAYERS, CHECK_LAYERS)
        try:
            check = loss_check(SHAPES["1.1B"], device, args.seq, layers, args.batch or CHECK_BATCH, loss_steps)
            emit(check, args.out)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            print(f"loss check: ERROR {type(e).__name__}: {e}", flush=True)
        free_memory(device)

    results: list[dict] = []
    seconds_by_shape: dict[str, float] = {}
    for shape_name, lora_name, ckpt, row_impls in rows_wanted:
        for impl in (i for i in row_impls if i in impls):
            expected = seconds_by_shape.get(shape_name, 0.0)
            if time.perf_counter() + expected > deadline:
                row = dict(kind="row", model=shape_name, lora=lora_name, ckpt=ckpt, impl=impl,
                           batch=args.batch or SHAPES[shape_name]["batch"], status="skipped (time budget)")
            else:
                ref = next((r for r in results if (r["model"], r["lora"], r["impl"], r["ckpt"], r["status"])
                            == (shape_name, lora_name, "peft", "on", "ok")), None)
                budget = ref["peak_gib"] if ref and "peak_gib" in ref else args.budget_gib
                row = bench_row(shape_name, lora_name, ckpt, impl, args, device, deadline, budget)
                seconds_by_shape[shape_name] = max(seconds_by_shape.get(shape_name, 0.0), row["wall_s"])
            results.append(row)
            emit(row, args.out)

    print_table(results)
    if check is not None:
        verdict = "PASS" if check["passed"] else "FAIL"
        print(f"\nloss check ({check['layers']}-layer 1.1B shape, {check['lora']}, dropout 0, bs {check['batch']}, "
              f"seq {check['seq']}, {check['steps']} steps, lr {check['lr']}, same init and batches): "
              f"max |ours − PEFT| / max(PEFT, 1) = {check['max_rel_diff']:.2e} (step {check['worst_step']}), "
              f"max abs {check['max_abs_diff']:.2e}; PEFT {check['peft_first']:.4f} → {check['peft_last']:.4f}, "
              f"ours {check['ours_first']:.4f} → {check['ours_last']:.4f}; tolerance {check['rtol']:.0e}: {verdict}",
              flush=True)
    else:
        print("\nloss check: not run", flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
