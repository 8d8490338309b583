"""ONNX importer and network API: external data, subgraph captures, clear errors, layer-by-layer building."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig
from kiln.errors import ModelError, UnsupportedOpError
from kiln.frontend.network import NetworkDefinition
from kiln.frontend.onnx import load_onnx
from kiln.ir.dtype import DType
from kiln.runtime.engine import Engine
from kiln.testing import assert_close_to_scale, check_model


def _mlp(rng):
    w = rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_external_data_weights(tmp_path):
    rng = np.random.default_rng()
    model = _mlp(rng)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    path = str(tmp_path / "ext.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=0)
    assert (tmp_path / "w.bin").exists()
    x = rng.standard_normal((2, 16)).astype(np.float32)
    plan = Builder().build(path, BuilderConfig())
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64) @ w), rtol=1e-5, atol=1e-6)


def test_constant_of_shape_weights_are_folded():
    rng = np.random.default_rng()
    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "s")
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["c"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Add", ["x", "c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [shape])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    plan = Builder().build(model, BuilderConfig())
    assert [s["op"] for s in plan.graph["steps"]] == ["Add"]
    check_model(model, {"x": rng.standard_normal((2, 3)).astype(np.float32)})


def test_if_subgraph_reads_outer_values():
    rng = np.random.default_rng()
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    graph = load_onnx(model)
    assert [v.name for v in graph.nodes[0].captures] == ["x"]
    for c in (True, False):
        check_model(model, {"c": np.array(c), "x": rng.standard_normal(3).astype(np.float32)})


def test_unknown_op_error_names_node_domain_opset():
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="frob1")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(UnsupportedOpError, match=r"frob1.*Frobnicate.*ai\.onnx.*opset 17"):
        load_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_undefined_input_is_model_error():
    node = helper.make_node("Relu", ["nowhere"], ["y"], name="r")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(ModelError, match="nowhere"):
        load_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_symbolic_dims_are_inferred():
    model = _mlp(np.random.default_rng())
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    g = load_onnx(model)
    assert g.nodes[-1].outputs[0].type.shape == ("batch", 8)


def test_network_api_matches_float64():
    rng = np.random.default_rng()
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    net = NetworkDefinition()
    x = net.add_input("x", DType.FLOAT32, ("N", 3, 10, 10))
    y = net.add_layer("Conv", [x, net.add_constant(w)], pads=[1, 1, 1, 1])
    net.mark_output(net.add_layer("Relu", [y]), "y")
    plan = Builder().build(net, BuilderConfig())
    xin = rng.standard_normal((2, 3, 10, 10)).astype(np.float32)
    got = Engine(plan).create_execution_context().execute({"x": xin})["y"]
    import torch
    want = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(xin).double(), torch.from_numpy(w).double(),
                                                 padding=1)).numpy()
    assert_close_to_scale(got, want)
