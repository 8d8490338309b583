"""`make demo`'s check (examples/demo.py): its oracle is independent of Kiln, its logits follow the input,
and the check fails on a wrong answer or on an output that ignores the input."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from examples import demo
from kiln.builder import Builder, BuilderConfig
from kiln.logger import Logger, Severity
from kiln.plan.format import save_plan


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("demo"))
    assert demo.main(["prepare", folder]) == 0
    plan = Builder(Logger(Severity.ERROR)).build(os.path.join(folder, "resnet50.onnx"),
                                                 BuilderConfig(device="cpu", optimization_level=0))
    save_plan(plan, os.path.join(folder, "resnet50.kiln"))
    return folder


def test_oracle_is_torch_float64_and_follows_the_input(demo_dir):
    """The expected logits are the torch module's, recomputed here in float64 on the images the demo wrote;
    they spread out per image and differ between the two images."""
    from examples.zoo import resnet50
    images = np.load(os.path.join(demo_dir, "images.npy"))
    want = np.load(os.path.join(demo_dir, "expected_logits.npy"))
    assert images.shape == (2, 3, 224, 224) and want.shape == (2, 1000) and want.dtype == np.float64
    assert np.abs(images[0] - images[1]).max() > 1.0
    with torch.no_grad():
        again = resnet50.build_torch(demo.SEED).double().eval()(torch.from_numpy(images).double()).numpy()
    assert np.abs(again - want).max() <= 1e-9 * np.abs(want).max()
    stds, change = demo.spread(want)
    assert min(stds) > demo.MIN_SPREAD and change > demo.MIN_SPREAD


def test_report_passes_on_kiln_and_fails_on_a_wrong_oracle(demo_dir, capsys, tmp_path):
    assert demo.main(["report", demo_dir]) == 0
    out = capsys.readouterr().out
    assert "demo check PASSED" in out and out.count("top-5 class") == 2
    want = np.load(os.path.join(demo_dir, "expected_logits.npy"))
    assert float(re.search(r"max \|diff\| / max \|oracle\| = (\S+)", out).group(1)) <= demo.RTOL
    # the same plan against logits off by a small shift: the check must fail
    for name in ("resnet50.kiln", "images.npy"):
        os.symlink(os.path.join(demo_dir, name), tmp_path / name)
    np.save(tmp_path / "expected_logits.npy", want + 0.01 * np.abs(want).max())
    assert demo.main(["report", str(tmp_path)]) == 1
    assert "demo check FAILED: Kiln's logits are off the oracle's" in capsys.readouterr().out


def test_constant_output_fails_the_spread_check():
    """A network whose output ignores its input (as onnx's light models' expected 0.001 vectors) proves little."""
    stds, change = demo.spread(np.full((2, 1000), 0.001))
    assert max(stds) < demo.MIN_SPREAD and change < demo.MIN_SPREAD
