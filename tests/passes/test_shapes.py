"""Shape-op simplification (kiln/passes/shapes.py)."""
from __future__ import annotations

import numpy as np
from onnx import helper

from tests.passes.models import compare, model, ops, optimized


def test_reshape_chain_merged() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Flatten", ["r"], ["a"], axis=2, name="flat1"),
             helper.make_node("Unsqueeze", ["a", "ax"], ["b"], name="unsq1"),
             helper.make_node("Reshape", ["b", "s"], ["y"], name="reshape1")]
    inits = {"ax": np.array([0], np.int64), "s": np.array([4, -1], np.int64)}
    m = model(nodes, {"x": (2, 3, 4, 5)}, ["y"], inits)
    g, log = optimized(m)
    assert ops(g) == ["Relu", "Reshape"]
    assert any("Merging" in line for line in log)
    compare(m)


def test_reshape_back_eliminated() -> None:
    nodes = [helper.make_node("Flatten", ["x"], ["a"], name="flat1"),
             helper.make_node("Reshape", ["a", "s"], ["b"], name="reshape1"),
             helper.make_node("Relu", ["b"], ["y"])]
    m = model(nodes, {"x": (2, 3, 4)}, ["y"], {"s": np.array([2, 3, 4], np.int64)})
    g, _ = optimized(m)
    assert ops(g) == ["Relu"]
    compare(m)


def test_transpose_pair_cancels_and_merges() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 3, 1], name="t1"),
             helper.make_node("Transpose", ["a"], ["b"], perm=[0, 3, 1, 2], name="t2"),
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("Transpose", ["r"], ["c"], perm=[1, 0, 2, 3], name="t3"),
             helper.make_node("Transpose", ["c"], ["y"], perm=[0, 1, 3, 2], name="t4")]
    m = model(nodes, {"x": (2, 3, 4, 5)}, ["y"])
    g, log = optimized(m)
    assert ops(g) == ["Relu", "Transpose"] and g.nodes[1].attrs["perm"] == [1, 0, 3, 2]
    assert any("transposes cancel" in line for line in log)
    compare(m)


def test_global_pool_flatten_becomes_reduce() -> None:
    for pool in (helper.make_node("GlobalAveragePool", ["x"], ["p"], name="gap"),
                 helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[4, 5], name="pool"),
                 helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[4, 5], name="pool")):
        m = model([pool, helper.make_node("Flatten", ["p"], ["y"], name="flat")], {"x": (2, 3, 4, 5)}, ["y"])
        g, _ = optimized(m)
        assert ops(g) == ["ReduceMax" if pool.op_type == "MaxPool" else "ReduceMean"]
        compare(m)


def test_local_pool_flatten_kept() -> None:
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 2]),
             helper.make_node("Flatten", ["p"], ["y"])]
    m = model(nodes, {"x": (2, 3, 4, 4)}, ["y"])
    g, _ = optimized(m)
    assert ops(g) == ["AveragePool", "Flatten"]
    compare(m)


def _view_model(batch_pos: int) -> object:
    """x.view(n, 2, 3, h, w) as torch exports it (Shape, Gather, Unsqueeze, Concat), batch dim dynamic;
    batch_pos puts the dynamic entry elsewhere (a target the rewrite must leave alone)."""
    w = np.random.default_rng(0).standard_normal((6, 3, 3, 3)).astype(np.float32)
    pieces = [["n1"], ["c2"], ["c3"], ["h1"], ["w1"]]
    pieces.insert(batch_pos, pieces.pop(0))
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["y"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             helper.make_node("Gather", ["s", "i2"], ["h"], axis=0),
             helper.make_node("Gather", ["s", "i3"], ["wd"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]), helper.make_node("Unsqueeze", ["h", "ax"], ["h1"]),
             helper.make_node("Unsqueeze", ["wd", "ax"], ["w1"]),
             helper.make_node("Concat", [p[0] for p in pieces], ["t"], axis=0),
             helper.make_node("Reshape", ["y", "t"], ["r"]), helper.make_node("Relu", ["r"], ["out"])]
    inits = {"w": w, "i0": np.array(0, np.int64), "i2": np.array(2, np.int64), "i3": np.array(3, np.int64),
             "ax": np.array([0], np.int64), "c2": np.array([2], np.int64), "c3": np.array([3], np.int64)}
    m = model(nodes, {"x": ("N", 3, 8, 8)}, ["out"], inits)
    return m


def test_runtime_reshape_target_becomes_constant() -> None:
    from kiln.builder import Builder, BuilderConfig, OptimizationProfile
    from kiln.runtime.engine import Engine
    from kiln.testing import run_oracle
    m = _view_model(0)
    g, log = optimized(m)
    assert ops(g) == ["FusedConv", "Reshape", "Relu"], ops(g)  # the Shape/Gather/Unsqueeze/Concat chain is gone
    reshape = [n for n in g.nodes if n.op_type == "Reshape"][0]
    assert reshape.inputs[1].const.tolist() == [0, 2, 3, 8, 8]  # 0: copy the input's (dynamic) batch dim
    assert any("run-time target" in line for line in log)
    prof = OptimizationProfile().set_shape("x", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))
    ctx = Engine(Builder().build(m, BuilderConfig(profiles=[prof]))).create_execution_context()
    rng = np.random.default_rng()
    for n in (1, 3, 4):
        x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
        got, want = ctx.execute({"x": x})["out"], run_oracle(m, {"x": x})[0]
        assert got.shape == want.shape == (n, 2, 3, 8, 8)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_runtime_reshape_target_with_a_moved_dim_stays_dynamic() -> None:
    m = _view_model(1)  # target [2, n, 3, h, w]: n is not the input's dim 1, so it stays a run-time value
    g, _ = optimized(m)
    assert "Shape" in ops(g) and "Concat" in ops(g)
    reshape = [n for n in g.nodes if n.op_type == "Reshape"][0]
    assert not reshape.inputs[1].is_const


def test_shape_of_a_static_tensor_folds() -> None:
    """Shape of a tensor whose dims are all static is a constant (the folder ran the op on a meta tensor and
    got a meta result, which it never folded: SSDlite's anchor generator ran 70 layers per inference)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["c"], value=helper.make_tensor("v", 1, [1], [2.0])),
             helper.make_node("Size", ["r"], ["n"]),
             helper.make_node("Cast", ["n"], ["nf"], to=1),
             helper.make_node("Mul", ["c", "nf"], ["cn"]),
             helper.make_node("Add", ["r", "cn"], ["y"])]
    m = model(nodes, {"x": (2, 3, 4)}, ["y"])
    g, _ = optimized(m)
    assert not {"Shape", "Size", "ConstantOfShape", "Cast"} & set(ops(g)), ops(g)
    compare(m)


def test_reshape_of_a_producer_without_inputs():
    """A Reshape whose input comes from a node with no inputs (a Constant with value_ints inlined from an If
    branch that constant folding took) is not a global-pool + flatten: the pass leaves it (it indexed the
    producer's first input and failed the build: ONNX's affine_grid expanded cases)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from kiln.builder import Builder, BuilderConfig
    from kiln.runtime.engine import Engine
    from kiln.testing import run_oracle
    rng = np.random.default_rng()
    ints = [int(v) for v in rng.integers(-5, 5, 6)]
    then_g = helper.make_graph([helper.make_node("Constant", [], ["k"], value_ints=ints),
                                helper.make_node("Reshape", ["k", "shape"], ["kr"])], "then",
                               [], [helper.make_tensor_value_info("kr", TensorProto.INT64, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["base"], ["nk"]),
                                helper.make_node("Reshape", ["nk", "shape"], ["nr"])], "else", [],
                               [helper.make_tensor_value_info("nr", TensorProto.INT64, [2, 3])])
    nodes = [helper.make_node("If", ["cond"], ["r"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["rf", "x"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array(True), "cond"),
                           numpy_helper.from_array(np.arange(6, dtype=np.int64), "base"),
                           numpy_helper.from_array(np.array([2, 3], np.int64), "shape")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 3)).astype(np.float32)
    got = Engine(Builder().build(model, BuilderConfig())).create_execution_context().execute({"x": x})["y"]
    np.testing.assert_allclose(got, run_oracle(model, {"x": x})[0], rtol=1e-6, atol=1e-6)
