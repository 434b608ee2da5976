"""JSONL reading, checks, tokenization, packing and batching (lora_engine.data): fast, no model."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lora_engine import data as D

WORDS = ["a", "b", "c", "d", "e", "f", "Q:", "A:"]


@pytest.fixture(scope="module")
def tok():
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]"] + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- reading ---------------------------------------------------------------------------------------


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write(tmp_path, ['{"text": "a"}', "", "   ", '{"text": "b"}'])
    assert D.read_jsonl(path) == [(1, {"text": "a"}), (4, {"text": "b"})]


def test_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path, ['{"text": "a"}', '{"text": "b"}', '{"text": "c"'])
    with pytest.raises(D.DataError, match=rf"{path}:3: not valid JSON"):
        D.read_jsonl(path)


def test_non_object_line_names_file_and_line(tmp_path):
    path = write(tmp_path, ['{"text": "a"}', '["a", 1]'])
    with pytest.raises(D.DataError, match=rf"{path}:2: expected a JSON object, got list"):
        D.read_jsonl(path)


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(D.DataError, match=rf"{path}:2: not valid UTF-8 \(byte 0xe9 at column 14"):
        D.read_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(D.DataError, match="no examples"):
        D.read_jsonl(write(tmp_path, ["", ""]))
    with pytest.raises(D.DataError, match="not a file"):
        D.read_jsonl(tmp_path)


def test_infer_task(tmp_path):
    path = tmp_path / "x.jsonl"
    assert D.infer_task([(1, {"text": "a"})], path) == "causal-lm"
    assert D.infer_task([(1, {"prompt": "a", "completion": "b"})], path) == "sft"
    assert D.infer_task([(1, {"text": "a", "label": 0})], path) == "classification"
    with pytest.raises(D.DataError, match=r"x.jsonl:7: cannot tell the task"):
        D.infer_task([(7, {"body": "a"})], path)


# -- checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, task, message",
    [
        ({"text": "a"}, "classification", "missing field 'label'"),
        ({"prompt": "a"}, "sft", "missing field 'completion'"),
        ({"text": 3}, "causal-lm", "field 'text' should be a string"),
        ({"text": "a", "label": "pos"}, "classification", "field 'label' should be an integer"),
        ({"text": "a", "label": True}, "classification", "field 'label' should be an integer"),
        ({"text": "a", "label": 2}, "classification",
         r"label 2 is out of range for num_labels=2 \(labels must be 0..1\)"),
        ({"text": "a", "label": -1}, "classification", "label -1 is out of range"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, tok, row, task, message):
    rows = [(1, {"text": "a", "label": 0, "prompt": "a", "completion": "b"}), (5, row)]
    with pytest.raises(D.DataError, match=rf"f.jsonl:5: {message}"):
        D.tokenize_rows(rows, tmp_path / "f.jsonl", tok, task, 16, num_labels=2)


def test_unknown_task(tok, tmp_path):
    with pytest.raises(D.DataError, match="unknown task 'lm'"):
        D.tokenize_rows([(1, {"text": "a"})], tmp_path / "f", tok, "lm", 8)


# -- tokenization ----------------------------------------------------------------------------------


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_causal_lm_appends_eos_and_truncates(tok, tmp_path):
    (ex,) = D.tokenize_rows([(1, {"text": "a b c"})], tmp_path / "f", tok, "causal-lm", 16)
    assert ex.input_ids == ids(tok, "a b c") + [tok.eos_token_id]
    assert ex.labels == ex.input_ids and ex.label is None and ex.where.endswith("f:1")
    (short,) = D.tokenize_rows([(1, {"text": "a b c d e"})], tmp_path / "f", tok, "causal-lm", 3)
    assert short.input_ids == ids(tok, "a b c")


def test_sft_masks_the_prompt(tok, tmp_path):
    rows = [(1, {"prompt": "Q: a b", "completion": "A: c"})]
    (ex,) = D.tokenize_rows(rows, tmp_path / "f", tok, "sft", 16)
    prompt, completion = ids(tok, "Q: a b"), ids(tok, "A: c") + [tok.eos_token_id]
    assert ex.input_ids == prompt + completion
    assert ex.labels == [D.IGNORE_INDEX] * len(prompt) + completion


def test_sft_rows_without_completion_tokens_are_skipped_with_a_warning(tok, tmp_path, capsys):
    rows = [(1, {"prompt": "a b c d e f", "completion": "A: c"}), (2, {"prompt": "a", "completion": "b"})]
    examples = D.tokenize_rows(rows, tmp_path / "f", tok, "sft", 4)
    assert len(examples) == 1 and examples[0].where.endswith("f:2")
    assert "1 of 2 rows" in capsys.readouterr().err
    with pytest.raises(D.DataError, match="no usable examples"):
        D.tokenize_rows(rows[:1], tmp_path / "f", tok, "sft", 4)


def test_classification_keeps_the_label(tok, tmp_path):
    (ex,) = D.tokenize_rows([(1, {"text": "a b", "label": 1})], tmp_path / "f", tok, "classification", 8, 2)
    assert ex.input_ids == ids(tok, "a b") and ex.label == 1 and ex.labels is None


# -- packing, batching, order -----------------------------------------------------------------------


def test_pack_examples_cuts_full_blocks():
    examples = [D.Example([1, 2, 3], [1, 2, 3], None, "f:1"), D.Example([4, 5, 6, 7, 8], [4, 5, 6, 7, 8], None, "f:2")]
    blocks = D.pack_examples(examples, 3)
    assert [b.input_ids for b in blocks] == [[1, 2, 3], [4, 5, 6], [7, 8]]
    assert all(b.labels == b.input_ids for b in blocks)


def test_collate_pads_to_the_longest():
    lm = [D.Example([5, 6, 7], [-100, 6, 7], None, "f:1"), D.Example([8], [8], None, "f:2")]
    batch = D.collate(lm, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = D.collate([D.Example([5, 6], None, 1, "f:1"), D.Example([7], None, 0, "f:2")], pad_id=0)
    assert cls["labels"].tolist() == [1, 0] and cls["input_ids"].shape == (2, 2)


def test_split_is_seeded_and_disjoint():
    examples = [D.Example([i], [i], None, f"f:{i}") for i in range(20)]
    train, held = D.split_examples(examples, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert {e.where for e in train}.isdisjoint({e.where for e in held})
    assert [e.where for e in D.split_examples(examples, 0.25, seed=3)[1]] == [e.where for e in held]
    with pytest.raises(D.DataError):
        D.split_examples(examples, 1.5, seed=0)


def test_epoch_order_and_replay_are_pure_functions():
    assert D.epoch_order(10, 1, 0) == D.epoch_order(10, 1, 0)
    assert sorted(D.epoch_order(10, 1, 0)) == list(range(10))
    assert D.epoch_order(10, 1, 0) != D.epoch_order(10, 1, 1)
    picks = D.replay_rows(50, 4, seed=0, batch_index=7)
    assert picks == D.replay_rows(50, 4, seed=0, batch_index=7) and len(set(picks)) == 4
    assert sorted(D.replay_rows(3, 5, seed=0, batch_index=0)) == [0, 1, 2]


def test_shipped_sentiment_data_is_valid_and_balanced():
    from importlib import resources

    base = resources.files("lora_engine") / "data"
    for name, size in (("sentiment_train.jsonl", 600), ("sentiment_eval.jsonl", 300)):
        rows = D.read_jsonl(str(base / name))
        assert len(rows) == size
        labels = torch.tensor([r["label"] for _, r in rows])
        assert labels.sum().item() == size // 2  # balanced
    train = {json.dumps(r["text"]) for _, r in D.read_jsonl(str(base / "sentiment_train.jsonl"))}
    held = {json.dumps(r["text"]) for _, r in D.read_jsonl(str(base / "sentiment_eval.jsonl"))}
    assert not train & held
    assert (base / "README.md").is_file()
