"""Convolutions whose padding depends on the input size (auto_pad SAME), and transposed convolutions, over dynamic
H and W on the CPU tactics.

Paddle's exporter writes PP-OCRv6's 2x2 stride-1 convolutions as auto_pad SAME_UPPER (one row and column of pad at
the end). The CPU conv tactics resolve the geometry per input shape, yet declined SAME on a dynamic input, and
those layers ran on the reference (2.2 ms of a 33 ms model); a ConvTranspose's output dims were unknown, and
every dim after it. Here both sit in one model that is compared with onnxruntime at odd sizes (asymmetric pads)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.cpu.dnnl import library
from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.logger import Logger
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle

pytestmark = pytest.mark.skipif(library() is None, reason="oneDNN (onednn-cpu-gomp, the test extra) is not installed")

LAYERS = [  # (name, weight shape, attributes)
    ("same2", (8, 4, 2, 2), {"auto_pad": "SAME_UPPER"}),
    ("same3_s2", (8, 8, 3, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ("wino", (8, 8, 3, 3), {"auto_pad": "SAME_UPPER"}),
    ("dw5_s2", (8, 1, 5, 5), {"auto_pad": "SAME_UPPER", "strides": [2, 2], "group": 8}),
]


def _model(rng: np.random.Generator) -> object:
    inits, nodes, x = [], [], "x"
    for name, shape, attrs in LAYERS:
        w = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w_{name}"))
        nodes += [helper.make_node("Conv", [x, f"w_{name}"], [name], name=name, **attrs),
                  helper.make_node("Relu", [name], [f"{name}_r"])]
        x = f"{name}_r"
    wt = (rng.standard_normal((8, 3, 2, 2)) * 0.3).astype(np.float32)
    inits.append(numpy_helper.from_array(wt, "w_up"))
    nodes.append(helper.make_node("ConvTranspose", [x, "w_up"], ["y"], name="up", strides=[2, 2]))
    g = helper.make_graph(nodes, "same_pads", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             ["N", 4, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("level", [0, 3])
def test_size_dependent_pads_get_cpu_tactics_and_match_onnxruntime(level: int) -> None:
    rng = np.random.default_rng()
    m = _model(rng)
    prof = OptimizationProfile().set_shape("x", (1, 4, 9, 9), (1, 4, 32, 32), (2, 4, 67, 67))
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[prof], optimization_level=level))
    steps = plan.graph["steps"]
    convs = [s for s in steps if s["op"] in ("Conv", "FusedConv", "ConvTranspose")]
    assert len(convs) == len(LAYERS) + 1, [s["op"] for s in steps]
    if level == 0:  # by priority: no convolution is left to the reference
        assert all(s["tactic"] != "ref" for s in convs if s["op"] != "ConvTranspose"), \
            [(s["name"], s["tactic"]) for s in convs]
    out = plan.graph["values"]["y"]["type"]["shape"]
    assert out is not None and out[:2] == ["N", 3], out
    ctx = Engine(plan).create_execution_context()
    h, w = (int(v) for v in rng.integers(9, 68, 2))
    for shape in [(1, 4, 32, 32), (2, 4, 9, 10), (1, 4, 67, 33), (2, 4, h, w)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got, want = np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0]
        assert got.shape == want.shape, (shape, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
