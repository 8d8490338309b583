"""Declared attributes (kiln.ops.attrs): the importer and the plan loader check every node against one
declaration; Loop's iteration cap; only KilnError leaves the builder."""
from __future__ import annotations

import io
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig
from kiln.errors import KilnError, PlanFormatError, UnsupportedOpError
from kiln.frontend.onnx import load_onnx
from kiln.logger import Logger, Severity
from kiln.ops.attrs import declared, read, validate_attrs
from kiln.plan.format import plan_from_bytes, plan_to_bytes
from kiln.runtime.engine import Engine


def _conv_model(rng: np.random.Generator, **conv_attrs: object) -> onnx.ModelProto:
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    attrs = {"pads": [1, 1, 1, 1], **conv_attrs}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", **attrs),
             helper.make_node("LeakyRelu", ["c"], ["y"], name="act", alpha=0.1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("attrs, what", [
    ({"strides": [0, 1]}, "strides"), ({"dilations": [1, -2]}, "dilations"), ({"group": 0}, "group"),
    ({"auto_pad": "os.system"}, "auto_pad"), ({"pads": [1, 1, -1, 1]}, "pads"),
    ({"kiln_elide": 1}, "kiln_elide"), ({"bogus": 3}, "bogus"),
])
def test_importer_refuses_undeclared_or_out_of_range(attrs: dict[str, object], what: str) -> None:
    model = _conv_model(np.random.default_rng(), **attrs)
    with pytest.raises(KilnError, match=what):
        load_onnx(model)


def test_wrong_attribute_type_is_one_line() -> None:
    with pytest.raises(UnsupportedOpError, match="axis' must be an int"):
        validate_attrs("Concat", "", 13, {"axis": "1"}, "cat")
    with pytest.raises(UnsupportedOpError, match="axis' must be an int"):
        validate_attrs("Concat", "", 13, {"axis": True}, "cat")  # JSON true is not an int
    with pytest.raises(UnsupportedOpError, match="is required"):
        validate_attrs("Concat", "", 13, {}, "cat")


def test_declarations_merge_schema_and_refinements() -> None:
    decl, closed = declared("MaxPool", "", 12)
    assert closed and decl["strides"].min == 1 and decl["ceil_mode"].choices == (0, 1)
    assert decl["auto_pad"].default == "NOTSET"  # ONNX's default, from the schema
    fused, closed = declared("FusedConv", "kiln", 1)
    assert closed and "Relu" in fused["activation"].choices and fused["group"].min == 1
    assert validate_attrs("LeakyRelu", "", 16, {"alpha": 1}, "a") == {"alpha": 1.0}  # int -> declared float


def test_read_gives_declared_default() -> None:
    model = _conv_model(np.random.default_rng())
    g = load_onnx(model)
    act = next(n for n in g.nodes if n.op_type == "LeakyRelu")
    conv = next(n for n in g.nodes if n.op_type == "Conv")
    assert read(act, "alpha") == pytest.approx(0.1) and read(conv, "group") == 1 and read(conv, "auto_pad") == "NOTSET"


def _fused_plan(rng: np.random.Generator):
    return Builder().build(_conv_model(rng), BuilderConfig(device="cpu", optimization_level=0))


@pytest.mark.parametrize("edit, what", [
    (("activation", "__import__('os').system('true')"), "activation"),
    (("group", 0), "group"), (("strides", ["1", "1"]), "strides"), (("alpha", "0.1"), "alpha"),
    (("nonsense", 1), "nonsense"),
])
def test_plan_loader_validates_attributes(edit: tuple[str, object], what: str) -> None:
    plan = _fused_plan(np.random.default_rng())
    step = next(s for s in plan.graph["steps"] if s["op"] == "FusedConv")
    step["attrs"][edit[0]] = edit[1]
    with pytest.raises(PlanFormatError, match=what):
        Engine(plan_from_bytes(plan_to_bytes(plan)))


def test_genuine_plan_still_loads_and_matches_reference() -> None:
    rng = np.random.default_rng()
    model = _conv_model(rng)
    x = rng.standard_normal((1, 3, 10, 10)).astype(np.float32)
    import onnxruntime as ort
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Engine(plan_from_bytes(plan_to_bytes(_fused_plan(rng)))).create_execution_context().execute({"x": x})["y"]
    # _fused_plan draws new weights: rebuild from the same model for the comparison
    got = Engine(Builder().build(model, BuilderConfig(device="cpu"))).create_execution_context().execute({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _loop_model(trip: int | None) -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    inits = [numpy_helper.from_array(np.array(True), "cond")]
    if trip is not None:
        inits.append(numpy_helper.from_array(np.array(trip, np.int64), "trip"))
    loop = helper.make_node("Loop", ["trip" if trip is not None else "", "cond", "v0"], ["v"], body=body)
    g = helper.make_graph([loop], "loop", [helper.make_tensor_value_info("v0", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trip", [None, 2**62])
def test_loop_iteration_cap(monkeypatch: pytest.MonkeyPatch, trip: int | None) -> None:
    monkeypatch.setenv("KILN_MAX_LOOP_ITERATIONS", "200")
    ctx = Engine(Builder().build(_loop_model(trip), BuilderConfig(device="cpu"))).create_execution_context()
    with pytest.raises(KilnError, match="cap on loop iterations"):
        ctx.execute({"v0": np.zeros(1, np.float32)})


def test_loop_under_the_cap_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_MAX_LOOP_ITERATIONS", "200")
    ctx = Engine(Builder().build(_loop_model(150), BuilderConfig(device="cpu"))).create_execution_context()
    v0 = np.random.default_rng().standard_normal(1).astype(np.float32)
    np.testing.assert_allclose(ctx.execute({"v0": v0})["v"], v0 + 150, rtol=1e-5)


def test_int8_is_refused_not_ignored() -> None:
    from kiln.errors import BuildError
    with pytest.raises(BuildError, match="INT8"):
        Builder().build(_conv_model(np.random.default_rng()), BuilderConfig(device="cpu", int8=True))


def test_workspace_limit_is_honoured() -> None:
    """A Winograd-eligible 3x3 conv: with no workspace allowed the autotuner never picks Winograd."""
    rng = np.random.default_rng()
    w = numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 28, 28])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    log = io.StringIO()
    plan = Builder(Logger(Severity.VERBOSE, log)).build(model, BuilderConfig(device="cpu", workspace_bytes=0))
    assert re.search(r"cpu\.conv_winograd .*skipped for conv .*needs \d+ workspace bytes, the limit is 0", log.getvalue())
    assert all(s["tactic"] != "cpu.conv_winograd" for s in plan.graph["steps"])
    x = rng.standard_normal((1, 32, 28, 28)).astype(np.float32)
    import onnxruntime as ort
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
