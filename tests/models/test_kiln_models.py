"""Kiln (CPU, FP32, full optimization pipeline) vs onnxruntime on whole models, fresh random inputs.

The nine light models get random weights (their shipped weights are constant-filled, which hides
errors); the project's ResNet-50 v1.5 and YOLOv4-tiny come from examples/zoo. Error is normwise:
max |kiln - ort| / max |ort| <= 1e-4.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from kiln.testing import run_kiln, run_oracle
from tests.conftest import rel_error
from tests.passes.models import LIGHT_DIR, randomize_light

LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
         "squeezenet", "vgg19", "zfnet512"]


def _fresh_feeds(m) -> dict[str, np.ndarray]:
    rng = np.random.default_rng()
    inits = {t.name for t in m.graph.initializer}
    feeds = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _check(m) -> None:
    feeds = _fresh_feeds(m)
    got = run_kiln(m, feeds)
    want = run_oracle(m, feeds)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_error(g, w) <= 1e-4, rel_error(g, w)


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT)
def test_light_model_matches_onnxruntime(name: str) -> None:
    _check(randomize_light(os.path.join(LIGHT_DIR, f"light_{name}.onnx")))


@pytest.mark.slow
@pytest.mark.parametrize("module", ["resnet50", "yolov4_tiny"])
def test_project_model_matches_onnxruntime(module: str) -> None:
    import importlib
    zoo = importlib.import_module(f"examples.zoo.{module}")
    _check(zoo.onnx_model(seed=int(np.random.default_rng().integers(1000)), batch=1))
