"""The repository can be used as the working directory: nothing in its root shadows an installed package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_imports_from_the_repository_root():
    """transformers imports Hugging Face's `kernels` package; with the repository root first on sys.path (as
    `python -m pytest` or `python -c` run from there put it), a top-level `kernels/` package shadowed it and
    importing a model class failed with ImportError."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); from transformers import LlamaForCausalLM; import lora_engine"
    run = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
