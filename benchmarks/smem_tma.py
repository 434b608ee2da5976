"""Shared memory the persistent TMA GEMM (`gemm_lora_tma`'s kernel) needs on Hopper, from the compiler alone: the
kernel is compiled for sm_90 with its default tiles (no GPU needed; Triton's bundled ptxas), per operand dtype and
LoRA mode, against the 232,448 bytes a block may use on an H100/H200. Why fp32 x and ranks above 64 do not run on it
(`ops._wide`).

`python benchmarks/smem_tma.py`
"""

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lora_engine.kernels import lora_linear as K

HOPPER_SMEM = 232_448
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def shared_bytes(dtype: torch.dtype, r_pad: int, grad_a: bool) -> int:
    """Bytes of shared memory of the kernel for dx = dy·W + g·A (with dA in its epilogue if grad_a), W read
    through strides as the backward reads it, or for the forward with a given xa (rows_out) when not grad_a."""
    fn = K._gemm_lora_tma_kernel
    names = list(fn.arg_names)
    cfg = K._tma_config()
    t = TYPES[dtype]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    rows_out = not grad_a
    blocks = {"a_desc": (bm, bk), "b_desc": (bn, bk) if rows_out else (bk, bn),
              "out_desc": (bm, bn // cfg["EPI_SPLIT"]), "down_desc": (r_pad, bk)}
    const = dict(HAS_BIAS=False, HAS_LORA=True, HAS_DOWN=False, HAS_DROPOUT=False, HAS_GRAD_A=grad_a,
                 B_ROWS_OUT=rows_out, UPCAST=False, PRECISION=K._precision(dtype), R_PAD=r_pad, BLOCK_M=bm, BLOCK_N=bn,
                 BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], EPI_SPLIT=cfg["EPI_SPLIT"], CHUNK_N=1, CHUNK_M=1,
                 NUM_PROGRAMS=132, PREFETCH=False)
    sig = {}
    for n in names:
        if n in blocks:
            sig[n] = f"tensordesc<{t}[{blocks[n][0]},{blocks[n][1]}]>"
        elif n in const:
            sig[n] = "constexpr"
        elif n == "da_ptr":
            sig[n] = "*fp32"
        elif n == "bits_ptr":
            sig[n] = "*u8"
        elif n.endswith("_ptr"):
            sig[n] = "*" + t
        else:
            sig[n] = "fp32" if n == "scale" else "i32"
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared


def main():
    print(f"# triton {triton.__version__}, sm_90, tiles {K._tma_config()}; limit {HOPPER_SMEM:,} bytes a block")
    print("| x dtype | kernel | rank pad | shared bytes | fits |")
    print("| --- | --- | --- | --- | --- |")
    for dtype in (torch.bfloat16, torch.float32):
        for grad_a, r_pad in ((False, 16), (True, 64), (True, 128), (True, 256)):
            name = "dx GEMM with dA" if grad_a else "forward, xa given"
            try:
                b = shared_bytes(dtype, r_pad, grad_a)
                cells = f"{b:,} | {'yes' if b <= HOPPER_SMEM else 'no'}"
            except Exception as e:  # the compiler refuses some layouts outright
                cells = f"compile error: {type(e).__name__} | no"
            print(f"| {TYPES[dtype]} | {name} | {r_pad} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
