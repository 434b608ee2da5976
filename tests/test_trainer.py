"""The Trainer on tiny random models (Llama, GPT-2, BERT; hidden 32, 2 layers, 53-token vocab).

Each option is exercised at least once; learning is checked as "the loss falls". On CPU the
conftest runs LoRA layers (and AdamW8bit, merge) through the Triton kernels under the
interpreter. The one test that trains 14 LoRA layers for 28 micro-batches uses `torch_fallback`
(the pure-torch references a CPU user gets without TRITON_INTERPRET; the kernels are checked
against them in the kernel tests); all others run the interpreted kernels.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lora_engine import data as D
from lora_engine.fusions import FUSIONS, fused_ops
from lora_engine.trainer import (
    ConfigError,
    OutOfMemory,
    TrainConfig,
    Trainer,
    atomic_dir,
    lr_factor,
    param_groups,
)

WORDS = [f"w{i}" for i in range(40)] + ["good", "great", "fine", "bad", "awful", "poor", "Q:", "A:"]
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]"]


@pytest.fixture
def torch_fallback(monkeypatch):
    """LoRA layers, merge and AdamW8bit on their pure-torch paths (dispatch reads the env per call)."""
    # Triton fixes interpreted-or-compiled when a kernel module is imported: import them first.
    import lora_engine.kernels.adamw8bit  # noqa: F401
    import lora_engine.kernels.lora_linear  # noqa: F401
    import lora_engine.kernels.merge  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")


# -- tiny models and data --------------------------------------------------------------------------


def make_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", cls_token="[CLS]")
    fast.save_pretrained(path)
    return fast


def make_model(path: Path, arch: str) -> str:
    """Saves a tiny random model + tokenizer to `path`. Decoders get initializer_range 0.2 (not 0.02)
    so the frozen LM head's logits have a useful range and LoRA alone fits the tasks in a few steps."""
    torch.manual_seed(0)
    vocab = len(SPECIALS) + len(WORDS)
    common = dict(vocab_size=vocab, initializer_range=0.2, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, **common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common))
    else:  # BERT keeps the usual 0.02: larger weights saturate its tanh pooler
        model = BertForSequenceClassification(BertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, num_labels=2, **{**common, "initializer_range": 0.02}))
    model.save_pretrained(path)
    make_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{arch: model dir} for llama, gpt2, bert (built once per session)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model(root / arch, arch) for arch in ("llama", "gpt2", "bert")}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def lm_rows(n: int, seed: int = 0, length: int = 8) -> list[dict]:
    """Counting sequences w_s w_s+1 ...: each token predicts the next."""
    rng = random.Random(seed)
    return [{"text": " ".join(f"w{(s + i) % 40}" for i in range(length))} for s in
            (rng.randrange(40) for _ in range(n))]


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = rng.randrange(40)
        rows.append({"prompt": f"Q: w{s} w{(s + 1) % 40}", "completion": f"A: w{(s + 2) % 40} w{(s + 3) % 40}"})
    return rows


def cls_rows(n: int, seed: int = 0) -> list[dict]:
    """Label 1 iff the first word is a positive one; the rest is noise. (BERT pools the first
    token, so even a frozen random encoder passes the label's evidence to the new head.)"""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        first = rng.choice(["good", "great", "fine"] if label else ["bad", "awful", "poor"])
        rows.append({"text": " ".join([first] + [f"w{rng.randrange(40)}" for _ in range(4)]), "label": label})
    return rows


def metrics(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out) -> list[float]:
    return [r["loss"] for r in metrics(out) if "loss" in r]


def config(tmp_path: Path, model: str, rows: list[dict], **kw) -> TrainConfig:
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    defaults = dict(model=model, data=data, output=str(tmp_path / "out"), progress=False, batch_size=8,
                    lr=1e-2, max_grad_norm=1.0)
    return TrainConfig(**{**defaults, **kw})


def falls(losses: list[float], factor: float) -> bool:
    """The mean of the last 3 losses is below `factor` times the mean of the first 3."""
    return sum(losses[-3:]) / 3 < factor * sum(losses[:3]) / 3


# -- learning, one test per task and mode (options spread over them) ---------------------------------


@pytest.mark.usefixtures("torch_fallback")  # 14 LoRA layers x 28 micro-batches: 45 s interpreted
def test_causal_lm_lora_learns(tmp_path, tiny):
    cfg = config(tmp_path, tiny["llama"], lm_rows(48), task="causal-lm", targets=["all-linear"], lr=3e-2,
                 rank=4, dropout=0.05, use_rslora=True, grad_accum=2, batch_size=4, max_steps=14,
                 warmup_steps=2, schedule="linear", gradient_checkpointing=True)
    trainer = Trainer(cfg)
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules())
    summary = trainer.train()
    losses = train_losses(cfg.output)
    assert len(losses) == 14 and falls(losses, 0.75), losses
    lrs = [r["lr"] for r in metrics(cfg.output) if "lr" in r]
    assert lrs[0] == pytest.approx(3e-2 / 3) and lrs[2] == pytest.approx(3e-2)  # warmup, then linear decay
    assert lrs[3] > lrs[-1] > 0
    adapter = json.loads((Path(summary["final"]) / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["use_rslora"] and adapter["lora_dropout"] == 0.05
    assert (Path(summary["final"]) / "tokenizer.json").is_file()


def test_causal_lm_full_packed_adamw8bit_frozen_layers(tmp_path, tiny):
    cfg = config(tmp_path, tiny["gpt2"], lm_rows(40, length=6), mode="full", pack=True, max_length=16,
                 optimizer="adamw8bit", freeze_layers=1, layer_lr_decay=0.5, weight_decay=0.01,
                 max_grad_norm=0.0, max_steps=10, lr=3e-2, eval_split=0.2)
    trainer = Trainer(cfg)
    assert all(len(ex.input_ids) == 16 for ex in trainer.data.train[:-1])  # packed into full blocks
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".h.0." in n}
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".h.1." in n}
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "wte" in n or ".h.0." in n)
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert lrs == pytest.approx([3e-2 * 0.5, 3e-2])  # layer 1 decayed once; final norm/head at lr
    summary = trainer.train()
    assert falls(train_losses(cfg.output), 0.9)
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert any(not torch.equal(params[n], p) for n, p in trainable.items())
    assert "eval_perplexity" in summary and (Path(cfg.output) / "model" / "config.json").is_file()


def test_sft_lora_with_distillation_and_replay(tmp_path, tiny):
    replay = write_jsonl(tmp_path / "general.jsonl", [
        {"prompt": r["text"].rsplit(" ", 2)[0], "completion": " ".join(r["text"].split()[-2:])} for r in lm_rows(20)])
    cfg = config(tmp_path, tiny["llama"], sft_rows(40), targets=["all-linear"], lr=3e-2, kd_weight=0.5,
                 kd_temperature=2.0, replay_data=replay, replay_fraction=0.25, schedule="constant", max_steps=10)
    trainer = Trainer(cfg)
    assert trainer.task == "sft" and trainer.n_replay == 2 and trainer.rows_per_batch == 6
    batch = trainer._micro_batch(0)
    assert batch["input_ids"].shape[0] == 8
    assert (batch["labels"][:, :3] == D.IGNORE_INDEX).all()  # the prompt carries no loss
    trainer.train()
    rows = [r for r in metrics(cfg.output) if "loss" in r]
    assert rows[0]["kd_loss"] == pytest.approx(0.0, abs=1e-6)  # B = 0: student == teacher at step 1
    assert rows[-1]["kd_loss"] > 0
    assert rows[-1]["task_loss"] < 0.75 * rows[0]["task_loss"]
    assert all(r["lr"] == pytest.approx(3e-2) for r in rows)


def test_classification_lora_new_head_eval_merge(tmp_path, tiny):
    eval_file = write_jsonl(tmp_path / "eval.jsonl", cls_rows(24, seed=1))
    cfg = config(tmp_path, tiny["bert"], cls_rows(48), eval_data=eval_file,
                 targets=["query", "value", "pooler.dense"], lr=3e-2, max_steps=12, eval_every=4,
                 eval_before=True, merge=True, seed=1)
    trainer = Trainer(cfg)
    assert trainer.task == "classification" and trainer.data.num_labels == 2
    summary = trainer.train()
    evals = [r for r in metrics(cfg.output) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert evals[0]["eval_accuracy"] < 0.8 and summary["eval_accuracy"] >= 0.9
    adapter = load_file(Path(cfg.output) / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in adapter  # the new head ships with the adapter
    # merged/ is a plain transformers model: same predictions as the trained model.
    merged = AutoModelForSequenceClassification.from_pretrained(Path(cfg.output) / "merged").eval()
    batch = D.collate(trainer.data.eval, trainer.pad_id)
    with torch.no_grad():
        logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert accuracy == pytest.approx(summary["eval_accuracy"])


def test_output_device_tokenizer_and_modules_to_save_options(tmp_path, tiny, capsys):
    """The options no other run uses: log_every, an explicit tokenizer and device, modules_to_save,
    and the progress bar."""
    cfg = config(tmp_path, tiny["bert"], cls_rows(32), targets=["query", "value"], modules_to_save=["pooler"],
                 tokenizer=tiny["bert"], device="cpu", log_every=3, progress=True, max_steps=6, lr=3e-2)
    trainer = Trainer(cfg)
    assert trainer.device.type == "cpu"
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()
              if ".pooler." in k and k.endswith("dense.weight")}  # the frozen original and the trained copy
    trainer.train()
    assert [r["step"] for r in metrics(cfg.output) if "loss" in r] == [3, 6]
    assert "step" in capsys.readouterr().err  # tqdm's bar (it writes to stderr)
    saved = load_file(Path(cfg.output) / "adapter" / "adapter_model.safetensors")
    keys = [k for k in saved if k.endswith("pooler.dense.weight")]
    assert len(keys) == 1, sorted(saved)
    assert before and all(not torch.equal(saved[keys[0]], w) for w in before.values())  # the copy trained


def test_classification_full_pure_bf16(tmp_path, tiny):
    cfg = config(tmp_path, tiny["bert"], cls_rows(32), mode="full", precision="bf16", lr=1e-2, max_steps=12,
                 eval_split=0.25, num_labels=3)
    trainer = Trainer(cfg)
    assert trainer.model.classifier.weight.dtype == torch.bfloat16 and trainer.model.config.num_labels == 3
    trainer.train()
    assert falls(train_losses(cfg.output), 0.85)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_autocast(tmp_path, tiny, precision):
    cfg = config(tmp_path, tiny["gpt2"], lm_rows(16), mode="full", precision=precision, lr=3e-3, max_steps=4)
    trainer = Trainer(cfg)
    assert trainer.scaler.is_enabled() == (precision == "fp16-mixed")
    trainer.train()
    losses = train_losses(cfg.output)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert next(trainer.model.parameters()).dtype == torch.float32  # autocast: fp32 master weights


# -- resume, Ctrl-C, crash ------------------------------------------------------------------------


def _straight_and_interrupted(tmp_path, model, monkeypatch, stop_after: int, **kw):
    """An uninterrupted run, and the same run sent SIGINT at the end of step `stop_after`
    (asserted to raise KeyboardInterrupt). Returns (straight config, interrupted config)."""
    rows = lm_rows(24)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = config(tmp_path / "a", model, rows, output=str(tmp_path / "a" / "out"), **kw)
    Trainer(straight).train()
    cut = config(tmp_path / "b", model, rows, output=str(tmp_path / "b" / "out"), **kw)
    trainer = Trainer(cut)
    real_step = trainer._train_step

    def step_then_ctrl_c():
        row = real_step()
        if trainer.step == stop_after:
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish this step, checkpoint, stop
        return row

    monkeypatch.setattr(trainer, "_train_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    return straight, cut


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ctrl_c_checkpoints_and_resume_repeats_the_uninterrupted_run(tmp_path, tiny, monkeypatch, mode):
    # LoRA: the kernels' dropout seeds must repeat after resume, and in checkpointing's recompute.
    extra = (dict(dropout=0.1, targets=["q_proj", "v_proj"], gradient_checkpointing=True) if mode == "lora"
             else dict(optimizer="adamw8bit"))
    straight, cut = _straight_and_interrupted(tmp_path, tiny["llama"], monkeypatch, 3, mode=mode, max_steps=6,
                                              batch_size=4, eval_every=2, seed=3, **extra)
    out = Path(cut.output)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000003"]
    assert max(r["step"] for r in metrics(out)) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    resumed = Trainer(TrainConfig(**{**cut.to_dict(), "resume": True}))
    assert resumed.step == 3
    resumed.train()
    assert set(fused_ops(resumed.model)) == set(FUSIONS)  # reloading the weights keeps the fused kernels
    _same_rows(metrics(out), metrics(straight.output))


def test_ctrl_c_in_the_step_before_an_eval_keeps_that_eval(tmp_path, tiny, monkeypatch):
    # Ctrl-C during step 4 is seen by the eval at step 4, which stops before its row is logged: the
    # checkpoint is at step 4, so the resumed run must still run (and log, and track) that eval.
    straight, cut = _straight_and_interrupted(tmp_path, tiny["llama"], monkeypatch, 4, mode="lora", max_steps=6,
                                              batch_size=4, eval_every=2, seed=3, eval_split=0.2)
    assert [p.name for p in Path(cut.output).glob("checkpoint-*")] == ["checkpoint-000004"]
    Trainer(TrainConfig(**{**cut.to_dict(), "resume": True})).train()
    assert [r["step"] for r in metrics(cut.output) if "eval_loss" in r] == [2, 4, 6]
    _same_rows(metrics(cut.output), metrics(straight.output))


def _same_rows(a: list[dict], b: list[dict]) -> bool:
    """Same rows: the same keys, steps, epochs and learning rates exactly, losses and other metrics to a relative
    1e-5 (timings and memory may differ). Not bit for bit: with torch 2.13 (CPU) and transformers 5.25 the first
    LoRA step after a resume computed gradients an ulp away from the uninterrupted run's, from the same parameters,
    batch and loss, with the kernels and with the plain-torch fallback alike; a wrong seed, batch or optimizer state
    moves the losses by far more."""
    timing = {"tokens_per_s", "peak_mem_mb"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    a, b = strip(a), strip(b)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key, va in ra.items():
            vb = rb[key]
            if key in ("step", "epoch", "lr") or not isinstance(va, float):
                assert va == vb, (ra["step"], key, va, vb)
            else:
                assert math.isclose(va, vb, rel_tol=1e-5), (ra["step"], key, va, vb)
    return True


def test_crash_resumes_from_the_last_checkpoint(tmp_path, tiny, monkeypatch):
    rows = cls_rows(24)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    held = write_jsonl(tmp_path / "eval.jsonl", cls_rows(8, seed=5))
    # Evals every step: the best found at step 5 (after the step-4 checkpoint) must be replayed.
    kw = dict(targets=["query", "value"], max_steps=6, batch_size=4, save_every=2, lr=2e-2, eval_data=held,
              eval_every=1)
    straight = config(tmp_path / "a", tiny["bert"], rows, output=str(tmp_path / "a" / "out"), **kw)
    Trainer(straight).train()

    crash = config(tmp_path / "b", tiny["bert"], rows, output=str(tmp_path / "b" / "out"), **kw)
    trainer = Trainer(crash)
    real_forward = trainer._forward

    def forward_then_crash(batch):
        if trainer.step == 5:
            raise RuntimeError("power cut")
        return real_forward(batch)

    monkeypatch.setattr(trainer, "_forward", forward_then_crash)
    with pytest.raises(RuntimeError, match="power cut"):
        trainer.train()
    out = Path(crash.output)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000004"]
    assert not list(out.glob(".*tmp*"))
    Trainer(TrainConfig(**{**crash.to_dict(), "resume": True})).train()
    _same_rows(metrics(out), metrics(straight.output))
    a = load_file(Path(straight.output) / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_options(tmp_path, tiny):
    cfg = config(tmp_path, tiny["llama"], lm_rows(8), mode="full", max_steps=1)
    Trainer(cfg).train()
    with pytest.raises(ConfigError, match=r"differ from the checkpoint's \(lr: 0.01 -> 0.5\)"):
        Trainer(TrainConfig(**{**cfg.to_dict(), "resume": True, "lr": 0.5}))
    # eval_split decides which rows train, eval_data which weights are kept: neither may change.
    with pytest.raises(ConfigError, match=r"differ from the checkpoint's \(eval_split: 0.0 -> 0.5\)"):
        Trainer(TrainConfig(**{**cfg.to_dict(), "resume": True, "eval_split": 0.5}))
    held = write_jsonl(tmp_path / "eval.jsonl", lm_rows(4, seed=1))
    with pytest.raises(ConfigError, match=rf"differ from the checkpoint's \(eval_data: None -> '{held}'\)"):
        Trainer(TrainConfig(**{**cfg.to_dict(), "resume": True, "eval_data": held}))
    # A finished run resumes to a no-op (no duplicate rows).
    before = metrics(cfg.output)
    Trainer(TrainConfig(**{**cfg.to_dict(), "resume": True})).train()
    assert metrics(cfg.output) == before


# -- early stopping keeps the best --------------------------------------------------------------------


def test_early_stopping_keeps_the_best_weights(tmp_path, tiny, monkeypatch):
    eval_file = write_jsonl(tmp_path / "eval.jsonl", cls_rows(8, seed=2))
    cfg = config(tmp_path, tiny["bert"], cls_rows(32), eval_data=eval_file, targets=["query"], max_steps=20,
                 batch_size=4, eval_every=2, patience=2)
    trainer = Trainer(cfg)
    scripted = iter([0.5, 0.75, 0.5, 0.625, 1.0])  # best at step 4, then two worse evals

    def fake_eval(examples=None):
        return {"eval_loss": 1.0, "eval_accuracy": next(scripted)}

    monkeypatch.setattr(trainer, "evaluate", fake_eval)
    saved_at = {}
    real_save = trainer._save_weights

    def spy(directory):
        real_save(directory)
        saved_at[(trainer.step, Path(directory).name.split(".")[1])] = load_file(
            Path(directory) / "adapter_model.safetensors")

    monkeypatch.setattr(trainer, "_save_weights", spy)
    summary = trainer.train()
    assert summary["steps"] == 8 and summary["best_step"] == 4  # stopped after evals at 6 and 8
    assert sorted(saved_at) == [(2, "best-000002"), (4, "best-000004"), (8, "adapter"), (8, "checkpoint-000008")]
    assert [p.name for p in Path(cfg.output).glob("best-*")] == ["best-000004"]
    final = load_file(Path(cfg.output) / "adapter" / "adapter_model.safetensors")
    best, last = saved_at[(4, "best-000004")], saved_at[(8, "checkpoint-000008")]
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)  # the last step's weights differ


def test_resuming_an_early_stopped_run_changes_nothing(tmp_path, tiny, monkeypatch, capsys):
    eval_file = write_jsonl(tmp_path / "eval.jsonl", cls_rows(8, seed=2))
    cfg = config(tmp_path, tiny["bert"], cls_rows(32), eval_data=eval_file, targets=["query"], max_steps=20,
                 batch_size=4, eval_every=2, patience=1)
    trainer = Trainer(cfg)
    scripted = iter([0.75, 0.5])  # best at step 2, worse at 4: stop

    monkeypatch.setattr(trainer, "evaluate", lambda examples=None: {"eval_loss": 1.0, "eval_accuracy": next(scripted)})
    assert trainer.train()["steps"] == 4
    out = Path(cfg.output)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    summary = Trainer(TrainConfig(**{**cfg.to_dict(), "resume": True})).train()
    assert summary["steps"] == 4 and summary["best_step"] == 2 and summary["eval_accuracy"] == 0.75
    assert "holds a finished run (it stopped early at step 4" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, tiny, monkeypatch):
    cfg = config(tmp_path, tiny["gpt2"], lm_rows(8), mode="full", max_steps=2, eval_split=0.25, eval_before=True)

    def oom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_forward", oom)
        with pytest.raises(OutOfMemory):
            Trainer(cfg).train()
        assert not Path(cfg.output).exists()  # it made the directory, so it removes it
        Path(cfg.output).mkdir()  # a directory the user made stays, emptied of this run's files
        with pytest.raises(OutOfMemory):
            Trainer(cfg).train()
        assert list(Path(cfg.output).iterdir()) == []
    # Neither --overwrite nor --resume is needed to try again (with the advice followed).
    assert Trainer(TrainConfig(**{**cfg.to_dict(), "batch_size": 2})).train()["steps"] == 2


def test_stale_files_of_a_killed_write_are_cleaned(tmp_path, tiny):
    from lora_engine.trainer import _clean_stale

    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".best-000003.old-7").mkdir()  # killed between atomic_dir's two renames: the old version
    (stale / ".best-000003.old-7" / "w").write_text("old")  # is the only one, so it is put back
    (stale / "best-000004").mkdir()
    (stale / ".best-000004.old-7").mkdir()  # the new version arrived: the old one goes
    _clean_stale(stale)
    assert (stale / "best-000003" / "w").read_text() == "old"
    assert sorted(p.name for p in stale.iterdir()) == ["best-000003", "best-000004"]

    cfg = config(tmp_path, tiny["gpt2"], lm_rows(8), mode="full", max_steps=1)
    out = Path(cfg.output)
    (out / ".checkpoint-000001.tmp-7").mkdir(parents=True)
    (out / ".metrics.jsonl.tmp-7").write_text("")
    (out / ".model.old-7").mkdir()  # put back as model/, then replaced by the final weights
    Trainer(cfg).train()
    assert not list(out.glob(".*"))


# -- unit pieces -------------------------------------------------------------------------------------


def test_lr_schedules():
    assert [lr_factor(s, 10, 3, "cosine", 0.0) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert lr_factor(3, 10, 3, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 10, 3, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant", 0.0) == 1.0


def test_param_groups_decay_matrices_only_and_by_depth(tiny):
    model = LlamaForCausalLM.from_pretrained(tiny["llama"])
    groups = param_groups(model, lr=1.0, weight_decay=0.1, layer_lr_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["model.embed_tokens.weight"]["lr"] == pytest.approx(0.125)  # 0.5^(2+1)
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["lr"] == pytest.approx(0.25)
    assert by_name["model.layers.1.mlp.up_proj.weight"]["lr"] == pytest.approx(0.5)
    assert by_name["model.norm.weight"]["lr"] == 1.0 and by_name["lm_head.weight"]["lr"] == 1.0
    assert by_name["model.norm.weight"]["weight_decay"] == 0.0
    assert by_name["lm_head.weight"]["weight_decay"] == 0.1


def test_out_of_memory_says_what_to_lower(tmp_path, tiny, monkeypatch):
    trainer = Trainer(config(tmp_path, tiny["gpt2"], lm_rows(8), mode="full", max_steps=2))

    def oom(batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_forward", oom)
    with pytest.raises(OutOfMemory, match="lower --batch-size.*--gradient-checkpointing"):
        trainer.train()


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "best"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# -- bad input -----------------------------------------------------------------------------------------


def test_bad_input_fails_before_writing_anything(tmp_path, tiny):
    out = tmp_path / "out"
    bad_label = write_jsonl(tmp_path / "labels.jsonl", [{"text": "good", "label": 1}] * 3 + [{"text": "a", "label": 7}])
    with pytest.raises(D.DataError, match=r"labels.jsonl:4: label 7 is out of range for num_labels=2"):
        Trainer(TrainConfig(model=tiny["bert"], data=bad_label, num_labels=2, output=str(out)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "w1 w2"}\n{"text": "w3"\n')
    with pytest.raises(D.DataError, match=r"broken.jsonl:2: not valid JSON"):
        Trainer(TrainConfig(model=tiny["llama"], data=str(broken), output=str(out)))
    with pytest.raises(ConfigError, match="unknown model 'no/such-model'"):
        Trainer(TrainConfig(model="no/such-model", data=str(broken), output=str(out)))
    with pytest.raises(ConfigError, match="cannot add LoRA.*nope"):
        Trainer(TrainConfig(model=tiny["llama"], data=write_jsonl(tmp_path / "ok.jsonl", lm_rows(4)),
                            targets=["nope"], output=str(out)))
    assert not out.exists()


def test_existing_run_needs_overwrite_or_resume(tmp_path, tiny):
    cfg = config(tmp_path, tiny["gpt2"], lm_rows(8), mode="full", max_steps=1)
    Trainer(cfg).train()
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        Trainer(cfg)
    Trainer(TrainConfig(**{**cfg.to_dict(), "overwrite": True, "max_steps": 2})).train()
    assert [p.name for p in Path(cfg.output).glob("checkpoint-*")] == ["checkpoint-000002"]
    with pytest.raises(ConfigError, match="no checkpoint"):
        Trainer(TrainConfig(**{**cfg.to_dict(), "output": str(tmp_path / "empty"), "resume": True}))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kd_weight": 0.5, "mode": "full"}, "needs mode lora"),
        ({"kd_weight": 0.5, "task": "classification"}, "no base-model teacher"),
        ({"freeze_layers": 1}, "applies to mode full"),
        ({"replay_fraction": 0.5}, "needs both --replay-data"),
        ({"merge": True, "mode": "full"}, "merge applies to mode lora"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"optimizer": "sgd"}, "optimizer 'sgd' is not one of adamw, adamw8bit"),
        ({"model": ""}, "no model given"),
    ],
)
def test_contradictory_options(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{"model": "m", "data": "d.jsonl", **options}).validate()


def test_config_from_dict_coerces_and_rejects_unknown_keys():
    cfg = TrainConfig.from_dict({"model": "m", "data": "d", "lr": "2e-4", "batch-size": "4",
                                 "targets": "q_proj, v_proj", "gradient_checkpointing": "true"})
    assert cfg.lr == 2e-4 and cfg.batch_size == 4 and cfg.targets == ["q_proj", "v_proj"]
    assert cfg.gradient_checkpointing is True
    with pytest.raises(ConfigError, match=r"unknown option 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"unknown option 'batch_szie' \(did you mean 'batch-size'\?\)"):
        TrainConfig.from_dict({"batch_szie": 4})
    with pytest.raises(ConfigError, match="rank should be int, got 2.5"):
        TrainConfig.from_dict({"rank": 2.5})
