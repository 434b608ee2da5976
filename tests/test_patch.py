"""patch_model against PEFT on tiny models of every listed architecture, plus behaviour and bad input.

Tolerances (fp32): logits ≤ 1e-5 relative to PEFT's; LoRA gradients ≤ 1e-4 relative (the kernels
reduce in another order than torch's matmuls, and some gradients are small differences).
"""

import copy
import os

import pytest
import torch
from conftest import rel_err
from tiny_models import (
    ARCHS,
    assert_unchanged,
    logits,
    peft_twin,
    randomize_lora,
    snapshot,
    tiny_inputs,
    tiny_model,
)
from transformers.pytorch_utils import Conv1D

import lora_engine as le
from lora_engine.layers import LoRALinear, ModulesToSave
from lora_engine.patch import adapter_settings, linear_module_names, remove_adapter

EXPECTED_TARGETS = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "gemma", "opt"], {"q_proj", "v_proj"}),
    **dict.fromkeys(["bert", "roberta"], {"query", "value"}),
    "gpt2": {"c_attn"},
    **dict.fromkeys(["gpt_neox", "falcon"], {"query_key_value"}),
    "t5": {"q", "v"},
}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad for k, p in zip(le.lora_state_dict(model), le.lora_parameters(model))}


@pytest.mark.parametrize("kind", ARCHS)
def test_matches_peft_logits_and_grads(kind):
    base = tiny_model(kind)
    ours = le.patch_model(copy.deepcopy(base), rank=4)
    randomize_lora(ours)
    twin = peft_twin(base, ours)
    inputs = tiny_inputs(kind)

    out, ref = logits(ours, inputs), logits(twin, inputs)
    assert rel_err(out, ref) <= 1e-5
    out.square().mean().backward()
    ref.square().mean().backward()
    twin_params = dict(twin.named_parameters())
    grads = lora_grads(ours)
    assert grads and all(g is not None for g in grads.values())
    for key, grad in grads.items():
        assert rel_err(grad, twin_params[f"base_model.model.{key}"].grad) <= 1e-4, key


@pytest.mark.parametrize("kind", ARCHS)
def test_default_targets_and_frozen_base(kind):
    model = le.patch_model(tiny_model(kind), rank=2)
    wrapped = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == EXPECTED_TARGETS[kind]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):
        assert layer.fan_in_fan_out == (kind == "gpt2") == isinstance(layer.base_layer, Conv1D)
        assert layer.lora_A["default"].weight.dtype == torch.float32
        assert not layer.lora_B["default"].weight.any()  # B starts at zero: the patched model = base


@pytest.mark.parametrize("conv1d", [False, True])
def test_lora_linear_runs_the_fused_op(conv1d):
    torch.manual_seed(0)
    base = Conv1D(24, 40) if conv1d else torch.nn.Linear(40, 24)  # Conv1D(nf=out, nx=in)
    layer = LoRALinear(base)
    layer.add_adapter("default", rank=3, alpha=6)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 5, 40, requires_grad=True)
    y = layer(x)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels, not the torch fallback
        assert type(y.grad_fn).__name__ == "LoRALinearFunctionBackward"
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert rel_err(y, base(x) + 2.0 * (x @ a.t() @ b.t())) <= 1e-5
    assert y.shape == (2, 5, 24) and (layer.in_features, layer.out_features) == (40, 24)
    assert not base.weight.requires_grad


def test_peft_state_dict_keys_and_init():
    model = le.patch_model(tiny_model("llama"), rank=4, alpha=16, use_rslora=True)
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 16 / 2  # rsLoRA: alpha / sqrt(r)
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert layer.lora_A["default"].weight.abs().max() <= bound
    assert le.patch_model(tiny_model("llama"), rank=4).model.layers[0].self_attn.q_proj.scaling["default"] == 2


def test_target_forms_list_regex_all_linear():
    suffix = le.patch_model(tiny_model("llama"), target_modules=["k_proj", "mlp.up_proj"])
    assert {p for p, m in suffix.named_modules() if isinstance(m, LoRALinear)} == {
        "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"}

    regex = le.patch_model(tiny_model("llama"), target_modules=r".*\.(o_proj|down_proj)")
    assert {p.rsplit(".", 1)[-1] for p, m in regex.named_modules() if isinstance(m, LoRALinear)} == {
        "o_proj", "down_proj"}
    assert adapter_settings(regex).target_modules == r".*\.(o_proj|down_proj)"

    model = tiny_model("llama")
    every = set(linear_module_names(model)) - {"lm_head"}
    model = le.patch_model(model, target_modules="all-linear")
    assert {p for p, m in model.named_modules() if isinstance(m, LoRALinear)} == every
    assert isinstance(model.lm_head, torch.nn.Linear)

    gpt2 = le.patch_model(tiny_model("gpt2"), target_modules="all-linear")  # lm_head is tied to wte
    assert not isinstance(gpt2.lm_head, LoRALinear)
    assert {p.rsplit(".", 1)[-1] for p, m in gpt2.named_modules() if isinstance(m, LoRALinear)} == {
        "c_attn", "c_proj", "c_fc"}


def test_all_linear_matches_peft():
    base = tiny_model("gpt2")
    ours = le.patch_model(copy.deepcopy(base), rank=2, target_modules="all-linear")
    randomize_lora(ours)
    twin = peft_twin(base, ours)
    inputs = tiny_inputs("gpt2")
    assert rel_err(logits(ours, inputs), logits(twin, inputs)) <= 1e-5


def test_all_linear_leaves_out_modules_to_save():
    model = le.patch_model(tiny_model("roberta"), target_modules="all-linear", modules_to_save=["classifier"])
    wrapped = {p for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped and not any(p.startswith("classifier") for p in wrapped)


def test_modules_to_save_head_trains_and_matches_peft():
    base = tiny_model("roberta")
    ours = le.patch_model(copy.deepcopy(base), rank=4, modules_to_save=["classifier"])
    randomize_lora(ours)
    assert isinstance(ours.classifier, ModulesToSave)
    keys = set(le.lora_state_dict(ours))
    assert "classifier.modules_to_save.default.dense.weight" in keys
    assert "classifier.modules_to_save.default.out_proj.bias" in keys
    assert all(p.requires_grad for p in ours.classifier.modules_to_save.parameters())
    assert not any(p.requires_grad for p in ours.classifier.original_module.parameters())
    twin = peft_twin(base, ours)
    inputs = tiny_inputs("roberta")
    out, ref = logits(ours, inputs), logits(twin, inputs)
    assert rel_err(out, ref) <= 1e-5
    out.sum().backward()
    ref.sum().backward()
    twin_grad = dict(twin.named_parameters())["base_model.model.classifier.modules_to_save.default.dense.weight"]
    assert rel_err(ours.classifier.modules_to_save["default"].dense.weight.grad, twin_grad.grad) <= 1e-5


def test_several_adapters_set_adapter_and_disable():
    base = tiny_model("llama")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        base_out = logits(base, inputs)
    model = le.patch_model(copy.deepcopy(base), rank=4)
    randomize_lora(model, seed=1)
    le.patch_model(model, rank=2, alpha=3, adapter_name="other", target_modules=["k_proj", "v_proj"])
    randomize_lora(model, seed=5)  # the active adapter: "other"
    only_other = le.patch_model(copy.deepcopy(base), rank=2, alpha=3, adapter_name="other",
                                target_modules=["k_proj", "v_proj"])
    only_other.load_state_dict(model.state_dict(), strict=False)

    with torch.no_grad():
        out_other = logits(model, inputs)
        assert rel_err(out_other, logits(only_other, inputs)) <= 1e-6
        le.set_adapter(model, "default")
        out_default = logits(model, inputs)
        assert rel_err(out_default, out_other) > 1e-3
        with le.disable_adapters(model):
            assert rel_err(logits(model, inputs), base_out) <= 1e-6
        assert torch.equal(logits(model, inputs), out_default)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert len(le.lora_parameters(model, "other")) == 4

    remove_adapter(model, "default")
    assert {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, LoRALinear)} == {
        "k_proj", "v_proj"}
    with torch.no_grad():
        assert rel_err(logits(model, inputs), out_other) <= 1e-6


def test_disable_adapters_restores_after_exception():
    model = le.patch_model(tiny_model("llama"))
    with pytest.raises(RuntimeError), le.disable_adapters(model):
        raise RuntimeError("boom")
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LoRALinear))


def test_generate_matches_peft():
    base = tiny_model("llama")
    ours = le.patch_model(copy.deepcopy(base), rank=4)
    randomize_lora(ours)
    twin = peft_twin(base, ours)
    ids = tiny_inputs("llama", batch=1)["input_ids"]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(ids, **kwargs), twin.generate(input_ids=ids, **kwargs))


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("checkpoint_first", [True, False])
def test_gradient_checkpointing(reentrant, checkpoint_first):
    base = tiny_model("llama")
    inputs = tiny_inputs("llama")
    plain = le.patch_model(copy.deepcopy(base), rank=4)
    randomize_lora(plain)
    model = copy.deepcopy(base)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    if checkpoint_first:
        model.gradient_checkpointing_enable(**kwargs)
    le.patch_model(model, rank=4)
    if not checkpoint_first:
        model.gradient_checkpointing_enable(**kwargs)
    model.load_state_dict(plain.state_dict())
    model.train()
    plain.train()
    logits(model, inputs).square().mean().backward()
    logits(plain, inputs).square().mean().backward()
    ours, ref = lora_grads(model), lora_grads(plain)
    for key, grad in ref.items():
        assert ours[key] is not None, key
        assert rel_err(ours[key], grad) <= 1e-5, key


def test_model_to_dtype():
    model = le.patch_model(tiny_model("llama"), rank=4)
    randomize_lora(model)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        ref = logits(model, inputs)
        model.to(torch.float16)
        assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float16
        out = logits(model, inputs)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) <= 1e-2


def test_state_dict_round_trip():
    inputs = tiny_inputs("gpt2")
    trained = le.patch_model(tiny_model("gpt2"), rank=4)
    randomize_lora(trained)
    fresh = le.patch_model(tiny_model("gpt2", seed=9), rank=4)
    fresh.load_state_dict(trained.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(logits(fresh, inputs), logits(trained, inputs))
    lora_only = tiny_model("gpt2")
    le.patch_model(lora_only, rank=4)
    missing, unexpected = lora_only.load_state_dict(le.lora_state_dict(trained), strict=False)
    assert not unexpected and not any("lora_" in k for k in missing)
    with torch.no_grad():
        assert torch.equal(logits(lora_only, inputs), logits(trained, inputs))


def test_unpatch_restores_the_model():
    model = tiny_model("bert")
    model.bert.embeddings.word_embeddings.requires_grad_(False)
    before = snapshot(model)
    le.patch_model(model, rank=4, modules_to_save=["classifier"])
    randomize_lora(model)
    le.patch_model(model, rank=2, adapter_name="second", target_modules="all-linear")
    assert le.unpatch_model(model) is model
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError, and the model exactly as it was.


BAD_PATCH = [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"rank": -3}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"alpha": -1}, "alpha must be a positive number"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"target_modules": ["nope"]}, r"match no module of LlamaForCausalLM\. Linear layers that exist: "
                                   r"\[down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj\]"),
    ({"target_modules": ["q_proj", "v_prj"]}, r"\['v_prj'\] match no module.*Fix or drop those names"),
    ({"target_modules": r"model\.nothing.*"}, "match no module of LlamaForCausalLM"),
    ({"target_modules": "(unclosed"}, "does not compile"),
    ({"target_modules": ["self_attn"]}, r"LoRA cannot wrap: \['model.layers.0.self_attn \(LlamaAttention\)'\]"),
    ({"target_modules": []}, "target_modules must be None, a list of module names"),
    ({"target_modules": 5}, "target_modules must be None, a list of module names"),
    ({"modules_to_save": ["classifier"]}, "modules_to_save entry 'classifier' matches no module"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of module names"),
    ({"modules_to_save": ["q_proj"]}, "both LoRA targets and modules_to_save"),
    ({"adapter_name": "a.b"}, "adapter_name must be a non-empty string without dots"),
]


@pytest.mark.parametrize("kwargs,message", BAD_PATCH, ids=[str(k) for k, _ in BAD_PATCH])
def test_bad_input_leaves_model_unchanged(kwargs, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        le.patch_model(model, **kwargs)
    assert_unchanged(model, before)


def test_patching_twice_with_one_name_is_refused():
    model = le.patch_model(tiny_model("llama"), rank=4)
    randomize_lora(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'default'.*another adapter_name"):
        le.patch_model(model, rank=8, target_modules="all-linear")
    assert_unchanged(model, before)


def test_unknown_architecture_needs_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"No default LoRA targets for model_type None.*target_modules=\[\.\.\.\]"):
        le.patch_model(model)
    assert_unchanged(model, before)
    le.patch_model(model, target_modules=["0"])
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], torch.nn.Linear)


def test_api_on_unpatched_model_is_refused():
    model = tiny_model("llama")
    before = snapshot(model)
    for call in (le.unpatch_model, le.merge, le.unmerge, le.lora_parameters, le.lora_state_dict):
        with pytest.raises(ValueError, match="(no LoRA adapter|not patched|call patch_model first)"):
            call(model)
    with pytest.raises(ValueError, match="no LoRA adapter 'x'"):
        le.set_adapter(model, "x")
    with pytest.raises(ValueError, match="no LoRA adapters to disable"), le.disable_adapters(model):
        pass
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_peft_and_compiles(dtype):
    base = tiny_model("llama").cuda().to(dtype)
    ours = le.patch_model(copy.deepcopy(base), rank=8)
    randomize_lora(ours)
    twin = peft_twin(base, ours)
    inputs = {k: v.cuda() for k, v in tiny_inputs("llama").items()}
    with torch.no_grad():
        assert rel_err(logits(ours, inputs), logits(twin, inputs)) <= 2e-2
    layer = ours.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 32, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(4, layer.out_features, device="cuda", dtype=dtype)
    params = (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: a graph break inside the layer fails
    grads = {}
    for name, fn in (("eager", layer), ("compiled", compiled)):  # no dropout (patch_model's default): one function
        y = fn(x)
        grads[name] = (y, *torch.autograd.grad(y, params, dy))
    for what, e, c in zip(("y", "dx", "dA", "dB"), grads["eager"], grads["compiled"]):
        assert rel_err(c, e) <= 1e-3, what
