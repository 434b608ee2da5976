"""The cached direct launch (`lora_engine.kernels.launch`): its key separates every case Triton
compiles separately, and a kernel launched through the cache computes what the JIT launch does."""

import pytest
import torch

from lora_engine.kernels import launch as L
from lora_engine.kernels.swiglu import _silu_mul_fwd_kernel


def _key(*args, constexprs=None, **options):
    return L.launch_key(_silu_mul_fwd_kernel, 0, args, constexprs or {}, options)


def test_key_separates_what_triton_specializes_on():
    base = torch.zeros(64)
    aligned, shifted = base[:32], base[1:33]  # 4-byte offset: not 16-byte aligned
    assert _key(aligned) != _key(shifted)
    assert _key(aligned) != _key(aligned.half())
    assert _key(aligned) == _key(base[4:36])  # 16 bytes further: still aligned
    param = torch.nn.Parameter(aligned.clone())  # a Tensor subclass is keyed as a tensor
    assert _key(param) == _key(aligned) != _key(param.half())
    ints = [0, 1, 2, 16, 17, 2**31 - 1, 2**31]  # every int value is its own key
    assert len({_key(v) for v in ints}) == len(ints)
    assert _key(True) != _key(1) and _key(0.5) == _key(2.0) != _key(2)  # floats: only their type
    assert _key(aligned, constexprs={"BLOCK": 8}) != _key(aligned, constexprs={"BLOCK": 16})
    assert _key(aligned, num_warps=4) != _key(aligned, num_stages=4) != _key(aligned)
    assert L.launch_key(_silu_mul_fwd_kernel, 0, (aligned,), {}, {}) != L.launch_key(
        _silu_mul_fwd_kernel, 1, (aligned,), {}, {})


def test_key_separates_tma_descriptors_by_dtype_and_block():
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(t, block):
        return TensorDescriptor(t, t.shape, t.stride(), block)

    x = torch.zeros(64, 64)
    assert _key(desc(x, [16, 32])) == _key(desc(torch.ones(32, 64), [16, 32]))  # shapes are runtime values
    assert _key(desc(x, [16, 32])) != _key(desc(x, [32, 16]))
    assert _key(desc(x, [16, 32])) != _key(desc(x.half(), [16, 32]))


def test_plain_int_grid_helpers():
    for a in range(1, 300):
        for b in (1, 7, 16, 64):
            assert L.cdiv(a, b) == -(-a // b) == (a + b - 1) // b
        assert L.next_power_of_2(a) >= a and L.next_power_of_2(a) // 2 < a
        assert L.next_power_of_2(a) & (L.next_power_of_2(a) - 1) == 0


def test_constexprs_must_follow_runtime_args_in_signature_order():
    g = torch.randn(8)
    with pytest.raises(TypeError, match="runtime arguments in signature order"):
        L.launch(_silu_mul_fwd_kernel, (1,), (g, g), dict(BLOCK=8, ROUND_BF16=False, n=8))
    with pytest.raises(TypeError, match=r"constexpr in signature order \(BLOCK, ROUND_BF16\)"):
        L.launch(_silu_mul_fwd_kernel, (1,), (g, g, g, 8), dict(ROUND_BF16=False, BLOCK=8))


@pytest.mark.gpu
def test_gpu_cached_launch_recompiles_for_misaligned_and_odd_arguments():
    """The same kernel through the cache with aligned rows, then 2-byte-shifted rows and odd sizes,
    then aligned again: each result matches torch (a kernel specialized for aligned addresses
    reused on shifted ones would read the wrong elements or fault)."""
    from lora_engine.kernels.lora_linear import lora_down

    torch.manual_seed(0)
    buf = torch.randn(300 * 130 + 8, device="cuda", dtype=torch.float16)
    a = torch.randn(8, 129, device="cuda", dtype=torch.float32)
    b = torch.randn(40, 8, device="cuda", dtype=torch.float32)
    cases = [
        buf[: 256 * 128].view(256, 128),  # aligned, sizes divisible by 16
        buf[1 : 1 + 255 * 129].view(255, 129),  # shifted by one element, odd sizes
        buf[16 : 16 + 1 * 128].view(1, 128),  # a single row (Triton specializes M == 1)
        buf[: 256 * 128].view(256, 128),  # back to the first case: the cached kernel again
    ]
    assert not L._launch_hook_set(), "no launch hook is installed: launches must take the cached path"
    L._compiled.clear()
    for x in cases:
        k = x.shape[1]
        for _ in range(2):  # the second launch of each case goes through the cache
            xa, y = lora_down(x, a[:, :k], 0.5, x.dtype, lora_b=b)
            ref = 0.5 * (x.double() @ a[:, :k].half().double().t())
            torch.testing.assert_close(xa.double(), ref, rtol=2e-3, atol=2e-3)
            ref_y = xa.double() @ b.half().double().t()
            torch.testing.assert_close(y.double(), ref_y, rtol=2e-3, atol=2e-3)
    assert len(L._compiled) == 3  # three distinct specializations, each launched through the cache
