"""Whole-model acceptance of the pass pipeline: layer counts and numerics on real networks."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kiln.testing import run_kiln
from tests.passes.models import LIGHT_DIR, compare, ops, optimized, randomize_light, rel_error

pytestmark = pytest.mark.slow


def test_light_resnet50_layers_and_expected_output() -> None:
    m = onnx.load(os.path.join(LIGHT_DIR, "light_resnet50.onnx"))
    assert len(m.graph.node) == 415
    g, log = optimized(m)
    assert len(g.nodes) <= 57, Counter(ops(g))
    assert Counter(ops(g))["FusedConv"] == 53
    assert sum("Fusing" in line for line in log) >= 53 + 49 + 16
    want = numpy_helper.to_array(onnx.load_tensor(os.path.join(LIGHT_DIR, "light_resnet50_output_0.pb")))
    x = (np.arange(3 * 224 * 224, dtype=np.float32) / (3 * 224 * 224)).reshape(1, 3, 224, 224)
    got = run_kiln(m, {m.graph.input[0].name: x})[0]
    assert rel_error(got, want) <= 1e-4


@pytest.mark.parametrize("name", ["resnet50", "inception_v1", "squeezenet", "densenet121"])
def test_light_models_random_weights_match_onnxruntime(name: str) -> None:
    """The light models' weights are constants; random ones make the comparison (of the logits) meaningful."""
    compare(randomize_light(os.path.join(LIGHT_DIR, f"light_{name}.onnx")), tol=1e-4)


def test_yolov4_tiny_one_layer_per_conv() -> None:
    yolo = pytest.importorskip("examples.zoo.yolov4_tiny")
    m = yolo.onnx_model(0, 1)
    kinds = Counter(n.op_type for n in m.graph.node)
    g, _ = optimized(m)
    got = Counter(ops(g))
    assert got["FusedConv"] == kinds["Conv"]
    assert got["MaxPool"] == kinds["MaxPool"] and got["Resize"] == kinds["Resize"]
    # the rest are channel slices and concats (views / elidable for the backends)
    assert len(g.nodes) == kinds["Conv"] + kinds["MaxPool"] + kinds["Resize"] + kinds["Slice"] + kinds["Concat"]
    compare(m, tol=1e-4)


def _cpu_kernels_missing() -> str:
    from kiln.backends.cpu import native
    from kiln.backends.cpu.dnnl import library
    if library() is None:
        return "the oneDNN library (pip install onednn-cpu-gomp) is not installed"
    return "" if native.load("winograd") is not None else f"no C compiler: {native.error('winograd')}"


@pytest.mark.skipif(bool(_cpu_kernels_missing()), reason=_cpu_kernels_missing() or "n/a")
def test_yolov4_tiny_cpu_plan_elides_every_concat() -> None:
    """On the CPU too: one launching layer per conv, pool and upsample; Slices are views, Concats elided."""
    from kiln.builder import Builder, BuilderConfig
    from kiln.plan.format import plan_from_bytes, plan_to_bytes
    from kiln.runtime.engine import Engine
    from tests.passes.models import feeds_for
    from kiln.testing import run_oracle
    yolo = pytest.importorskip("examples.zoo.yolov4_tiny")
    m = yolo.onnx_model(0, 1)
    kinds = Counter(n.op_type for n in m.graph.node)
    # level 0: the heuristic choice, in-place writers first; when timing, a producer may leave its slice to the
    # Concat's copy where its faster tactic pays for that (kiln.tune.autotuner.STORE_MARGIN: load-dependent)
    plan = Builder().build(m, BuilderConfig(device="cpu", optimization_level=0))
    assert plan.build["layers"] == kinds["Conv"] + kinds["MaxPool"] + kinds["Resize"]
    assert plan.build["views"] == kinds["Slice"] and plan.build["elided"] == kinds["Concat"]
    feeds = feeds_for(m, 3)
    out = Engine(plan_from_bytes(plan_to_bytes(plan))).create_execution_context().execute(feeds)
    for got, want in zip(out.values(), run_oracle(m, feeds)):
        assert rel_error(got, want) <= 1e-4
