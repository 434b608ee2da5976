"""benchmarks/bench_kernels.py refuses a bad --ranks before it touches a GPU or writes anything."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("ranks", "message"), [("8,x", "comma-separated integers"), ("16,0", "at least 1")])
def test_bad_ranks_are_refused_with_the_argument_named(tmp_path, ranks, message):
    out = tmp_path / "rows.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--ranks", ranks,
                          "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    assert "--ranks" in run.stderr and message in run.stderr and repr(ranks) in run.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
