"""execute()'s input forms and messages: an unknown name reported first, a bare array refused clearly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from kiln.builder import Builder, BuilderConfig
from kiln.errors import InputError
from kiln.logger import Logger, Severity
from kiln.runtime.engine import Engine


def _engine(inputs: list[str]) -> Engine:
    """y = tanh(sum of the inputs) * 3, every input float32 [2, 5]."""
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5]) for n in inputs]
    nodes, acc = [], inputs[0]
    for k, n in enumerate(inputs[1:]):
        nodes.append(helper.make_node("Add", [acc, n], [f"s{k}"]))
        acc = f"s{k}"
    nodes += [helper.make_node("Tanh", [acc], ["t"]),
              helper.make_node("Mul", ["t", "three"], ["y"])]
    g = helper.make_graph(nodes, "g", vi, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                          [helper.make_tensor("three", TensorProto.FLOAT, [], [3.0])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return Engine(Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(device="cpu", optimization_level=0)))


def test_unknown_name_is_reported_before_the_missing_one():
    ctx = _engine(["x"]).create_execution_context()
    x = np.random.default_rng().standard_normal((2, 5)).astype(np.float32)
    with pytest.raises(InputError) as e:
        ctx.execute({"input": x})
    assert str(e.value) == "unknown input 'input'; inputs are: x"
    with pytest.raises(InputError) as e:
        ctx.execute({})
    assert str(e.value) == "missing input 'x'; inputs are: x"


def test_bare_array_is_refused_with_the_forms_that_work():
    """A bare array or tensor, for a plan with one input or several: one line naming the dict and list forms
    (no shape error about the array), and those forms then run."""
    rng = np.random.default_rng()
    ctx = _engine(["x"]).create_execution_context()
    x = rng.standard_normal((2, 5)).astype(np.float32)
    for bare in (x, torch.from_numpy(x)):
        with pytest.raises(InputError) as e:
            ctx.execute(bare)
        assert str(e.value) == ("inputs must be a dict {name: array} or a list in input order (x), got "
                                f"{type(bare).__name__} (a bare array: pass {{'x': array}} or [array])")
    want = np.tanh(x.astype(np.float64)) * 3
    assert np.abs(ctx.execute({"x": x})["y"] - want).max() < 1e-5
    assert np.abs(ctx.execute([x])["y"] - want).max() < 1e-5


def test_bare_array_for_several_inputs_says_what_is_expected():
    ctx = _engine(["a", "b"]).create_execution_context()
    x = np.zeros((2, 5), np.float32)
    for bare in (x, torch.from_numpy(x)):
        with pytest.raises(InputError) as e:
            ctx.execute(bare)
        assert str(e.value) == ("inputs must be a dict {name: array} or a list in input order (a, b), got "
                                f"{type(bare).__name__} (a bare array: pass {{'a': ..., 'b': ...}})")
    rng = np.random.default_rng()
    a, b = (rng.standard_normal((2, 5)).astype(np.float32) for _ in range(2))
    want = np.tanh(a.astype(np.float64) + b) * 3
    assert np.abs(ctx.execute([a, b])["y"] - want).max() < 1e-5
    with pytest.raises(InputError, match="unknown input 'c'; inputs are: a, b"):
        ctx.execute({"a": a, "c": b})
