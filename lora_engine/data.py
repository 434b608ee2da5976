"""JSONL training data: read, check, tokenize, pack and batch.

One row per line. The task decides the fields:

| task             | row                                   | trained on                       |
| ---------------- | ------------------------------------- | -------------------------------- |
| `causal-lm`      | `{"text": str}`                       | every token                      |
| `sft`            | `{"prompt": str, "completion": str}`  | the completion's tokens only     |
| `classification` | `{"text": str, "label": int}`         | the label, through a new head    |

Every error names the file and, where one line is at fault, its line number. Batches are built
from an example list by index, so the order is a pure function of (seed, epoch) and a resumed run
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "TASKS",
    "DataError",
    "Example",
    "read_jsonl",
    "infer_task",
    "tokenize_rows",
    "pack_examples",
    "collate",
    "split_examples",
    "epoch_order",
    "replay_rows",
]

TASKS = ("causal-lm", "sft", "classification")
IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt tokens, padding)

_FIELDS = {
    "causal-lm": {"text": str},
    "sft": {"prompt": str, "completion": str},
    "classification": {"text": str, "label": int},
}


class DataError(ValueError):
    """Bad training or eval data; the message names the file (and line)."""


@dataclass
class Example:
    """One tokenized row. `labels` is per token (LM tasks) or None; `label` is the class or None."""

    input_ids: list[int]
    labels: list[int] | None
    label: int | None
    where: str  # "file:line", for messages


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line of a JSONL file; DataError names file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")
    rows = []
    with open(path, "rb") as f:  # decoded line by line, so a bad byte's line can be named
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1}: {e.reason}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def infer_task(rows: list[tuple[int, dict]], path: str | Path) -> str:
    """The task the first row's fields imply: prompt+completion → sft, label → classification."""
    lineno, row = rows[0]
    if "prompt" in row and "completion" in row:
        return "sft"
    if "text" in row and "label" in row:
        return "classification"
    if "text" in row:
        return "causal-lm"
    raise DataError(
        f"{path}:{lineno}: cannot tell the task from fields {sorted(row)}; rows need "
        '{"text"} (causal-lm), {"prompt", "completion"} (sft) or {"text", "label"} (classification)'
    )


def _check_row(row: dict, task: str, where: str, num_labels: int | None) -> None:
    for name, kind in _FIELDS[task].items():
        if name not in row:
            wanted = ", ".join(f'"{k}"' for k in _FIELDS[task])
            raise DataError(f"{where}: missing field {name!r} (task {task} reads rows with {{{wanted}}})")
        value = row[name]
        # bool is an int subclass in Python; a true/false label is almost surely a mistake.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(
                f"{where}: field {name!r} should be {'an integer' if kind is int else 'a string'}, "
                f"got {json.dumps(value)[:60]}"
            )
    if task == "classification" and num_labels is not None and not 0 <= row["label"] < num_labels:
        raise DataError(
            f"{where}: label {row['label']} is out of range for num_labels={num_labels} "
            f"(labels must be 0..{num_labels - 1})"
        )


def tokenize_rows(
    rows: list[tuple[int, dict]],
    path: str | Path,
    tokenizer,
    task: str,
    max_length: int,
    num_labels: int | None = None,
) -> list[Example]:
    """Check every row's fields for `task`, then tokenize (truncating to max_length tokens).

    causal-lm appends EOS (when the tokenizer has one) so the model learns where text ends;
    sft masks the prompt's labels with -100 and appends EOS after the completion.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, dropped = [], []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        _check_row(row, task, where, num_labels)
        if task == "classification":
            ids = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
            examples.append(Example(ids, None, row["label"], where))
        elif task == "causal-lm":
            ids = (tokenizer(row["text"])["input_ids"] + eos)[:max_length]
            if len(ids) >= 2:  # one token has nothing to predict
                examples.append(Example(ids, list(ids), None, where))
        else:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
            ids = (prompt + completion)[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
            if any(t != IGNORE_INDEX for t in labels[1:]):
                examples.append(Example(ids, labels, None, where))
            else:
                dropped.append(where)
    if dropped:
        # A prompt that fills max_length leaves no completion token to learn from.
        print(
            f"warning: {len(dropped)} of {len(rows)} rows in {path} have no completion token left within "
            f"max_length={max_length} and are skipped (first: {dropped[0]}); raise --max-length",
            file=sys.stderr,
        )
    if not examples:
        raise DataError(f"{path}: no usable examples for task {task} with max_length={max_length}")
    return examples


def pack_examples(examples: Sequence[Example], block_size: int) -> list[Example]:
    """Causal-LM packing: concatenate all token streams and cut blocks of exactly block_size.

    The tail shorter than a block is kept as a last, shorter block. Attention is not masked at
    document boundaries (each text ends in EOS), the usual trade for no padding at all.
    """
    stream = [t for ex in examples for t in ex.input_ids]
    blocks = []
    for start in range(0, len(stream), block_size):
        ids = stream[start : start + block_size]
        if len(ids) >= 2:
            blocks.append(Example(ids, list(ids), None, f"{examples[0].where.rsplit(':', 1)[0]} (packed)"))
    return blocks


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example in the batch (right padding).

    Returns input_ids and attention_mask (B, T) and labels: (B, T) with -100 on padding for LM
    tasks, or (B,) class indices for classification.
    """
    longest = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, ex in enumerate(examples):
        ids[i, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        mask[i, : len(ex.input_ids)] = 1
    if examples[0].label is not None:
        labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        for i, ex in enumerate(examples):
            labels[i, : len(ex.labels)] = torch.tensor(ex.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded random `fraction` of the examples (at least one) is held out."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"eval_split must be in (0, 1), got {fraction}")
    if len(examples) < 2:
        raise DataError("eval_split needs at least 2 examples")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def replay_rows(n_replay: int, how_many: int, seed: int, batch_index: int) -> list[int]:
    """Indices of `how_many` replay examples for micro-batch `batch_index` (no repeats in a batch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * batch_index + 1)
    if how_many >= n_replay:
        return torch.randperm(n_replay, generator=g).tolist()
    return torch.randperm(n_replay, generator=g)[:how_many].tolist()


def batches_per_epoch(n_examples: int, rows_per_batch: int) -> int:
    return math.ceil(n_examples / rows_per_batch)
