"""CPU runtime: steps whose tensors are this thread's arena views and constants repeat their first call bound
(Kernel.bind, GraphFunction._bound_calls). Checked against onnxruntime on fresh seeded inputs at every call:
two input shapes in alternation (one bound set per shape), more shapes than a thread keeps (rebinding), a
profiler hook, a closed engine, and threads sharing one engine."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.errors import KilnError
from kiln.logger import Logger, Severity
from kiln.runtime.arena import KEPT_PER_THREAD
from kiln.runtime.engine import Engine
from kiln.testing import assert_close_to_scale, run_oracle

C = 16


def _model() -> object:
    """conv + hard-swish (Paddle's Add/Clip/Mul/Div), a squeeze-excite gate and its channel scale, a 1x1 conv
    with a residual add, a channel Slice (a view) into another 1x1 conv, a max pool: every bindable kind."""
    rng = np.random.default_rng(7)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    f = lambda v: np.array(v, np.float32)  # noqa: E731
    inits = {"w1": w(C, 8, 3, 3), "b1": w(C, 1)[:, 0], "wr": w(4, C, 1, 1), "br": w(4, 1)[:, 0],
             "we": w(C, 4, 1, 1), "be": w(C, 1)[:, 0], "w2": w(C, C, 1, 1), "w3": w(8, 8, 1, 1),
             "three": f(3.0), "zero": f(0.0), "six": f(6.0),
             "s0": np.array([0], np.int64), "s1": np.array([8], np.int64), "ax": np.array([1], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "three"], ["p"]), helper.make_node("Clip", ["p", "zero", "six"], ["q"]),
        helper.make_node("Mul", ["c1", "q"], ["m"]), helper.make_node("Div", ["m", "six"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["g0"]),
        helper.make_node("Conv", ["g0", "wr", "br"], ["g1"]), helper.make_node("Relu", ["g1"], ["g2"]),
        helper.make_node("Conv", ["g2", "we", "be"], ["g3"]),
        helper.make_node("HardSigmoid", ["g3"], ["g4"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["h", "g4"], ["se"]),
        helper.make_node("Conv", ["se", "w2"], ["c2"]), helper.make_node("Add", ["c2", "h"], ["r"]),
        helper.make_node("Slice", ["r", "s0", "s1", "ax"], ["half"]),
        helper.make_node("Conv", ["half", "w3"], ["y1"]),
        helper.make_node("MaxPool", ["r"], ["y2"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    g = helper.make_graph(nodes, "bound", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, "H", 12])],
                          [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def engine() -> Engine:
    p = OptimizationProfile().set_shape("x", (1, 8, 4, 12), (2, 8, 10, 12), (4, 8, 16, 12))
    plan = Builder(Logger(Severity.ERROR)).build(_model(), BuilderConfig(optimization_level=0, profiles=[p]))
    return Engine(plan)


def _check(ctx, model, rng: np.random.Generator, n: int, h: int) -> None:
    x = rng.standard_normal((n, 8, h, 12)).astype(np.float32) * 3  # across the hard-swish's clip bounds
    got = ctx.execute({"x": x})
    want = run_oracle(model, {"x": x})
    for name, w in zip(("y1", "y2"), want):
        assert_close_to_scale(got[name], w)


def _bound(engine: Engine) -> dict[tuple, int]:
    calls = getattr(engine.function._bound, "calls", {})
    return {key: sum(b is not None for b in entry[1]) for key, entry in calls.items()}


def test_two_shapes_in_alternation_bind_once_each(engine: Engine) -> None:
    model, rng, ctx = _model(), np.random.default_rng(1), engine.create_execution_context()
    for _ in range(3):
        for n, h in ((2, 10), (3, 6)):
            _check(ctx, model, rng, n, h)
    bound = _bound(engine)
    assert set(bound) == {(("H", 10), ("N", 2)), (("H", 6), ("N", 3))}
    steps = len(engine.function.steps)
    # every layer but the one reading the network's input and those writing its outputs is bound
    assert all(steps - 3 <= b < steps for b in bound.values()), (bound, steps)


def test_more_shapes_than_a_thread_keeps_rebind(engine: Engine) -> None:
    model, rng, ctx = _model(), np.random.default_rng(2), engine.create_execution_context()
    shapes = [(1, 4 + 2 * k) for k in range(KEPT_PER_THREAD + 2)]
    for _ in range(2):
        for n, h in shapes:
            _check(ctx, model, rng, n, h)
    assert len(_bound(engine)) == KEPT_PER_THREAD


def test_a_profiler_sees_bound_layers(engine: Engine) -> None:
    model, rng, ctx = _model(), np.random.default_rng(3), engine.create_execution_context()
    _check(ctx, model, rng, 2, 8)
    seen: list[str] = []
    ctx.profiler = lambda node, seconds, result: seen.append(node.name)
    _check(ctx, model, rng, 2, 8)
    assert len(seen) == len(engine.function.steps)


def test_threads_sharing_an_engine(engine: Engine) -> None:
    model = _model()
    xs = [np.random.default_rng(10 + k).standard_normal((1 + k % 3, 8, 6 + 2 * (k % 2), 12)).astype(np.float32)
          for k in range(6)]
    want = [run_oracle(model, {"x": x}) for x in xs]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        ctx = engine.create_execution_context()
        try:
            for i in range(60):
                k = (seed + i) % len(xs)
                got = ctx.execute({"x": torch.from_numpy(xs[k])})
                assert_close_to_scale(got["y1"].numpy(), want[k][0])
                assert_close_to_scale(got["y2"].numpy(), want[k][1])
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_a_closed_engine_refuses_bound_calls() -> None:
    p = OptimizationProfile().set_shape("x", (1, 8, 4, 12), (1, 8, 8, 12), (2, 8, 8, 12))
    engine = Engine(Builder(Logger(Severity.ERROR)).build(_model(), BuilderConfig(optimization_level=0, profiles=[p])))
    ctx = engine.create_execution_context()
    x = np.random.default_rng(4).standard_normal((1, 8, 8, 12)).astype(np.float32)
    ctx.execute({"x": x})
    ctx.execute({"x": x})
    assert max(_bound(engine).values()) > 0
    engine.close()
    with pytest.raises(KilnError, match="released") as e:
        ctx.execute({"x": x})
    assert "\n" not in str(e.value)


def test_view_ops_on_the_reference_are_bound_and_follow_their_input() -> None:
    """Flatten, Transpose and Reshape run by the reference return views of their input: bound, the same view
    object at every call (its values the input's current ones), so the layers reading them are bound too
    (MobileNetV3's head: pool -> 1x1 conv -> Flatten -> Gemm -> Gemm; a channels-last map seen as tokens)."""
    rng = np.random.default_rng(9)
    inits = {"w": (rng.standard_normal((C, 8, 3, 3)) / 9).astype(np.float32),
             "g": (rng.standard_normal((5, C)) / 4).astype(np.float32),
             "h": (rng.standard_normal((C, C, 1, 1)) / 4).astype(np.float32),
             "g2": (rng.standard_normal((3, 5)) / 2).astype(np.float32),
             "m": (rng.standard_normal((C, 4)) / 4).astype(np.float32), "shape": np.array([0, -1, C], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Conv", ["p", "h"], ["q"]),
             helper.make_node("Flatten", ["q"], ["f"]), helper.make_node("Gemm", ["f", "g"], ["e"], transB=1),
             helper.make_node("Gemm", ["e", "g2"], ["y1"], transB=1),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t", "shape"], ["r"]), helper.make_node("MatMul", ["r", "m"], ["y2"])]
    g = helper.make_graph(nodes, "views", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, "H", 12])],
                          [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p = OptimizationProfile().set_shape("x", (1, 8, 4, 12), (2, 8, 6, 12), (4, 8, 8, 12))
    engine = Engine(Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(optimization_level=0, profiles=[p])))
    ctx = engine.create_execution_context()
    for _ in range(3):
        x = rng.standard_normal((2, 8, 6, 12)).astype(np.float32)
        got, want = ctx.execute({"x": x}), run_oracle(model, {"x": x})
        for name, w in zip(("y1", "y2"), want):
            assert_close_to_scale(got[name], w)
    steps = engine.function.steps
    (entry,) = engine.function._bound.calls.values()
    bound = {st.node.op_type for st, b in zip(steps, entry[1]) if b is not None}
    assert {"Flatten", "Transpose", "Reshape"} <= bound, [(st.node.op_type, b) for st, b in zip(steps, entry[1])]
    gemm = [b for st, b in zip(steps, entry[1]) if st.node.inputs[0] is not None and st.node.inputs[0].name == "f"]
    assert gemm and gemm[0] is not None  # the layer reading the Flatten view is bound too


def test_gemms_over_token_rows_are_bound() -> None:
    """Linear layers reading [B, S, K] activations (a transformer's) repeat their first call bound on 2-D views of
    the same memory, the residual add included; checked against onnxruntime on fresh inputs at every call."""
    rng = np.random.default_rng(11)
    inits = {"w0": (rng.standard_normal((C, C)) / 4).astype(np.float32),
             "w1": (rng.standard_normal((C, 32)) / 4).astype(np.float32), "b1": rng.standard_normal(32).astype(np.float32),
             "w2": (rng.standard_normal((32, C)) / 6).astype(np.float32), "w3": (rng.standard_normal((C, 8)) / 4).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["t"]),  # reads the network's input: not bound
             helper.make_node("MatMul", ["t", "w1"], ["a"]), helper.make_node("Add", ["a", "b1"], ["ab"]),
             helper.make_node("Relu", ["ab"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Add", ["m", "t"], ["h"]), helper.make_node("MatMul", ["h", "w3"], ["y"])]
    g = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", C])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p = OptimizationProfile().set_shape("x", (1, 4, C), (2, 9, C), (4, 16, C))
    engine = Engine(Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(optimization_level=0, profiles=[p])))
    ctx = engine.create_execution_context()
    for _ in range(3):
        x = rng.standard_normal((2, 9, C)).astype(np.float32)
        assert_close_to_scale(ctx.execute({"x": x})["y"], run_oracle(model, {"x": x})[0])
    steps = engine.function.steps
    (entry,) = engine.function._bound.calls.values()
    kinds = [(st.node.op_type, st.kernel.bind is not None, b is not None) for st, b in zip(steps, entry[1])]
    gemms = [k for k in kinds if k[0] == "FusedGemm"]  # the first reads the input, the last writes the output
    assert len(gemms) == 4 and all(bound for _, _, bound in gemms[1:3]), kinds


def test_a_conv_reading_a_channel_slice_of_a_concat_is_bound() -> None:
    """GhostNet's module: a 1x1 primary conv, a depthwise 'cheap' conv on its output, Concat of both, then a
    conv. The primary writes its part of the Concat's channels-last buffer, so the cheap conv reads a strided
    channel slice: its call copies that slice into a dense buffer and is repeated bound like any other layer.
    Checked against onnxruntime on fresh inputs at every call (the bound copy must read each call's data)."""
    rng = np.random.default_rng()
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    inits = {"w0": w(C, 8, 3, 3), "wp": w(C, C, 1, 1), "bp": w(C, 1)[:, 0], "wc": w(C, 1, 3, 3),
             "bc": w(C, 1)[:, 0], "wo": w(8, 2 * C, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["t"], pads=[1, 1, 1, 1]),  # reads the network's input
             helper.make_node("Conv", ["t", "wp", "bp"], ["p0"]), helper.make_node("Relu", ["p0"], ["p"]),
             helper.make_node("Conv", ["p", "wc", "bc"], ["c0"], group=C, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["c"]), helper.make_node("Concat", ["p", "c"], ["cat"], axis=1),
             helper.make_node("Conv", ["cat", "wo"], ["y"])]
    g = helper.make_graph(nodes, "ghost", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 14, 14])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    engine = Engine(Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(optimization_level=0)))
    steps = engine.function.steps
    cheap = next(k for k, st in enumerate(steps) if st.node.op_type == "FusedConv" and st.node.attr("group", 1) == C)
    if steps[cheap].node.inputs[0] is not steps[cheap - 1].node.outputs[0] or not steps[cheap - 1].out:
        pytest.skip("the primary conv's tactic does not write into the Concat here (no oneDNN)")
    ctx = engine.create_execution_context()
    for _ in range(3):
        x = rng.standard_normal((1, 8, 14, 14)).astype(np.float32)
        assert_close_to_scale(ctx.execute({"x": x})["y"], run_oracle(model, {"x": x})[0])
    (entry,) = engine.function._bound.calls.values()
    assert steps[cheap].kernel.bind is not None and entry[1][cheap] is not None
