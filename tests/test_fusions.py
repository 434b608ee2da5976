"""lora_engine.fusions on tiny Llama, Mistral and Qwen2 models: the fused model computes the unfused
model's loss, logits and every gradient; other architectures are left alone; unfuse restores.
Also the per-layer checkpointing of lora_engine.checkpointing. CPU, kernels under the interpreter."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from conftest import rel_err

import lora_engine as le
from lora_engine.checkpointing import CheckpointingError, checkpointed_layers, enable_gradient_checkpointing
from lora_engine.fusions import FUSIONS, fuse_model, fused_lm_loss, fused_ops, unfuse_model

VOCAB = 97
ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
}


def tiny(arch: str, layers: int = 2, seed: int = 0):
    cfg_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.2, tie_word_embeddings=False)
    return model_cls(cfg).train()


def batch(seed: int = 1, rows: int = 2, seq: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt whose tokens carry no loss
    return ids, labels


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("arch", list(ARCHS))
def test_full_model_same_loss_and_grads(arch):
    plain = tiny(arch)
    fused = copy.deepcopy(plain)
    counts = fuse_model(fused)
    layers = plain.config.num_hidden_layers
    assert counts == {"cross_entropy": 1, "rms_norm": 2 * layers + 1, "swiglu": layers}
    assert fused_lm_loss(fused)
    ids, labels = batch()
    ref, ref_grads = loss_and_grads(plain, ids, labels)
    out, grads = loss_and_grads(fused, ids, labels)
    assert out.logits is None  # training with labels: the logits are never formed
    assert rel_err(out.loss, ref.loss) <= 1e-6
    assert ref_grads.keys() == grads.keys() and len(grads) == len(list(plain.parameters()))
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_model_same_loss_and_grads(arch):
    base = tiny(arch)
    plain = le.patch_model(copy.deepcopy(base), rank=4, target_modules="all-linear", fused=False)
    fused = le.patch_model(copy.deepcopy(base), rank=4, target_modules="all-linear")
    assert fused_ops(plain) == {} and set(fused_ops(fused)) == set(FUSIONS)
    for model in (plain, fused):  # B non-zero, the same in both, so the adapters act
        torch.manual_seed(3)
        for p in le.lora_parameters(model):
            torch.nn.init.normal_(p, std=0.1)
    ids, labels = batch(seed=2)
    ref, ref_grads = loss_and_grads(plain, ids, labels)
    out, grads = loss_and_grads(fused, ids, labels)
    assert rel_err(out.loss, ref.loss) <= 1e-6
    assert ref_grads.keys() == grads.keys() and any("lora_B" in n for n in grads)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 1e-5, name


def test_eval_and_no_labels_return_logits():
    plain = tiny("llama")
    fused = copy.deepcopy(plain)
    fuse_model(fused)
    ids, labels = batch()
    with torch.no_grad():
        for mode in ("train", "eval"):
            getattr(plain, mode)()
            getattr(fused, mode)()
            ref = plain(input_ids=ids).logits
            out = fused(input_ids=ids).logits
            assert rel_err(out, ref) <= 1e-6, mode
        # with labels but under no_grad (an eval loop): the model's own forward, logits included
        out = fused(input_ids=ids, labels=labels)
        assert out.logits is not None and rel_err(out.loss, plain(input_ids=ids, labels=labels).loss) <= 1e-6


def test_positional_arguments_and_num_items():
    plain = tiny("qwen2")
    fused = copy.deepcopy(plain)
    fuse_model(fused)
    ids, labels = batch()
    mask = torch.ones_like(ids)
    ref = plain(ids, mask, labels=labels, num_items_in_batch=5).loss
    out = fused(ids, mask, labels=labels, num_items_in_batch=5).loss
    assert rel_err(out, ref) <= 1e-6


def test_other_architectures_and_custom_heads_unchanged():
    gemma = tf.GemmaForCausalLM(tf.GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, head_dim=16))
    assert fuse_model(gemma) == {"cross_entropy": 0, "rms_norm": 0, "swiglu": 0}
    assert fused_ops(gemma) == {}
    # A LoRA-wrapped lm_head cannot be multiplied out by hand: the model's own head and loss run.
    model = le.patch_model(tiny("llama"), rank=2, target_modules=["lm_head"])
    assert not fused_lm_loss(model)
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_unknown_fusion_changes_nothing():
    model = tiny("llama")
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse_model(model, ["rms_norm", "rope"])
    with pytest.raises(ValueError, match="unknown fusion"):
        le.patch_model(model, rank=2, fused=["swigluu"])
    assert fused_ops(model) == {} and not any(isinstance(m, le.LoRALinear) for m in model.modules())


def test_unfuse_and_unpatch_restore_the_forwards():
    model = le.patch_model(tiny("mistral"), rank=2)
    assert fused_ops(model)
    le.unpatch_model(model)
    assert fused_ops(model) == {} and all("forward" not in m.__dict__ for m in model.modules())
    fuse_model(model, ["rms_norm"])
    assert fused_ops(model) == {"rms_norm": 5}
    unfuse_model(model)
    assert fused_ops(model) == {}


def test_fused_model_deepcopies_and_saves(tmp_path):
    model = le.patch_model(tiny("llama"), rank=2)
    clone = copy.deepcopy(model)
    ids, labels = batch()
    assert rel_err(clone(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss) <= 1e-6
    le.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# Checkpointing: all layers, the first K


def test_checkpoint_first_k_layers_same_grads():
    plain = le.patch_model(tiny("llama", layers=3), rank=4)
    ids, labels = batch()
    ref, ref_grads = loss_and_grads(plain, ids, labels)
    for k in (0, 1, 3):
        model = copy.deepcopy(plain)
        enable_gradient_checkpointing(model, k)
        flags = [b.gradient_checkpointing for b in checkpointed_layers(model)]
        assert flags == ([True] * 3 if k == 0 else [i < k for i in range(3)])
        out, grads = loss_and_grads(model, ids, labels)
        assert rel_err(out.loss, ref.loss) <= 1e-6
        for name, g in grads.items():
            assert rel_err(g, ref_grads[name]) <= 1e-5, (k, name)


def test_checkpoint_layers_out_of_range():
    model = tiny("llama", layers=2)
    with pytest.raises(CheckpointingError, match=r"the model has 2; give 0..2"):
        enable_gradient_checkpointing(model, 3)
    assert not any(b.gradient_checkpointing for b in checkpointed_layers(model))


@pytest.mark.parametrize("layers", [0, 2])
def test_offloaded_checkpointing_same_loss_and_grads(layers):
    """Offloaded (reentrant-style) recompute with LoRA dropout on: the same masks are drawn again, the
    first block's LoRA weights get gradients though the frozen embedding's output needs none."""
    plain = le.patch_model(tiny("llama", layers=3), rank=4, dropout=0.2)
    for p in le.lora_parameters(plain):
        torch.nn.init.normal_(p, std=0.1)
    ids, labels = batch()
    torch.manual_seed(5)
    ref, ref_grads = loss_and_grads(plain, ids, labels)
    after_ref = torch.randn(3)
    model = copy.deepcopy(plain)
    enable_gradient_checkpointing(model, layers, offload=True)
    torch.manual_seed(5)
    out, grads = loss_and_grads(model, ids, labels)
    assert torch.equal(torch.randn(3), after_ref)  # the RNG stream is where the plain step leaves it
    assert rel_err(out.loss, ref.loss) <= 1e-6
    assert grads.keys() == ref_grads.keys() and "model.layers.0.self_attn.q_proj.lora_A.default.weight" in grads
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 1e-5, name


def test_checkpoint_options_need_gradient_checkpointing():
    from lora_engine.trainer import ConfigError, TrainConfig

    for extra in (dict(checkpoint_layers=2), dict(checkpoint_budget_gib=10.0), dict(checkpoint_offload=True)):
        with pytest.raises(ConfigError, match="gradient-checkpointing"):
            TrainConfig(model="m", data="d.jsonl", **extra).validate()
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(model="m", data="d.jsonl", gradient_checkpointing=True, checkpoint_layers=2,
                    checkpoint_budget_gib=10.0).validate()


@pytest.mark.gpu
@pytest.mark.parametrize("fusions", [True, False])
def test_gpu_fused_and_offloaded_match_plain(fusions):
    """On CUDA (real kernels, the side-stream copies): fused + offloaded checkpointing against the
    plain model, bf16, LoRA on every linear with dropout."""
    base = tiny("llama", layers=3).to("cuda", torch.bfloat16)
    plain = le.patch_model(copy.deepcopy(base), rank=8, dropout=0.1, target_modules="all-linear", fused=False)
    for p in le.lora_parameters(plain):
        torch.nn.init.normal_(p, std=0.05)
    model = copy.deepcopy(plain)
    le.unpatch_model(model)
    model = le.patch_model(model, rank=8, dropout=0.1, target_modules="all-linear", fused=fusions)
    model.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(model, 0, offload=True)
    ids, labels = (t.cuda() for t in batch(rows=4, seq=33))
    torch.manual_seed(9)
    ref, ref_grads = loss_and_grads(plain, ids, labels)
    torch.manual_seed(9)
    out, grads = loss_and_grads(model, ids, labels)
    assert rel_err(out.loss, ref.loss) <= 1e-2
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 3e-2, name
