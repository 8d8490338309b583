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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make `--dist loadgroup` group again under pytest >= 9.

    pytest-xdist 3.8 tags a grouped test by rewriting `item._nodeid` to `<id>@<group>`, but pytest 9 reads
    the id from `item._id` (a structured NodeId), so the tag never reaches the scheduler and tests marked
    `xdist_group` spread over all workers. The same tag is applied to `_id` here, in the workers only.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9: xdist's own rewrite works
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid and isinstance(getattr(item, "_id", None), NodeId):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")
