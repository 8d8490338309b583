"""Reduced precision pass: which layers go to float16/bfloat16, where Casts go, boundary dtypes, accuracy."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle
from tests.conftest import rel_error


@pytest.fixture(autouse=True)
def _lower_on_any_cpu(monkeypatch):
    """These tests check the pass's rewriting through CPU builds: lower whatever the host CPU computes natively
    (a real CPU build of --fp16, or of --bf16 without BF16 instructions, is float32: tests/backends/test_cpu_bf16.py)."""
    import kiln.builder
    monkeypatch.setattr(kiln.builder, "cpu_precision", lambda dtype, logger: dtype)


def _model(rng):
    w1 = (rng.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu1"),
        helper.make_node("Softmax", ["b"], ["s"], axis=1, name="softmax"),  # stays float32
        helper.make_node("Conv", ["s", "w2"], ["c"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c", "b"], ["d"], name="add"),
        helper.make_node("Shape", ["d"], ["shp"], name="shape"),  # reads any type: no Cast in front
    ]
    # a dynamic batch, so that the Shape is a run-time layer (of a static tensor it folds to a constant)
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, ["N", 8, 8, 8]),
                           helper.make_tensor_value_info("shp", TensorProto.INT64, [4])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _steps(plan):
    return {s["name"]: s for s in plan.graph["steps"]}


def _dtype(plan, name):
    return plan.graph["values"][name]["type"]["dtype"]


@pytest.mark.parametrize("flag, low", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_casts_only_where_types_change(flag, low):
    rng = np.random.default_rng(0)
    model = _model(rng)
    plan = Builder().build(model, BuilderConfig(**{flag: True}))
    steps = _steps(plan)
    casts = [s for s in plan.graph["steps"] if s["op"] == "Cast"]
    # x -> low (conv1), b -> float32 (softmax), s -> low (conv2), d -> float32 (graph output)
    assert len(casts) == 4, [(c["inputs"], c["outputs"]) for c in casts]
    assert _dtype(plan, steps["conv1"]["outputs"][0]) == low
    assert _dtype(plan, steps["softmax"]["outputs"][0]) == "float32"
    assert _dtype(plan, steps["conv2"]["outputs"][0]) == low
    assert steps["shape"]["inputs"][0] != "d"  # reads the low-type value directly
    assert [o["dtype"] for o in plan.outputs] == ["float32", "int64"]
    assert [i["dtype"] for i in plan.inputs] == ["float32"]
    weights = {plan.graph["values"][steps["conv1"]["inputs"][1]]["type"]["dtype"]}
    assert weights == {low}
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = Engine(plan).create_execution_context().execute({"x": x})
    want = run_oracle(model, {"x": x})
    assert got["d"].dtype == np.float32
    assert rel_error(got["d"], want[0]) < (1e-2 if flag == "fp16" else 3e-2)
    np.testing.assert_array_equal(got["shp"], want[1])


def test_fp32_layers_fall_back():
    rng = np.random.default_rng(1)
    plan = Builder().build(_model(rng), BuilderConfig(fp16=True, fp32_layers=["conv2"]))
    steps = _steps(plan)
    assert _dtype(plan, steps["conv2"]["outputs"][0]) == "float32"
    assert _dtype(plan, steps["conv1"]["outputs"][0]) == "float16"


def test_no_flag_no_casts():
    plan = Builder().build(_model(np.random.default_rng(2)), BuilderConfig())
    assert not [s for s in plan.graph["steps"] if s["op"] == "Cast"]


def _attention_model(rng):
    """x [N, S, 24] -> qkv projection -> Split into q, k, v -> softmax(q k^T) v: three outputs of one Split."""
    w = (rng.standard_normal((24, 72)) / 5).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["qkv"], name="proj"),
        helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=2, num_outputs=3, name="split"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="softmax"),  # stays float32
        helper.make_node("MatMul", ["p", "v"], ["y"], name="pv"),
    ]
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 24])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 24])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("blind", [False, True])
def test_low_precision_holds_where_inference_is_blind(monkeypatch, blind):
    """Element types the pass cannot see (an op whose inference fails on symbolic dims, as torch 2.11's fake
    matmul did on the GPU machine) must not leave a layer with a float16 and a float32 operand: every output
    of a lowered Split is float16, and a layer reading an unknown type gets what its producers really make."""
    from kiln.builder import OptimizationProfile
    from kiln.ir.types import TensorType
    from kiln.ops import linalg
    if blind:
        monkeypatch.setattr(linalg.MatMul, "infer", lambda self, node, types, consts: [TensorType(None, None)])
    rng = np.random.default_rng()
    model = _attention_model(rng)
    prof = OptimizationProfile().set_shape("x", (1, 4, 24), (2, 16, 24), (3, 32, 24))
    plan = Builder().build(model, BuilderConfig(fp16=True, optimization_level=0, profiles=[prof]))
    x = rng.standard_normal((3, 11, 24)).astype(np.float32)
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    want = run_oracle(model, {"x": x})[0]
    assert got.dtype == np.float32
    assert rel_error(got, want) < 1e-2


# ---- If / Loop / Scan bodies are lowered too --------------------------------------------------------------

F = TensorProto.FLOAT
LOW_OPS = {"Conv", "FusedConv", "MatMul", "FusedGemm", "Gemm", "Relu", "Add", "Mul", "Pointwise", "Tanh"}
"""Body layers that run low at top level in these models (Pointwise programs here hold no Exp/Log/Pow)."""


def _vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def _c(name, rng, *shape, scale=1.0):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _onnx(g):
    import onnx
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def _if_model(rng):
    """a = relu(conv(x)) at top level, read by both branches of If(c); the then-branch holds a nested If(c2).
    Every branch: Conv/MatMul + Relu + Add reading the captured a; the then-branch also a Softmax (float32)
    of a, so a float32 body layer reads the low capture."""
    inner_then = helper.make_graph(
        [helper.make_node("MatMul", ["t_mul", "m1"], ["u_mm"], name="u_matmul"),
         helper.make_node("Relu", ["u_mm"], ["u_relu"], name="u_relu"),
         helper.make_node("Add", ["u_relu", "a"], ["u_out"], name="u_add")],
        "inner_then", [], [_vi("u_out", ["N", 8, 6, 6])])
    inner_else = helper.make_graph(
        [helper.make_node("MatMul", ["a", "m2"], ["v_mm"], name="v_matmul"),
         helper.make_node("Relu", ["v_mm"], ["v_relu"], name="v_relu"),
         helper.make_node("Add", ["v_relu", "t_mul"], ["v_out"], name="v_add")],
        "inner_else", [], [_vi("v_out", ["N", 8, 6, 6])])
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["a", "wt"], ["t_conv"], pads=[1, 1, 1, 1], name="t_conv"),
         helper.make_node("Relu", ["t_conv"], ["t_relu"], name="t_relu"),
         helper.make_node("Add", ["t_relu", "a"], ["t_add"], name="t_add"),
         helper.make_node("Softmax", ["a"], ["t_soft"], axis=1, name="t_softmax"),
         helper.make_node("Mul", ["t_add", "t_soft"], ["t_mul"], name="t_mul"),
         helper.make_node("If", ["c2"], ["t_out"], then_branch=inner_then, else_branch=inner_else, name="inner_if")],
        "then", [], [_vi("t_out", ["N", 8, 6, 6])])
    else_g = helper.make_graph(
        [helper.make_node("Conv", ["a", "we"], ["e_conv"], pads=[1, 1, 1, 1], name="e_conv"),
         helper.make_node("Relu", ["e_conv"], ["e_relu"], name="e_relu"),
         helper.make_node("Add", ["e_relu", "a"], ["e_out"], name="e_add")],
        "else", [], [_vi("e_out", ["N", 8, 6, 6])])
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w0"], ["a0"], pads=[1, 1, 1, 1], name="conv0"),
         helper.make_node("Relu", ["a0"], ["a"], name="relu0"),
         helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="outer_if")],
        "if_net", [_vi("c", [], TensorProto.BOOL), _vi("c2", [], TensorProto.BOOL), _vi("x", ["N", 4, 6, 6])],
        [_vi("y", ["N", 8, 6, 6])],
        [_c("w0", rng, 8, 4, 3, 3, scale=0.3), _c("wt", rng, 8, 8, 3, 3, scale=0.2),
         _c("we", rng, 8, 8, 3, 3, scale=0.2), _c("m1", rng, 6, 6, scale=0.4), _c("m2", rng, 6, 6, scale=0.4)])
    return _onnx(g)


def _if_feeds(rng, n, c, c2):
    return {"c": np.array(c), "c2": np.array(c2), "x": rng.standard_normal((n, 4, 6, 6)).astype(np.float32)}


def _loop_model(rng):
    """p = relu(x @ P) at top level; Loop M times: h <- relu(h @ W + p), acc <- acc + h (float32 loop-carried
    state), each h also a scan output."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["hw"], name="b_matmul"),
         helper.make_node("Add", ["hw", "p"], ["hp"], name="b_add_p"),
         helper.make_node("Relu", ["hp"], ["h_out"], name="b_relu"),
         helper.make_node("Add", ["acc_in", "h_out"], ["acc_out"], name="b_acc"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="b_cond"),
         helper.make_node("Identity", ["h_out"], ["h_scan"], name="b_scan")],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("h_in", ["N", 8]),
                 _vi("acc_in", ["N", 8])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("h_out", ["N", 8]), _vi("acc_out", ["N", 8]),
         _vi("h_scan", ["N", 8])])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "P"], ["p0"], name="top_matmul"),
         helper.make_node("Relu", ["p0"], ["p"], name="top_relu"),
         helper.make_node("Loop", ["M", "", "x", "acc0"], ["h_final", "acc_final", "hs"], body=body, name="loop")],
        "loop_net", [_vi("M", [], TensorProto.INT64), _vi("x", ["N", 8]), _vi("acc0", ["N", 8])],
        [_vi("h_final", ["N", 8]), _vi("acc_final", ["N", 8]), _vi("hs", ["T", "N", 8])],
        [_c("P", rng, 8, 8, scale=0.4), _c("W", rng, 8, 8, scale=0.4)])
    return _onnx(g)


def _loop_feeds(rng, n, trips):
    return {"M": np.array(trips, np.int64), "x": rng.standard_normal((n, 8)).astype(np.float32),
            "acc0": rng.standard_normal((n, 8)).astype(np.float32)}


def _scan_model(rng):
    """q = relu(s0 @ Q) at top level; Scan over xs [N, T, 8]: s <- tanh(s @ W + x_t @ U + q), y_t = relu(s) @ V."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "W"], ["sw"], name="s_mm_w"),
         helper.make_node("MatMul", ["x_t", "U"], ["xu"], name="s_mm_u"),
         helper.make_node("Add", ["sw", "xu"], ["pre"], name="s_add"),
         helper.make_node("Add", ["pre", "q"], ["preq"], name="s_add_q"),
         helper.make_node("Tanh", ["preq"], ["s_out"], name="s_tanh"),
         helper.make_node("Relu", ["s_out"], ["r"], name="s_relu"),
         helper.make_node("MatMul", ["r", "V"], ["y_t"], name="s_mm_v")],
        "scan_body", [_vi("s_in", ["N", 16]), _vi("x_t", ["N", 8])], [_vi("s_out", ["N", 16]), _vi("y_t", ["N", 4])])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["s0", "Q"], ["q0"], name="top_matmul"),
         helper.make_node("Relu", ["q0"], ["q"], name="top_relu"),
         helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], body=body, num_scan_inputs=1,
                          scan_input_axes=[1], name="scan")],
        "scan_net", [_vi("s0", ["N", 16]), _vi("xs", ["N", "T", 8])],
        [_vi("s_final", ["N", 16]), _vi("ys", ["T", "N", 4])],
        [_c("Q", rng, 16, 16, scale=0.3), _c("W", rng, 16, 16, scale=0.3), _c("U", rng, 8, 16, scale=0.3),
         _c("V", rng, 16, 4, scale=0.5)])
    return _onnx(g)


def _scan_feeds(rng, n, t):
    return {"s0": rng.standard_normal((n, 16)).astype(np.float32),
            "xs": rng.standard_normal((n, t, 8)).astype(np.float32)}


def _ort_run(model, feeds):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _graphs(spec, where=""):
    """(path, graph spec) of a plan graph and every body in it, recursively."""
    out = [(where, spec)]
    for st in spec["steps"]:
        for k, a in st["attrs"].items():
            if isinstance(a, dict) and "__graph__" in a:
                out += _graphs(a["__graph__"], f"{where}{st['name']}.{k}/")
    return out


def _body_dtypes(plan):
    """{step name: its first output's element type} over every body step (not the main graph's)."""
    return {st["name"]: spec["values"][st["outputs"][0]]["type"]["dtype"]
            for where, spec in _graphs(plan.graph) if where for st in spec["steps"]}


def _interface(plan):
    """Each body's input and output element types, by path."""
    return {where: ([spec["values"][v]["type"]["dtype"] for v in spec["inputs"]],
                    [spec["values"][v]["type"]["dtype"] for v in spec["outputs"]])
            for where, spec in _graphs(plan.graph) if where}


BODY_CASES = {
    # model, feeds at two shapes, the body layers (Conv/MatMul sources) that must run low
    "if": (_if_model, lambda rng: [_if_feeds(rng, 1, True, True), _if_feeds(rng, 3, True, False),
                                   _if_feeds(rng, 3, False, True)],
           {"t_conv", "e_conv", "u_matmul", "v_matmul"}),
    "loop": (_loop_model, lambda rng: [_loop_feeds(rng, 1, 2), _loop_feeds(rng, 3, 4)], {"b_matmul"}),
    "scan": (_scan_model, lambda rng: [_scan_feeds(rng, 1, 3), _scan_feeds(rng, 3, 5)],
             {"s_mm_w", "s_mm_u", "s_mm_v"}),
}


@pytest.fixture(scope="module")
def fp32_plans():
    return {k: Builder().build(mk(np.random.default_rng(0)), BuilderConfig(device="cpu"))
            for k, (mk, _, _) in BODY_CASES.items()}


@pytest.mark.parametrize("case", sorted(BODY_CASES))
@pytest.mark.parametrize("flag, low, tol", [("fp16", "float16", 1e-2), ("bf16", "bfloat16", 3e-2)])
def test_bodies_run_low_and_match_onnxruntime(case, flag, low, tol, fp32_plans):
    from kiln.plan.format import plan_from_bytes, plan_to_bytes
    make, feeds_at, compute_layers = BODY_CASES[case]
    model = make(np.random.default_rng(0))
    plan = Builder().build(model, BuilderConfig(device="cpu", **{flag: True}))
    dtypes = _body_dtypes(plan)
    assert compute_layers <= set(dtypes), sorted(dtypes)
    assert {n: dtypes[n] for n in compute_layers} == {n: low for n in compute_layers}
    ops = {st["name"]: st["op"] for _, spec in _graphs(plan.graph) for st in spec["steps"]}
    stayed = {n: t for n, t in dtypes.items() if ops[n] in LOW_OPS and t != low}
    assert not stayed, stayed  # every body layer that runs low at top level runs low in its body
    if case == "if":
        assert dtypes["t_softmax"] == "float32"  # and what stays float32 at top level stays so in a body
    assert _interface(plan) == _interface(fp32_plans[case])  # body inputs/outputs keep their types
    assert [o["dtype"] for o in plan.outputs] == [o["dtype"] for o in fp32_plans[case].outputs]
    engine = Engine(plan_from_bytes(plan_to_bytes(plan)))  # as a file would load it
    for feeds in feeds_at(np.random.default_rng()):
        got = engine.create_execution_context().execute(feeds)
        want = _ort_run(model, feeds)
        for name, w in zip(engine.output_names, want):
            assert got[name].dtype == np.float32 and got[name].shape == w.shape, name
            assert rel_error(got[name], w) <= tol, (name, rel_error(got[name], w))


def test_body_output_that_is_a_low_capture_keeps_its_type():
    """A branch whose output is the captured outer value itself (what eliminating its Identity leaves): the
    outer value is float16 after lowering, the branch output stays float32 through a Cast in the branch."""
    from kiln.frontend.onnx import load_onnx
    from kiln.ir.dtype import DType
    from kiln.logger import Logger, Severity
    from kiln.ops.infer import infer_types
    from kiln.passes.base import PassContext, PassManager
    from kiln.passes.precision import ReducedPrecision
    rng = np.random.default_rng(3)
    then_g = helper.make_graph([helper.make_node("Identity", ["a"], ["ta"], name="keep")], "then", [],
                               [_vi("ta", ["N", 8])])
    else_g = helper.make_graph([helper.make_node("Softmax", ["a"], ["s"], axis=1, name="soft")], "else", [],
                               [_vi("s", ["N", 8])])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "P"], ["a"], name="mm"),
                           helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
                          "cap", [_vi("c", [], TensorProto.BOOL), _vi("x", ["N", 8])], [_vi("y", ["N", 8])],
                          [_c("P", rng, 8, 8)])
    logger = Logger(Severity.ERROR)
    graph = load_onnx(_onnx(g), logger)
    then_b = graph.nodes[1].attrs["then_branch"]
    a = graph.nodes[0].outputs[0]
    then_b.nodes, then_b.outputs = [], [a]  # the branch returns the capture itself
    PassManager([ReducedPrecision(DType.FLOAT16)], subgraphs=True).run(graph, PassContext(logger))
    assert a.type.dtype == DType.FLOAT16
    out = then_b.outputs[0]
    assert out is not a and out.type.dtype == DType.FLOAT32
    assert [n.op_type for n in then_b.nodes] == ["Cast"] and then_b.nodes[0].inputs == [a]
    assert then_b.captures == [a] and graph.nodes[-1].captures == [a]
    infer_types(graph)  # a whole re-inference (what the loader does) agrees
    assert graph.outputs[0].type.dtype == DType.FLOAT32 and out.type.dtype == DType.FLOAT32


def test_lowered_attention_keeps_a_float32_softmax():
    """An imported float32 Attention (opset 23, no softmax_precision: the softmax in Q's type) lowered to float16
    keeps the float32 softmax the model computed, so it stays within the fast kernels' contract
    (kiln.backends.attention.spec), and its result matches onnxruntime's float32 one to float16 accuracy."""
    from kiln.backends.attention import spec
    rng = np.random.default_rng()
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1)
    g = helper.make_graph([node], "a", [_vi(n, [2, 4, 9, 16]) for n in "qkv"], [_vi("y", [2, 4, 9, 16])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    plan = Builder().build(model, BuilderConfig(fp16=True, optimization_level=0))
    steps = [s for s in plan.graph["steps"] if s["op"] == "Attention"]
    assert steps and steps[0]["attrs"].get("softmax_precision") == 1
    engine = Engine(plan)
    assert spec(next(n for n in engine.graph.nodes if n.op_type == "Attention")) is not None
    feeds = {n: rng.standard_normal((2, 4, 9, 16)).astype(np.float32) for n in "qkv"}
    got = engine.create_execution_context().execute(feeds)["y"]
    assert rel_error(got, run_oracle(model, feeds)[0]) < 5e-3
