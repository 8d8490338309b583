"""Plan files: round trip, and refusal of truncated, corrupted, foreign and incompatible files."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig
from kiln.errors import PlanFormatError
from kiln.plan.format import FORMAT_VERSION, MAGIC, load_plan, plan_from_bytes, plan_to_bytes, save_plan
from kiln.runtime.engine import Engine


def _model():
    rng = np.random.default_rng()
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w, b


def test_round_trip_runs_same_function(tmp_path):
    model, w, b = _model()
    plan = Builder().build(model, BuilderConfig())
    path = tmp_path / "m.kiln"
    save_plan(plan, path)
    x = np.random.default_rng().standard_normal((5, 3)).astype(np.float32)
    y = Engine.load(path).create_execution_context().execute({"x": x})["y"]
    np.testing.assert_allclose(y, np.maximum(x.astype(np.float64) @ w.T + b, 0), rtol=1e-5, atol=1e-6)
    again = load_plan(path)
    from kiln.backends.cpu.features import cpu_model, vector_isa
    assert again.graph == plan.graph and again.target == {"device": "cpu", "name": cpu_model(), "isa": vector_isa()}
    assert set(again.weights) == set(plan.weights)
    for k in plan.weights:
        assert torch.equal(again.weights[k], plan.weights[k])


def _bytes():
    model, _, _ = _model()
    return plan_to_bytes(Builder().build(model, BuilderConfig()))


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d[: len(d) // 2], "truncated"),
    (lambda d: d[:10], "truncated"),
    (lambda d: d[:-40] + bytes([d[-40] ^ 0xFF]) + d[-39:], "checksum"),
    (lambda d: b"\x08\x07\x12\x04onnx" + d[10:], "not a Kiln plan"),
    (lambda d: d[:8] + (FORMAT_VERSION + 1).to_bytes(4, "little") + d[12:], "format version"),
    (lambda d: d + b"junk", "padded"),
])
def test_bad_files_refused_with_one_line(mutate, msg):
    data = _bytes()
    with pytest.raises(PlanFormatError) as e:
        plan_from_bytes(mutate(data))
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_foreign_target_refused(tmp_path):
    model, _, _ = _model()
    plan = Builder().build(model, BuilderConfig())
    plan.target = {"device": "cuda", "capability": "1.0"}
    with pytest.raises(PlanFormatError, match="CUDA|capability"):
        Engine(plan)


def test_save_is_atomic_and_leaves_nothing_on_failure(tmp_path):
    model, _, _ = _model()
    plan = Builder().build(model, BuilderConfig())
    plan.weights["bad"] = object()  # type: ignore[assignment]  # serialization fails midway
    target = tmp_path / "m.kiln"
    with pytest.raises(Exception):
        save_plan(plan, target)
    assert os.listdir(tmp_path) == []


def test_magic_is_first():
    assert _bytes()[:8] == MAGIC


def test_cpu_plan_names_its_cpu_and_warns_on_another(tmp_path, monkeypatch, capsys):
    """A CPU plan records the CPU its tactics were timed on; loaded on another model or vector ISA it runs (oneDNN
    dispatches at run time) and says once that its choices were timed elsewhere, naming the missing extensions."""
    from kiln.backends.cpu import features
    from kiln.runtime import engine as engine_mod
    model, w, b = _model()
    path = tmp_path / "m.kiln"
    save_plan(Builder().build(model, BuilderConfig()), path)
    assert "warning" not in capsys.readouterr().err.lower()
    Engine.load(path)
    assert "was tuned on" not in capsys.readouterr().err
    monkeypatch.setattr(features, "cpu_model", lambda: "Other CPU 9000")
    monkeypatch.setattr(features, "vector_isa", lambda: "sse4_2 avx avx2 fma")
    monkeypatch.setattr(engine_mod, "_WARNED_CPU", set())
    x = np.random.default_rng().standard_normal((2, 3)).astype(np.float32)
    for _ in range(2):
        y = Engine.load(path).create_execution_context().execute({"x": x})["y"]
        np.testing.assert_allclose(y, np.maximum(x.astype(np.float64) @ w.T + b, 0), rtol=1e-5, atol=1e-6)
    err = capsys.readouterr().err
    assert err.count("was tuned on") == 1 and "this CPU is Other CPU 9000" in err, err
    have = set(load_plan(path).target["isa"].split()) - {"sse4_2", "avx", "avx2", "fma"}
    assert all(f in err for f in have), err


def test_timing_cache_entries_are_per_cpu_model_and_isa(monkeypatch):
    """A timing cache made on one CPU is not reused on another: its entries are keyed on the CPU's model and
    vector extensions (an EPYC's timings once chose a Xeon's tactics)."""
    from kiln.backends.cpu import features
    from kiln.tune import timing_cache as tc
    monkeypatch.setattr(tc, "_ENV_CACHE", {})
    here = tc.environment(torch.device("cpu"))
    assert here["cpu"] == features.cpu_model() and here["isa"] == features.vector_isa()
    monkeypatch.setattr(tc, "_ENV_CACHE", {})
    monkeypatch.setattr(features, "cpu_model", lambda: "Other CPU 9000")
    other = tc.environment(torch.device("cpu"))
    sig = {"op": "Conv", "inputs": [[1, 3, 8, 8]]}
    assert tc.entry_key(here, sig, "fp32") != tc.entry_key(other, sig, "fp32")
