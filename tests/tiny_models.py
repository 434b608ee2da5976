"""Tiny random Hugging Face models (hidden 32, 1 layer, vocab 64) for the patching tests.

Each entry builds a model in eval mode with every dropout off, and example inputs for it; the
kernels run under the Triton interpreter on CPU, so the models and sequences stay small.
"""

from __future__ import annotations

import copy

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

import lora_engine as le
from lora_engine.patch import adapter_settings

VOCAB = 64
SEQ = 6

_DECODERS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"num_key_value_heads": 1}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"num_key_value_heads": 1}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"num_key_value_heads": 1}),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"num_key_value_heads": 1, "head_dim": 16}),
}


def _decoder(kind: str):
    cfg_cls, model_cls, extra = _DECODERS[kind]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=64, **extra)
    return model_cls(cfg)


def _build(kind: str):
    if kind in _DECODERS:
        return _decoder(kind)
    if kind == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
            word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0))
    if kind in ("bert", "roberta"):
        cfg_cls, model_cls = ((tf.BertConfig, tf.BertForSequenceClassification) if kind == "bert"
                              else (tf.RobertaConfig, tf.RobertaForSequenceClassification))
        return model_cls(cfg_cls(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=1))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    if kind == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=64))
    if kind == "falcon":
        return tf.FalconForCausalLM(tf.FalconConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            hidden_dropout=0.0, attention_dropout=0.0))
    if kind == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
            num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))
    raise KeyError(kind)


ARCHS = ["llama", "mistral", "qwen2", "gemma", "opt", "bert", "roberta", "gpt2", "gpt_neox", "falcon", "t5"]


def tiny_model(kind: str, seed: int = 0):
    """A fresh tiny `kind` model (fp32, eval mode), the same weights for the same seed."""
    torch.manual_seed(seed)
    return _build(kind).eval()


def tiny_inputs(kind: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Model inputs: token ids in [2, VOCAB) (plus decoder ids for T5)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, SEQ), generator=g)
    inputs = {"input_ids": ids}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, 4), generator=g)
    return inputs


def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def randomize_lora(model, seed: int = 2, std: float = 0.2) -> None:
    """Gives every LoRA weight (B included, which starts at zero) random values, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in le.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_twin(base, patched, adapter_name: str = "default"):
    """PEFT's `get_peft_model` on a copy of the unpatched `base`, with the patched model's LoRA weights."""
    s = adapter_settings(patched, adapter_name)
    config = LoraConfig(
        r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, use_rslora=s.use_rslora,
        target_modules=s.target_modules, modules_to_save=s.modules_to_save, fan_in_fan_out=s.fan_in_fan_out,
    )
    twin = get_peft_model(copy.deepcopy(base), config)
    state = {f"base_model.model.{k}": v for k, v in le.lora_state_dict(patched, adapter_name).items()}
    result = twin.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return twin.eval()


def snapshot(model) -> dict:
    """Everything patching could change: module types by path, tensors, requires_grad, attributes."""
    return {
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attrs": sorted(k for k in model.__dict__ if k.startswith("_lora")),
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["attrs"] == before["attrs"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
