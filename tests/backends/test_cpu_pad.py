"""cpu.pad against the op's reference (and onnxruntime through a built plan) on random inputs: every mode, negative
amounts (crops), opset 18's axes, float and integer elements, a destination given or not; what it declines."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tactic import get_tactic
from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.errors import KilnError
from kiln.logger import Logger, Severity
from kiln.ops.registry import lookup
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle
from tests.backends.test_cpu_tactics import CPU, make_node

TACTIC = get_tactic("cpu.pad")
CASES = [  # shape, pads (begins then ends, per axis or per listed axis), axes or None
    ((2, 576), [0, 0, 0, 64], None),
    ((3, 5, 7), [0, 2, 1, 0, 3, 2], None),
    ((1, 4, 6, 6), [0, 0, -1, 2, 0, 0, 3, -2], None),  # a crop on each spatial axis
    ((2, 3, 9), [4, 1], [2]),  # opset 18: one listed axis
    ((5, 1, 4), [0, 2, 0, 0, 3, 1], None),  # reflect over an axis of size 1
]


def _node(shape, pads, axes, mode: str, dtype: torch.dtype, value=None):
    opset = 18 if axes is not None else 17
    x = torch.zeros(shape, dtype=dtype)
    ins = [(x, False), (torch.tensor(pads, dtype=torch.int64), True)]
    if value is not None or axes is not None:
        ins.append((None if value is None else torch.tensor(value, dtype=dtype), True))
    if axes is not None:
        ins.append((torch.tensor(axes, dtype=torch.int64), True))
    return make_node("Pad", ins, None, {"mode": mode}, opset=opset)


@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_matches_the_reference(case, mode: str, dtype: torch.dtype) -> None:
    shape, pads, axes = case
    value = 1.5 if mode == "constant" and dtype.is_floating_point else None
    node = _node(shape, pads, axes, mode, dtype, value)
    if mode == "constant" and not dtype.is_floating_point:
        assert not TACTIC.supports(node, CPU)  # constant_pad_nd takes a Python number: floats only
        return
    assert TACTIC.supports(node, CPU)
    kern = TACTIC.make(node, {}, torch.device("cpu"))
    g = torch.Generator().manual_seed(len(pads) + len(mode))
    x = (torch.randn(shape, generator=g) * 100).to(dtype)
    args = [x] + [None if v is None else v.const for v in node.inputs[1:]]
    want = lookup("Pad", "").compute(node, *args)
    got = kern(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    out = torch.full(want.shape, -7).to(dtype)
    assert kern(x, out=out) is out and torch.equal(out, want)
    strided = torch.full((*want.shape[:-1], want.shape[-1] * 2), -7).to(dtype)[..., ::2]
    assert kern(x, out=strided) is strided and torch.equal(strided, want)


def test_refuses_what_it_was_not_made_for() -> None:
    node = _node((2, 8), [0, 1, 0, 2], None, "reflect", torch.float32)
    kern = TACTIC.make(node, {}, torch.device("cpu"))
    with pytest.raises(KilnError):
        kern(torch.randn(2, 8, 3))
    with pytest.raises(KilnError):
        kern(torch.randn(2, 8), out=torch.empty(2, 10))
    with pytest.raises(KilnError):
        kern(torch.randn(2, 0))  # reflect of an empty axis
    runtime_pads = make_node("Pad", [(torch.zeros(2, 8), False), (torch.zeros(4, dtype=torch.int64), False)], None,
                             {"mode": "reflect"})
    assert not TACTIC.supports(runtime_pads, CPU)


def test_audio_front_end_matches_onnxruntime() -> None:
    """A reflect pad of a dynamic-length signal before a framing conv (Silero VAD's STFT), built with a profile."""
    rng = np.random.default_rng()
    w = (rng.standard_normal((8, 1, 64)) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(np.array([0, 0, 0, 32], np.int64), "pads"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"), numpy_helper.from_array(w, "w")]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
             helper.make_node("Unsqueeze", ["p", "ax"], ["u"]),
             helper.make_node("Conv", ["u", "w"], ["y"], strides=[32])]
    g = helper.make_graph(nodes, "front", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    prof = OptimizationProfile().set_shape("x", (1, 64), (1, 576), (3, 1024))
    # level 0: the tactic by priority, not by a timing a loaded machine could upset
    plan = Builder(Logger(Severity.ERROR)).build(m, BuilderConfig(device="cpu", profiles=[prof], optimization_level=0))
    assert any(s["tactic"] == "cpu.pad" for s in plan.graph["steps"]), [s["tactic"] for s in plan.graph["steps"]]
    ctx = Engine(plan).create_execution_context()
    for shape in ((1, 576), (3, int(rng.integers(64, 1024)))):
        x = rng.standard_normal(shape).astype(np.float32)
        got, want = np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
