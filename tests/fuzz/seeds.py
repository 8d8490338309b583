"""Seed inputs of the fuzzers: a handful of small ONNX models and the CPU plans built from them.

Every seed is tiny (a few kilobytes of weights) so a mutated case loads and runs in milliseconds, yet
together they reach the interesting parts of the loader and the runtime: fused convolutions with a
residual and an elided Concat (Winograd / oneDNN / 1x1-matmul tactics), FusedGemm, a Pointwise program,
pooling and nearest Resize, Loop and If with subgraphs, and the view/shape ops (Reshape, Transpose,
Slice, Gather, Split), and ops whose sizes or indices come from constants or data.

``seed_models()`` returns {name: ModelProto}; ``seed_plans()`` returns {name@O<level>: plan bytes},
built on the CPU at optimization levels 0 and 3 and cached, per process, in a temporary folder (the
builds take a few seconds). ``seed_profiles()`` gives the optimization profiles the plans are built with.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

Shape3 = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))


def _w(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(name: str, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: dict[str, np.ndarray], opset: int = OPSET) -> onnx.ModelProto:
    g = helper.make_graph(nodes, name, inputs, outputs,
                          [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="kiln-fuzz-seed")
    m.ir_version = min(m.ir_version, 10)
    return m


def _f(name: str, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_net() -> onnx.ModelProto:
    """Conv+BN+Relu, a 3x3 conv with a residual Add, a 1x1 branch and a Concat, then a max pool."""
    r = _rng("conv_net")
    c = 8
    inits: dict[str, np.ndarray] = {
        "w0": _w(r, c, 3, 3, 3), "b0": _w(r, c),
        "bn_s": (1 + 0.1 * r.standard_normal(c)).astype(np.float32), "bn_b": _w(r, c),
        "bn_m": _w(r, c), "bn_v": (1 + 0.2 * r.random(c)).astype(np.float32),
        "w1": _w(r, c, c, 3, 3), "b1": _w(r, c), "w2": _w(r, c, c, 1, 1),
        "w3": _w(r, c, 2 * c, 3, 3), "b3": _w(r, c),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("BatchNormalization", ["c0", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn0"], name="bn0"),
        helper.make_node("Relu", ["bn0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Add", ["c1", "r0"], ["a1"], name="res"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r0", "w2"], ["c2"], name="conv1x1"),
        helper.make_node("Concat", ["r1", "c2"], ["cat"], axis=1, name="cat"),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("MaxPool", ["r3"], ["y"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
    ]
    return _model("conv_net", nodes, [_f("x", ["N", 3, 8, 8])], [_f("y", ["N", c, 4, 4])], inits)


def mlp() -> onnx.ModelProto:
    """Gemm+Relu, MatMul+Add+Tanh, Gemm, Softmax."""
    r = _rng("mlp")
    inits = {"w0": _w(r, 16, 12), "b0": _w(r, 16), "w1": _w(r, 16, 16), "b1": _w(r, 16),
             "w2": _w(r, 4, 16), "b2": _w(r, 4)}
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["h0"], transB=1, name="fc0"),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
        helper.make_node("MatMul", ["r0", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h1"], name="add1"),
        helper.make_node("Tanh", ["h1"], ["t1"], name="tanh1"),
        helper.make_node("Gemm", ["t1", "w2", "b2"], ["h2"], transB=1, name="fc2"),
        helper.make_node("Softmax", ["h2"], ["y"], axis=-1, name="softmax"),
    ]
    return _model("mlp", nodes, [_f("x", ["N", 12])], [_f("y", ["N", 4])], inits)


def pointwise_chain() -> onnx.ModelProto:
    """Add/Mul/Sigmoid/Clip/Greater/Where/Sub/Abs/LeakyRelu on two inputs: one fused Pointwise node."""
    r = _rng("pointwise")
    inits = {"s": _w(r, 1, 6), "lo": np.array(-0.5, np.float32), "hi": np.array(0.75, np.float32),
             "zero": np.array(0.0, np.float32)}
    nodes = [
        helper.make_node("Add", ["a", "b"], ["p0"], name="add"),
        helper.make_node("Mul", ["p0", "s"], ["p1"], name="mul"),
        helper.make_node("Sigmoid", ["p1"], ["p2"], name="sig"),
        helper.make_node("Clip", ["p2", "lo", "hi"], ["p3"], name="clip"),
        helper.make_node("Greater", ["a", "zero"], ["g"], name="gt"),
        helper.make_node("Where", ["g", "p3", "b"], ["p4"], name="where"),
        helper.make_node("Sub", ["p4", "a"], ["p5"], name="sub"),
        helper.make_node("Abs", ["p5"], ["p6"], name="abs"),
        helper.make_node("LeakyRelu", ["p6"], ["y"], alpha=0.1, name="lrelu"),
    ]
    return _model("pointwise", nodes, [_f("a", [4, 6]), _f("b", [4, 6])], [_f("y", [4, 6])], inits)


def pool_resize() -> onnx.ModelProto:
    """MaxPool, AveragePool (padded), nearest Resize by scales, GlobalAveragePool."""
    scales = np.array([1, 1, 2, 2], np.float32)
    nodes = [
        helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], name="maxpool"),
        helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[2, 2], strides=[2, 2], name="avgpool"),
        helper.make_node("Resize", ["a", "", "scales"], ["u"], mode="nearest", name="resize"),
        helper.make_node("Add", ["u", "x"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y"], axis=1, name="flatten"),
    ]
    return _model("pool_resize", nodes, [_f("x", [1, 4, 8, 8])], [_f("y", [1, 4]), ], {"scales": scales})


def loop() -> onnx.ModelProto:
    """Loop with a trip count input and a condition: accumulates x * (i + 1), stops when the sum gets large."""
    body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT, name="cast"),
            helper.make_node("Add", ["fi", "one"], ["fi1"], name="inc"),
            helper.make_node("Mul", ["x", "fi1"], ["xs"], name="scale"),
            helper.make_node("Add", ["acc_in", "xs"], ["acc_out"], name="acc"),
            helper.make_node("ReduceSum", ["acc_out"], ["tot"], keepdims=0, name="sum"),
            helper.make_node("Abs", ["tot"], ["atot"], name="abs"),
            helper.make_node("Less", ["atot", "limit"], ["c_out"], name="less"),
            helper.make_node("Identity", ["acc_out"], ["scan_out"], name="copy"),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         _f("acc_in", [3])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), _f("acc_out", [3]), _f("scan_out", [3])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(np.array(1e3, np.float32), "limit")],
    )
    nodes = [helper.make_node("Loop", ["M", "cond", "init"], ["acc", "scans"], body=body, name="loop"),
             helper.make_node("Mul", ["acc", "x"], ["y"], name="mul")]
    inputs = [helper.make_tensor_value_info("M", TensorProto.INT64, []),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, []), _f("x", [3])]
    return _model("loop", nodes, inputs, [_f("y", [3]), _f("scans", ["T", 3])],
                  {"init": np.zeros(3, np.float32)})


def if_else() -> onnx.ModelProto:
    """If on a bool input: the branches compute different functions of an outer value."""
    then_g = helper.make_graph([helper.make_node("Mul", ["h", "two"], ["t_out"], name="then_mul")], "then", [],
                               [_f("t_out", [2, 5])], [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    else_g = helper.make_graph([helper.make_node("Sigmoid", ["h"], ["e0"], name="else_sig"),
                                helper.make_node("Neg", ["e0"], ["e_out"], name="else_neg")], "else", [],
                               [_f("e_out", [2, 5])])
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("If", ["c"], ["o"], then_branch=then_g, else_branch=else_g, name="if"),
             helper.make_node("Add", ["o", "x"], ["y"], name="add")]
    inputs = [helper.make_tensor_value_info("c", TensorProto.BOOL, []), _f("x", [2, 5])]
    return _model("if_else", nodes, inputs, [_f("y", [2, 5])], {})


def shape_ops() -> onnx.ModelProto:
    """Reshape, Transpose, Slice, Gather, Split, Concat, Squeeze/Unsqueeze over a [N, 4, 6] input."""
    inits = {"shape": np.array([0, 24], np.int64), "shape2": np.array([-1, 6, 4], np.int64),
             "starts": np.array([1], np.int64), "ends": np.array([5], np.int64), "axes": np.array([2], np.int64),
             "idx": np.array([2, 0, 1], np.int64), "split": np.array([2, 2], np.int64),
             "ax0": np.array([0], np.int64)}
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1], name="transpose"),   # [N, 6, 4]
        helper.make_node("Slice", ["t", "starts", "ends", "axes"], ["s"], name="slice"),  # [N, 6, 4] -> axis 2: [1:5] clipped to 3
        helper.make_node("Gather", ["x", "idx"], ["g"], axis=1, name="gather"),         # [N, 3, 6]
        helper.make_node("Split", ["x", "split"], ["p0", "p1"], axis=1, name="split"),  # 2x [N, 2, 6]
        helper.make_node("Concat", ["p1", "p0", "g"], ["c"], axis=1, name="concat"),    # [N, 7, 6]
        helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),             # [N, 24]
        helper.make_node("Unsqueeze", ["r", "ax0"], ["u"], name="unsqueeze"),           # [1, N, 24]
        helper.make_node("Squeeze", ["u", "ax0"], ["q"], name="squeeze"),               # [N, 24]
        helper.make_node("Reshape", ["q", "shape2"], ["r2"], name="reshape2"),          # [N, 6, 4]
        helper.make_node("Add", ["r2", "t"], ["y0"], name="add"),
        helper.make_node("ReduceMax", ["s"], ["y1"], axes=[2], keepdims=1, name="rmax"),
    ]
    outputs = [_f("y0", ["N", 6, 4]), _f("c", ["N", 7, 6]), _f("y1", ["N", 6, 1])]
    return _model("shape_ops", nodes, [_f("x", ["N", 4, 6])], outputs, inits, opset=13)


def data_dependent() -> onnx.ModelProto:
    """Ops whose output sizes or addresses come from constants or data: Tile, Expand, Pad, TopK,
    ConstantOfShape, NonZero, GatherElements, ScatterElements, CumSum (mutated constants make them large or
    out of range)."""
    inits = {"reps": np.array([2, 1], np.int64), "eshape": np.array([2, 1, 1], np.int64),
             "pads": np.array([0, 1, 0, 1], np.int64), "k": np.array([2], np.int64),
             "gidx": np.array([[0, 3, 1, 2]], np.int64), "sidx": np.array([[3, 0]], np.int64),
             "supd": np.array([[5.0, -5.0]], np.float32), "axis": np.array(1, np.int64),
             "zero": np.array(0.0, np.float32)}
    nodes = [
        helper.make_node("Tile", ["x", "reps"], ["tile"], name="tile"),                    # [2N, 4]
        helper.make_node("Expand", ["x", "eshape"], ["exp"], name="expand"),               # [2, N, 4]
        helper.make_node("Pad", ["x", "pads"], ["pad"], mode="constant", name="pad"),      # [N, 6]
        helper.make_node("TopK", ["x", "k"], ["topv", "topi"], axis=1, name="topk"),       # [N, 2]
        helper.make_node("Shape", ["x"], ["shp"], name="shape"),
        helper.make_node("ConstantOfShape", ["shp"], ["cos"], name="cos"),
        helper.make_node("Add", ["cos", "x"], ["xc"], name="addc"),
        helper.make_node("Greater", ["xc", "zero"], ["pos"], name="gt"),
        helper.make_node("NonZero", ["pos"], ["nz"], name="nonzero"),                      # [2, K]
        helper.make_node("GatherElements", ["x", "gidx"], ["ge"], axis=1, name="gather_el"),  # [1, 4]
        helper.make_node("ScatterElements", ["x", "sidx", "supd"], ["se"], axis=1, name="scatter_el"),
        helper.make_node("CumSum", ["se", "axis"], ["cs"], name="cumsum"),
    ]
    outputs = [_f("tile", ["T", 4]), _f("exp", [2, "N", 4]), _f("pad", ["N", 6]), _f("topv", ["N", 2]),
               helper.make_tensor_value_info("nz", TensorProto.INT64, [2, "K"]), _f("ge", [1, 4]), _f("cs", ["N", 4])]
    return _model("data_dependent", nodes, [_f("x", ["N", 4])], outputs, inits, opset=17)


SEEDS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_net": conv_net, "mlp": mlp, "pointwise": pointwise_chain, "pool_resize": pool_resize,
    "loop": loop, "if_else": if_else, "shape_ops": shape_ops, "data_dependent": data_dependent,
}

PROFILES: dict[str, dict[str, Shape3]] = {
    "conv_net": {"x": ((1, 3, 8, 8), (2, 3, 8, 8), (3, 3, 8, 8))},
    "mlp": {"x": ((1, 12), (2, 12), (4, 12))},
    "shape_ops": {"x": ((1, 4, 6), (2, 4, 6), (3, 4, 6))},
    "data_dependent": {"x": ((1, 4), (2, 4), (5, 4))},
}

OPT_LEVELS = (0, 3)


def seed_models() -> dict[str, onnx.ModelProto]:
    return {name: make() for name, make in SEEDS.items()}


def seed_model_bytes() -> dict[str, bytes]:
    return {name: m.SerializeToString() for name, m in seed_models().items()}


def seed_profiles(name: str) -> list[Any]:
    from kiln.builder import OptimizationProfile
    shapes = PROFILES.get(name)
    if not shapes:
        return []
    p = OptimizationProfile()
    for inp, (mn, op, mx) in shapes.items():
        p.set_shape(inp, mn, op, mx)
    return [p]


_CACHE_DIR: str | None = None
_PLANS: dict[str, bytes] | None = None
_ERRORS: dict[str, str] = {}


def _cache_dir() -> str:
    global _CACHE_DIR
    if _CACHE_DIR is None:
        _CACHE_DIR = tempfile.mkdtemp(prefix="kiln-fuzz-seeds-")
        atexit.register(shutil.rmtree, _CACHE_DIR, True)
    return _CACHE_DIR


def build_seed_plan(name: str, level: int) -> bytes:
    """The CPU plan of one seed model at one optimization level (bytes of a .kiln file)."""
    from kiln.builder import Builder, BuilderConfig
    from kiln.logger import Logger, Severity
    from kiln.plan.format import plan_to_bytes
    import io
    cfg = BuilderConfig(device="cpu", optimization_level=level, profiles=seed_profiles(name))
    plan = Builder(Logger(Severity.ERROR, io.StringIO())).build(SEEDS[name](), cfg)
    return plan_to_bytes(plan)


def seed_plans(levels: tuple[int, ...] = OPT_LEVELS) -> dict[str, bytes]:
    """{"<seed>@O<level>": plan bytes} for every seed that builds (failures are in `seed_errors()`)."""
    global _PLANS
    if _PLANS is None:
        _PLANS = {}
    d = _cache_dir()
    for name in SEEDS:
        for level in levels:
            key = f"{name}@O{level}"
            if key in _PLANS or key in _ERRORS:
                continue
            path = os.path.join(d, f"{key}.kiln")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    _PLANS[key] = f.read()
                continue
            try:
                data = build_seed_plan(name, level)
            except Exception as e:  # a seed that no longer builds is reported, the others still fuzz
                _ERRORS[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            with open(path, "wb") as f:
                f.write(data)
            _PLANS[key] = data
    return {k: v for k, v in _PLANS.items() if k.split("@O")[1] in {str(x) for x in levels}}


def seed_errors() -> dict[str, str]:
    return dict(_ERRORS)
