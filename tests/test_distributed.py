"""The trainer under torchrun: 2 CPU processes (gloo) against one process with the same global batch.

Each distributed run is `torchrun --nproc-per-node 2` of a small driver around `lora_engine.cli.main`
that also records the gradients the optimizer sees at the first step (gathered whole, on rank 0).
The single-process reference runs `Trainer` here with batch_size × 2. Everything runs the
pure-torch paths (TRITON_INTERPRET=0: the kernels are checked against them elsewhere), fp32,
dropout 0, a constant lr (so a run of 2 steps resumed to 4 equals a run of 4).
Tolerance: relative 1e-5 (fp32; only the order of the sums over ranks differs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import lm_rows, make_model, write_jsonl

from lora_engine.trainer import TrainConfig, Trainer

TOL = 1e-5
TIMEOUT = 120  # seconds per torchrun launch; a hang fails the test instead of the CI job

DRIVER = '''
import json, os, sys
import torch
import lora_engine.trainer as T
from lora_engine import distributed
from lora_engine.cli import main

make = T.make_optimizer

def recording_optimizer(groups, cfg):
    opt = make(groups, cfg)
    def first_step_recorded(opt, args, kwargs):
        if not getattr(opt, "_recorded", False):
            opt._recorded = True
            grads = [p.grad.full_tensor() if distributed.is_dtensor(p.grad) else p.grad
                     for g in opt.param_groups for p in g["params"]]
            if distributed.launched().main:
                torch.save([g.detach().cpu() for g in grads], os.environ["GRADS_OUT"])
    opt.register_step_pre_hook(first_step_recorded)
    return opt

T.make_optimizer = recording_optimizer
sys.exit(main(sys.argv[1:]))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def flags(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def torchrun(tmp: Path, cfg: dict, grads_out: Path) -> subprocess.CompletedProcess:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "GRADS_OUT": str(grads_out),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(driver), "train", *flags(cfg)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun hung for {TIMEOUT} s:\n{e.stderr}")
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def single(tmp: Path, cfg: dict, monkeypatch) -> tuple[dict, list[torch.Tensor]]:
    """The one-process run of `cfg` (batch_size as given), and its first step's gradients."""
    import lora_engine.trainer as T

    grads: list[torch.Tensor] = []
    make = T.make_optimizer

    def recording_optimizer(groups, c):
        opt = make(groups, c)

        def first_step_recorded(opt, args, kwargs):
            if not grads:
                grads.extend(p.grad.detach().clone() for g in opt.param_groups for p in g["params"])

        opt.register_step_pre_hook(first_step_recorded)
        return opt

    monkeypatch.setattr(T, "make_optimizer", recording_optimizer)
    summary = Trainer(TrainConfig(**cfg)).train()
    return summary, grads


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = make_model(root / "llama", "llama")
    data = write_jsonl(root / "train.jsonl", lm_rows(36, seed=1))  # 36 rows: the last global batch is short
    evals = write_jsonl(root / "eval.jsonl", lm_rows(7, seed=2))  # odd: ranks get 4 and 3
    return root, dict(model=model, data=data, eval_data=evals, max_length=16, batch_size=4, lr=1e-2,
                      schedule="constant", dropout=0.0, progress=False, device="cpu", seed=3)


@pytest.fixture
def pure_torch(monkeypatch):
    import lora_engine.kernels.adamw8bit  # noqa: F401  (triton reads TRITON_INTERPRET at import)
    import lora_engine.kernels.lora_linear  # noqa: F401
    import lora_engine.kernels.merge  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def check_same_run(dist_out: Path, ref_out: Path, final: str, dist_grads: list, ref_grads: list) -> None:
    assert len(dist_grads) == len(ref_grads)
    for g, r in zip(dist_grads, ref_grads):
        assert rel(g, r) < TOL
    got, ref = weights(dist_out / final), weights(ref_out / final)
    assert got.keys() == ref.keys()
    for k in ref:
        assert rel(got[k], ref[k]) < TOL, k
    rows, ref_rows = metrics(dist_out), metrics(ref_out)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]  # one row per event: rank 0 alone logs
    for r, q in zip(rows, ref_rows):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in q:
                assert abs(r[key] - q[key]) <= TOL * abs(q[key]), (key, r, q)


def only_rank0_wrote(out: Path) -> None:
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if ".tmp-" in n or ".old-" in n], names  # no second writer's leftovers
    assert len(list(out.glob("checkpoint-*"))) == 1


@pytest.mark.parametrize("mode", ["lora", "lora-fsdp", "full"])
def test_two_ranks_equal_one_process_and_resume(setup, tmp_path, mode, pure_torch, monkeypatch):
    """2 ranks × batch 4 for 2 steps, resumed on 2 ranks to 4 steps == 1 process × batch 8 for 4 steps:
    first-step gradients, final weights, logged losses and eval. lora: gradients all-reduced;
    lora-fsdp: LoRA on an FSDP2-sharded model; full: FSDP2 with AdamW8bit (each rank steps its shard)."""
    root, base = setup
    cfg = {**base, "mode": mode.split("-")[0], "eval_every": 2, "save_every": 2}
    if mode == "full":
        cfg["optimizer"] = "adamw8bit"
    ref_out = tmp_path / "one"
    _, ref_grads = single(tmp_path, {**cfg, "batch_size": 8, "max_steps": 4, "output": str(ref_out)}, monkeypatch)
    if mode == "lora-fsdp":
        cfg["fsdp"] = True

    out = tmp_path / "two"
    first = torchrun(tmp_path, {**cfg, "max_steps": 2, "output": str(out)}, tmp_path / "grads.pt")
    assert first.stdout.count('"steps": 2') == 1  # the summary is printed by rank 0 only
    second = torchrun(tmp_path, {**cfg, "max_steps": 4, "output": str(out), "resume": True}, tmp_path / "unused.pt")
    assert second.stdout.count('"steps": 4') == 1
    final = "adapter" if mode == "lora" else "model"
    check_same_run(out, ref_out, final, torch.load(tmp_path / "grads.pt"), ref_grads)
    only_rank0_wrote(out)
