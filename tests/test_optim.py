"""AdamW8bit: kernel step vs the pure-torch reference, skipping, resuming, schedulers, training parity.

CPU: the kernel runs under TRITON_INTERPRET=1, whose fp32 arithmetic is IEEE op by op like the
reference's, so the two agree bit for bit. GPU (`-m gpu`): the kernel is compiled without FMA
contraction; with IEEE sqrt/division it agrees bit for bit there too, and with the hardware's
approximate ones (the default) the states still do and the params agree to rounding.
"""

import copy
import io
import math
import os

import pytest
import torch
from conftest import rel_err

from lora_engine.optim import AdamW8bit, adamw8bit_step_reference, dequantize_blockwise

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Kernel runs on CPU tensors need the interpreter (a GPU machine runs the `gpu` tests instead).
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
# Sizes: 8-bit with a partial last block, 8-bit spanning several programs, and fp32-state ones.
SIZES = [(70, 90), (4096 * 3 + 17,), (300,), (64, 64), (1000,)]


def make_params(dtype, device="cpu", sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in sizes]


def make_grads(params, step, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    # Per-tensor scales far apart and a few large outliers: blocks with real dynamic range.
    out = []
    for i, p in enumerate(params):
        x = torch.randn(p.shape, generator=g) * 10.0 ** (i - 3)
        x = x * torch.where(torch.rand(p.shape, generator=g) < 0.01, 30.0, 1.0)
        out.append(x.to(device=p.device, dtype=p.dtype))
    return out


def run_steps(params, n_steps, use_kernel, groups=None, seed=0, **kw):
    ps = [p.clone().requires_grad_() for p in params]
    spec = groups(ps) if groups else ps
    opt = AdamW8bit(spec, use_kernel=use_kernel, **kw)
    for t in range(n_steps):
        for p, g in zip(ps, make_grads(params, t, seed)):
            p.grad = g
        opt.step()
    return ps, opt


def assert_same_state(opt_a, ps_a, opt_b, ps_b):
    for a, b in zip(ps_a, ps_b):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, k
            assert torch.equal(sa[k], sb[k]), k


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference(dtype):
    """Two param groups (different lr/wd/block size), 8-bit and fp32 states, several steps."""
    params = make_params(dtype)
    groups = lambda ps: [
        dict(params=ps[:3], lr=3e-3, block_size=256),
        dict(params=ps[3:], lr=1e-2, weight_decay=0.1, block_size=64, betas=(0.8, 0.99)),
    ]
    pk, ok = run_steps(params, 4, True, groups)
    pr, orf = run_steps(params, 4, False, groups)
    assert all(tab.aligned for _, tab in ok._tables.values())
    for a, b in zip(pk, pr):
        assert torch.equal(a, b)
    assert_same_state(ok, pk, orf, pr)
    assert "state1" in ok.state[pk[0]] and "exp_avg" in ok.state[pk[2]]
    assert ok.state[pk[0]]["step"].item() == 4.0


def misaligned(t, k=1):
    """A copy of t whose storage starts k elements into a buffer (not 16-byte aligned for k = 1)."""
    buf = torch.zeros(t.numel() + k, dtype=t.dtype, device=t.device)
    out = buf[k:].view(t.shape)
    out.copy_(t)
    return out


def run_misaligned(params, n_steps, use_kernel):
    ps = [misaligned(p).requires_grad_() for p in params]
    opt = AdamW8bit(ps, use_kernel=use_kernel, lr=1e-3)
    for t in range(n_steps):
        for p, g in zip(ps, make_grads(params, t)):
            p.grad = misaligned(g)
        opt.step()
    return ps, opt


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_misaligned_tensors_match_reference(dtype):
    """Params and grads that do not start on 16 bytes take the element-addressed path."""
    params = make_params(dtype)
    pk, ok = run_misaligned(params, 3, True)
    pr, orf = run_misaligned(params, 3, False)
    assert all(not tab.aligned for _, tab in ok._tables.values())
    for a, b in zip(pk, pr):
        assert torch.equal(a, b)
    assert_same_state(ok, pk, orf, pr)


@interpreted
def test_kernel_stochastic_rounding_matches_reference_and_is_unbiased():
    params = make_params(torch.bfloat16, sizes=[(5000,), (200,)])
    pk, ok = run_steps(params, 3, True, stochastic_rounding=True)
    pr, orf = run_steps(params, 3, False, stochastic_rounding=True)
    for a, b in zip(pk, pr):
        assert torch.equal(a, b)
    # Updates of ~lr = 1e-4 per step are far below half a bf16 ulp at 1.0 (2**-8): round-to-nearest
    # never moves the weights, stochastic rounding moves them by the right amount on average.
    for sr in (False, True):
        p = torch.ones(8192, dtype=torch.bfloat16, requires_grad=True)
        opt = AdamW8bit([p], lr=1e-4, weight_decay=0.0, stochastic_rounding=sr)
        for _ in range(20):
            p.grad = torch.ones_like(p)
            opt.step()
        drift = 1.0 - p.float().mean().item()
        if sr:
            assert drift == pytest.approx(20 * 1e-4, rel=0.1)
        else:
            assert drift == 0.0


@pytest.mark.parametrize("use_kernel", [pytest.param(True, marks=interpreted), False])
def test_nonfinite_grad_skips_everything(use_kernel):
    params = make_params(torch.float32)
    ps, opt = run_steps(params, 2, use_kernel)
    before_p = [p.detach().clone() for p in ps]
    before_s = copy.deepcopy(opt.state_dict()["state"])
    for p, g in zip(ps, make_grads(params, 2)):
        p.grad = g
    ps[1].grad[7] = math.inf
    ps[3].grad[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(ps, before_p):
        assert torch.equal(p.detach(), b)
    after_s = opt.state_dict()["state"]
    for i in before_s:
        for k in before_s[i]:
            assert torch.equal(before_s[i][k], after_s[i][k]), (i, k)
    # The next finite step continues exactly as if the bad one never came.
    for p, g in zip(ps, make_grads(params, 2)):
        p.grad = g
    opt.step()
    ref, _ = run_steps(params, 3, use_kernel)
    for a, b in zip(ps, ref):
        assert torch.equal(a, b)


def test_launch_table_orders_whole_chunks_then_tails():
    """Programs: one per whole chunk, tensor by tensor, then one per partial last chunk; a tensor
    of whole chunks has no tail, and a group of small tensors has only tails."""
    from lora_engine.kernels import adamw8bit as K

    chunk = K.CHUNK
    sizes = [3 * chunk, chunk + 5, 7]
    ps = [torch.zeros(n) for n in sizes]
    st = [torch.zeros(n) for n in sizes]
    tab = K.make_table(ps, ps, st, st, None, None, [torch.zeros(()) for _ in sizes], [0, 1, 2], 256, "cpu")
    assert (tab.n_full, tab.n_tails) == (4, 2)
    assert tab.programs.tolist() == [0, 0, 0, 1, 1, 2]
    assert tab.table[:, K.COL_FIRST_PROG.value].tolist() == [0, 3, 4]
    assert tab.launches() == [(4, 0, False), (2, 4, True)]
    small = K.make_table(ps[2:], ps[2:], st[2:], st[2:], None, None, [torch.zeros(())], [0], 256, "cpu")
    assert small.launches() == [(1, 0, True)]


@interpreted
@pytest.mark.parametrize("where", ["first", "second check program", "last whole chunk", "tail end"])
def test_nonfinite_anywhere_is_found(where):
    """The check reads every chunk: several whole chunks a program (the last program's clamped),
    and the partial last chunk in its own launch."""
    from lora_engine.kernels import adamw8bit as K

    n_full = K.CHECK_CHUNKS + 3
    n = n_full * K.CHUNK + 17
    idx = {"first": 0, "second check program": K.CHECK_CHUNKS * K.CHUNK + 5,
           "last whole chunk": n_full * K.CHUNK - 1, "tail end": n - 1}[where]
    ps, opt = run_steps([torch.randn(n)], 1, True)
    before = ps[0].detach().clone()
    ps[0].grad = torch.randn(n)
    ps[0].grad[idx] = math.nan
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and torch.equal(ps[0].detach(), before)


@interpreted
def test_state_dict_resume_is_bit_exact():
    """Save after 3 steps (through torch.save), resume in a fresh optimizer: the next steps are
    identical to an uninterrupted run, states keep their dtypes, stochastic rounding included."""
    params = make_params(torch.bfloat16)
    full, opt_full = run_steps(params, 6, True, stochastic_rounding=True)

    ps, opt = run_steps(params, 3, True, stochastic_rounding=True)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2 = AdamW8bit(resumed, stochastic_rounding=True, lr=123.0)  # lr comes from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["lr"] == 1e-3
    st = opt2.state[resumed[0]]
    assert st["state1"].dtype == torch.uint8 and st["absmax1"].dtype == torch.float32
    for t in range(3, 6):
        for p, g in zip(resumed, make_grads(params, t)):
            p.grad = g
        opt2.step()
    for a, b in zip(resumed, full):
        assert torch.equal(a, b)
    assert_same_state(opt2, resumed, opt_full, full)


def test_lr_scheduler():
    ps = [p.requires_grad_() for p in make_params(torch.float32)]
    opt = AdamW8bit(ps, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: [1.0, 0.5, 0.0][min(t, 2)])
    lrs = []
    for t in range(3):
        before = [p.detach().clone() for p in ps]
        for p, g in zip(ps, make_grads(ps, t)):
            p.grad = g
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        moved = any(not torch.equal(p.detach(), b) for p, b in zip(ps, before))
        assert moved == (lrs[-1] > 0)
    assert lrs == [1e-2, 5e-3, 0.0]
    assert opt.state[ps[0]]["step"].item() == 3.0  # states advance even at lr 0
    sd = sched.state_dict()
    assert sd["last_epoch"] == 3


def test_reference_step_first_update_is_adamw():
    """Step 1 from zero states: m, v are exact for the update (quantization comes after), so the
    8-bit step equals torch.optim.AdamW's first step to fp32 rounding."""
    p0 = torch.randn(5000)
    g = torch.randn(5000)
    a = p0.clone().requires_grad_()
    b = p0.clone().requires_grad_()
    a.grad, b.grad = g.clone(), g.clone()
    AdamW8bit([a], lr=1e-2, weight_decay=0.1).step()
    torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1).step()
    assert rel_err(a - p0, b - p0) < 1e-5


def test_state_layout_and_bytes():
    p = torch.zeros(10_000, requires_grad=True)
    small = torch.zeros(100, requires_grad=True)
    opt = AdamW8bit([p, small], block_size=256)
    p.grad, small.grad = torch.randn(10_000), torch.randn(100)
    opt.step()
    st = opt.state[p]
    assert st["state1"].shape == (10_000,) and st["state1"].dtype == torch.uint8
    assert st["absmax1"].shape == (40,) and st["absmax2"].dtype == torch.float32
    nbytes = sum(v.numel() * v.element_size() for k, v in st.items() if k != "step")
    assert nbytes / p.numel() == pytest.approx(2 + 8 / 256, rel=0.01)
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    # Dequantized m after one step is (1 - β1) g to within the map's resolution.
    m = dequantize_blockwise(st["state1"], st["absmax1"], signed=True)
    assert rel_err(m, 0.1 * p.grad) < 0.02


@interpreted
def test_reference_path_on_llama_matches_kernel_path():
    """The optimizer's grouping (many tensors, one launch per kind) on a real model: kernel and
    reference paths give identical weights after a few steps."""
    torch.manual_seed(0)
    model_a = tiny_llama()
    model_b = copy.deepcopy(model_a)
    data = make_batches(3)
    opts = [AdamW8bit(m.parameters(), lr=3e-3, use_kernel=k) for m, k in ((model_a, True), (model_b, False))]
    for x in data:
        for m, opt in zip((model_a, model_b), opts):
            m(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Training parity with torch.optim.AdamW.

VOCAB = 96


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg)


def make_batches(n, batch=8, seq=32, seed=0):
    """Sequences of a noisy deterministic process: next token = (a·token + b) mod VOCAB with
    per-sequence (a, b), so the loss falls steadily but not to zero."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a = torch.randint(1, 4, (batch, 1), generator=g)
        b = torch.randint(0, VOCAB, (batch, 1), generator=g)
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(1, seq):
            x[:, t] = (a[:, 0] * x[:, t - 1] + b[:, 0]) % VOCAB
        noise = torch.rand(batch, seq, generator=g) < 0.1
        x = torch.where(noise, torch.randint(0, VOCAB, (batch, seq), generator=g), x)
        out.append(x)
    return out


def train(make_opt, steps, data, seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = tiny_llama().to(device)
    opt = make_opt(model.parameters())
    losses = []
    for t in range(steps):
        x = data[t % len(data)].to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_training_parity_with_torch_adamw():
    """Tiny Llama, 300 steps: the mean loss over the last pass of the data (50 batches, so batch
    difficulty averages out) is within 2% of torch AdamW's. (Pure-torch reference path: the
    kernel's math at CPU speed; kernel == reference is tested above.)"""
    data = make_batches(50)
    hp = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ours = train(lambda ps: AdamW8bit(ps, use_kernel=False, **hp), 300, data)
    ref = train(lambda ps: torch.optim.AdamW(ps, **hp), 300, data)
    tail = lambda xs: sum(xs[-50:]) / 50
    assert ours[0] == pytest.approx(ref[0], rel=1e-6)
    assert tail(ref) < 0.75 * ref[0]  # it learned something
    assert abs(tail(ours) - tail(ref)) / tail(ref) < 0.02, (tail(ours), tail(ref))


@pytest.mark.gpu
def test_gpu_training_parity_with_torch_adamw():
    """The same on the GPU through the compiled kernel with its default (approximate) sqrt and
    division: within 2% of torch AdamW's loss on the same device."""
    data = make_batches(50)
    hp = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ours = train(lambda ps: AdamW8bit(ps, **hp), 300, data, device="cuda")
    ref = train(lambda ps: torch.optim.AdamW(ps, **hp), 300, data, device="cuda")
    tail = lambda xs: sum(xs[-50:]) / 50
    assert tail(ref) < 0.75 * ref[0]
    assert abs(tail(ours) - tail(ref)) / tail(ref) < 0.02, (tail(ours), tail(ref))


# ----------------------------------------------------------------------------------------------
# GPU: the compiled kernel against the reference, from the same non-trivial state.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("ieee", [True, False])
def test_gpu_kernel_matches_reference(dtype, stochastic, ieee, monkeypatch):
    from lora_engine.kernels import adamw8bit

    if stochastic and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding is for bf16 params")
    monkeypatch.setattr(adamw8bit, "IEEE_MATH", ieee)
    sizes = [(2048, 2048), (4097, 33), (1000,), (5632, 64), (3, 5000), (128,)]
    params = make_params(dtype, "cuda", sizes)
    # Warm the states up with the reference, then one step of each from identical copies.
    base, base_opt = run_steps(params, 5, False, stochastic_rounding=stochastic, lr=1e-3)
    opts, outs = [], []
    for use_kernel in (True, False):
        ps = [p.detach().clone().requires_grad_() for p in base]
        opt = AdamW8bit(ps, use_kernel=use_kernel, stochastic_rounding=stochastic, lr=1e-3)
        sd = base_opt.state_dict()
        opt.load_state_dict(sd)
        for p, g in zip(ps, make_grads(params, 5)):
            p.grad = g
        opt.step()
        opts.append(opt)
        outs.append(ps)
    if ieee:
        # Bit for bit: the kernel is compiled without FMA contraction and with IEEE sqrt and
        # division, so the GPU rounds every operation as the reference does.
        for pk, pr in zip(*outs):
            assert torch.equal(pk, pr), pk.shape
    else:
        # sqrt.approx and div.full (<= 2 ulp each) change the fp32 update by a few ulp: the param
        # moves by at most ~one unit of its own dtype, and rarely.
        eps = torch.finfo(dtype).eps
        for pk, pr, p0 in zip(*outs, base):
            pk, pr, p0 = pk.detach().double(), pr.detach().double(), p0.detach().double()
            assert bool(((pk - pr).abs() <= 2 * eps * pr.abs() + 1e-5 * (pr - p0).abs()).all()), pk.shape
            assert (pk != pr).double().mean().item() < 0.02, pk.shape
    # m, v, codes and absmax do not depend on the approximate operations: exact either way.
    assert_same_state(opts[0], outs[0], opts[1], outs[1])
    assert opts[0].state[outs[0][0]]["step"].item() == 6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_misaligned_tensors_match_aligned(dtype):
    """The element-addressed path (tensors not on 16 bytes) computes what the 16-byte one does."""
    params = make_params(dtype, "cuda", [(2048, 2048), (4097, 33), (1000,), (3, 5000)])
    pa, oa = run_steps(params, 3, True, lr=1e-3)
    pm, om = run_misaligned(params, 3, True)
    assert all(tab.aligned for _, tab in oa._tables.values())
    assert all(not tab.aligned for _, tab in om._tables.values())
    for a, b in zip(pa, pm):
        assert torch.equal(a, b)
    assert_same_state(oa, pa, om, pm)


@pytest.mark.gpu
def test_gpu_skip_without_sync_then_warns():
    params = make_params(torch.bfloat16, "cuda")
    ps, opt = run_steps(params, 2, True)
    before = [p.detach().clone() for p in ps]
    steps_before = opt.state[ps[0]]["step"].item()
    for p, g in zip(ps, make_grads(params, 2)):
        p.grad = g
    ps[0].grad[3, 3] = math.nan
    opt.step()  # queued; nothing reported yet
    torch.cuda.synchronize()
    for p, b in zip(ps, before):
        assert torch.equal(p, b)
    assert opt.state[ps[0]]["step"].item() == steps_before
    assert opt.skipped_steps == 1
    for p, g in zip(ps, make_grads(params, 3)):
        p.grad = g
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.state[ps[0]]["step"].item() == steps_before + 1


@pytest.mark.gpu
def test_gpu_reference_step_function_on_cuda():
    """adamw8bit_step_reference runs on CUDA tensors too (the benchmark's correctness oracle)."""
    p = torch.randn(10_000, device="cuda")
    opt = AdamW8bit([p.requires_grad_()], use_kernel=False)
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    adamw8bit_step_reference(p, torch.randn_like(p), st, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=0.0)
    assert st["step"].item() == 2
