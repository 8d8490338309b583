"""cpu.conv1d_dnnl: 1-D convolutions ([N, C, L]) on oneDNN, against torch's conv1d in float64 on fresh random
inputs, built through the Builder at optimization level 0 (no timing decides which tactic runs) and loaded
from the plan's bytes, plus the FusedConv residual forms and the cases the tactic declines."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.cpu.dnnl import library as dnnl_library
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger, Severity
from kiln.plan.format import plan_from_bytes, plan_to_bytes
from kiln.runtime import Engine

pytestmark = pytest.mark.skipif(dnnl_library() is None, reason="oneDNN library (onednn-cpu-gomp) not installed")
CPU = TacticContext(torch.device("cpu"))
TID = "cpu.conv1d_dnnl"
TOL = 1e-5

# (C, K, L, kernel, stride, dilation, pads (begin, end), group)
CASES = [
    (1, 16, 640, 256, 128, 1, (0, 0), 1),   # Silero's STFT: one channel, a 256-tap window every 128 samples
    (8, 12, 37, 3, 1, 1, (1, 1), 1),
    (8, 12, 37, 3, 2, 1, (1, 1), 1),
    (6, 10, 41, 5, 2, 3, (4, 1), 1),         # dilated, asymmetric pads
    (8, 8, 29, 3, 1, 1, (1, 1), 8),          # depthwise
    (12, 6, 30, 3, 1, 2, (2, 2), 3),         # grouped, dilated
    (16, 4, 9, 1, 1, 1, (0, 0), 1),          # pointwise
    (5, 7, 4, 3, 2, 1, (1, 1), 1),           # output length 2
    (64, 32, 1, 3, 1, 1, (1, 1), 1),         # output length 1 (oneDNN's plain-layout gemm convolution)
]


def _rel(got: np.ndarray, want: torch.Tensor) -> float:
    w = want.numpy()
    assert got.shape == w.shape, (got.shape, w.shape)
    return float(np.abs(got.astype(np.float64) - w).max() / max(float(np.abs(w).max()), 1e-30))


def _model(case: tuple[Any, ...], bias: bool, relu: bool, rng: np.random.Generator, batch: Any = 2
           ) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray | None]:
    c, k, n, kk, s, d, (p0, p1), g = case
    w = (rng.standard_normal((k, c // g, kk)) / np.sqrt(c // g * kk)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32) if bias else None
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if bias else [])
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["c" if relu else "y"], strides=[s],
                              dilations=[d], pads=[p0, p1], group=g, kernel_shape=[kk])]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    graph = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), w, b


def _engine(model: onnx.ModelProto, profiles: list[OptimizationProfile] | None = None) -> tuple[Engine, dict[str, Any]]:
    plan = Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(optimization_level=0, profiles=profiles or []))
    steps = {s["name"]: s for s in plan.graph["steps"]}
    return Engine(plan_from_bytes(plan_to_bytes(plan))), steps


def _want(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, case: tuple[Any, ...], relu: bool) -> torch.Tensor:
    _, _, _, _, s, d, (p0, p1), g = case
    xd = F.pad(torch.from_numpy(x).double(), (p0, p1))
    y = F.conv1d(xd, torch.from_numpy(w).double(), None if b is None else torch.from_numpy(b).double(),
                 stride=s, dilation=d, groups=g)
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias,relu", [(True, True), (False, False), (True, False)])
def test_conv1d_matches_torch_float64(case: tuple[Any, ...], bias: bool, relu: bool) -> None:
    rng = np.random.default_rng(hash((case, bias, relu)) % 2**32)
    model, w, b = _model(case, bias, relu, rng)
    engine, steps = _engine(model)
    convs = [st for st in steps.values() if st["op"] in ("Conv", "FusedConv")]
    assert [st["tactic"] for st in convs] == [TID]
    if relu:
        assert convs[0]["op"] == "FusedConv"  # the Relu runs as the primitive's post-op
    ctx = engine.create_execution_context()
    for _ in range(2):  # fresh inputs through the same primitive
        x = rng.standard_normal((2, case[0], case[2])).astype(np.float32)
        got = np.asarray(ctx.execute({"x": x})["y"])
        assert _rel(got, _want(x, w, b, case, relu)) <= TOL


def test_conv1d_dynamic_length_and_batch() -> None:
    """A length the build never saw makes its own primitive; the output follows ONNX's formula."""
    rng = np.random.default_rng(7)
    case = (4, 6, None, 3, 2, 1, (1, 1), 1)
    model, w, b = _model(case, True, True, rng, batch="N")
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "L"
    engine, steps = _engine(model)
    assert [st["tactic"] for st in steps.values() if st["op"] == "FusedConv"] == [TID]
    ctx = engine.create_execution_context()
    for n, length in ((1, 17), (3, 64), (2, 5)):
        x = rng.standard_normal((n, 4, length)).astype(np.float32)
        got = np.asarray(ctx.execute({"x": x})["y"])
        assert _rel(got, _want(x, w, b, case, True)) <= TOL


def test_conv1d_chain_reads_the_previous_output_without_copy_and_matches() -> None:
    """Two 1-D convs back to back (the second reads the first's channels-last view)."""
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((8, 3, 5)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((4, 8, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], strides=[2], pads=[2, 2]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 50])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    engine, steps = _engine(model)
    assert sorted(st["tactic"] for st in steps.values()) == [TID, TID]
    x = rng.standard_normal((1, 3, 50)).astype(np.float32)
    got = np.asarray(engine.create_execution_context().execute({"x": x})["y"])
    h = torch.relu(F.conv1d(torch.from_numpy(x).double(), torch.from_numpy(w1).double(), stride=2, padding=2))
    assert _rel(got, F.conv1d(h, torch.from_numpy(w2).double(), padding=1)) <= TOL


def _fused(z: bool, act: str, before_add: int, length: Any = 20) -> Node:
    x = Value("x", TensorType(DType.FLOAT32, (2, 6, length)))
    w = Value("w", const=torch.randn(4, 6, 3, dtype=torch.float32) * 0.3)
    b = Value("b", const=torch.randn(4, dtype=torch.float32))
    zv = Value("z", TensorType(DType.FLOAT32, (2, 4, length))) if z else None
    out = Value("y", TensorType(DType.FLOAT32, (2, 4, length)))
    return Node("FusedConv", [x, w, b, zv], [out], {"strides": [1], "pads": [1, 1], "dilations": [1], "group": 1,
                                                    "activation": act, "act_before_add": before_add},
                name="fc", domain="kiln", opset=1)


@pytest.mark.parametrize("act,before_add", [("Relu", 0), ("Relu", 1), ("", 0), ("Sigmoid", 0)])
def test_fused_conv1d_residual(act: str, before_add: int) -> None:
    node = _fused(True, act, before_add)
    t = get_tactic(TID)
    assert t is not None and t.supports(node, CPU)
    kern = t.make(node, {}, torch.device("cpu"))
    x, z = torch.randn(2, 6, 20), torch.randn(2, 4, 20)
    got = kern(x, None, None, z)
    w, b = node.inputs[1].const.double(), node.inputs[2].const.double()  # type: ignore[union-attr]
    y = F.conv1d(x.double(), w, b, padding=1)
    fn = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "": lambda a: a}[act]
    want = fn(y) + z.double() if before_add else fn(y + z.double())
    assert _rel(got.numpy(), want) <= TOL
    kern.close()


def test_conv1d_declines_other_ranks_types_and_geometries() -> None:
    t = get_tactic(TID)
    assert t is not None
    assert t.supports(_fused(False, "Relu", 0), CPU)
    four_d = _fused(False, "Relu", 0)
    four_d.inputs[0] = Value("x4", TensorType(DType.FLOAT32, (2, 6, 4, 20)))
    assert not t.supports(four_d, CPU)
    halfs = _fused(False, "Relu", 0)
    halfs.inputs[0] = Value("xh", TensorType(DType.FLOAT16, (2, 6, 20)))
    assert not t.supports(halfs, CPU)
    unknown = _fused(False, "Relu", 0)
    unknown.inputs[0] = Value("xu", TensorType(DType.FLOAT32, None))
    assert not t.supports(unknown, CPU)
    bad_pads = _fused(False, "Relu", 0)
    bad_pads.attrs["pads"] = [1, 1, 1, 1]  # a 2-D convolution's pads on a 1-D one
    assert not t.supports(bad_pads, CPU)
    wrong_channels = _fused(False, "Relu", 0)
    wrong_channels.inputs[0] = Value("xc", TensorType(DType.FLOAT32, (2, 5, 20)))
    assert not t.supports(wrong_channels, CPU)


def test_conv1d_bad_inputs_raise_kiln_errors() -> None:
    t = get_tactic(TID)
    assert t is not None
    kern = t.make(_fused(False, "Relu", 0, length="L"), {}, torch.device("cpu"))
    with pytest.raises(KilnError):
        kern(torch.randn(2, 5, 20))  # 5 channels, the weight reads 6
    with pytest.raises(KilnError):
        kern(torch.randn(2, 6, 4, 20))  # 4-D
    with pytest.raises(KilnError):
        kern(torch.randn(2, 6, 20, dtype=torch.float64))
    with pytest.raises(Exception) as e:  # shorter than the window even with its pads: the reference's error
        kern(torch.randn(2, 6, 0))
    assert not isinstance(e.value, (SystemError, MemoryError))
