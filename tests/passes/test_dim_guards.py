"""Dim guards: equalities an op needs that inference cannot prove over the profile (kiln.ir.dims.DimGuard).

The model class: a feature pyramid (YOLOv8, FPNs) concatenates an upsampled deep map, 2*((h - 1)//4 + 1) rows,
with a shallow one, (h - 1)//2 + 1 rows. They agree when h is a multiple of 4 and differ otherwise, so neither
dim can be proven the other's; until now the Concat's output dims became unknown, every later dim too, and the
shape-only head (Shape -> Range -> anchor grids) ran per call on the reference. Now the output takes one
input's expression, the equality becomes a guard the runtime checks once per input shape, and a shape that breaks
it is refused with the layer named, as onnxruntime fails at that Concat."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.errors import InputError, ProfileError
from kiln.frontend.onnx import load_onnx
from kiln.ir.dims import DimExpr
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.ops.infer import infer_node_guarded, infer_types
from kiln.ops.symbolic import symbol_bounds
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle

F32 = DType.FLOAT32


def _pyramid(rng: np.random.Generator) -> object:
    """x [N, 4, H, W] -> a (stride 2) -> b (stride 2) -> upsample x2 -> Concat(up, a) -> 1x1 conv -> MaxPool 5x5
    -> + a coordinate row: Range(0.0, Cast(W'), 1.0) + 0.5 over the last axis (W' from Shape, as exporters write
    anchor grids)."""
    c = {"w1": rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
         "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
         "w3": rng.standard_normal((6, 16, 1, 1)).astype(np.float32) * 0.3,
         "scales": np.array([1, 1, 2, 2], np.float32), "three": np.array(3, np.int64),
         "zero": np.array(0.0, np.float32), "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["b", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Concat", ["up", "a"], ["cat"], axis=1),
             helper.make_node("Conv", ["cat", "w3"], ["f"]),
             helper.make_node("MaxPool", ["f"], ["p"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
             helper.make_node("Shape", ["p"], ["ps"]),
             helper.make_node("Gather", ["ps", "three"], ["wn"], axis=0),
             helper.make_node("Cast", ["wn"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("Range", ["zero", "wf", "one"], ["grid"]),
             helper.make_node("Add", ["grid", "half"], ["centres"]),
             helper.make_node("Add", ["p", "centres"], ["y"])]
    g = helper.make_graph(nodes, "pyramid",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in c.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _profile(opt: tuple[int, int] = (64, 64), lo: tuple[int, int] = (32, 32)) -> OptimizationProfile:
    return OptimizationProfile().set_shape("x", (1, 4, *lo), (1, 4, *opt), (2, 4, 128, 128))


def test_concat_of_pyramid_levels_keeps_its_dims_under_a_guard() -> None:
    m = _pyramid(np.random.default_rng(0))
    g = load_onnx(m)
    with symbol_bounds({"N": (1, 2), "H": (32, 128), "W": (32, 128)}):
        infer_types(g)
    cat = next(n for n in g.nodes if n.op_type == "Concat")
    assert {(str(gd.lhs), str(gd.rhs)) for gd in cat.guards} and len(cat.guards) == 2, cat.guards
    for gd in cat.guards:  # the equality holds exactly where the levels agree
        sym = next(iter(gd.lhs_symbols | gd.rhs_symbols))
        assert all(gd.holds({sym: h}) == (h % 4 in (0, 3)) for h in range(32, 129)), gd
    y = g.outputs[0].type.shape
    assert y is not None and y[:2] == ("N", 6) and all(isinstance(d, DimExpr) for d in y[2:]), y
    # without the profile a level could be 1 (a broadcast would then be legal): no guard, dims unknown
    g0 = load_onnx(m)
    infer_types(g0)
    assert not any(n.guards for n in g0.nodes) and g0.outputs[0].type.shape[2:] == (None, None)


def test_guarded_plan_matches_onnxruntime_and_refuses_shapes_that_break_the_guard() -> None:
    rng = np.random.default_rng()
    m = _pyramid(rng)
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[_profile()]))
    ctx = Engine(plan).create_execution_context()
    h, w = (int(v) * 4 for v in rng.integers(8, 33, 2))
    for shape in [(1, 4, 64, 64), (2, 4, 32, 128), (1, 4, 128, 44), (2, 4, h, w), (1, 4, 63, 35)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got, want = np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0]
        assert got.shape == want.shape, (shape, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    x = rng.standard_normal((1, 4, 64, 66)).astype(np.float32)  # W = 66: 34 rows upsampled against 33
    with pytest.raises(Exception):
        run_oracle(m, {"x": x})  # onnxruntime fails at the Concat too
    with pytest.raises(InputError, match=r"layer '\w+' needs .*W.* == .*, which is (\d+) vs (?!\1)\d+ at W=66$"):
        ctx.execute({"x": x})
    x = rng.standard_normal((1, 4, 64, 64)).astype(np.float32)  # and the context still runs good shapes
    np.testing.assert_allclose(np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_profile_points_are_checked_against_the_guards() -> None:
    m = _pyramid(np.random.default_rng(1))
    with pytest.raises(ProfileError, match="cannot run at its opt shapes"):
        Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[_profile(opt=(64, 62))]))
    lines: list[str] = []
    log = Logger()
    log.warning = lines.append  # type: ignore[method-assign]
    Builder(log).build(m, BuilderConfig(device="cpu", profiles=[_profile(lo=(33, 32))]))
    assert any("cannot run at its min shapes" in ln and "H=33" in ln for ln in lines), lines


def test_shape_head_runs_once_per_shape_and_pooling_gets_its_tactic() -> None:
    """With the dims known, the coordinate row is a host value computed once per input shape (no step left
    for Shape / Range) and the MaxPool over dynamic H, W runs on oneDNN's pooling."""
    m = _pyramid(np.random.default_rng(2))
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[_profile()], optimization_level=0))
    engine = Engine(plan)
    steps = {st.node.op_type for st in engine.function.steps}
    assert "Range" not in steps and "Shape" not in steps, steps
    tactics = {s["op"]: s.get("tactic") for s in plan.graph["steps"]}
    from kiln.backends.cpu.dnnl import library
    if library() is not None:
        assert tactics["MaxPool"] == "cpu.pool_dnnl", tactics


@pytest.mark.parametrize("lo, guarded", [(2, True), (1, False)])
def test_broadcast_of_two_symbols_is_guarded_only_where_neither_can_be_one(lo: int, guarded: bool) -> None:
    """[N, A] + [N, B]: where A and B are at least 2 the Add needs A == B; where either may be 1 it broadcasts,
    and no guard may refuse that."""
    a = Value("a", TensorType(F32, ("N", "A")))
    b = Value("b", TensorType(F32, ("N", "B")))
    add = Node("Add", [a, b], [Value("y")], name="add", opset=17)
    with symbol_bounds({"N": (1, 4), "A": (lo, 64), "B": (lo, 64)}):
        (t,), guards = infer_node_guarded(add)
    assert bool(guards) == guarded, guards
    if guarded:
        (gd,) = guards
        assert gd.holds({"A": 7, "B": 7}) and not gd.holds({"A": 7, "B": 8})
        assert t.shape[0] == "N" and t.shape[1] in ("A", "B"), t
    else:
        assert t.shape == ("N", None), t


@pytest.mark.parametrize("dtype, top, known", [(TensorProto.FLOAT, 4096, True), (TensorProto.DOUBLE, 4096, True),
                                               (TensorProto.FLOAT, (1 << 24) + 1, False),
                                               (TensorProto.FLOAT16, 64, False)])
def test_float_range_over_a_cast_size_has_that_length_where_every_size_is_exact(dtype: int, top: int,
                                                                                known: bool) -> None:
    np_t = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}[dtype]
    c = {"z": np.array(0, np_t), "o": np.array(1, np_t), "k": np.array(1, np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "k"], ["n"], axis=0),
             helper.make_node("Cast", ["n"], ["nf"], to=dtype), helper.make_node("Range", ["z", "nf", "o"], ["r"])]
    g = helper.make_graph(nodes, "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L"])],
                          [helper.make_tensor_value_info("r", dtype, None)],
                          [numpy_helper.from_array(v, k) for k, v in c.items()])
    kg = load_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    with symbol_bounds({"L": (1, top)}):
        infer_types(kg)
    assert kg.outputs[0].type.shape == (("L",) if known else (None,)), kg.outputs[0].type


def test_fpn_add_of_an_upsampled_level_is_guarded_and_matches() -> None:
    """A feature pyramid that adds (not concatenates) the upsampled deeper level to the lateral one (RetinaNet,
    FCOS): the broadcast of two dims that are both >= 2 over the profile needs them equal, so the Add is guarded
    and its output keeps its dims; the plan matches onnxruntime where they agree and refuses where they do not."""
    rng = np.random.default_rng()
    c = {"w1": rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
         "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
         "scales": np.array([1, 1, 2, 2], np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["b", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Add", ["up", "a"], ["s"]),
             helper.make_node("GlobalAveragePool", ["s"], ["y"])]
    g = helper.make_graph(nodes, "fpn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in c.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    kg = load_onnx(m)
    with symbol_bounds({"N": (1, 2), "H": (32, 128), "W": (32, 128)}):
        infer_types(kg)
    add = next(n for n in kg.nodes if n.op_type == "Add")
    assert len(add.guards) == 2 and all(isinstance(d, DimExpr) for d in add.outputs[0].type.shape[2:]), add.guards
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[_profile()]))
    ctx = Engine(plan).create_execution_context()
    for shape in [(1, 4, 64, 64), (2, 4, 96, 40)]:
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0],
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"layer '[^']+' needs .*H.* at H=66"):  # the Add, fused or not
        ctx.execute({"x": rng.standard_normal((1, 4, 66, 64)).astype(np.float32)})
