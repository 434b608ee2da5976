"""The training loop: LoRA or full fine-tuning of a Hugging Face model on JSONL data.

    cfg = TrainConfig(model="path/to/model", data="train.jsonl", eval_data="eval.jsonl",
                      task="classification", output="runs/demo")
    Trainer(cfg).train()

`Trainer.train` reads top to bottom like nanoGPT's loop: get the step's micro-batches, forward,
backward, clip, step, log, evaluate, checkpoint. Every option is a small function it calls
(`freeze_first_layers_`, `param_groups`, `distill_loss`, `lr_factor`, ...), not a subclass.

What `--output DIR` holds after a run:

    metrics.jsonl          one JSON object per event: train rows {step, loss, lr, ...},
                           eval rows {step, eval_loss, eval_accuracy | eval_perplexity}
    train_config.yaml      the resolved configuration
    checkpoint-000120/     the latest checkpoint: adapter (PEFT layout) or full weights, plus
                           trainer_state.pt (optimizer, scheduler, RNG, step, early-stop state)
    best-000080/           weights at the best eval so far (the latest checkpoint's best is kept
                           too, until a newer checkpoint)
    adapter/ | model/      the final weights (the best eval's when there was an eval, else the last)
    merged/                with merge=True in LoRA mode: a plain transformers model + tokenizer

Every directory is written under a temporary name and renamed into place, so a crash or Ctrl-C
never leaves a half-written checkpoint; Ctrl-C checkpoints the last finished step, then exits.

Under torchrun (`torchrun --nproc-per-node N -m lora_engine.cli train ...`) each rank runs this
same loop (see `lora_engine.distributed`). `batch_size` is per rank: a step sees
batch_size × N × grad_accum examples, each micro-batch of N × batch_size rows of the epoch's
order split into N contiguous slices, one per rank, so ranks never overlap and the run equals a
single-process one with batch_size × N. LoRA gradients are summed over ranks once per step; full
fine-tuning (and LoRA with `fsdp`) shards the model with FSDP2. Losses, token counts and eval
sums are summed over ranks, so every rank logs and decides (early stop, Ctrl-C) the same. Only
rank 0 writes files and shows the progress bar; checkpoints resume on the same number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from lora_engine import data as D
from lora_engine import distributed as dist
from lora_engine.adapters import load_adapter, save_adapter, unpatch_model
from lora_engine.checkpointing import CheckpointingError, checkpointed_layers, fit_checkpointing
from lora_engine.checkpointing import enable_gradient_checkpointing as _enable_checkpointing
from lora_engine.fusions import fuse_model, fused_lm_loss
from lora_engine.optim import AdamW8bit
from lora_engine.patch import disable_adapters, lora_parameters, lora_state_dict, patch_model

__all__ = ["TrainConfig", "Trainer", "ConfigError", "OutOfMemory", "load_model", "load_tokenizer", "evaluate"]

MODES = ("lora", "full")
OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")
SCHEDULES = ("cosine", "linear", "constant")
STATE_FILE = "trainer_state.pt"


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which option and what to change."""


class OutOfMemory(RuntimeError):
    """The accelerator ran out of memory; the message says what to lower."""


def _opt(default, help: str, group: str, **extra):
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass
class TrainConfig:
    """Every training option, flat, with its default. Each is also a `lora-engine train` flag
    (`eval_data` is `--eval-data`) and a key of a `--config` YAML/JSON file."""

    # data
    model: str = _opt("", "base model: a local Hugging Face model directory", "data", metavar="PATH")
    data: str = _opt("", "training data, JSONL", "data", metavar="FILE")
    eval_data: str | None = _opt(None, "held-out data, JSONL (else see --eval-split)", "data", metavar="FILE")
    eval_split: float = _opt(0.0, "without --eval-data: fraction of --data held out for eval", "data")
    task: str | None = _opt(
        None, "causal-lm ({text}), sft ({prompt, completion}: loss on the completion only) or "
        "classification ({text, label}); default: read from the data's fields", "data",
        choices=D.TASKS)
    num_labels: int | None = _opt(None, "classification: number of classes (default: largest label + 1)", "data")
    max_length: int = _opt(512, "truncate examples to this many tokens (the block size when packing)", "data")
    pack: bool = _opt(False, "causal-lm: pack texts into full max-length blocks instead of padding", "data")
    tokenizer: str | None = _opt(None, "tokenizer directory (default: the model's)", "data", metavar="PATH")
    # model and adapter
    mode: str = _opt("lora", "lora: train low-rank adapters (and a new head); full: train all weights",
                     "model", choices=MODES)
    rank: int = _opt(8, "LoRA rank r", "model")
    alpha: float | None = _opt(None, "LoRA alpha; scaling = alpha / rank (default alpha = 2 * rank)", "model")
    dropout: float = _opt(0.0, "dropout on the LoRA input", "model")
    targets: list[str] | None = _opt(
        None, "modules that get LoRA, comma-separated names (e.g. q_proj,v_proj) or all-linear "
        "(default: the attention query/value projections)", "model", metavar="NAMES")
    use_rslora: bool = _opt(False, "rank-stabilised LoRA: scaling = alpha / sqrt(rank)", "model")
    modules_to_save: list[str] | None = _opt(
        None, "extra modules trained in full beside the adapter (a classification head is added "
        "automatically)", "model", metavar="NAMES")
    freeze_layers: int = _opt(0, "full mode: freeze the embeddings and the first K transformer layers", "model",
                              metavar="K")
    # optimization
    optimizer: str = _opt("adamw", "adamw (torch) or adamw8bit (8-bit states, lora_engine.optim)", "optimization",
                          choices=OPTIMIZERS)
    lr: float = _opt(2e-4, "peak learning rate", "optimization")
    weight_decay: float = _opt(0.0, "decoupled weight decay (matrices only; not biases or norms)", "optimization")
    layer_lr_decay: float = _opt(1.0, "layer-wise lr decay: layer i of L trains at lr * decay^(L - i)",
                                 "optimization", metavar="DECAY")
    schedule: str = _opt("cosine", "lr schedule after warmup", "optimization", choices=SCHEDULES)
    warmup_steps: int = _opt(0, "linear warmup steps", "optimization")
    min_lr_ratio: float = _opt(0.0, "the schedule ends at lr * this", "optimization")
    batch_size: int = _opt(8, "examples per micro-batch (per rank under torchrun)", "optimization")
    grad_accum: int = _opt(1, "micro-batches per optimizer step", "optimization")
    epochs: float = _opt(1.0, "passes over the training data (fractions allowed)", "optimization")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0: use --epochs)", "optimization")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)", "optimization")
    precision: str = _opt("fp32", "fp32; bf16-mixed / fp16-mixed (autocast); bf16 (pure bf16 base weights)",
                          "optimization", choices=PRECISIONS)
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (HF's, non-reentrant)",
                                        "optimization")
    checkpoint_layers: int = _opt(0, "with --gradient-checkpointing: recompute only the first K transformer "
                                  "layers and keep the rest's activations (0: all layers)", "optimization",
                                  metavar="K")
    checkpoint_budget_gib: float = _opt(0.0, "with --gradient-checkpointing on CUDA: recompute only as many layers "
                                        "as keep a step's peak memory under this many GiB (measured on the first "
                                        "batch; 0: off)", "optimization", metavar="GIB")
    checkpoint_offload: bool = _opt(False, "with --gradient-checkpointing on CUDA: keep each checkpointed layer's "
                                    "input in CPU memory (less GPU memory, the time of the copies); one GPU or DDP",
                                    "optimization")
    fused: bool = _opt(True, "fused kernels for RMSNorm, SwiGLU and the LM head + loss (Llama, Mistral, Qwen2; "
                       "other models are unchanged)", "optimization")
    fsdp: bool = _opt(False, "under torchrun in LoRA mode: shard the model with FSDP2, for models that do not "
                      "fit one GPU (full mode always shards)", "optimization")
    seed: int = _opt(0, "seed for weights init, data order, dropout", "optimization")
    # forgetting
    kd_weight: float = _opt(0.0, "LoRA LM tasks: weight of a distillation term against the base model "
                            "(adapters disabled, no second copy)", "forgetting")
    kd_temperature: float = _opt(2.0, "distillation temperature", "forgetting")
    replay_data: str | None = _opt(None, "JSONL of general examples mixed into every batch", "forgetting",
                                   metavar="FILE")
    replay_fraction: float = _opt(0.0, "fraction of each batch drawn from --replay-data", "forgetting")
    # eval and output
    eval_every: int = _opt(0, "evaluate every N steps (and always at the end)", "output", metavar="N")
    eval_before: bool = _opt(False, "also evaluate before the first step (logged as step 0)", "output")
    patience: int = _opt(0, "stop after N evals without improvement (0: never stop early)", "output",
                         metavar="N")
    output: str = _opt("runs/lora-engine", "output directory", "output", metavar="DIR")
    save_every: int = _opt(0, "checkpoint every N steps (always at the end and on Ctrl-C)", "output",
                           metavar="N")
    resume: bool = _opt(False, "continue from the latest checkpoint in --output", "output")
    overwrite: bool = _opt(False, "start over in an --output that already holds a run", "output")
    merge: bool = _opt(False, "LoRA: also write merged/, a plain transformers model", "output")
    log_every: int = _opt(1, "write a train row to metrics.jsonl every N steps", "output", metavar="N")
    progress: bool = _opt(True, "show a progress bar", "output")
    device: str = _opt("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...", "output")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from a dict (keys may use - or _); unknown keys and bad types raise ConfigError."""
        return cls(**_coerce_all(values, source))

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainConfig:
        """Reads a YAML or JSON file of options; `overrides` (e.g. from CLI flags) win."""
        return cls.from_dict({**read_config_file(path), **overrides}, str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Checks the options against each other; raises ConfigError naming the option to change."""
        def bad(msg):
            raise ConfigError(msg)

        if not self.model:
            bad("no model given: pass --model PATH (a local Hugging Face model directory)")
        if not self.data:
            bad("no training data given: pass --data FILE (JSONL)")
        for name, choices in (("task", D.TASKS), ("mode", MODES), ("optimizer", OPTIMIZERS),
                              ("precision", PRECISIONS), ("schedule", SCHEDULES)):
            value = getattr(self, name)
            if value is not None and value not in choices:
                bad(f"{name} {value!r} is not one of {', '.join(choices)}")
        for name in ("rank", "max_length", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                bad(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "patience", "freeze_layers",
                     "checkpoint_layers"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            bad(f"lr must be > 0, got {self.lr}")
        if self.epochs <= 0 and not self.max_steps:
            bad("epochs must be > 0 (or give max_steps)")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            bad(f"layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            bad(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.num_labels is not None and self.num_labels < 2:
            bad(f"num_labels must be at least 2, got {self.num_labels}")
        if not 0.0 <= self.replay_fraction < 1.0:
            bad(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if (self.replay_fraction > 0) != bool(self.replay_data):
            bad("replay needs both --replay-data FILE and --replay-fraction > 0")
        if self.replay_fraction > 0 and round(self.replay_fraction * self.batch_size) >= self.batch_size:
            bad(f"replay_fraction {self.replay_fraction} leaves no room for training rows in a batch of "
                f"{self.batch_size}; lower it or raise --batch-size")
        if self.kd_weight < 0 or self.kd_temperature <= 0:
            bad("kd_weight must be >= 0 and kd_temperature > 0")
        if self.kd_weight > 0 and self.mode != "lora":
            bad("distillation (kd_weight > 0) needs mode lora: the teacher is the base model with the "
                "adapters disabled, which full fine-tuning overwrites")
        if self.kd_weight > 0 and self.task == "classification":
            bad("distillation (kd_weight > 0) applies to causal-lm and sft: a new classification head "
                "has no base-model teacher")
        if self.freeze_layers and self.mode != "full":
            bad("freeze_layers applies to mode full (in LoRA mode the base weights are frozen already)")
        if self.merge and self.fsdp:
            bad("merge with fsdp: the sharded weights cannot be merged in place; run `lora-engine merge` "
                "on the adapter afterwards")
        if self.merge and self.mode != "lora":
            bad("merge applies to mode lora (a full fine-tune already writes a plain model to model/)")
        if self.eval_split and self.eval_data:
            bad("give either --eval-data or --eval-split, not both")
        if self.eval_split and not 0.0 < self.eval_split < 1.0:
            bad(f"eval_split must be in (0, 1), got {self.eval_split}")
        if self.pack and self.task not in (None, "causal-lm"):
            bad("pack applies to task causal-lm only")
        if self.resume and self.overwrite:
            bad("--resume and --overwrite contradict each other: pick one")
        if ((self.checkpoint_layers or self.checkpoint_budget_gib or self.checkpoint_offload)
                and not self.gradient_checkpointing):
            bad("checkpoint_layers, checkpoint_budget_gib and checkpoint_offload apply with "
                "--gradient-checkpointing; add it")
        if self.checkpoint_offload and self.fsdp:
            bad("checkpoint_offload does not combine with fsdp (FSDP2 gathers weights around each layer); "
                "drop one of them")
        if self.checkpoint_budget_gib < 0:
            bad(f"checkpoint_budget_gib must be >= 0, got {self.checkpoint_budget_gib}")
        if self.checkpoint_layers and self.checkpoint_budget_gib:
            bad("give --checkpoint-layers or --checkpoint-budget-gib, not both")


def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """value converted to the field's type (YAML reads 2e-4 as a string, flags arrive as strings)."""
    if value is None:
        if "None" in str(hint):
            return None
        raise ConfigError(f"{source}: {name} cannot be empty")
    text = str(hint)
    try:
        if "list[str]" in text:
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [str(s).strip() for s in items if str(s).strip()]
            return items or None
        if text.startswith("bool") or hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if "float" in text:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if "int" in text:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        return str(value)
    except (TypeError, ValueError):
        kind = getattr(hint, "__name__", text.replace(" | None", ""))
        raise ConfigError(f"{source}: {name} should be {kind}, got {value!r}") from None


def _coerce_all(values: dict[str, Any], source: str) -> dict[str, Any]:
    hints = _field_types()
    out = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in hints:
            near = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean {near[0].replace('_', '-')!r}?)" if near else ""
            raise ConfigError(f"{source}: unknown option {raw_key!r}{hint}")
        out[key] = _coerce(key, value, hints[key], source)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a YAML or JSON file (a mapping of option name to value)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML/JSON ({e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    return values


# ------------------------------------------------------------------------------------------------
# Loading the model, tokenizer and data


def load_tokenizer(path: str):
    """The tokenizer in `path`, with a pad token (EOS when the tokenizer defines none)."""
    from transformers import AutoTokenizer

    try:
        # A path that is not a local directory is looked up in the HF cache only: no download.
        tok = AutoTokenizer.from_pretrained(path, local_files_only=not Path(path).is_dir())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {path!r}: pass --tokenizer PATH ({e})") from None
    if tok.pad_token_id is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise ConfigError(f"the tokenizer in {path} has neither a pad nor an EOS token")
    return tok


def load_model_config(path: str):
    """The model's transformers config; ConfigError for a path that is not a model."""
    from transformers import AutoConfig

    local = Path(path)
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"model path {path!r} has no config.json: pass a Hugging Face model directory")
    try:
        # A path that is not a local directory is looked up in the HF cache only: no download.
        return AutoConfig.from_pretrained(path, local_files_only=not local.is_dir())
    except (OSError, ValueError):
        raise ConfigError(
            f"unknown model {path!r}: no such directory, and not in the Hugging Face cache "
            "(lora-engine never downloads: pass a local model directory)"
        ) from None


def load_model(path: str, task: str, num_labels: int | None = None) -> nn.Module:
    """A causal LM (causal-lm, sft) or a sequence classifier (classification) from a local directory.

    For classification a checkpoint without a head gets a new one with `num_labels` outputs.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = load_model_config(path)
    offline = not Path(path).is_dir()
    kwargs = {}
    if task == "classification":
        if num_labels and num_labels != config.num_labels:
            # A head of another size in the checkpoint is replaced by a new one.
            config.num_labels = num_labels
            config.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            config.label2id = {v: k for k, v in config.id2label.items()}
            kwargs["ignore_mismatched_sizes"] = True
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    try:
        return auto.from_pretrained(path, config=config, local_files_only=offline, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot load {path!r} as a {auto.__name__[9:]} model: {e}") from None


def enable_gradient_checkpointing(model: nn.Module, layers: int = 0, offload: bool = False) -> None:
    """`checkpointing.enable_gradient_checkpointing`, its errors as ConfigError (the CLI prints them)."""
    try:
        _enable_checkpointing(model, layers, offload)
    except CheckpointingError as e:
        raise ConfigError(str(e)) from None


def classification_head(model: nn.Module) -> str:
    """The name of a sequence classifier's head module (`classifier`, `score`, ...)."""
    for name in ("classifier", "score", "classification_head", "logits_proj"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ConfigError(
        f"cannot find the classification head of {type(model).__name__}; name it with --modules-to-save"
    )


@dataclass
class Datasets:
    train: list[D.Example]
    eval: list[D.Example] | None
    replay: list[D.Example] | None
    task: str
    num_labels: int | None


def load_datasets(cfg: TrainConfig, tokenizer) -> Datasets:
    """Reads, checks and tokenizes the train / eval / replay files (errors name file and line)."""
    rows = D.read_jsonl(cfg.data)
    task = cfg.task or D.infer_task(rows, cfg.data)
    eval_rows = D.read_jsonl(cfg.eval_data) if cfg.eval_data else None
    replay_rows = D.read_jsonl(cfg.replay_data) if cfg.replay_data else None
    num_labels = cfg.num_labels
    if task == "classification" and num_labels is None:
        labels = [r.get("label") for _, r in rows if isinstance(r.get("label"), int)]
        num_labels = max(2, max(labels, default=0) + 1)
    if task != "classification" and num_labels is not None:
        raise ConfigError(f"num_labels applies to task classification, not {task}")

    def tokenize(rs, path):
        return D.tokenize_rows(rs, path, tokenizer, task, cfg.max_length, num_labels)

    train = tokenize(rows, cfg.data)
    held = tokenize(eval_rows, cfg.eval_data) if eval_rows else None
    replay = tokenize(replay_rows, cfg.replay_data) if replay_rows else None
    if cfg.eval_split:
        train, held = D.split_examples(train, cfg.eval_split, cfg.seed)
    if cfg.pack:
        train = D.pack_examples(train, cfg.max_length)
        replay = D.pack_examples(replay, cfg.max_length) if replay else None
    return Datasets(train, held, replay, task, num_labels)


# ------------------------------------------------------------------------------------------------
# Options as small functions


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embeddings|embed_tokens|embed_positions|wte|wpe)(?:\.|$)")


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for transformer layer i, num_layers + 1 for the rest (head, final norm)."""
    m = _LAYER_INDEX.search(name)
    if m:
        return int(m.group(1)) + 1
    return 0 if _EMBEDDING.search(name) else num_layers + 1


def count_layers(model: nn.Module) -> int:
    found = {int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER_INDEX.search(n))}
    return max(found) + 1 if found else 0


def freeze_first_layers_(model: nn.Module, k: int) -> None:
    """Full mode: freezes the embeddings and transformer layers 0..k-1 (a tied LM head with them)."""
    num_layers = count_layers(model)
    if k > num_layers:
        raise ConfigError(f"freeze_layers={k} but the model has {num_layers} transformer layers")
    for name, p in model.named_parameters():
        if layer_depth(name, num_layers) <= k:
            p.requires_grad_(False)


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_lr_decay: float) -> list[dict]:
    """Optimizer groups of the trainable parameters: matrices decay, biases/norms do not; with
    layer_lr_decay < 1 each parameter's lr is lr * decay^(L + 1 - depth) (embeddings lowest)."""
    num_layers = count_layers(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = layer_depth(name, num_layers) if layer_lr_decay < 1.0 else num_layers + 1
        decays = p.dim() >= 2 and weight_decay > 0
        group = groups.setdefault((depth, decays), {
            "params": [], "names": [], "weight_decay": weight_decay if decays else 0.0,
            "lr": lr * layer_lr_decay ** (num_layers + 1 - depth),
        })
        group["params"].append(p)
        group["names"].append(name)
    if not groups:
        raise ConfigError("no trainable parameters (check --targets, --freeze-layers)")
    return [groups[k] for k in sorted(groups)]


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if cfg.optimizer == "adamw8bit":
        # Pure bf16 weights: stochastic rounding keeps updates smaller than a bf16 ulp on average.
        return AdamW8bit(groups, lr=cfg.lr, stochastic_rounding=cfg.precision == "bf16")
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier on each group's lr for optimizer step `step` (0-based): linear warmup from
    1/(warmup+1), then cosine or linear decay to min_ratio at the last step, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, number of targets). LM: logits (B, T, V) predict labels shifted by one
    (-100 skipped); classification: logits (B, C), labels (B,) (-100 skipped too)."""
    if task == "classification":
        loss = F.cross_entropy(logits.float(), labels, ignore_index=D.IGNORE_INDEX, reduction="sum")
        return loss, int((labels != D.IGNORE_INDEX).sum())
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                           ignore_index=D.IGNORE_INDEX, reduction="sum")
    return loss, int((targets != D.IGNORE_INDEX).sum())


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Summed T² · KL(teacher_T ‖ student_T) over the LM target positions; logits (B, T, V)."""
    keep = (labels[:, 1:] != D.IGNORE_INDEX).flatten()
    s = student[:, :-1].flatten(0, 1)[keep].float() / temperature
    t = teacher[:, :-1].flatten(0, 1)[keep].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return kl * temperature**2


def evaluate(model: nn.Module, examples: list[D.Example], task: str, pad_id: int, batch_size: int = 8,
             device: torch.device | str = "cpu", autocast=contextlib.nullcontext, before_batch=None):
    """eval_loss (mean over target tokens, or examples) plus eval_accuracy (classification) or
    eval_perplexity (LM), with the model in eval mode (restored to train mode after)."""
    sums = eval_sums(model, examples, task, pad_id, batch_size, device, autocast, before_batch)
    return eval_metrics(*sums, len(examples), task)


def eval_metrics(loss_sum: float, n_sum: float, correct: float, n_examples: int, task: str) -> dict[str, float]:
    metrics = {"eval_loss": loss_sum / max(1, n_sum)}
    if task == "classification":
        metrics["eval_accuracy"] = correct / n_examples
    else:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))
    return metrics


@torch.no_grad()
def eval_sums(model: nn.Module, examples: list[D.Example], task: str, pad_id: int, batch_size: int = 8,
              device: torch.device | str = "cpu", autocast=contextlib.nullcontext, before_batch=None):
    """(summed loss, targets, correct predictions) over `examples`; `masked` examples count nothing."""
    was_training = model.training
    model.eval()
    try:
        loss_sum, n_sum, correct = 0.0, 0, 0
        for start in range(0, len(examples), batch_size):
            if before_batch is not None:
                before_batch()
            batch = D.collate(examples[start : start + batch_size], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n = task_loss(logits, batch["labels"], task)
            loss_sum, n_sum = loss_sum + loss.item(), n_sum + n
            if task == "classification":
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
    finally:
        model.train(was_training)
    return loss_sum, n_sum, correct


def masked(example: D.Example) -> D.Example:
    """A copy of `example` with every target ignored: it runs through the model (keeping ranks in
    step, FSDP's all-gathers need every rank) but adds nothing to losses, counts or gradients."""
    labels = [D.IGNORE_INDEX] * len(example.labels) if example.labels is not None else None
    label = D.IGNORE_INDEX if example.label is not None else None
    return D.Example(example.input_ids, labels, label, example.where)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or on CPU the process's peak resident set (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yields a temporary directory beside `target`; on success it replaces `target` whole."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _clean_stale(directory: Path) -> None:
    """Removes what a killed atomic_dir / write_text_atomic left: temporaries, and an old version
    set aside (put back where the new one never arrived, so the target is never lost)."""
    for stale in directory.glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    for old in directory.glob(".*.old-*"):
        target = directory / old.name[1:].rsplit(".old-", 1)[0]
        if not target.exists():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _checkpoints(output: Path) -> list[Path]:
    found = [p for p in output.glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


_RUN_FILES = ("metrics.jsonl", "train_config.yaml", "adapter", "model", "merged")


def _best_dirs(output: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in output.glob("best-*") if p.is_dir()}


# Options that may change between a run and its --resume without changing the math of the steps.
# Not eval_split (it decides which rows train) nor eval_data (the evals pick the best weights).
_RESUMABLE = {"resume", "overwrite", "merge", "progress", "log_every", "eval_every", "save_every",
              "patience", "max_steps", "epochs", "output", "device", "eval_before"}


class _Interrupted(Exception):
    pass


_LORA_KEY = re.compile(r"^(.*)\.(lora_A|lora_B|modules_to_save)\.[^.]+\.(.*)$")


def _adapter_keys(model: nn.Module) -> dict[str, str]:
    """{key in the adapter file (PEFT layout): the live model's state_dict key} of the active adapter."""
    out = {}
    for key in lora_state_dict(model):
        path, attr, rest = _LORA_KEY.match(key).groups()
        out[f"base_model.model.{path}.{attr + '.' if attr != 'modules_to_save' else ''}{rest}"] = key
    return out


def _local_optimizer_state(state_dict: dict) -> dict:
    """An optimizer state_dict with each DTensor replaced by this rank's shard, on CPU (to gather)."""
    def plain(v):
        return dist.local(v).detach().cpu() if torch.is_tensor(v) else v

    return {**state_dict, "state": {k: {n: plain(v) for n, v in s.items()} for k, s in state_dict["state"].items()}}


@torch.no_grad()
def _dtensor_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """After loading `_local_optimizer_state`: torch's optimizers keep DTensor states for DTensor
    params (exp_avg...), so each shard shaped like its param's is made a DTensor again."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not dist.is_dtensor(p):
                continue
            state = optimizer.state.get(p, {})
            for name, v in state.items():
                if torch.is_tensor(v) and not dist.is_dtensor(v) and v.shape == p.to_local().shape:
                    state[name] = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape,
                                                     stride=p.stride(), run_check=False)


# ------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Loads everything `cfg` names and checks it (before anything is written), then `train()`."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        try:
            self.world, self.device = dist.setup(cfg.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # FSDP2 for full fine-tuning, and for LoRA when asked; else LoRA grads are all-reduced.
        self.sharded = self.world.distributed and (cfg.mode == "full" or cfg.fsdp)
        # FSDP2 averages gradients over ranks where we want their sum: scale the loss by the world
        # size (a power of two in practice, so exact).
        self._grad_scale = self.world.size if self.sharded else 1
        if self.sharded and cfg.precision == "fp16-mixed":
            raise ConfigError("fp16-mixed needs a GradScaler that knows FSDP's sharded gradients: use "
                              "bf16-mixed or bf16 under torchrun with full mode or --fsdp")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {cfg.device!r}: no CUDA GPU is visible (use --device cpu or auto)")
        self.output = Path(cfg.output)
        self._resume_from = self._check_output()
        load_model_config(cfg.model)  # an unknown model fails here, before reading any data
        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.data = load_datasets(cfg, self.tokenizer)
        self.task = self.data.task
        if cfg.kd_weight > 0 and self.task == "classification":
            raise ConfigError("distillation (kd_weight > 0) applies to causal-lm and sft, not classification")
        if cfg.pack and self.task != "causal-lm":
            raise ConfigError("pack applies to task causal-lm only")

        self.n_replay = round(cfg.replay_fraction * cfg.batch_size) if self.data.replay else 0
        self.rows_per_batch = cfg.batch_size - self.n_replay
        # One micro-batch index covers world.size × rows_per_batch rows of the epoch's order.
        self.batches_per_epoch = D.batches_per_epoch(len(self.data.train), self.rows_per_batch * self.world.size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum))

        torch.manual_seed(cfg.seed)  # the new head's and LoRA's initial weights
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = self._build_model()
        if self.world.distributed:
            # Each rank draws its own dropout masks (the weights above are the same on every rank).
            torch.manual_seed(cfg.seed + 7_919 * self.world.rank)
        self.groups = param_groups(self.model, cfg.lr, cfg.weight_decay, cfg.layer_lr_decay)
        self.optimizer = make_optimizer(self.groups, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, self.total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16-mixed")
        self.step = 0
        self._checkpointing_fitted = not cfg.checkpoint_budget_gib
        self.best: tuple[float, int, dict] | None = None  # (score, step, eval metrics)
        self.bad_evals = 0
        self.early_stopped = False  # saved in checkpoints: a resumed early-stopped run is finished
        self._made_output = False  # train() created --output (removed again if it fails before a checkpoint)
        self._checkpoint_best: int | None = None  # step of the best weights the last checkpoint refers to
        self.last_eval: tuple[int | None, dict[str, float]] = (None, {})  # (step, metrics)
        self._rng_after_step = rng_state(self.device)
        self._order_cache: tuple[int, list[int]] | None = None
        self._stop_requested = False
        if self._resume_from is not None:
            self._load_checkpoint(self._resume_from)

    # -- setup ----------------------------------------------------------------------------------

    def _check_output(self) -> Path | None:
        """The checkpoint to resume from (or None); refuses to overwrite a run without --overwrite."""
        cfg, out = self.cfg, self.output
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output {out} exists and is not a directory")
        checkpoints = _checkpoints(out) if out.is_dir() else []
        if cfg.resume:
            if not checkpoints:
                raise ConfigError(f"--resume: no checkpoint in {out} to resume from")
            return checkpoints[-1]
        existing = checkpoints + [out / n for n in _RUN_FILES if (out / n).exists()]
        existing += list(_best_dirs(out).values()) if out.is_dir() else []
        if existing and not cfg.overwrite:
            raise ConfigError(
                f"{out} already holds a run ({existing[0].name}); pass --resume to continue it, "
                "--overwrite to start over, or another --output"
            )
        return None

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        model = load_model(cfg.model, self.task, self.data.num_labels)
        if self.task == "classification":
            n_out = model.config.num_labels
            if n_out != self.data.num_labels:
                raise ConfigError(f"the model's head has {n_out} labels but the data needs {self.data.num_labels}")
            if model.config.pad_token_id is None:
                model.config.pad_token_id = self.pad_id  # decoder classifiers pool the last non-pad token
        if cfg.precision == "bf16":
            model.to(torch.bfloat16)  # LoRA weights, made after this, stay fp32 (as PEFT)
        model.to(self.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model, cfg.checkpoint_layers, cfg.checkpoint_offload)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        if cfg.mode == "lora":
            saved = list(cfg.modules_to_save or [])
            if self.task == "classification":
                head = classification_head(model)
                saved += [head] if head not in saved else []
            try:
                patch_model(model, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, fused=False,
                            target_modules=self._targets(), use_rslora=cfg.use_rslora,
                            modules_to_save=saved or None)
            except ValueError as e:
                raise ConfigError(f"cannot add LoRA to {cfg.model}: {e}") from None
        elif cfg.freeze_layers:
            freeze_first_layers_(model, cfg.freeze_layers)
        if cfg.fused:
            fuse_model(model)
        if self.sharded:
            dist.shard_model_(model, torch.bfloat16 if cfg.precision == "bf16-mixed" else None)
        elif self.world.distributed:
            dist.broadcast_params_([p for p in model.parameters() if p.requires_grad])
        model.train()
        return model

    def _targets(self):
        targets = self.cfg.targets
        return targets[0] if targets and len(targets) == 1 and targets[0] == "all-linear" else targets

    # -- data -----------------------------------------------------------------------------------

    def _micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        """This rank's part of micro-batch `index`: a pure function of (seed, index, rank), so resume
        repeats it. Rank r takes slice r of the index's world.size × rows_per_batch rows."""
        epoch, pos = divmod(index, self.batches_per_epoch)
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, D.epoch_order(len(self.data.train), self.cfg.seed, epoch))
        order = self._order_cache[1]
        start = (pos * self.world.size + self.world.rank) * self.rows_per_batch
        rows = [self.data.train[i] for i in order[start : start + self.rows_per_batch]]
        if not rows:
            # The epoch's last, short micro-batch left nothing for this rank: run a row that counts
            # nothing, so this rank's collectives stay in step with the others'.
            rows = [masked(self.data.train[order[0]])]
        if self.n_replay:
            replay = self.data.replay
            which = index * self.world.size + self.world.rank  # its own replay rows on each rank
            rows += [replay[i] for i in D.replay_rows(len(replay), self.n_replay, self.cfg.seed, which)]
        return {k: v.to(self.device) for k, v in D.collate(rows, self.pad_id).items()}

    def _autocast(self):
        p = self.cfg.precision
        if p in ("bf16-mixed", "fp16-mixed"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16-mixed" else torch.float16)
        return contextlib.nullcontext()

    # -- one step -------------------------------------------------------------------------------

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(summed task loss, summed distillation term or None, targets) for one micro-batch."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        teacher = None
        if self.cfg.kd_weight > 0:
            with torch.no_grad(), disable_adapters(self.model), self._autocast():
                self.model.eval()  # a deterministic teacher; dropout would only add noise
                teacher = self.model(**inputs).logits
                self.model.train()
        if teacher is None and self.task != "classification" and fused_lm_loss(self.model):
            # The fused head + loss: summed over the targets (num_items_in_batch=1), logits never formed.
            with self._autocast():
                loss = self.model(**inputs, labels=batch["labels"], num_items_in_batch=1).loss
            return loss, None, self._count_targets(batch)
        with self._autocast():
            logits = self.model(**inputs).logits
        loss, n = task_loss(logits, batch["labels"], self.task)
        kd = distill_loss(logits, teacher, batch["labels"], self.cfg.kd_temperature) if teacher is not None else None
        return loss, kd, n

    def _fit_checkpointing(self, batch) -> None:
        """Picks how many layers to recompute for --checkpoint-budget-gib from one measured forward +
        backward of `batch`; its gradients are dropped and the RNG streams left as they were."""
        cfg = self.cfg
        if self.device.type != "cuda":
            raise ConfigError("--checkpoint-budget-gib measures CUDA memory: run on a GPU, or give "
                              "--checkpoint-layers K instead")

        def forward_backward():
            loss, kd, _ = self._forward(batch)
            (loss + cfg.kd_weight * kd if kd is not None else loss).backward()

        with torch.random.fork_rng(devices=[self.device]):
            try:
                k = fit_checkpointing(self.model, forward_backward, int(cfg.checkpoint_budget_gib * 2**30),
                                      offload=cfg.checkpoint_offload)
            except CheckpointingError as e:
                raise ConfigError(str(e)) from None
            finally:
                self.optimizer.zero_grad(set_to_none=True)
        self._checkpointing_fitted = True
        if cfg.progress and self.world.main:
            n = len(checkpointed_layers(self.model))
            print(f"checkpointing: {k} of {n} layers recomputed to stay under {cfg.checkpoint_budget_gib:g} GiB",
                  file=sys.stderr)

    def _train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the train row to log."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batches = [self._micro_batch(self.step * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
        if not self._checkpointing_fitted:
            self._fit_checkpointing(batches[0])
        # Normalise by the step's total number of targets, so every target token (or example)
        # weighs the same however the micro-batches split them.
        # Under torchrun: the targets of all ranks, and the gradients summed over ranks.
        n_total = int(dist.all_reduce_sum([sum(self._count_targets(b) for b in batches)], self.device)[0])
        # Summed on the device in float64 (the same adds as Python floats): one sync per step, not
        # one per micro-batch.
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in batches:
            loss, kd, _ = self._forward(batch)
            objective = loss + cfg.kd_weight * kd if kd is not None else loss
            self.scaler.scale(objective * self._grad_scale / max(1, n_total)).backward()
            sums[0] += loss.detach().double()
            if kd is not None:
                sums[1] += kd.detach().double()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.world.distributed and not self.sharded:
            dist.all_reduce_grads_(params)  # FSDP2 reduce-scatters in backward instead
        self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        lr = self.optimizer.param_groups[-1]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._rng_after_step = rng_state(self.device)
        # Read back once the optimizer's work is queued, so the host does not wait before it.
        loss_sum, kd_sum = sums.tolist()
        grad_norm = float(grad_norm.full_tensor() if dist.is_dtensor(grad_norm) else grad_norm)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        if self.world.distributed:
            loss_sum, kd_sum, tokens = dist.all_reduce_sum([loss_sum, kd_sum, tokens], self.device)
        seconds = time.perf_counter() - t0
        row = {"step": self.step, "epoch": round(self.step * cfg.grad_accum / self.batches_per_epoch, 4),
               "loss": (loss_sum + cfg.kd_weight * kd_sum) / max(1, n_total), "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": tokens / seconds, "peak_mem_mb": round(peak_memory_mb(self.device), 1)}
        if cfg.kd_weight > 0:
            row["task_loss"] = loss_sum / max(1, n_total)
            row["kd_loss"] = kd_sum / max(1, n_total)
        return row

    def _count_targets(self, batch) -> int:
        labels = batch["labels"] if self.task == "classification" else batch["labels"][:, 1:]
        return int((labels != D.IGNORE_INDEX).sum())

    # -- eval -----------------------------------------------------------------------------------

    def evaluate(self, examples: list[D.Example] | None = None) -> dict[str, float]:
        """eval_loss plus eval_accuracy (classification) or eval_perplexity (LM) over `examples`
        (default: the eval set)."""
        examples = examples if examples is not None else self.data.eval
        if not examples:
            raise ConfigError("no eval data: pass --eval-data or --eval-split")

        def check_stop():
            if self._stop_requested:
                raise _Interrupted

        if not self.world.distributed:
            return evaluate(self.model, examples, self.task, self.pad_id, self.cfg.batch_size, self.device,
                            self._autocast, check_stop)
        # Rank r evaluates examples r, r + N, ...; every rank runs as many batches (padded with rows
        # that count nothing, for FSDP's all-gathers), and the sums are added over ranks. Ctrl-C is
        # only honoured between steps here, where all ranks agree on it.
        size, rank = self.world.size, self.world.rank
        mine = examples[rank::size]
        mine += [masked(examples[0])] * (math.ceil(len(examples) / size) - len(mine))
        sums = eval_sums(self.model, mine, self.task, self.pad_id, self.cfg.batch_size, self.device, self._autocast)
        return eval_metrics(*dist.all_reduce_sum(list(sums), self.device), len(examples), self.task)

    def _metric(self, metrics: dict[str, float]) -> float:
        """The early-stopping score, higher is better: accuracy, or minus the eval loss."""
        return metrics["eval_accuracy"] if self.task == "classification" else -metrics["eval_loss"]

    def _after_eval(self, metrics: dict[str, float]) -> bool:
        """Tracks the best eval (saving its weights to best-<step>/); True when patience has run out."""
        score = self._metric(metrics)
        if self.best is None or score > self.best[0]:
            self.best = (score, self.step, metrics)
            self.bad_evals = 0
            with self._atomic_dir(self.output / f"best-{self.step:06d}") as tmp:
                self._save_weights(tmp)
            self._drop_best_dirs(keep={self.step, self._checkpoint_best})
            dist.barrier()
            return False
        self.bad_evals += 1
        return bool(self.cfg.patience) and self.bad_evals >= self.cfg.patience

    # -- checkpoints ----------------------------------------------------------------------------

    def _atomic_dir(self, target: Path):
        """atomic_dir on rank 0; elsewhere yields None (those ranks join the gathers, write nothing)."""
        return atomic_dir(target) if self.world.main else contextlib.nullcontext()

    def _save_weights(self, directory: Path | None) -> None:
        """Writes the weights to `directory` (None: on ranks other than 0, which only help gather)."""
        if self.sharded:
            if self.cfg.mode == "lora":  # the LoRA tensors are small: gather them whole on every rank
                with dist.full_params(self.model, lora_parameters(self.model)):
                    if directory is not None:
                        save_adapter(self.model, directory)
            else:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
                if directory is not None:
                    self.model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        elif directory is None:
            return
        elif self.cfg.mode == "lora":
            save_adapter(self.model, directory)
        else:
            self.model.save_pretrained(directory, safe_serialization=True)

    def _load_weights(self, directory: Path) -> None:
        """Puts the weights saved in `directory` into the live model (exactly, no rounding)."""
        if self.sharded:
            self._load_sharded_weights(directory)
        elif self.cfg.mode == "lora":
            unpatch_model(self.model, merge=False)  # also removes the fused forwards: put them back
            load_adapter(self.model, directory)
            if self.cfg.fused:
                fuse_model(self.model)
        else:
            saved = type(self.model).from_pretrained(directory)
            self.model.load_state_dict(saved.state_dict())
            del saved

    def _load_sharded_weights(self, directory: Path) -> None:
        """FSDP2: every rank reads the saved full tensors and keeps its shard of each; in LoRA mode
        the adapter's file keys are mapped onto the live (sharded) LoRA parameters."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        files = sorted(directory.glob("*.safetensors"))
        tensors = {k: v for f in files for k, v in load_file(f).items()}
        if self.cfg.mode == "lora":
            tensors = {model_key: tensors[file_key] for file_key, model_key in _adapter_keys(self.model).items()}
        result = set_model_state_dict(self.model, tensors, options=StateDictOptions(full_state_dict=True,
                                                                                    strict=False))
        unexpected = list(result.unexpected_keys)
        if unexpected:
            raise ConfigError(f"{directory} holds weights the model does not have: {unexpected[:5]}")

    def save_checkpoint(self) -> Path:
        """Writes checkpoint-<step>/ atomically (weights + trainer state), then drops older ones."""
        target = self.output / f"checkpoint-{self.step:06d}"
        optimizer = self.optimizer.state_dict()
        # Under torchrun rank 0 writes what each rank needs to resume: its RNG, and with FSDP2 its
        # shard of the optimizer states (LoRA's replicated states are rank 0's).
        ranks = None
        if self.world.distributed:
            mine = {"rng": self._rng_after_step}
            if self.sharded:
                mine["optimizer"] = _local_optimizer_state(optimizer)
            ranks = dist.gather_to_main(mine)
            optimizer = None if self.sharded else optimizer
        with self._atomic_dir(target) as tmp:
            self._save_weights(tmp)
            if tmp is not None:
                torch.save({
                    "step": self.step,
                    "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": self._rng_after_step,
                    "ranks": ranks,
                    "world_size": self.world.size,
                    "best": self.best,
                    "bad_evals": self.bad_evals,
                    "early_stopped": self.early_stopped,
                    "last_eval": self.last_eval,
                    "config": self.cfg.to_dict(),
                }, tmp / STATE_FILE)
        if self.world.main:
            for old in _checkpoints(self.output):
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        # The checkpoint's best weights must outlive later bests, in case we resume from it.
        self._checkpoint_best = self.best[1] if self.best else None
        self._drop_best_dirs(keep={self._checkpoint_best})
        dist.barrier()  # no rank reads a checkpoint before it is whole
        return target

    def _drop_best_dirs(self, keep: set[int | None]) -> None:
        if not self.world.main:
            return
        for step, path in _best_dirs(self.output).items():
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _load_checkpoint(self, directory: Path) -> None:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != self.world.size:
            raise ConfigError(f"{directory} was written by {state.get('world_size', 1)} processes; resume it "
                              f"with as many (torchrun --nproc-per-node), not {self.world.size}")
        saved, now = state["config"], self.cfg.to_dict()
        changed = [k for k in now if k not in _RESUMABLE and saved.get(k) != now[k]]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(f"--resume with options that differ from the checkpoint's ({diffs}); "
                              "resume with the same options, or start over with --overwrite")
        self._load_weights(directory)
        if self.cfg.mode == "lora" and not self.sharded:
            # load_adapter made new LoRA parameters: the optimizer must point at them.
            self.groups = param_groups(self.model, self.cfg.lr, self.cfg.weight_decay, self.cfg.layer_lr_decay)
            self.optimizer = make_optimizer(self.groups, self.cfg)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.scheduler.lr_lambdas[0])
        mine = state["ranks"][self.world.rank] if self.world.distributed else {"rng": state["rng"]}
        if self.sharded:
            self.optimizer.load_state_dict(mine["optimizer"])
            if not isinstance(self.optimizer, AdamW8bit):  # AdamW8bit keeps plain per-shard states
                _dtensor_optimizer_state_(self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best, self.bad_evals = state["step"], state["best"], state["bad_evals"]
        self._checkpoint_best = self.best[1] if self.best else None
        self.last_eval = state["last_eval"]
        self.early_stopped = state.get("early_stopped", False)
        self._rng_after_step = mine["rng"]
        set_rng_state(mine["rng"], self.device)
        self.model.train()

    # -- output ---------------------------------------------------------------------------------

    def _prepare_output(self) -> None:
        if not self.world.main:
            return
        out = self.output
        self._made_output = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        _clean_stale(out)
        if self._resume_from is None:
            if self.cfg.overwrite:
                for p in _checkpoints(out) + [out / n for n in _RUN_FILES] + list(_best_dirs(out).values()):
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            write_text_atomic(out / "metrics.jsonl", "")
        else:
            self._truncate_metrics(self.step)
            self._drop_best_dirs(keep={self._checkpoint_best})  # bests after the checkpoint are replayed
        write_text_atomic(out / "train_config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def _truncate_metrics(self, step: int) -> None:
        """Keeps the rows up to the checkpoint's step, so a resumed log equals an uninterrupted one."""
        path = self.output / "metrics.jsonl"
        kept = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line + "\n")
        write_text_atomic(path, "".join(kept))

    def _log(self, row: dict[str, Any]) -> None:
        if not self.world.main:
            return
        with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _finish(self) -> dict[str, Any]:
        """Final weights (the best eval's, if any) to adapter/ or model/, tokenizer beside; merged/."""
        cfg, out = self.cfg, self.output
        if self.best is not None and self.best[1] != self.step:
            self._load_weights(out / f"best-{self.best[1]:06d}")
        with self._atomic_dir(self._final_dir()) as tmp:
            self._save_weights(tmp)
            if tmp is not None:
                self.tokenizer.save_pretrained(tmp)
        if cfg.merge and self.world.main:  # never sharded (validate refuses merge with fsdp; full mode does not merge)
            merged = unpatch_model(self.model, merge=True)
            with atomic_dir(out / "merged") as tmp:
                merged.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
        dist.barrier()
        return self._summary()

    def _final_dir(self) -> Path:
        return self.output / ("adapter" if self.cfg.mode == "lora" else "model")

    def _summary(self) -> dict[str, Any]:
        summary = {"steps": self.step, "final": str(self._final_dir())}
        if self.best is not None:  # the final weights are the best eval's: report its metrics
            summary.update({"best_step": self.best[1], **self.best[2]})
        if self.cfg.merge:
            summary["merged"] = str(self.output / "merged")
        return summary

    def _finished(self) -> bool:
        """Nothing left to train: early-stopped, or every step done and the final eval logged."""
        done = self.step >= self.total_steps and not (self.data.eval and self.last_eval[0] != self.step)
        return self.early_stopped or done

    def _discard_failed_start(self) -> None:
        """A fresh run that fails before its first checkpoint leaves nothing behind: it is no run to
        resume, and its files would only make the next attempt ask for --overwrite."""
        out = self.output
        if not self.world.main or self._resume_from is not None or not out.is_dir() or _checkpoints(out):
            return
        for p in [out / n for n in _RUN_FILES] + list(_best_dirs(out).values()):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        _clean_stale(out)
        if self._made_output:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Runs to total_steps (or early stop). Returns {steps, final (path), best_step and the eval
        metrics of the final weights (when there is eval data), merged (path, with merge)}.

        Ctrl-C (SIGINT) finishes the current step, writes a checkpoint and raises KeyboardInterrupt;
        a second Ctrl-C stops at once (the last checkpoint written stays the one to resume from).
        Running out of accelerator memory raises OutOfMemory, saying what to lower. A fresh run that
        fails before its first checkpoint removes the files it wrote. Resuming a finished run (all
        steps done, or early-stopped) says so and changes nothing.
        """
        if self._resume_from is not None and self._finished():
            final, merged = self._final_dir(), self.output / "merged"
            if not final.is_dir() or (self.cfg.merge and not merged.is_dir()):
                return self._finish()  # finished, but stopped before writing the final weights
            if self.world.main:
                why = (f"it stopped early at step {self.step}, after {self.bad_evals} evals without improvement"
                       if self.early_stopped else f"all {self.total_steps} steps are done; raise --max-steps or "
                       "--epochs to train further")
                print(f"{self.output} holds a finished run ({why}): nothing to do", file=sys.stderr)
            return self._summary()
        try:
            return self._train()
        except BaseException:
            self._discard_failed_start()
            raise

    def _train(self) -> dict[str, Any]:
        cfg = self.cfg
        dist.barrier()  # every rank has checked --output (in __init__) before rank 0 writes to it
        self._prepare_output()
        self._write_data_note()
        previous_handler = self._catch_sigint()
        show = cfg.progress and self.world.main
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not show, dynamic_ncols=True, file=sys.stderr)
        try:
            if cfg.eval_before and self.step == 0 and self.data.eval:
                self._eval_and_log(bar)
            stop = False
            if self.step and self._eval_due():  # Ctrl-C cut this step's eval short: the checkpoint is at
                stop = self._evals_and_saves(bar)  # this step, so finish its bookkeeping as an unbroken run
            while self.step < self.total_steps and not stop:
                if self._stop_agreed():
                    raise _Interrupted
                row = self._train_step()
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                mem=f"{row['peak_mem_mb']:.0f}MB")
                stop = self._evals_and_saves(bar)
            if self.data.eval and self.last_eval[0] != self.step:
                self._eval_and_log(bar)
            self.save_checkpoint()
        except _Interrupted:
            bar.close()
            where = self.save_checkpoint()
            if self.world.main:
                print(f"\ninterrupted: checkpoint saved to {where} (step {self.step}); "
                      f"run again with --resume to continue", file=sys.stderr)
            raise KeyboardInterrupt from None
        except torch.OutOfMemoryError:
            raise OutOfMemory(
                f"out of {self.device.type} memory at step {self.step + 1} (batch_size={cfg.batch_size}, "
                f"max_length={cfg.max_length}): lower --batch-size (raise --grad-accum to keep the "
                "effective batch), lower --max-length, or turn on --gradient-checkpointing, "
                "--precision bf16-mixed, --optimizer adamw8bit"
            ) from None
        finally:
            bar.close()
            self._restore_sigint(previous_handler)
        return self._finish()

    def _eval_due(self) -> bool:
        """This step is an eval_every step whose eval has not been logged."""
        every = self.cfg.eval_every
        return bool(self.data.eval and every and self.step % every == 0 and self.last_eval[0] != self.step)

    def _evals_and_saves(self, bar) -> bool:
        """After a step: its eval (every eval_every) and checkpoint (every save_every); True: early stop."""
        cfg, stop = self.cfg, False
        if self._eval_due():
            stop = self.early_stopped = self._eval_and_log(bar)
            if stop and cfg.progress and self.world.main:
                bar.write(f"early stop: no better eval in {cfg.patience} evals (best at step {self.best[1]})")
        if cfg.save_every and self.step % cfg.save_every == 0 and not stop:
            self.save_checkpoint()
        return stop

    def _eval_and_log(self, bar) -> bool:
        """Evaluates, logs the eval row, tracks the best; True when early stopping says stop."""
        evals = self.evaluate()
        self.last_eval = (self.step, evals)
        self._log({"step": self.step, **evals})
        if self.cfg.progress and self.world.main:
            bar.write(f"eval at step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
        return self._after_eval(evals)

    def _write_data_note(self) -> None:
        d = self.data
        parts = [f"{len(d.train)} train"]
        if d.eval:
            parts.append(f"{len(d.eval)} eval")
        if d.replay:
            parts.append(f"{len(d.replay)} replay ({self.n_replay} per batch)")
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        if self.cfg.progress and self.world.main:
            ranks = f" × {self.world.size} ranks ({'FSDP2' if self.sharded else 'LoRA grads all-reduced'})"
            print(f"{self.task}, {self.cfg.mode}: {', '.join(parts)} examples; {trainable:,} of {total:,} "
                  f"parameters train; {self.total_steps} steps on {self.device}"
                  f"{ranks if self.world.distributed else ''}", file=sys.stderr)

    def _stop_agreed(self) -> bool:
        """Ctrl-C reaches the ranks at different moments: stop when any rank has seen it, all at once."""
        if not self.world.distributed:
            return self._stop_requested
        return dist.all_reduce_max(float(self._stop_requested), self.device) > 0

    def _catch_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_requested = True
            print("\nCtrl-C: finishing this step, then writing a checkpoint (again to stop at once)",
                  file=sys.stderr)

        return signal.signal(signal.SIGINT, handler)

    @staticmethod
    def _restore_sigint(previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
