"""Gather without the reference's four launches: view.gather (a constant scalar or consecutive run of indices as a
select / narrow view) and cuda.triton_gather (run-time indices, one kernel), against numpy's take on fresh
random data. Without a GPU the Triton kernel runs under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

from kiln.backends.tactic import TacticContext, get_tactic  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.ir.dtype import DType  # noqa: E402
from kiln.ir.graph import Node, Value  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402

CPU = torch.device("cpu")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _node(x_dtype: torch.dtype, x_shape: tuple, idx: torch.Tensor | None, idx_shape: tuple, axis: int) -> Node:
    ins = [Value("x", TensorType(DType.from_torch(x_dtype), x_shape)),
           Value("i", const=idx) if idx is not None else Value("i", TensorType(DType.INT64, idx_shape))]
    return Node("Gather", ins, [Value("y", TensorType(DType.from_torch(x_dtype), None))], {"axis": axis},
                name="g", opset=13)


def _data(dtype: torch.dtype, shape: tuple, rng: np.random.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.from_numpy(rng.random(shape) > 0.5)
    if dtype.is_floating_point:
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
    return torch.from_numpy(rng.integers(-1000, 1000, shape)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool])
@pytest.mark.parametrize("x_shape,axis,idx_shape", [((7, 5), 0, (3, 4)), ((2, 9, 6), 1, (5,)), ((3, 4, 10), -1, ()),
                                                    ((11, 3), 0, (2, 1, 3))])
def test_triton_gather_matches_take(dtype, x_shape, axis, idx_shape) -> None:
    rng = np.random.default_rng(abs(hash((str(dtype), x_shape))) % 2**32)
    n = x_shape[axis]
    x = _data(dtype, x_shape, rng)
    idx = torch.from_numpy(rng.integers(-n, n, idx_shape))  # negatives count from the end
    t = get_tactic("cuda.triton_gather")
    node = _node(dtype, x_shape, None, idx_shape, axis)
    assert t is not None and t.supports(node, TacticContext(DEV))
    got = t.make(node, {}, DEV)(x.to(DEV), idx.to(DEV)).cpu()
    want = np.take(x.numpy(), idx.numpy(), axis=axis)
    assert got.dtype == dtype and tuple(got.shape) == want.shape
    np.testing.assert_array_equal(got.numpy(), want)


def test_triton_gather_strided_input_out_and_int32() -> None:
    rng = np.random.default_rng(3)
    base = _data(torch.float32, (6, 8, 5), rng)
    x = base.transpose(0, 1)  # [8, 6, 5], not contiguous
    idx = torch.from_numpy(rng.integers(-6, 6, (4,))).to(torch.int32)
    node = _node(torch.float32, (8, 6, 5), None, (4,), 1)
    kern = get_tactic("cuda.triton_gather").make(node, {}, DEV)
    want = np.take(x.numpy(), idx.numpy(), axis=1)
    out = torch.full((8, 4, 5), float("nan"), device=DEV)
    assert kern(x.to(DEV), idx.to(DEV), out=out) is out
    np.testing.assert_array_equal(out.cpu().numpy(), want)
    big = torch.full((8, 4, 10), float("nan"), device=DEV)
    kern(x.to(DEV), idx.to(DEV), out=big[:, :, :5])  # a strided destination: through a temporary
    np.testing.assert_array_equal(big[:, :, :5].cpu().numpy(), want)
    assert torch.isnan(big[:, :, 5:]).all()


def test_triton_gather_out_of_range_reads_zeros() -> None:
    x = torch.arange(1, 13, dtype=torch.float32).reshape(4, 3)
    idx = torch.tensor([1, 4, -5, -1])
    got = get_tactic("cuda.triton_gather").make(_node(torch.float32, (4, 3), None, (4,), 0), {}, DEV)(
        x.to(DEV), idx.to(DEV)).cpu()
    assert got[0].tolist() == [4.0, 5.0, 6.0] and got[3].tolist() == [10.0, 11.0, 12.0]
    assert (got[1:3] == 0).all()


@pytest.mark.parametrize("idx,axis,kind", [(torch.tensor(0), 1, "select"), (torch.tensor(-2), 0, "select"),
                                           (torch.tensor([2, 3, 4]), -1, "narrow"),
                                           (torch.tensor([-3, -2], dtype=torch.int32), 1, "narrow")])
def test_gather_view(idx, axis, kind) -> None:
    rng = np.random.default_rng(5)
    x = _data(torch.float32, (4, 6, 7), rng)
    t = get_tactic("view.gather")
    node = _node(torch.float32, (4, 6, 7), idx, tuple(idx.shape), axis)
    assert t is not None and t.supports(node, TacticContext(CPU)) and not t.launches
    got = t.make(node, {}, CPU)(x)
    assert got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a view: nothing copied
    np.testing.assert_array_equal(got.numpy(), np.take(x.numpy(), idx.numpy(), axis=axis))


def test_gather_view_declines_and_refuses() -> None:
    t = get_tactic("view.gather")
    ctx = TacticContext(CPU)
    for idx in (torch.tensor([0, 2]), torch.tensor([-1, 0]), torch.tensor([[0, 1]]), torch.tensor([], dtype=torch.int64)):
        assert not t.supports(_node(torch.float32, (4, 6), idx, tuple(idx.shape), 0), ctx), idx
    assert not t.supports(_node(torch.float32, (4, 6), None, (2,), 0), ctx)  # run-time indices
    kern = t.make(_node(torch.float32, ("n", 6), torch.tensor([2, 3]), (2,), 0), {}, CPU)
    with pytest.raises(KilnError, match="out of range"):
        kern(torch.zeros(3, 6))
    with pytest.raises(KilnError, match="out of range"):
        t.make(_node(torch.float32, ("n", 6), torch.tensor(-4), (), 0), {}, CPU)(torch.zeros(3, 6))


def test_built_model_gathers_are_views_and_match_onnxruntime(tmp_path) -> None:
    """BERT's pooler (row 0 of the sequence) and a run of rows, in a built CPU plan, against onnxruntime."""
    from kiln.builder import Builder, BuilderConfig
    from kiln.logger import Logger, Severity
    from kiln.runtime.engine import Engine
    inits = [numpy_helper.from_array(np.array(0, np.int64), "first"),
             numpy_helper.from_array(np.array([-3, -2, -1], np.int64), "tail")]
    nodes = [helper.make_node("Gather", ["x", "first"], ["cls"], axis=1),
             helper.make_node("Gather", ["x", "tail"], ["t"], axis=1),
             helper.make_node("Relu", ["t"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 9, 8])],
                          [helper.make_tensor_value_info("cls", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = str(tmp_path / "g.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)  # any ORT reads 8
    plan = Builder(Logger(Severity.ERROR)).build(path, BuilderConfig(device="cpu"))
    assert {s["tactic"] for s in plan.graph["steps"] if s.get("op") == "Gather"} == {"view.gather"}
    x = np.random.default_rng(7).standard_normal((3, 9, 8)).astype(np.float32)
    got = Engine(plan).create_execution_context().execute({"x": x})
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for name, w in zip(("cls", "y"), want):
        np.testing.assert_allclose(np.asarray(got[name]), w, rtol=0, atol=0)
