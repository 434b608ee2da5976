"""merge_lora_ (lora_engine/kernels/merge.py) against an fp64 reference, and merge/unmerge/export of models.

Tolerances: a merge must land within one rounding of W's dtype of the fp64 result: half an ulp,
plus the fp32 arithmetic before the store ((r + 2)·2⁻²⁴·|scale|·Σ|B||A| for the r-term product,
2⁻²⁴·|W + ΔW| for the add); merge then unmerge within one ulp of the larger of |W| and |W + ΔW|
(plus the same fp32 slack); merged logits within 1e-5 relative of unmerged (fp32).
"""

import copy
import os

import pytest
import torch
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import assert_unchanged, logits, randomize_lora, snapshot, tiny_inputs, tiny_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import lora_engine as le
from lora_engine.kernels.merge import kernel_supports, merge_lora_
from lora_engine.layers import LoRALinear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (x in fp64), the smallest normal's spacing below it."""
    info = torch.finfo(dtype)
    mag = x.abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def poisoned_weight(n, k, dtype, transposed, device="cpu", seed=0):
    """(W, storage): an (n, k) weight living inside a NaN-filled buffer; transposed=True gives
    GPT-2 Conv1D's layout (a transposed view of (k, n) storage) with a row pitch wider than k."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = (k, n) if transposed else (n, k)
    storage = torch.full((rows + 2, cols + 3), float("nan"), dtype=dtype, device=device)
    inner = storage[1:-1, 2:-1]
    inner.copy_(torch.randn(rows, cols, generator=g).to(dtype))
    return (inner.t() if transposed else inner), storage


def check_poison(storage):
    border = torch.ones_like(storage, dtype=torch.bool)
    border[1:-1, 2:-1] = False
    assert storage[border].isnan().all(), "merge wrote outside the weight"
    assert not storage[~border].isnan().any()


def fp32_slack(ref, lora_a, lora_b, scale):
    """Bound on the fp32 arithmetic's error before the one rounding to W's dtype."""
    r = lora_a.shape[0]
    product = abs(scale) * (lora_b.double().abs() @ lora_a.double().abs())
    return (r + 2) * 2.0**-24 * product + 2.0**-24 * ref.abs()


def check_one_rounding(merged, ref, lora_a, lora_b, scale):
    bound = 0.5 * ulp(ref, merged.dtype) + fp32_slack(ref, lora_a, lora_b, scale)
    assert ((merged.double() - ref).abs() <= bound).all()


def merge_and_check(n, k, r, dtype, transposed, scale, lora_dtype, device="cpu", seed=0):
    weight, storage = poisoned_weight(n, k, dtype, transposed, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    lora_a = torch.randn(r, k, generator=g).to(device, lora_dtype)
    lora_b = torch.randn(n, r, generator=g).to(device, lora_dtype)
    original = weight.double().clone()
    ref = original + scale * (lora_b.double() @ lora_a.double())

    assert merge_lora_(weight, lora_a, lora_b, scale) is weight
    check_poison(storage)
    check_one_rounding(weight, ref, lora_a, lora_b, scale)

    merge_lora_(weight, lora_a, lora_b, -scale)
    check_poison(storage)
    tol = ulp(torch.maximum(original.abs(), ref.abs()), dtype) + 2 * fp32_slack(ref, lora_a, lora_b, scale)
    assert ((weight.double() - original).abs() <= tol).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 70), k=st.integers(1, 70), r=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES), lora_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    transposed=st.booleans(), scale=st.floats(-4, 4).filter(lambda s: abs(s) > 1e-3),
    seed=st.integers(0, 2**16),
)
def test_merge_one_rounding_and_unmerge_restores(n, k, r, dtype, lora_dtype, transposed, scale, seed):
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert kernel_supports(torch.empty(1, dtype=dtype))  # the kernel runs, not the torch fallback
    merge_and_check(n, k, r, dtype, transposed, scale, lora_dtype, seed=seed)


def test_merge_fallback_for_float64():
    assert not kernel_supports(torch.empty(1, dtype=torch.float64))
    merge_and_check(9, 7, 3, torch.float64, True, 0.5, torch.float32)


def test_merge_rejects_mismatched_shapes():
    weight = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"lora_a \(2, 5\) should be \(2, 6\)"):
        merge_lora_(weight, torch.zeros(2, 5), torch.zeros(4, 2), 1.0)
    assert not weight.any()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "falcon"])
def test_merged_logits_equal_unmerged(kind):
    model = le.patch_model(tiny_model(kind), rank=4, dropout=0.1)
    randomize_lora(model)
    inputs = tiny_inputs(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = logits(model, inputs)
        le.merge(model)
        assert all(m.merged == "default" for m in model.modules() if isinstance(m, LoRALinear))
        assert rel_err(logits(model, inputs), ref) <= 1e-5
        le.merge(model)  # already merged: nothing more happens
        assert rel_err(logits(model, inputs), ref) <= 1e-5
        le.unmerge(model)
        assert rel_err(logits(model, inputs), ref) <= 1e-6
    for key, value in model.state_dict().items():
        assert (value - state[key]).abs().max() <= 1e-6 * (1 + state[key].abs().max()), key


def test_merge_active_adapter_of_several():
    model = le.patch_model(tiny_model("llama"), rank=4)
    le.patch_model(model, rank=2, adapter_name="other", target_modules=["k_proj"])
    randomize_lora(model)
    le.set_adapter(model, "default")
    randomize_lora(model, seed=4)
    le.set_adapter(model, "other")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        ref = logits(model, inputs)
        le.merge(model)
        merged = {p.rsplit(".", 1)[-1]: m.merged for p, m in model.named_modules() if isinstance(m, LoRALinear)}
        assert merged == {"q_proj": None, "k_proj": "other", "v_proj": None}
        assert rel_err(logits(model, inputs), ref) <= 1e-5
        exported = le.unpatch_model(model, merge=True)
        assert rel_err(logits(exported, inputs), ref) <= 1e-5


def test_merged_model_refuses_switching_and_disabling():
    model = le.patch_model(tiny_model("llama"), rank=4)
    le.patch_model(model, rank=4, adapter_name="other")
    le.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        le.set_adapter(model, "default")
    with pytest.raises(ValueError, match="unmerge"), le.disable_adapters(model):
        pass
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merged adapter; call lora_engine.unmerge\(model\) before adding"):
        le.patch_model(model, adapter_name="third")
    assert_unchanged(model, before)
    le.unmerge(model)
    le.set_adapter(model, "default")


def test_unpatch_without_merge_unmerges():
    base = tiny_model("gpt2")
    model = le.patch_model(copy.deepcopy(base), rank=4)
    randomize_lora(model)
    le.merge(model)
    le.unpatch_model(model)
    for key, value in base.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, atol=1e-6), key


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_export_merged_reloads_in_transformers(kind, tmp_path):
    model = le.patch_model(tiny_model(kind), rank=4)
    randomize_lora(model)
    inputs = tiny_inputs(kind)
    with torch.no_grad():
        ref = logits(model, inputs)
    exported = le.unpatch_model(model, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in exported.modules())
    assert all(p.requires_grad for p in exported.parameters())  # as before patching
    exported.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(logits(reloaded, inputs), ref) <= 1e-5


def test_export_keeps_trained_modules_to_save(tmp_path):
    model = le.patch_model(tiny_model("bert"), rank=4, modules_to_save=["classifier"])
    randomize_lora(model)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        ref = logits(model, inputs)
    le.unpatch_model(model, merge=True).save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(logits(reloaded, inputs), ref) <= 1e-5


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernel, bf16 and fp16, Linear and Conv1D layouts, odd and large shapes.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("n,k,r", [(4096, 4096, 16), (1000, 3001, 13), (4096, 1024, 64), (37, 129, 1)])
def test_gpu_merge_vs_fp64(dtype, transposed, n, k, r):
    merge_and_check(n, k, r, dtype, transposed, scale=2.0, lora_dtype=torch.float32, device="cuda")
    merge_and_check(n, k, r, dtype, transposed, scale=0.5, lora_dtype=dtype, device="cuda", seed=7)
