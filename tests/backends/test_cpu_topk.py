"""cpu.topk (kiln/backends/cpu/topk.py, native/topk.c) against onnxruntime, the ONNX reference evaluator and
Kiln's reference TopK (a stable sort) on fresh random inputs: every axis, largest and smallest, k from 1 to
the axis length, ties (lower index first), NaN, infinities and signed zeros, k = 0 and k out of range."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from kiln.backends.cpu.topk import CpuTopKTactic, _library
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.registry import lookup

pytestmark = pytest.mark.skipif(_library() is None, reason="no C compiler for native/topk.c")


def _node(axis: int, largest: int, opset: int = 11, k: int | None = None, dtype: DType = DType.FLOAT32) -> Node:
    ins = [Value("x", TensorType(dtype, None))] + ([] if opset < 10 else [Value("k", TensorType(DType.INT64, (1,)))])
    attrs = {"axis": axis, "largest": largest} | ({"k": k} if opset < 10 else {})
    return Node("TopK", ins, [Value("v"), Value("i")], attrs, name="topk", opset=opset)


def _oracles(x: np.ndarray, k: int, axis: int, largest: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from onnx.reference import ReferenceEvaluator
    import onnxruntime as ort
    g = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=axis, largest=largest)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("i", TensorProto.INT64, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    feeds = {"x": x, "k": np.array([k], np.int64)}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [tuple(sess.run(None, feeds)), tuple(ReferenceEvaluator(model).run(None, feeds))]


def _check(x: np.ndarray, k: int, axis: int, largest: int, oracles: bool = True) -> None:
    node = _node(axis, largest)
    kernel = CpuTopKTactic().build(node, {}, torch.device("cpu"))
    xt, kt = torch.from_numpy(x), torch.tensor([k])
    v, i = kernel(xt, kt)
    rv, ri = lookup("TopK").compute(node, xt, kt)
    assert torch.equal(i, ri), (i, ri)
    assert torch.equal(v.view(torch.int32), rv.view(torch.int32))  # bit for bit (NaN payloads, -0.0)
    if oracles:
        for ov, oi in _oracles(x, k, axis, largest):
            np.testing.assert_array_equal(i.numpy(), oi)
            np.testing.assert_array_equal(v.numpy(), ov)


@pytest.mark.parametrize("largest", [0, 1])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_random(axis: int, largest: int) -> None:
    rng = np.random.default_rng()
    x = rng.standard_normal((5, 37, 6)).astype(np.float32)
    n = x.shape[axis]
    for k in (1, 3, n // 2, n):
        _check(x, k, axis, largest)


@pytest.mark.parametrize("largest", [0, 1])
def test_ties_take_the_lower_index_first(largest: int) -> None:
    rng = np.random.default_rng()
    x = rng.integers(-3, 4, (4, 200)).astype(np.float32)  # 7 distinct values: ties everywhere, at the boundary too
    x[0, :] = 1.0  # one row all equal
    for k in (1, 7, 50, 199, 200):
        _check(x, k, -1, largest)


@pytest.mark.parametrize("largest", [0, 1])
def test_nan_infinities_and_signed_zeros(largest: int) -> None:
    """The reference's order: NaN above +inf, -0.0 equal to 0.0 (ties by index); onnxruntime's NaN order differs."""
    x = np.array([[0.0, -0.0, np.nan, 1.0, -np.inf, np.inf, -0.0, np.nan, 0.0, -1.0, 2.5, -np.nan]], np.float32)
    x = np.repeat(x, 3, axis=0)
    x[1] = x[1, ::-1]
    for k in range(1, x.shape[1] + 1):
        _check(x, k, 1, largest, oracles=False)
    zeros = np.array([[0.0, -0.0, 3.0, -0.0, 0.0, -2.0]], np.float32)
    for k in range(1, 7):
        _check(zeros, k, 1, largest)


def test_large_rows_run_in_parallel() -> None:
    x = np.random.default_rng().standard_normal((64, 3000)).astype(np.float32)
    _check(x, 300, 1, 1, oracles=False)
    _check(x, 10, 0, 0, oracles=False)


def test_k_zero_and_out_of_range_take_the_reference() -> None:
    node = _node(-1, 1)
    kernel = CpuTopKTactic().build(node, {}, torch.device("cpu"))
    x = torch.randn(3, 5)
    v, i = kernel(x, torch.tensor([0]))
    assert v.shape == (3, 0) and i.shape == (3, 0) and i.dtype == torch.int64
    with pytest.raises(Exception):
        kernel(x, torch.tensor([6]))
    d = x.double()  # another dtype at run time: the reference
    assert torch.equal(kernel(d, torch.tensor([2]))[1], lookup("TopK").compute(node, d, torch.tensor([2]))[1])


def test_opset1_k_attribute() -> None:
    node = _node(1, 1, opset=1, k=4)
    kernel = CpuTopKTactic().build(node, {}, torch.device("cpu"))
    x = torch.randn(2, 9)
    v, i = kernel(x)
    rv, ri = lookup("TopK").compute(node, x)
    assert torch.equal(v, rv) and torch.equal(i, ri)


def test_tactic_takes_float32_only() -> None:
    t = get_tactic("cpu.topk")
    ctx = TacticContext(torch.device("cpu"))
    assert t is not None and t.supports(_node(-1, 1), ctx)
    assert not t.supports(_node(-1, 1, dtype=DType.FLOAT16), ctx)
    assert not t.supports(_node(-1, 1, dtype=DType.INT64), ctx)


@pytest.mark.parametrize("order", ["ascending", "descending", "organ_pipe", "few_values"])
def test_long_rows_in_adversarial_orders(order: str) -> None:
    """Long rows through the quickselect and quicksort paths (already sorted, organ pipe, few distinct values)."""
    n = 5001
    x = np.arange(n, dtype=np.float32)
    if order == "descending":
        x = x[::-1].copy()
    elif order == "organ_pipe":
        x = np.concatenate([x[: n // 2], x[n // 2:][::-1]])
    elif order == "few_values":
        x = (x % 3).astype(np.float32)
    for k in (1, 17, 700, 2500, n):
        _check(x[None], k, 1, 1, oracles=order == "few_values")
        _check(x[None], k, 1, 0, oracles=False)
