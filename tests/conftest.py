"""Shared fixtures: paths to onnx's bundled models and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on the CPU; must be set before any triton.jit
    os.environ.setdefault("TRITON_INTERPRET", "1")

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def light_dir() -> str:
    return LIGHT_DIR


def run_cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


@pytest.fixture
def cli():
    return run_cli


def rel_error(got, want) -> float:
    """Normwise relative error: max |got - want| / max |want| (element-wise ratios blow up near zero)."""
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
