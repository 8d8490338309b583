"""Control flow compiled, not interpreted (issue 11): If / Loop / Scan bodies go through the pass pipeline,
tactic selection and autotuning like the main graph, run their tactics (own arenas) at run time, and
loop-invariant work is hoisted out of loop bodies. onnxruntime is the oracle, on fresh random inputs."""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.errors import KilnError, PlanFormatError
from kiln.logger import Logger, Severity
from kiln.plan.format import Plan, plan_from_bytes, plan_to_bytes
from kiln.runtime import Engine

ort = pytest.importorskip("onnxruntime")

F = TensorProto.FLOAT


def _vi(name: str, shape: Any, dtype: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _c(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(a, name)


def _rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(g: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)  # any onnxruntime reads 8
    onnx.checker.check_model(m)
    return m


def _build(model: onnx.ModelProto, profiles: list[OptimizationProfile] | None = None, level: int = 3,
           log: io.StringIO | None = None, cache: str | None = None) -> Plan:
    logger = Logger(Severity.VERBOSE if log is not None else Severity.ERROR, log or io.StringIO())
    return Builder(logger).build(model, BuilderConfig(device="cpu", profiles=profiles or [],
                                                      optimization_level=level, timing_cache=cache))


def _engine(plan: Plan) -> Engine:
    return Engine(plan_from_bytes(plan_to_bytes(plan)))  # as a file would load it


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _check(engine: Engine, model: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: float = 1e-4) -> None:
    got = engine.create_execution_context().execute(feeds)
    want = _ort(model, feeds)
    for name, w in zip(engine.output_names, want):
        g = np.asarray(got[name])
        assert g.shape == w.shape, (name, g.shape, w.shape)
        scale = max(float(np.abs(w).max()), 1.0) if w.size else 1.0
        assert float(np.abs(g.astype(np.float64) - w).max() if w.size else 0.0) <= tol * scale, name


def _steps(spec: dict[str, Any], where: str = "") -> dict[str, dict[str, Any]]:
    """Every step of a plan graph spec, subgraphs included, by path ('if.then_branch/conv')."""
    out: dict[str, dict[str, Any]] = {}
    for st in spec["steps"]:
        out[f"{where}{st['name']}"] = st
        for k, a in st["attrs"].items():
            if isinstance(a, dict) and "__graph__" in a:
                out.update(_steps(a["__graph__"], f"{where}{st['name']}.{k}/"))
    return out


def _body_steps(plan: Plan) -> dict[str, dict[str, Any]]:
    return {k: s for k, s in _steps(plan.graph).items() if "/" in k}


# ---- (a) If branches: Conv+Relu, Gemm, LSTM ---------------------------------------------------------

H = 16  # LSTM hidden size


def _branch_nodes(tag: str) -> list[onnx.NodeProto]:
    """x [N,3,8,8] -> Conv+Relu [N,8,8,8] -> [8,N,64] sequence -> LSTM -> Y_h [N,16] -> Gemm -> [N,10]."""
    return [
        helper.make_node("Conv", ["x", f"{tag}_w", f"{tag}_b"], [f"{tag}_conv"], pads=[1, 1, 1, 1], name=f"{tag}_conv"),
        helper.make_node("Relu", [f"{tag}_conv"], [f"{tag}_relu"], name=f"{tag}_relu"),
        helper.make_node("Reshape", [f"{tag}_relu", "seq_shape"], [f"{tag}_seq"], name=f"{tag}_reshape"),
        helper.make_node("Transpose", [f"{tag}_seq"], [f"{tag}_tseq"], perm=[1, 0, 2], name=f"{tag}_transpose"),
        helper.make_node("LSTM", [f"{tag}_tseq", f"{tag}_lw", f"{tag}_lr", f"{tag}_lb"], ["", f"{tag}_h"],
                         hidden_size=H, name=f"{tag}_lstm"),
        helper.make_node("Squeeze", [f"{tag}_h", "ax0"], [f"{tag}_hs"], name=f"{tag}_squeeze"),
        helper.make_node("Gemm", [f"{tag}_hs", f"{tag}_g", f"{tag}_gb"], [f"{tag}_out"], transB=1, name=f"{tag}_gemm"),
    ]


def _branch_weights(tag: str, rng: np.random.Generator) -> list[onnx.TensorProto]:
    return [_c(f"{tag}_w", _rand(rng, 8, 3, 3, 3, scale=0.3)), _c(f"{tag}_b", _rand(rng, 8, scale=0.1)),
            _c(f"{tag}_lw", _rand(rng, 1, 4 * H, 64, scale=0.1)), _c(f"{tag}_lr", _rand(rng, 1, 4 * H, H, scale=0.1)),
            _c(f"{tag}_lb", _rand(rng, 1, 8 * H, scale=0.1)),
            _c(f"{tag}_g", _rand(rng, 10, H, scale=0.3)), _c(f"{tag}_gb", _rand(rng, 10, scale=0.1))]


_SHARED = [_c("seq_shape", np.array([0, 8, 64], np.int64)), _c("ax0", np.array([0], np.int64))]


def _if_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    then_g = helper.make_graph(_branch_nodes("t"), "then", [], [_vi("t_out", ["N", 10])])
    else_g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["e_flat"], name="e_flatten"),
         helper.make_node("Gemm", ["e_flat", "e_g"], ["e_gemm"], transB=1, name="e_gemm"),
         helper.make_node("Relu", ["e_gemm"], ["e_out"], name="e_relu")],
        "else", [], [_vi("e_out", ["N", 10])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
                          "if_model", [_vi("c", [], TensorProto.BOOL), _vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 10])],
                          _branch_weights("t", rng) + [_c("e_g", _rand(rng, 10, 192, scale=0.1))] + _SHARED)
    return _model(g)


def _flat_model(seed: int = 0) -> onnx.ModelProto:
    """The then-branch's layers as a top-level graph (same names and weights): what each gets there."""
    rng = np.random.default_rng(seed)
    g = helper.make_graph(_branch_nodes("t"), "flat", [_vi("x", ["N", 3, 8, 8])], [_vi("t_out", ["N", 10])],
                          _branch_weights("t", rng) + _SHARED)
    return _model(g)


_PROFILE = [OptimizationProfile().set_shape("x", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))]


@pytest.fixture(scope="module")
def timing_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cf") / "timing.json")


@pytest.fixture(scope="module")
def flat_plan(timing_cache: str) -> Plan:
    return _build(_flat_model(), _PROFILE, cache=timing_cache)


@pytest.fixture(scope="module")
def if_plan(flat_plan: Plan, timing_cache: str) -> Plan:
    # the same timing cache: a branch layer has the signature of its top-level twin (op, attributes, types at
    # the opt shape), so it is not timed again and the choice cannot differ by timing noise
    return _build(_if_model(), _PROFILE, cache=timing_cache)


def test_if_branch_layers_get_the_tactics_of_top_level_layers(flat_plan, if_plan):
    flat = {s["name"]: s for s in flat_plan.graph["steps"]}
    body = {k.split("/")[-1]: s for k, s in _body_steps(if_plan).items() if k.startswith("if.then_branch/")}
    assert set(flat) == set(body)  # the same passes made the same layers
    for name, s in flat.items():
        assert (body[name]["tactic"], body[name]["config"]) == (s["tactic"], s["config"]), name
    assert if_plan.build["tuning"]["cached"] >= flat_plan.build["tuning"]["measured"] > 0
    assert {name for name, s in flat.items() if s["tactic"] != "ref"}, "no fast CPU tactic takes these layers"
    assert if_plan.build["subgraph_layers"] == len(body) + 2  # and the else branch's two
    assert if_plan.build["ref_layers"] == 1 + sum(s["tactic"] == "ref" for s in _body_steps(if_plan).values())


def test_if_branch_layers_get_fast_tactics_heuristically():
    """Level 0 (no timing, deterministic): Conv+Relu and Gemm in the branches get the native tactics their
    top-level twins get."""
    flat = {s["name"]: s["tactic"] for s in _build(_flat_model(), _PROFILE, level=0).graph["steps"]}
    plan = _build(_if_model(), _PROFILE, level=0)
    body = {k.split("/")[-1]: s["tactic"] for k, s in _body_steps(plan).items()}
    assert flat["t_conv"] != "ref" and flat["t_gemm"] != "ref"
    for name, tid in flat.items():
        assert body[name] == tid, name
    assert body["e_gemm"] != "ref"
    _check(_engine(plan), _if_model(), {"c": np.array(True), "x": _rand(np.random.default_rng(), 3, 3, 8, 8)})


@pytest.mark.parametrize("cond", [True, False])
def test_if_matches_onnxruntime(if_plan, cond):
    model = _if_model()
    engine = _engine(if_plan)
    rng = np.random.default_rng()
    for n in (1, 2, 3):
        _check(engine, model, {"c": np.array(cond), "x": _rand(rng, n, 3, 8, 8)})


def test_if_plan_save_load_round_trip(if_plan, tmp_path):
    path = tmp_path / "if.kiln"
    path.write_bytes(plan_to_bytes(if_plan))
    engine = Engine.load(path)
    loaded = _body_steps(plan_from_bytes(path.read_bytes()))
    assert {k: (s["tactic"], s["config"]) for k, s in loaded.items()} == \
        {k: (s["tactic"], s["config"]) for k, s in _body_steps(if_plan).items()}
    rng = np.random.default_rng()
    for cond in (True, False):
        _check(engine, _if_model(), {"c": np.array(cond), "x": _rand(rng, 2, 3, 8, 8)})


def test_body_layers_are_timed_and_logged_by_path():
    log = io.StringIO()
    _build(_if_model(), _PROFILE, log=log)
    text = log.getvalue()
    assert "Fastest tactic for if.then_branch/t_conv (FusedConv)" in text
    assert "Subgraph if.then_branch: 6 layers: t_conv (FusedConv) " in text


# ---- passes inside bodies keep the boundary ---------------------------------------------------------

def _boundary_model(seed: int = 0) -> onnx.ModelProto:
    """Outer Conv -> If: the then-branch applies BatchNorm + Relu to the outer conv's output (neither may fold
    into the outer conv, which the else-branch and the outer Add also read)."""
    rng = np.random.default_rng(seed)
    then_g = helper.make_graph(
        [helper.make_node("BatchNormalization", ["conv", "s", "bb", "mu", "var"], ["bn"], name="bn"),
         helper.make_node("Relu", ["bn"], ["t_out"], name="t_relu")],
        "then", [], [_vi("t_out", [1, 4, 6, 6])])
    else_g = helper.make_graph([helper.make_node("Neg", ["conv"], ["e_out"], name="e_neg")],
                               "else", [], [_vi("e_out", [1, 4, 6, 6])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("If", ["c"], ["o"], then_branch=then_g, else_branch=else_g, name="if"),
             helper.make_node("Add", ["o", "conv"], ["y"], name="add")]
    weights = [_c("w", _rand(rng, 4, 3, 3, 3)), _c("s", np.abs(_rand(rng, 4)) + 0.5), _c("bb", _rand(rng, 4)),
               _c("mu", _rand(rng, 4)), _c("var", np.abs(_rand(rng, 4)) + 0.5)]
    g = helper.make_graph(nodes, "boundary", [_vi("c", [], TensorProto.BOOL), _vi("x", [1, 3, 6, 6])],
                          [_vi("y", [1, 4, 6, 6])], weights)
    return _model(g)


@pytest.mark.parametrize("cond", [True, False])
def test_body_rewrites_stay_inside_the_body(cond):
    model = _boundary_model()
    plan = _build(model)
    top = {s["name"]: s for s in plan.graph["steps"]}
    assert top["conv"]["op"] in ("Conv", "FusedConv") and "conv" in top["if"]["captures"]
    assert [k for k in _body_steps(plan) if k.startswith("if.then_branch/")]  # BatchNorm + Relu stay there
    _check(_engine(plan), model, {"c": np.array(cond), "x": _rand(np.random.default_rng(), 1, 3, 6, 6)})


# ---- (b) Loop: loop-invariant work hoisted ----------------------------------------------------------

def _loop_model(seed: int = 0, carried_shape: Any = (2, 8)) -> onnx.ModelProto:
    """h_{i+1} = tanh(h_i @ W + (a * b)) @ Transpose(R): a * b and Transpose(R) read only outer values."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["ab"], name="inv_mul"),
         helper.make_node("Transpose", ["r"], ["rt"], name="inv_transpose"),
         helper.make_node("MatMul", ["h_in", "W"], ["hw"], name="mm_w"),
         helper.make_node("Add", ["hw", "ab"], ["pre"], name="add_ab"),
         helper.make_node("Tanh", ["pre"], ["act"], name="tanh"),
         helper.make_node("MatMul", ["act", "rt"], ["h_out"], name="mm_r"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("ReduceSum", ["h_out"], ["total"], keepdims=0, name="total")],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("h_in", list(carried_shape))],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("h_out", list(carried_shape)), _vi("total", [])])
    g = helper.make_graph(
        [helper.make_node("Loop", ["M", "", "h0"], ["h_final", "totals"], body=body, name="loop")],
        "loop_model", [_vi("M", [], TensorProto.INT64), _vi("h0", [2, 8]), _vi("a", [2, 8]), _vi("b", [8]),
                       _vi("r", [8, 8])],
        [_vi("h_final", [2, 8]), _vi("totals", ["T"])], [_c("W", _rand(rng, 8, 8, scale=0.4))])
    return _model(g)


def _loop_feeds(rng: np.random.Generator, trips: int) -> dict[str, np.ndarray]:
    return {"M": np.array(trips, np.int64), "h0": _rand(rng, 2, 8), "a": _rand(rng, 2, 8), "b": _rand(rng, 8),
            "r": _rand(rng, 8, 8, scale=0.4)}


@pytest.fixture(scope="module")
def loop_plan() -> Plan:
    return _build(_loop_model())


def _at(names: list[str], layer: str) -> int:
    """Index of the step holding a layer (a fused step names its layers: 'PWN(inv_mul)')."""
    return next((i for i, n in enumerate(names) if n == layer or f"({layer}" in n or f" {layer}" in n), -1)


def test_loop_invariant_work_is_hoisted(loop_plan):
    top = [s["name"] for s in loop_plan.graph["steps"]]
    body = [k.split("/")[-1] for k in _body_steps(loop_plan)]
    assert 0 <= _at(top, "inv_mul") < top.index("loop") and 0 <= _at(top, "inv_transpose") < top.index("loop"), top
    assert _at(body, "inv_mul") < 0 and _at(body, "inv_transpose") < 0, body
    loop = next(s for s in loop_plan.graph["steps"] if s["name"] == "loop")
    caps = loop["attrs"]["body"]["__graph__"]["captures"]
    assert "ab" in caps and "rt" in caps and "a" not in caps and "r" not in caps, caps
    assert loop["captures"] == caps


def _native_matmul() -> bool:
    """Whether a top-level MatMul by a constant weight gets a native tactic here (level 0: no timing noise)."""
    flat = _build(_model(helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["hw"], name="mm_w")], "flat", [_vi("h_in", [2, 8])],
        [_vi("hw", [2, 8])], [_c("W", _rand(np.random.default_rng(0), 8, 8))])), level=0)
    return flat.graph["steps"][0]["tactic"] != "ref"


def test_loop_body_matmul_with_constant_weight_gets_a_fast_tactic():
    if not _native_matmul():
        pytest.skip("no native MatMul tactic on this machine")
    plan = _build(_loop_model(), level=0)
    body = {k.split("/")[-1]: s for k, s in _body_steps(plan).items()}
    assert body["mm_w"]["op"] == "FusedGemm" and body["mm_w"]["tactic"] != "ref", body  # MatMul + Add + Tanh
    assert body["mm_w"]["inputs"][3] == "ab"  # the hoisted a * b is the fused residual, read as a capture


@pytest.mark.parametrize("trips", [1, 2, 3, 7])
def test_loop_matches_onnxruntime(loop_plan, trips):
    _check(_engine(loop_plan), _loop_model(), _loop_feeds(np.random.default_rng(), trips))


def test_loop_carried_dims_unknown_at_opt_shape_get_the_heuristic_tactic():
    """h_in declared [rows, 8]: its dims are not concrete at the opt shape, so its layers are not timed; they
    still get the highest-priority tactic that supports them (as at level 0), and run."""
    model = _loop_model(carried_shape=("rows", 8))
    log = io.StringIO()
    plan = _build(model, log=log)
    body = {k.split("/")[-1]: s for k, s in _body_steps(plan).items()}
    mm = body["mm_w"]
    assert f"loop.body/mm_w: shapes unknown at the opt point; heuristic tactic {mm['tactic']}" in log.getvalue()
    if _native_matmul():
        assert mm["tactic"] != "ref"
    for trips in (1, 4):
        _check(_engine(plan), model, _loop_feeds(np.random.default_rng(), trips))


def test_nested_loop_invariant_moves_out_of_both_loops():
    """A Loop inside a Loop body: the inner body's Mul of two top-level values moves out of both."""
    inner = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["ab"], name="inv_mul"),
         helper.make_node("Add", ["s_in", "ab"], ["s_out"], name="acc"),
         helper.make_node("Identity", ["ci"], ["co"], name="inner_cond")],
        "inner", [_vi("j", [], TensorProto.INT64), _vi("ci", [], TensorProto.BOOL), _vi("s_in", [4])],
        [_vi("co", [], TensorProto.BOOL), _vi("s_out", [4])])
    outer = helper.make_graph(
        [helper.make_node("Loop", ["K", "", "t_in"], ["t_mid"], body=inner, name="inner_loop"),
         helper.make_node("Sin", ["t_mid"], ["t_out"], name="sin"),
         helper.make_node("Identity", ["co2"], ["co3"], name="outer_cond")],
        "outer", [_vi("i", [], TensorProto.INT64), _vi("co2", [], TensorProto.BOOL), _vi("t_in", [4])],
        [_vi("co3", [], TensorProto.BOOL), _vi("t_out", [4])])
    g = helper.make_graph([helper.make_node("Loop", ["M", "", "x"], ["y"], body=outer, name="outer_loop")],
                          "nested", [_vi("M", [], TensorProto.INT64), _vi("K", [], TensorProto.INT64),
                                     _vi("x", [4]), _vi("a", [4]), _vi("b", [4])], [_vi("y", [4])])
    model = _model(g)
    plan = _build(model)
    top = [s["name"] for s in plan.graph["steps"]]
    assert 0 <= _at(top, "inv_mul") < top.index("outer_loop"), top
    assert _at([k.split("/")[-1] for k in _body_steps(plan)], "inv_mul") < 0
    rng = np.random.default_rng()
    for m, k in ((1, 1), (2, 3), (3, 2)):
        _check(_engine(plan), model, {"M": np.array(m, np.int64), "K": np.array(k, np.int64), "x": _rand(rng, 4),
                                      "a": _rand(rng, 4), "b": _rand(rng, 4)})


def test_residual_captured_by_a_loop_body_is_not_donated():
    """Loop body: h = Relu(Conv(h) + z) with z an outer value; an in-place add into z would change it for the
    next iteration."""
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [helper.make_node("Conv", ["h_in", "w"], ["cv"], pads=[1, 1, 1, 1], name="body_conv"),
         helper.make_node("Add", ["cv", "z"], ["sum"], name="body_add"),
         helper.make_node("Relu", ["sum"], ["h_out"], name="body_relu"),
         helper.make_node("Identity", ["ci"], ["co"], name="cond")],
        "body", [_vi("i", [], TensorProto.INT64), _vi("ci", [], TensorProto.BOOL), _vi("h_in", [1, 4, 6, 6])],
        [_vi("co", [], TensorProto.BOOL), _vi("h_out", [1, 4, 6, 6])])
    g = helper.make_graph(
        [helper.make_node("Relu", ["zx"], ["z"], name="make_z"),
         helper.make_node("Loop", ["M", "", "x"], ["y"], body=body, name="loop"),
         helper.make_node("Add", ["y", "z"], ["out"], name="after")],
        "donate", [_vi("M", [], TensorProto.INT64), _vi("x", [1, 4, 6, 6]), _vi("zx", [1, 4, 6, 6])],
        [_vi("out", [1, 4, 6, 6])], [_c("w", _rand(rng, 4, 4, 3, 3, scale=0.2))])
    model = _model(g)
    plan = _build(model)
    for s in _body_steps(plan).values():
        assert not s["attrs"].get("kiln_z_donate"), s
    for trips in (1, 3):
        _check(_engine(plan), model, {"M": np.array(trips, np.int64), "x": _rand(rng, 1, 4, 6, 6),
                                      "zx": _rand(rng, 1, 4, 6, 6)})


def test_body_inputs_that_differ_from_their_declared_type_run_on_reference_kernels():
    """A body input declared [2, 8] but fed [3, 8]: the body's tactics were chosen for [2, 8], so that call runs
    the body on the reference kernels (one warning) and still computes the right result."""
    model = _loop_model()
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "R"  # h0 [R, 8]; the body still says [2, 8]
    model.graph.input[2].type.tensor_type.shape.dim[0].dim_param = "R"  # a [R, 8]
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "R"
    plan = _build(model)
    engine = _engine(plan)
    rng = np.random.default_rng()
    feeds = {"M": np.array(3, np.int64), "h0": _rand(rng, 3, 8), "a": _rand(rng, 3, 8), "b": _rand(rng, 8),
             "r": _rand(rng, 8, 8, scale=0.4)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = engine.create_execution_context().execute(feeds)
    assert any("reference kernels" in str(w.message) for w in caught)
    h = feeds["h0"]
    for _ in range(3):
        h = np.tanh(h @ onnx.numpy_helper.to_array(model.graph.initializer[0]) + feeds["a"] * feeds["b"]) @ feeds["r"].T
    np.testing.assert_allclose(got["h_final"], h, rtol=1e-4, atol=1e-5)


# ---- (c) Scan ---------------------------------------------------------------------------------------

def _scan_model(seed: int = 0) -> onnx.ModelProto:
    """s_{t+1} = tanh(s_t @ W + x_t @ U); y_t = relu(s_{t+1}) @ V."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "W"], ["sw"], name="mm_w"),
         helper.make_node("MatMul", ["x_t", "U"], ["xu"], name="mm_u"),
         helper.make_node("Add", ["sw", "xu"], ["pre"], name="add"),
         helper.make_node("Tanh", ["pre"], ["s_out"], name="tanh"),
         helper.make_node("Relu", ["s_out"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "V"], ["y_t"], name="mm_v")],
        "scan_body", [_vi("s_in", [2, 16]), _vi("x_t", [2, 8])], [_vi("s_out", [2, 16]), _vi("y_t", [2, 4])])
    g = helper.make_graph(
        [helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], body=body, num_scan_inputs=1,
                          scan_input_axes=[1], name="scan")],
        "scan_model", [_vi("s0", [2, 16]), _vi("xs", [2, "T", 8])], [_vi("s_final", [2, 16]), _vi("ys", ["T", 2, 4])],
        [_c("W", _rand(rng, 16, 16, scale=0.3)), _c("U", _rand(rng, 8, 16, scale=0.3)), _c("V", _rand(rng, 16, 4))])
    return _model(g)


def test_scan_body_layers_get_fast_tactics_and_match_onnxruntime():
    model = _scan_model()
    plan = _build(model, level=0)  # by priority: which tactic wins a 2x16 MatMul's timing is noise
    body = {k.split("/")[-1]: s for k, s in _body_steps(plan).items()}
    assert plan.build["subgraph_layers"] >= 3
    fast = [s for s in body.values() if s["tactic"] != "ref"]
    flat = _build(_model(helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "W"], ["sw"], name="mm_w")], "flat", [_vi("s_in", [2, 16])],
        [_vi("sw", [2, 16])], [_c("W", _rand(np.random.default_rng(0), 16, 16))])), level=0)
    if flat.graph["steps"][0]["tactic"] != "ref":
        assert len(fast) >= 3, {k: s["tactic"] for k, s in body.items()}  # the three MatMuls (maybe fused)
    engine = _engine(plan)
    rng = np.random.default_rng()
    for t in (1, 3, 6):
        _check(engine, model, {"s0": _rand(rng, 2, 16), "xs": _rand(rng, 2, t, 8)})


# ---- (d) the loader checks body steps as top-level steps --------------------------------------------

def _mutated(plan: Plan, edit: Any) -> Plan:
    p = plan_from_bytes(plan_to_bytes(plan))
    edit(p)
    return p


def _then_step(p: Plan, name: str) -> dict[str, Any]:
    return _steps(p.graph)[f"if.then_branch/{name}"]


def test_body_step_naming_a_tactic_that_does_not_support_it_is_refused(if_plan):
    def edit(p: Plan) -> None:
        st = _then_step(p, "t_lstm")  # an LSTM: no conv tactic takes it
        st["tactic"], st["config"] = "cpu.conv_onednn", {"layout": "nhwc"}
    with pytest.raises(KilnError, match=r"t_lstm.*does not support this layer"):
        Engine(plan_from_bytes(plan_to_bytes(_mutated(if_plan, edit))))


def test_body_step_with_a_config_outside_its_tuning_space_is_refused(if_plan):
    st0 = _then_step(if_plan, "t_gemm")
    if st0["tactic"] == "ref":
        pytest.skip("no native gemm tactic here")

    def edit(p: Plan) -> None:
        _then_step(p, "t_gemm")["config"] = {"bogus": 1}
    with pytest.raises(PlanFormatError, match=r"t_gemm.*has no config"):
        Engine(plan_from_bytes(plan_to_bytes(_mutated(if_plan, edit))))


def test_body_step_naming_an_unknown_tactic_is_refused(if_plan):
    def edit(p: Plan) -> None:
        _then_step(p, "t_conv")["tactic"] = "cpu.no_such_tactic"
    with pytest.raises(PlanFormatError, match=r"unknown to this Kiln"):
        Engine(plan_from_bytes(plan_to_bytes(_mutated(if_plan, edit))))


# ---- CUDA: body layers run CUDA tactics -------------------------------------------------------------

def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["if", "loop", "scan"])
def test_cuda_bodies_run_their_tactics_and_match_onnxruntime(which, tmp_path):
    rng = np.random.default_rng()
    if which == "if":
        model, flat = _if_model(), _flat_model()
        feeds = [{"c": np.array(c), "x": _rand(rng, 2, 3, 8, 8)} for c in (True, False)]
        profiles = _PROFILE
    elif which == "loop":
        model, flat, profiles = _loop_model(), None, None
        feeds = [_loop_feeds(rng, t) for t in (1, 4)]
    else:
        model, flat, profiles = _scan_model(), None, None
        feeds = [{"s0": _rand(rng, 2, 16), "xs": _rand(rng, 2, t, 8)} for t in (1, 5)]
    # one timing cache: a branch layer and its top-level twin share a signature, so timing noise cannot part them
    cfg = BuilderConfig(device="cuda", profiles=profiles or [], tf32=False, timing_cache=str(tmp_path / "t.json"))
    top = {} if flat is None else {s["name"]: (s["tactic"], s["config"]) for s in Builder(
        Logger(Severity.ERROR, io.StringIO())).build(flat, cfg).graph["steps"]}
    plan = Builder(Logger(Severity.ERROR, io.StringIO())).build(model, cfg)
    body = {k.split("/")[-1]: s for k, s in _body_steps(plan).items()}
    for name, choice in top.items():
        assert (body[name]["tactic"], body[name]["config"]) == choice, name
    assert any(s["tactic"].startswith("cuda.") for s in body.values()), {k: s["tactic"] for k, s in body.items()}
    engine = _engine(plan)
    for f in feeds:
        _check(engine, model, f, tol=1e-3)


# ---- (f) layers behind shape guards and constant conditions inside a branch ---------------------------------
# An exporter's `if x.shape[-1] == 1: x = x.squeeze(-1)` (Silero VAD's decoder) is an If whose branches give
# different ranks: unless its condition folds, everything after it has an unknown rank and no CPU tactic
# takes it. The condition is decided by a dim that every profile fixes (min = max) and that a strided conv
# derives; a nested If on a constant condition wraps a 1x1 conv. Both fold at build time, so the layers
# after them get the tactics their top-level twins get.

def _guarded_nodes(tag: str) -> list[onnx.NodeProto]:
    """x [N,3,H,W] (H = W = 16 in every profile) -> Conv s2 + Relu [N,8,8,8] -> guard If (squeeze a size-1
    last dim; the Relu output is captured) -> constant If around a 1x1 conv -> Concat [N,16,8,8] -> Cast ->
    ReduceMean over H, W -> Pad -> [N,16,1,3]."""
    guard_then = helper.make_graph([helper.make_node("Squeeze", [f"{tag}_relu", "ax3"], [f"{tag}_sq"],
                                                     name=f"{tag}_squeeze")], f"{tag}_gt", [], [_vi(f"{tag}_sq", ["n", "c", "h"])])
    guard_else = helper.make_graph([helper.make_node("Identity", [f"{tag}_relu"], [f"{tag}_id"], name=f"{tag}_ident")],
                                   f"{tag}_ge", [], [_vi(f"{tag}_id", ["n", "c", "h", "w"])])
    const_then = helper.make_graph([helper.make_node("Conv", [f"{tag}_g", f"{tag}_w2"], [f"{tag}_c2"], name=f"{tag}_conv2")],
                                   f"{tag}_ct", [], [_vi(f"{tag}_c2", ["n", "c", "h", "w"])])
    const_else = helper.make_graph([helper.make_node("Conv", [f"{tag}_g", f"{tag}_w3"], [f"{tag}_c3"], name=f"{tag}_conv3")],
                                   f"{tag}_ce", [], [_vi(f"{tag}_c3", ["n", "c", "h", "w"])])
    return [
        helper.make_node("Conv", ["x", f"{tag}_w", f"{tag}_b"], [f"{tag}_conv"], strides=[2, 2], pads=[1, 1, 1, 1],
                         name=f"{tag}_conv"),
        helper.make_node("Relu", [f"{tag}_conv"], [f"{tag}_relu"], name=f"{tag}_relu"),
        helper.make_node("Shape", [f"{tag}_relu"], [f"{tag}_shape"], name=f"{tag}_shape"),
        helper.make_node("Gather", [f"{tag}_shape", "idx3"], [f"{tag}_last"], axis=0, name=f"{tag}_gather"),
        helper.make_node("Equal", [f"{tag}_last", "one"], [f"{tag}_is1"], name=f"{tag}_equal"),
        helper.make_node("If", [f"{tag}_is1"], [f"{tag}_g"], then_branch=guard_then, else_branch=guard_else,
                         name=f"{tag}_guard"),
        helper.make_node("If", ["always"], [f"{tag}_c"], then_branch=const_then, else_branch=const_else,
                         name=f"{tag}_const_if"),
        helper.make_node("Concat", [f"{tag}_g", f"{tag}_c"], [f"{tag}_cat"], axis=1, name=f"{tag}_concat"),
        helper.make_node("Cast", [f"{tag}_cat"], [f"{tag}_cast"], to=TensorProto.FLOAT, name=f"{tag}_cast"),
        helper.make_node("ReduceMean", [f"{tag}_cast"], [f"{tag}_mean"], axes=[2, 3], keepdims=1, name=f"{tag}_mean"),
        helper.make_node("Pad", [f"{tag}_mean", "pads"], [f"{tag}_out"], mode="edge", name=f"{tag}_pad"),
    ]


def _guarded_weights(tag: str, rng: np.random.Generator) -> list[onnx.TensorProto]:
    return [_c(f"{tag}_w", _rand(rng, 8, 3, 3, 3, scale=0.3)), _c(f"{tag}_b", _rand(rng, 8, scale=0.1)),
            _c(f"{tag}_w2", _rand(rng, 8, 8, 1, 1, scale=0.3)), _c(f"{tag}_w3", _rand(rng, 8, 8, 1, 1, scale=0.3))]


_GUARD_SHARED = [_c("ax3", np.array([3], np.int64)), _c("idx3", np.array(3, np.int64)), _c("one", np.array(1, np.int64)),
                 _c("always", np.array(True)), _c("pads", np.array([0, 0, 0, 0, 0, 0, 0, 2], np.int64))]
_GUARD_X = ["N", 3, "H", "W"]
_GUARD_PROFILE = [OptimizationProfile().set_shape("x", (1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))]


def _guarded_if_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    then_g = helper.make_graph(_guarded_nodes("t"), "then", [], [_vi("t_out", ["n", "c", "h", "w"])])
    else_g = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["e_mean"], axes=[1], keepdims=1, name="e_mean"),
         helper.make_node("Slice", ["e_mean", "e_starts", "e_ends", "e_axes"], ["e_out"], name="e_slice")],
        "else", [], [_vi("e_out", ["n", "c", "h", "w"])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
                          "guarded_if", [_vi("c", [], TensorProto.BOOL), _vi("x", _GUARD_X)], [_vi("y", ["n", "c", "h", "w"])],
                          _guarded_weights("t", rng) + _GUARD_SHARED
                          + [_c("e_starts", np.array([0, 0], np.int64)), _c("e_ends", np.array([16, 1], np.int64)),
                             _c("e_axes", np.array([1, 2], np.int64))])
    return _model(g)


def _guarded_flat_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    g = helper.make_graph(_guarded_nodes("t"), "flat", [_vi("x", _GUARD_X)], [_vi("t_out", ["n", "c", "h", "w"])],
                          _guarded_weights("t", rng) + _GUARD_SHARED)
    return _model(g)


def test_layers_behind_shape_guards_and_constant_ifs_get_their_top_level_tactics():
    """Level 0 (no timing): no branch step runs on `ref` where its top-level twin gets a faster tactic, and
    the guard and the constant If are gone (their branches' layers run in the body itself)."""
    flat = {s["name"]: s for s in _build(_guarded_flat_model(), _GUARD_PROFILE, level=0).graph["steps"]}
    plan = _build(_guarded_if_model(), _GUARD_PROFILE, level=0)
    body = {k.split("/")[-1]: s for k, s in _body_steps(plan).items() if k.startswith("if.then_branch/")}
    assert {s["op"] for s in body.values()}.isdisjoint({"If", "Shape", "Equal", "Cast"})
    fast = {name for name, s in flat.items() if s["tactic"] != "ref"}
    assert {"t_conv", "t_concat", "t_mean"} <= fast, fast  # conv+relu, concat, spatial mean at top level
    for name in fast:  # (the same tactic or another fast one: a body's Concat is not elided, so the 1x1 conv
        # feeding it need not write into a slice of it)
        assert name in body and body[name]["tactic"] != "ref", (name, body.get(name))
    for name, s in body.items():  # nothing on ref in the body that is not on ref at top level
        assert s["tactic"] != "ref" or flat.get(name, {"tactic": "ref"})["tactic"] == "ref", name


@pytest.mark.parametrize("level", [0, 3])
def test_guarded_if_matches_onnxruntime(level):
    model = _guarded_if_model()
    engine = _engine(_build(model, _GUARD_PROFILE, level=level))
    rng = np.random.default_rng()
    for n in (1, 3, 4):
        for cond in (True, False):
            _check(engine, model, {"c": np.array(cond), "x": _rand(rng, n, 3, 16, 16)}, tol=1e-5)
    with pytest.raises(KilnError):  # the profile fixes H and W at 16
        engine.create_execution_context().execute({"c": np.array(True), "x": _rand(rng, 1, 3, 16, 18)})


def test_constant_if_in_a_branch_folds_without_a_profile():
    """No profile: the constant If still becomes its then-branch (the shape guard, on a dim no profile fixes,
    stays, and the layers after it, of unknown rank, keep `ref`), and the model still matches onnxruntime
    at other sizes."""
    model = _guarded_if_model()
    plan = _build(model, level=0)
    body = _body_steps(plan)
    assert not any(k.endswith("t_const_if") for k in body) and any(k.endswith("t_guard") for k in body)
    assert "if.then_branch/t_conv2" in body and body["if.then_branch/t_conv"]["tactic"] != "ref"
    engine = _engine(plan)
    rng = np.random.default_rng()
    for h, w in ((16, 16), (6, 6), (9, 5)):
        _check(engine, model, {"c": np.array(True), "x": _rand(rng, 2, 3, h, w)}, tol=1e-5)
