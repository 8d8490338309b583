"""cpu.lstm (torch's fused LSTM with ONNX's gate order reordered at build time) against onnxruntime on fresh
random weights and inputs: forward, reverse and bidirectional, with and without initial states and biases,
all three outputs; built at optimization level 0 (no timing decides the tactic) and loaded from the
plan's bytes. The forms it does not implement keep the reference tactic."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tactic import TacticContext, get_tactic
from kiln.builder import Builder, BuilderConfig
from kiln.errors import KilnError
from kiln.logger import Logger, Severity
from kiln.plan.format import plan_from_bytes, plan_to_bytes
from kiln.runtime import Engine

ort = pytest.importorskip("onnxruntime")
CPU = TacticContext(torch.device("cpu"))
TOL = 1e-5


def _model(rng: np.random.Generator, direction: str, states: bool, bias: bool, t: int = 5, b: int = 3,
           size: int = 7, hidden: int = 6, outputs: tuple[str, ...] = ("Y", "Y_h", "Y_c"),
           seq_lens: np.ndarray | None = None, **attrs: Any) -> onnx.ModelProto:
    d = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array((rng.standard_normal((d, 4 * hidden, size)) * 0.4).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((d, 4 * hidden, hidden)) * 0.4).astype(np.float32), "R")]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal((d, 8 * hidden)) * 0.4).astype(np.float32), "B"))
    if seq_lens is not None:
        inits.append(numpy_helper.from_array(seq_lens.astype(np.int32), "lens"))
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [t, b, size])]
    if states:
        ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [d, b, hidden]) for n in ("h0", "c0")]
    node = helper.make_node("LSTM", ["X", "W", "R", "B" if bias else "", "lens" if seq_lens is not None else "",
                                     "h0" if states else "", "c0" if states else ""],
                            list(outputs), direction=direction, hidden_size=hidden, **attrs)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs if n]
    graph = helper.make_graph([node], "lstm", ins, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def _feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def _build(model: onnx.ModelProto) -> tuple[Engine, str]:
    plan = Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(optimization_level=0))
    (step,) = [s for s in plan.graph["steps"] if s["op"] == "LSTM"]
    return Engine(plan_from_bytes(plan_to_bytes(plan))), step["tactic"]


def _compare(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    engine, _ = _build(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ctx = engine.create_execution_context()
    for _ in range(2):  # fresh inputs each call
        feeds = _feeds(model, rng)
        got = ctx.execute(feeds)
        want = sess.run(None, feeds)
        for name, w in zip([o.name for o in model.graph.output], want):
            g = np.asarray(got[name]).astype(np.float64)
            assert g.shape == w.shape, (name, g.shape, w.shape)
            assert float(np.abs(g - w).max() / max(float(np.abs(w).max()), 1e-30)) <= TOL, name


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("states", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_matches_onnxruntime(direction: str, states: bool, bias: bool) -> None:
    rng = np.random.default_rng(hash((direction, states, bias)) % 2**32)
    model = _model(rng, direction, states, bias)
    assert _build(model)[1] == "cpu.lstm"
    _compare(model, rng)


@pytest.mark.parametrize("outputs", [("Y",), ("", "Y_h"), ("Y", "Y_h"), ("", "", "Y_c")])
def test_lstm_output_subsets(outputs: tuple[str, ...]) -> None:
    rng = np.random.default_rng(len(outputs) * 10 + sum(map(len, outputs)))
    model = _model(rng, "bidirectional", True, True, outputs=outputs)
    assert _build(model)[1] == "cpu.lstm"
    _compare(model, rng)


def test_lstm_full_constant_sequence_lens_and_explicit_default_activations() -> None:
    rng = np.random.default_rng(11)
    model = _model(rng, "forward", True, True, seq_lens=np.full(3, 5), activations=["Sigmoid", "Tanh", "Tanh"])
    assert _build(model)[1] == "cpu.lstm"
    _compare(model, rng)


@pytest.mark.parametrize("attrs,lens", [({"clip": 0.5}, None), ({"input_forget": 1}, None),
                                        ({"activations": ["Sigmoid", "Relu", "Tanh"]}, None),
                                        ({}, np.array([5, 2, 3]))])
def test_lstm_forms_it_does_not_implement_keep_the_reference(attrs: dict[str, Any], lens: np.ndarray | None) -> None:
    rng = np.random.default_rng(5)
    model = _model(rng, "forward", True, True, seq_lens=lens, **attrs)
    assert _build(model)[1] == "ref"
    _compare(model, rng)


def test_lstm_bad_inputs_raise_kiln_errors() -> None:
    model = _model(np.random.default_rng(2), "forward", True, True)
    engine, tactic = _build(model)
    assert tactic == "cpu.lstm"
    from kiln.frontend.onnx import load_onnx
    g = load_onnx(model, Logger(Severity.ERROR))
    (node,) = g.nodes
    t = get_tactic("cpu.lstm")
    assert t is not None and t.supports(node, CPU)
    kern = t.make(node, {}, torch.device("cpu"))
    with pytest.raises(KilnError):
        kern(torch.randn(5, 3, 8))  # input size 8, the weights read 7
    with pytest.raises(KilnError):
        kern(torch.randn(5, 3, 7), None, None, None, None, torch.randn(1, 2, 6), torch.randn(1, 3, 6))  # h0 batch 2
    with pytest.raises(KilnError):
        kern(torch.randn(5, 3, 7, dtype=torch.float64))


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("states", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("t", [1, 6])
def test_c_lstm_matches_onnxruntime(direction: str, states: bool, bias: bool, t: int) -> None:
    """cpu.lstm_c (native/lstm.c), every output, one-step and multi-step sequences, fresh inputs per call."""
    rng = np.random.default_rng()
    model = _model(rng, direction, states, bias, t=t, b=int(rng.integers(1, 4)), size=9, hidden=16)
    from kiln.frontend.onnx import load_onnx
    (node,) = load_onnx(model, Logger(Severity.ERROR)).nodes
    tac = get_tactic("cpu.lstm_c")
    assert tac is not None and tac.supports(node, CPU) and not tac.torch_dispatch
    kern = tac.make(node, {}, torch.device("cpu"))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for _ in range(2):
        feeds = _feeds(model, rng)
        args = [torch.from_numpy(feeds["X"]), None, None, None, None,
                *((torch.from_numpy(feeds["h0"]), torch.from_numpy(feeds["c0"])) if states else ())]
        got = kern(*args)
        for g, w in zip(got, sess.run(None, feeds)):
            assert tuple(g.shape) == w.shape
            assert float(np.abs(g.numpy().astype(np.float64) - w).max() / max(float(np.abs(w).max()), 1e-30)) <= TOL


def test_c_lstm_competes_with_the_fused_lstm_by_timing() -> None:
    """At optimization level 3 the autotuner times cpu.lstm_c beside cpu.lstm and the reference; whichever
    it picks, the plan matches onnxruntime."""
    rng = np.random.default_rng()
    model = _model(rng, "forward", True, True, t=1, b=1, size=128, hidden=64)
    plan = Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(optimization_level=3))
    (step,) = [s for s in plan.graph["steps"] if s["op"] == "LSTM"]
    assert step["tactic"] in ("cpu.lstm_c", "cpu.lstm", "ref")
    tuned = plan.build["tuning"]
    assert tuned, plan.build
    engine = Engine(plan_from_bytes(plan_to_bytes(plan)))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds(model, rng)
    got, want = engine.create_execution_context().execute(feeds), sess.run(None, feeds)
    for name, w in zip([o.name for o in model.graph.output], want):
        np.testing.assert_allclose(np.asarray(got[name]), w, rtol=1e-4, atol=1e-5)
