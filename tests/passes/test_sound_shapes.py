"""Sound shape inference: a dim is static only when proven for every value of the dynamic dims.

The failure this guards against (issue 11): two placeholder lengths that happened to give the same
frame count after a stride-128 convolution typed the frame count as a fixed 7, folding then decided an
exporter's `Equal(Gather(Shape(x), -1), 1)` check, and the wrong If branch ran."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.frontend.onnx import load_onnx
from kiln.ir.dims import DimExpr, dim_size
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.ops.infer import infer_node
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle

F32 = DType.FLOAT32


def _stft_gate(rng: np.random.Generator) -> object:
    """x [1, L] -> a stride-128 framing conv -> frames [1, 4, T]; if T == 1: frames * 3 else frames[..., 1:] + 1."""
    w = (rng.standard_normal((4, 1, 256)) * 0.1).astype(np.float32)
    c = {"w": w, "ax0": np.array([1], np.int64), "m1": np.array(-1, np.int64), "one": np.array(1, np.int64),
         "three": np.array(3.0, np.float32), "s1": np.array([1], np.int64), "e": np.array([1 << 30], np.int64),
         "ax2": np.array([2], np.int64), "onef": np.array(1.0, np.float32)}
    then_g = helper.make_graph([helper.make_node("Mul", ["f", "three"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Slice", ["f", "s1", "e", "ax2"], ["sl"]),
                                helper.make_node("Add", ["sl", "onef"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Unsqueeze", ["x", "ax0"], ["x3"]),
             helper.make_node("Conv", ["x3", "w"], ["f"], strides=[128]),
             helper.make_node("Shape", ["f"], ["fs"]),
             helper.make_node("Gather", ["fs", "m1"], ["t"]),
             helper.make_node("Equal", ["t", "one"], ["single"]),
             helper.make_node("If", ["single"], ["y"], then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "stft_gate", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in c.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_strided_frame_count_is_not_typed_static_from_samples() -> None:
    x = Value("x", TensorType(F32, (1, 1, "L")))
    w = Value("w", const=__import__("torch").zeros(4, 1, 256))
    conv = Node("Conv", [x, w], [Value("f")], {"strides": [128]}, name="c", opset=17)
    (t,) = infer_node(conv)
    # 1025 and 1133 samples both give 7 frames: the dim is the definition's expression, never the constant 7
    assert t.dtype == F32 and t.shape[:2] == (1, 4) and isinstance(t.shape[2], DimExpr), t
    for n in (256, 383, 1025, 1133, 4096):
        assert t.shape[2].evaluate({"L": n}) == (n - 256) // 128 + 1


@pytest.mark.parametrize("op, attrs, kernel", [
    ("Conv", {"strides": [2, 2], "pads": [1, 1, 1, 1]}, (3, 3)),
    ("Conv", {"strides": [2, 3], "pads": [0, 1, 2, 0], "dilations": [2, 1]}, (3, 2)),
    ("Conv", {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (3, 3)),
    ("Conv", {"strides": [3, 1], "auto_pad": "VALID"}, (4, 1)),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, None),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, None),
    ("ConvTranspose", {"strides": [2, 2]}, (2, 2)),
    ("ConvTranspose", {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 0], "dilations": [1, 2]},
     (3, 3)),
    ("ConvTranspose", {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (3, 3)),
    ("ConvTranspose", {"strides": [3, 1], "auto_pad": "VALID"}, (4, 1)),
])
def test_strided_window_dims_are_exact_expressions(op: str, attrs: dict, kernel: tuple | None) -> None:
    """A strided convolution, transposed convolution or pool over symbolic H, W: its output dims match torch at
    every size tried."""
    import torch
    x = Value("x", TensorType(F32, ("N", 4, "H", "W")))
    w_shape = (4, 6) if op == "ConvTranspose" else (6, 4)  # [C_in, C_out] there, [C_out, C_in] for Conv
    ins = [x] if kernel is None else [x, Value("w", const=torch.randn(*w_shape, *kernel))]
    (t,) = infer_node(Node(op, ins, [Value("y")], attrs, name="p", opset=17))
    rng = np.random.default_rng()
    for h, w in [(7, 9), (16, 16), (33, 20)] + [tuple(int(v) for v in rng.integers(8, 70, 2))]:
        want = infer_node(Node(op, [Value("x", TensorType(F32, (2, 4, h, w))), *ins[1:]], [Value("y")], attrs,
                               name="p", opset=17))[0].shape
        got = tuple(dim_size(d, {"H": h, "W": w}) for d in t.shape[2:])
        assert got == want[2:], (h, w, t, want)


def test_branch_on_a_dynamic_frame_count_is_kept_and_both_branches_run() -> None:
    rng = np.random.default_rng()
    m = _stft_gate(rng)
    prof = OptimizationProfile().set_shape("x", (1, 256), (1, 1025), (1, 4096))
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[prof]))
    assert any(s["op"] == "If" for s in plan.graph["steps"]), [s["op"] for s in plan.graph["steps"]]
    ctx = Engine(plan).create_execution_context()
    for length in (300, 1025, 1133, int(rng.integers(384, 4096))):  # 300 -> one frame: the other branch
        x = rng.standard_normal((1, length)).astype(np.float32)
        got, want = np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0]
        assert got.shape == want.shape, (length, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_frame_count_one_value_across_the_profile_is_static() -> None:
    """(L - 256)//128 + 1 over L in [256, 383] is 1 for every input the plan accepts: static, so the exporter's
    one-frame check folds and no If is left; one sample past the profile would give two frames."""
    from kiln.ops.symbolic import symbol_bounds
    x = Value("x", TensorType(F32, (1, 1, "L")))
    conv = Node("Conv", [x, Value("w", const=__import__("torch").zeros(4, 1, 256))], [Value("f")],
                {"strides": [128]}, name="c", opset=17)
    with symbol_bounds({"L": (256, 383)}):
        assert infer_node(conv)[0].shape == (1, 4, 1)
    with symbol_bounds({"L": (256, 384)}):  # 384 samples: two frames; the dim stays the expression
        assert isinstance(infer_node(conv)[0].shape[2], DimExpr)
    rng = np.random.default_rng()
    m = _stft_gate(rng)
    prof = OptimizationProfile().set_shape("x", (1, 256), (1, 300), (1, 383))
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[prof]))
    assert not any(s["op"] == "If" for s in plan.graph["steps"]), [s["op"] for s in plan.graph["steps"]]
    ctx = Engine(plan).create_execution_context()
    for length in (256, 383, int(rng.integers(257, 383))):
        x = rng.standard_normal((1, length)).astype(np.float32)
        got, want = np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0]
        assert got.shape == want.shape, (length, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("dim", [-1, 0])
def test_non_positive_dim_value_imports_as_dynamic(dim: int) -> None:
    vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])
    vi.type.tensor_type.shape.dim[0].dim_value = dim
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vi],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    graph = load_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), Logger())
    d0 = graph.inputs[0].type.shape[0]
    assert not isinstance(d0, int), graph.inputs[0].type
    prof = OptimizationProfile().set_shape("x", (1, 3, 8), (2, 3, 8), (4, 3, 8))
    plan = Builder(Logger()).build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                                   BuilderConfig(device="cpu", profiles=[prof]))
    x = np.random.default_rng().standard_normal((3, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(Engine(plan).create_execution_context().execute({"x": x})["y"], np.maximum(x, 0))


@pytest.mark.parametrize("op,attrs,want", [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, ("N", 8, "H", "W")),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, ("N", 8, lambda h: h // 2, lambda h: h // 2)),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [1, 1]}, ("N", 8, lambda h: h - 2, lambda h: h - 2)),
    ("AveragePool", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER"}, ("N", 8, "H", "W")),
    ("AveragePool", {"kernel_shape": [3, 1], "strides": [2, 1], "pads": [1, 0, 1, 0]}, ("N", 8, lambda h: (h - 1) // 2 + 1, "W")),
])
def test_window_ops_keep_a_spatial_symbol_only_where_proven(op: str, attrs: dict, want: tuple) -> None:
    """Kept exactly where the window keeps the size; otherwise the definition's expression (a derived dim)."""
    x = Value("x", TensorType(F32, ("N", 8, "H", "W")))
    (t,) = infer_node(Node(op, [x], [Value("y")], attrs, name="p", opset=17))
    assert t.dtype == F32 and len(t.shape) == 4, t
    for d, w in zip(t.shape, want):
        if isinstance(d, DimExpr):
            for h in (5, 8, 13):  # the expression, evaluated where H and W are h
                assert d.evaluate({"H": h, "W": h}) == w(h), (t, want)
        else:
            assert d == w, (t, want)


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [1, 1], "pads": [0, 0, 1, 1]}),
    ("Conv", {"pads": [0, 0, 1, 1]}),
    ("FusedConv", {"pads": [0, 0, 1, 1], "activation": "Relu"}),
])
def test_window_ops_with_asymmetric_pads_keep_a_symbolic_batch(op: str, attrs: dict) -> None:
    """Static spatial dims, asymmetric pads (HGNetV2's stem) and a symbolic batch: the batch symbol passes through
    and every other dim is known (a symbolic run of such a geometry knew no dim, and a plan of it failed its own
    load check)."""
    x = Value("x", TensorType(F32, ("N", 8, 12, 10)))
    ins = [x]
    if op != "MaxPool":
        w = np.random.default_rng().standard_normal((5, 8, 2, 2)).astype(np.float32)
        import torch
        ins.append(Value("w", TensorType(F32, (5, 8, 2, 2)), const=torch.from_numpy(w)))
    (t,) = infer_node(Node(op, ins, [Value("y")], attrs, name="p", opset=17, domain="kiln" if op == "FusedConv" else ""))
    assert t == TensorType(F32, ("N", 8 if op == "MaxPool" else 5, 12, 10)), t


def test_fused_conv_with_a_residual_keeps_symbolic_batch_and_size() -> None:
    """FusedConv(x, W, B, Z) over [N, 8, H, 10] with 3x3 same pads: [N, 5, H, 10], the residual typed alike."""
    import torch
    x = Value("x", TensorType(F32, ("N", 8, "H", 10)))
    w = Value("w", TensorType(F32, (5, 8, 3, 3)), const=torch.randn(5, 8, 3, 3))
    b = Value("b", TensorType(F32, (5,)), const=torch.randn(5))
    z = Value("z", TensorType(F32, ("N", 5, "H", 10)))
    (t,) = infer_node(Node("FusedConv", [x, w, b, z], [Value("y")], {"pads": [1, 1, 1, 1], "activation": "Relu"},
                           name="c", opset=1, domain="kiln"))
    assert t == TensorType(F32, ("N", 5, "H", 10)), t


def test_broadcast_against_an_unknown_dim_does_not_claim_the_symbol() -> None:
    a = Value("a", TensorType(F32, ("N", 4)))
    b = Value("b", TensorType(F32, (None, 4)))  # could be 1 at run time: the output is then N, else b's
    (t,) = infer_node(Node("Add", [a, b], [Value("y")], name="add", opset=17))
    assert t.shape == (None, 4), t
    same = Node("Add", [a, Value("c", TensorType(F32, ("N", 1)))], [Value("z")], name="add2", opset=17)
    assert infer_node(same)[0].shape == ("N", 4)


def test_derived_dims_from_reshape_and_concat() -> None:
    import torch
    x = Value("x", TensorType(F32, ("N", 3, "H", "W")))
    r = Node("Reshape", [x, Value("s", const=torch.tensor([0, -1]))], [Value("y")], name="r", opset=17)
    n, hw = infer_node(r)[0].shape
    assert n == "N" and isinstance(hw, DimExpr) and hw.symbols == {"H", "W"}
    assert hw.evaluate({"N": 2, "H": 5, "W": 7}) == 105  # 3 * H * W, for every H and W
    cat = Node("Concat", [x, Value("z", TensorType(F32, ("N", 5, "H", "W")))], [Value("c")], {"axis": 1},
               name="cat", opset=17)
    assert infer_node(cat)[0].shape == ("N", 8, "H", "W")


def test_resize_dims_follow_the_definition() -> None:
    import torch
    x = Value("x", TensorType(F32, ("N", 8, "H", 10)))
    scales = Value("sc", const=torch.tensor([1.0, 1.0, 2.0, 2.0]))
    r = Node("Resize", [x, None, scales], [Value("y")], {"mode": "nearest"}, name="r", opset=13)
    n, c, h, w = infer_node(r)[0].shape
    assert (n, c, w) == ("N", 8, 20) and isinstance(h, DimExpr) and h.evaluate({"H": 13}) == 26  # floor(2 H)
    half = Node("Resize", [x, None, Value("sc2", const=torch.tensor([1.0, 1.0, 0.5, 1.5]))], [Value("y")],
                {"mode": "nearest"}, name="r2", opset=13)
    _, _, h2, w2 = infer_node(half)[0].shape
    assert [h2.evaluate({"H": k}) for k in (7, 8, 9)] == [3, 4, 4] and w2 == 15  # floor(H / 2), floor(1.5 * 10)
    sizes = Value("sz", const=torch.tensor([1, 8, 32, 32]))
    r = Node("Resize", [x, None, None, sizes], [Value("y")], {"mode": "nearest"}, name="r", opset=13)
    assert infer_node(r)[0].shape == (1, 8, 32, 32)


def test_profile_ranges_bound_the_symbols() -> None:
    import torch
    from kiln.ops.symbolic import profile_bounds, symbol_bounds
    x = Value("x", TensorType(F32, ("N", "L", 64)))
    last = Node("Slice", [x, Value("s", const=torch.tensor([-1])), Value("e", const=torch.tensor([2 ** 63 - 1])),
                          Value("a", const=torch.tensor([1]))], [Value("y")], name="last", opset=13)
    head = Node("Slice", [x, Value("s", const=torch.tensor([0])), Value("e", const=torch.tensor([7])),
                          Value("a", const=torch.tensor([1]))], [Value("y")], name="head", opset=13)
    # unbounded, L may be 0 (then the slice is empty): derived dims, exact for every L
    (n, d_last, c), (_, d_head, _) = infer_node(last)[0].shape, infer_node(head)[0].shape
    assert (n, c) == ("N", 64) and isinstance(d_last, DimExpr) and isinstance(d_head, DimExpr)
    for L in (0, 1, 5, 7, 300):
        assert d_last.evaluate({"L": L}) == min(L, 1) and d_head.evaluate({"L": L}) == min(L, 7)
    bounds = profile_bounds([(("N", "L", 64), [((1, 8, 64), (4, 128, 64))]), (("N",), [((2,), (3,))])])
    assert bounds == {"N": (2, 3), "L": (8, 128)}
    with symbol_bounds(bounds):
        assert infer_node(last)[0].shape == ("N", 1, 64)
        assert infer_node(head)[0].shape == ("N", 7, 64)


def test_reference_kernel_moves_host_tensors_to_its_device() -> None:
    import torch
    from kiln.backends.reference import ReferenceTactic
    a, b = Value("a", TensorType(F32, (3,))), Value("b", TensorType(F32, (3,)))
    fn = ReferenceTactic().build(Node("Add", [a, b], [Value("y")], name="add", opset=17), {}, torch.device("meta"))
    y = fn(torch.ones(3, device="meta"), torch.arange(3.0))  # a host tensor meets a device tensor
    assert y.device.type == "meta" and y.shape == (3,)


def test_question_mark_dim_params_are_independent_dims() -> None:
    """Paddle2ONNX writes "?" for every dynamic dim: H and W are two dims, not one symbol."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "?", "?"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    h, w = load_onnx(m, Logger()).inputs[0].type.shape[2:]
    assert not isinstance(h, int) and not isinstance(w, int) and h != w
    x = np.random.default_rng().standard_normal((1, 3, 48, 192)).astype(np.float32)
    prof = OptimizationProfile().set_shape("x", (1, 3, 32, 32), (1, 3, 48, 192), (1, 3, 64, 320))
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[prof]))
    np.testing.assert_array_equal(Engine(plan).create_execution_context().execute({"x": x})["y"], np.maximum(x, 0))


def test_reshape_to_a_run_time_target_keeps_type_and_rank() -> None:
    x = Value("x", TensorType(F32, ("N", 12)))
    target = Value("t", TensorType(DType.INT64, (3,)))
    (t,) = infer_node(Node("Reshape", [x, target], [Value("y")], name="r", opset=14))
    assert t == TensorType(F32, (None, None, None)), t


def test_fp16_lowering_types_a_layer_whose_output_type_inference_could_not_tell() -> None:
    """A Reshape to a run-time shape feeding a MatMul: both run in float16, no float32/float16 mix."""
    from kiln.passes.base import PassContext
    from kiln.passes.precision import ReducedPrecision
    from kiln.ir.graph import Graph
    import torch
    x = Value("x", TensorType(F32, ("N", 4)))
    s = Value("s", TensorType(DType.INT64, (2,)))
    r, y = Value("r", TensorType(None, None)), Value("y", TensorType(None, None))
    w = Value("w", const=torch.randn(4, 3))
    nodes = [Node("Reshape", [x, s], [r], name="reshape", opset=14), Node("MatMul", [r, w], [y], name="mm", opset=14)]
    g = Graph("g")
    g.nodes, g.inputs, g.outputs = nodes, [x, s], [y]
    ReducedPrecision(DType.FLOAT16).run(g, PassContext(Logger(), device="cpu", options={}))
    mm = next(n for n in g.nodes if n.op_type == "MatMul")
    assert all(v.type.dtype == DType.FLOAT16 for v in mm.inputs), [str(v.type) for v in mm.inputs]


def test_dynamic_model_without_a_profile_is_tuned_at_a_named_default_point() -> None:
    import io
    rng = np.random.default_rng()
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    log = io.StringIO()
    plan = Builder(Logger(stream=log)).build(m, BuilderConfig(device="cpu"))
    assert "no optimization profile" in log.getvalue() and "x:1x3x224x224" in log.getvalue(), log.getvalue()
    assert plan.profiles == [] and plan.build["tuning"]["layers_timed"] >= 1, plan.build["tuning"]
    ctx = Engine(plan).create_execution_context()
    for shape in ((1, 3, 224, 224), (2, 3, 17, 40)):  # the plan still takes any shape
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(ctx.execute({"x": x})["y"], run_oracle(m, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_if_output_type_is_what_both_branches_agree_on() -> None:
    m = _stft_gate(np.random.default_rng(0))
    g = load_onnx(m, Logger())
    (node,) = [n for n in g.nodes if n.op_type == "If"]
    (t,) = infer_node(node)
    assert t.dtype == F32 and t.shape == (1, 4, None), t  # then: [1, 4, T]; else: [1, 4, T - 1]


def test_declared_output_symbols_are_labels_not_proofs() -> None:
    from kiln.ops.infer import merge_types
    declared = TensorType(F32, ("Gemmlogits_dim_0", 1000))
    assert merge_types(TensorType(F32, (None, 1000)), declared).shape == (None, 1000)
    assert merge_types(TensorType(F32, None), declared).shape == (None, 1000)
    assert merge_types(TensorType(F32, ("N", None)), TensorType(F32, (None, 7))).shape == ("N", None)
    assert merge_types(TensorType(F32, ("N", 4)), TensorType(F32, (1, 4))).shape == (1, 4)


def _shuffle_chain(blocks: int) -> object:
    """`blocks` channel shuffles as TorchScript exports them with a dynamic batch: each Reshape target is
    Concat(Unsqueeze(Gather(Shape(x), 0)), ...) of the tensor before it, so each fold needs the previous one."""
    nodes, inits, x = [], [], "x"
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("i0", 0), ("ax", [0]), ("g", [2]), ("c", [4]), ("hw", [3]), ("c8", [8]))]
    for k in range(blocks):
        p = f"b{k}_"
        nodes += [helper.make_node("Shape", [x], [p + "s"]), helper.make_node("Gather", [p + "s", "i0"], [p + "n"]),
                  helper.make_node("Unsqueeze", [p + "n", "ax"], [p + "nu"]),
                  helper.make_node("Concat", [p + "nu", "g", "c", "hw", "hw"], [p + "t5"], axis=0),
                  helper.make_node("Reshape", [x, p + "t5"], [p + "r"]),
                  helper.make_node("Transpose", [p + "r"], [p + "tr"], perm=[0, 2, 1, 3, 4]),
                  helper.make_node("Shape", [p + "tr"], [p + "s2"]), helper.make_node("Gather", [p + "s2", "i0"], [p + "m"]),
                  helper.make_node("Unsqueeze", [p + "m", "ax"], [p + "mu"]),
                  helper.make_node("Concat", [p + "mu", "c8", "hw", "hw"], [p + "t4"], axis=0),
                  helper.make_node("Reshape", [p + "tr", p + "t4"], [p + "out"])]
        x = p + "out"
    nodes.append(helper.make_node("Relu", [x], ["y"]))
    g = helper.make_graph(nodes, "shuffles", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_chained_run_time_reshape_targets_all_fold() -> None:
    m = _shuffle_chain(12)
    prof = OptimizationProfile().set_shape("x", (1, 8, 3, 3), (1, 8, 3, 3), (4, 8, 3, 3))
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[prof], optimization_level=0))
    ops_left = [s["op"] for s in plan.graph["steps"]]
    assert not {"Shape", "Gather", "Unsqueeze", "Concat"} & set(ops_left), ops_left
    x = np.random.default_rng().standard_normal((3, 8, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(Engine(plan).create_execution_context().execute({"x": x})["y"],
                                  run_oracle(m, {"x": x})[0])


def _shape_dim(x: Value, axis: int, tag: str) -> Value:
    """Unsqueeze(Gather(Shape(x), axis)): a run-time 1-D value holding x's dim `axis` (an exporter's x.size(axis))."""
    import torch
    shp = Value(f"{tag}_shape")
    Node("Shape", [x], [shp], name=f"{tag}_shape_op", opset=15)
    g = Value(f"{tag}_gather")
    Node("Gather", [shp, Value(f"{tag}_i", const=torch.tensor(axis))], [g], name=f"{tag}_gather_op", opset=13)
    u = Value(f"{tag}_unsq", TensorType(DType.INT64, (1,)))
    Node("Unsqueeze", [g, Value(f"{tag}_ax", const=torch.tensor([0]))], [u], name=f"{tag}_unsq_op", opset=13)
    return u


def test_run_time_slice_end_from_a_shape_chain_keeps_the_symbol_where_the_profile_proves_it() -> None:
    """BERT's position ids: Slice(ids[1, 512], 0, x.size(1)) has x's sequence dim when seq <= 512 is proven
    (the profile's range), and the derived dim min(seq, 512) otherwise."""
    import torch
    from kiln.ops.symbolic import symbol_bounds
    x = Value("x", TensorType(DType.INT64, ("B", "S")))
    ids = Value("ids", const=torch.arange(512).reshape(1, 512))
    end = _shape_dim(x, 1, "seq")
    sl = Node("Slice", [ids, Value("s0", const=torch.tensor([0])), end, Value("a1", const=torch.tensor([1]))],
              [Value("pos")], name="pos", opset=13)
    def dim() -> DimExpr:
        (t,) = infer_node(sl)
        assert t.dtype == DType.INT64 and t.shape[0] == 1 and isinstance(t.shape[1], DimExpr), t
        return t.shape[1]
    assert [dim().evaluate({"S": s}) for s in (1, 511, 512, 513, 4000)] == [1, 511, 512, 512, 512]
    with symbol_bounds({"S": (1, 512)}):
        assert infer_node(sl)[0] == TensorType(DType.INT64, (1, "S"))
    with symbol_bounds({"S": (1, 513)}):
        assert dim().evaluate({"S": 513}) == 512


def test_expand_to_a_guarded_shape_chain() -> None:
    """Expand(m, Where(Equal(t, -1), ones, t)) with t = [x.size(0), 1, x.size(1)]: a dim symbol is never -1, so
    the target is t and the Expand's dims are proven: (B, 1, S)."""
    import torch
    x = Value("x", TensorType(F32, ("B", "S")))
    t = Value("t")
    Node("Concat", [_shape_dim(x, 0, "b"), Value("one", const=torch.tensor([1])), _shape_dim(x, 1, "s")], [t],
         {"axis": 0}, name="t", opset=13)
    eq = Value("eq")
    Node("Equal", [t, Value("m1", const=torch.tensor([-1]))], [eq], name="eq", opset=13)
    tgt = Value("tgt")
    Node("Where", [eq, Value("ones", const=torch.ones(3, dtype=torch.int64)), t], [tgt], name="where", opset=16)
    m = Value("m", TensorType(F32, (1, 1, 1)))
    ex = Node("Expand", [m, tgt], [Value("y")], name="expand", opset=13)
    assert infer_node(ex)[0] == TensorType(F32, ("B", 1, "S"))
    eq.producer.inputs[1] = Value("m2", const=torch.tensor([2]))  # == 2 is not decided for a symbol
    assert infer_node(ex)[0].shape != ("B", 1, "S")


def test_range_and_reshape_over_shape_chains() -> None:
    """Range(0, x.size(1), 1) has x's sequence dim (and nothing is claimed for Range(1, n, 1)); a Reshape to a
    target a chain computes takes its entries (-1 stays unknown); the exporters' mask guard compares the
    target with ConstantOfShape(Shape(t)) * -1, which is decided entry by entry."""
    import torch
    x = Value("x", TensorType(F32, ("B", "S")))
    n = Value("n")
    Node("Cast", [_shape_dim(x, 1, "r")], [n], {"to": 7}, name="cast", opset=13)
    sq = Value("sq")
    Node("Squeeze", [n, Value("ax0", const=torch.tensor([0]))], [sq], name="sq", opset=13)
    rng = Node("Range", [Value("z", const=torch.tensor(0)), sq, Value("one", const=torch.tensor(1))],
               [Value("r")], name="range", opset=11)
    assert infer_node(rng)[0] == TensorType(DType.INT64, ("S",))
    rng.inputs[0] = Value("st", const=torch.tensor(1))
    assert infer_node(rng)[0].shape == (None,)  # S - 1 elements: derived, not a symbol
    t = Value("t", TensorType(DType.INT64, (4,)))
    Node("Concat", [_shape_dim(x, 0, "b"), Value("c1", const=torch.tensor([1])), _shape_dim(x, 1, "s"),
                    Value("m1", const=torch.tensor([-1]))], [t], {"axis": 0}, name="t", opset=13)
    y = Value("y", TensorType(F32, (None, None, None, None)))
    rs = Node("Reshape", [y, t], [Value("out")], name="rs", opset=14)
    assert infer_node(rs)[0] == TensorType(F32, ("B", 1, "S", None))
    shp, cos, neg, eq, tgt = (Value(k) for k in ("shp", "cos", "neg", "eq", "tgt"))
    Node("Shape", [t], [shp], name="shp", opset=15)
    Node("ConstantOfShape", [shp], [cos], {"value": torch.tensor([1])}, name="cos", opset=9)
    Node("Mul", [cos, Value("mm", const=torch.tensor(-1))], [neg], name="neg", opset=14)
    Node("Equal", [t, neg], [eq], name="eq", opset=13)
    Node("Where", [eq, cos, t], [tgt], name="where", opset=16)
    ex = Node("Expand", [Value("m", TensorType(F32, (1, 1, 1, 1))), tgt], [Value("e")], name="ex", opset=13)
    assert infer_node(ex)[0] == TensorType(F32, ("B", 1, "S", 1))  # the -1 entry is replaced by 1


def test_a_loaded_plan_proves_profile_bounded_dims_as_the_build_did() -> None:
    """The plan loader re-infers types under the plan's profile ranges, as the builder did: the position-id
    Slice keeps its sequence symbol after a round trip through bytes (else tactics that rely on it would
    decline the loaded layers)."""
    import torch
    from kiln.plan import plan_from_bytes, plan_to_bytes
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((512, 8)).astype(np.float32)
    c = {"pos": np.arange(512, dtype=np.int64).reshape(1, 512), "emb": emb, "z": np.array([0], np.int64),
         "one": np.array([1], np.int64), "ax": np.array([0], np.int64)}
    nodes = [helper.make_node("Shape", ["ids"], ["s"]), helper.make_node("Gather", ["s", "one"], ["n"]),
             helper.make_node("Slice", ["pos", "z", "n", "one"], ["p"]),
             helper.make_node("Gather", ["emb", "p"], ["pe"]), helper.make_node("Gather", ["emb", "ids"], ["te"]),
             helper.make_node("Add", ["te", "pe"], ["y"])]
    g = helper.make_graph(nodes, "pos", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in c.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p = OptimizationProfile()
    p.set_shape("ids", (1, 1), (2, 16), (4, 128))
    plan = Builder(Logger()).build(model, BuilderConfig(profiles=[p]))
    assert plan.graph["values"]["y"]["type"]["shape"] == ["B", "S", 8]
    loaded = plan_from_bytes(plan_to_bytes(plan))
    engine = Engine(loaded)
    y = next(v for n in engine.function.graph.nodes for v in n.outputs if v.name == "y")
    assert y.type.shape == ("B", "S", 8)  # proven again at load (a header symbol alone is not kept)
    ids = rng.integers(0, 512, (3, 77)).astype(np.int64)
    got = engine.create_execution_context().execute({"ids": torch.from_numpy(ids)})["y"]
    want = run_oracle(model, {"ids": ids})[0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def _trigram_model(rng: np.random.Generator, e: int, hidden: int) -> "onnx.ModelProto":
    """MobileBERT's embedding trigram: cat(pad(x[:, 1:], end), x, pad(x[:, :-1], start)) over [B, S, E], then a
    [3E, H] projection and a per-head reshape to [B*heads, S, H/heads] and back (each a derived dim of B and S)."""
    big = 2 ** 62
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits = [ints("one", [1]), ints("big", [big]), ints("minus1", [-1]), ints("zero", [0]), ints("ax1", [1]),
             ints("pad_end", [0, 0, 0, 0, 1, 0]), ints("pad_start", [0, 1, 0, 0, 0, 0]),
             ints("heads", [-1, hidden // 4, 0]), ints("back", [-1, hidden, 0]),
             numpy_helper.from_array(rng.standard_normal((3 * e, hidden)).astype(np.float32) * 0.2, "w")]
    nodes = [
        helper.make_node("Slice", ["x", "one", "big", "ax1"], ["tail"]),       # S - 1
        helper.make_node("Pad", ["tail", "pad_end"], ["a"]),                   # S again
        helper.make_node("Slice", ["x", "zero", "minus1", "ax1"], ["head"]),   # S - 1
        helper.make_node("Pad", ["head", "pad_start"], ["c"]),
        helper.make_node("Concat", ["a", "x", "c"], ["t"], axis=2),
        helper.make_node("MatMul", ["t", "w"], ["h"]),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),          # [B, H, S]
        helper.make_node("Reshape", ["ht", "heads"], ["split"]),               # [4*B, H/4, S]
        helper.make_node("Relu", ["split"], ["r"]),
        helper.make_node("Reshape", ["r", "back"], ["rb"]),                    # [B, H, S]
        helper.make_node("Transpose", ["rb"], ["merged"], perm=[0, 2, 1]),     # [B, S, H]
        helper.make_node("Shape", ["merged"], ["shp"]),
        helper.make_node("Gather", ["shp", "ax1"], ["s_len"], axis=0),
        helper.make_node("Cast", ["s_len"], ["s_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["merged", "s_f"], ["y"]),
    ]
    g = helper.make_graph(nodes, "trigram", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", e])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_derived_dims_come_back_exact_and_run_at_every_shape() -> None:
    """x[:, 1:] is S - 1 and padding it by one gives S again, proven; B*4 rows reshaped back give B: every layer
    after them keeps its dims (tactics, arena slots), and the plan runs right at shapes it was not tuned at."""
    rng = np.random.default_rng()
    m = _trigram_model(rng, 16, 32)
    g = load_onnx(m, Logger())
    from kiln.ops.infer import infer_types
    from kiln.ops.symbolic import symbol_bounds
    with symbol_bounds({"B": (1, 4), "S": (2, 64)}):
        infer_types(g, Logger())
    types = {v.name: v.type.shape for v in g.values() if not v.is_const}
    assert types["tail"][1] == DimExpr.make(types["tail"][1].expr) and types["tail"][1].symbols == {"S"}
    assert types["a"] == ("B", "S", 16) and types["t"] == ("B", "S", 48) and types["h"] == ("B", "S", 32)
    assert isinstance(types["split"][0], DimExpr) and types["merged"] == ("B", "S", 32), types
    assert types["y"] == ("B", "S", 32)
    prof = OptimizationProfile().set_shape("x", (1, 2, 16), (2, 9, 16), (4, 64, 16))
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[prof]))
    assert all(s["op"] != "MatMul" or s["tactic"] != "ref" for s in plan.graph["steps"]), plan.graph["steps"]
    from kiln.plan.format import plan_from_bytes, plan_to_bytes
    ctx = Engine(plan_from_bytes(plan_to_bytes(plan))).create_execution_context()  # stored unknown, re-derived
    for b, s in ((2, 9), (1, 2), (3, int(rng.integers(3, 64))), (4, 64)):
        x = rng.standard_normal((b, s, 16)).astype(np.float32)
        got, want = np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0]
        assert got.shape == want.shape == (b, s, 32)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_dim_upper_bound_only_where_proven() -> None:
    """The largest value of a dim over the symbols' ranges: exact for a symbol and for an expression built to rise
    with its symbols (a strided window's size, a product of sizes); None for a symbol without a range, a falling
    or sign-changing expression - checked against every point of the ranges."""
    import itertools

    from torch.utils._sympy.functions import FloorDiv

    from kiln.ir.dims import dim_upper_bound, sym
    w, h = sym("w"), sym("h")
    bounds = {"w": (160, 200), "h": (1, 9)}
    rising = [DimExpr(FloorDiv(FloorDiv(w - 1, 16) - 2, 3) + 1), DimExpr((FloorDiv(w - 1, 4) + 1) * h),
              DimExpr(3 * h + w)]
    for e in rising:
        top = max(e.evaluate({"w": a, "h": b}) for a, b in itertools.product(range(160, 201), range(1, 10)))
        assert dim_upper_bound(e, bounds) == top, e
    assert dim_upper_bound("w", bounds) == 200 and dim_upper_bound(7, bounds) == 7
    assert dim_upper_bound("n", bounds) is None
    for e in (DimExpr(200 - w), DimExpr((h - 5) * (h - 7)), DimExpr(FloorDiv(w, 2) * sym("n"))):
        assert dim_upper_bound(e, bounds) is None, e


def _pad_to(total: int) -> object:
    """Whisper's front end: x [B, N] padded at the end to `total` samples, the amount from its own shape
    (Pad(x, [0, 0, 0, total - N] as (total - Shape(x)[1]) * [0, 0, 0, 1])), then a stride-4 framing conv."""
    c = {"tot": np.array([total], np.int64), "sel": np.array([0, 0, 0, 1], np.int64), "ax": np.array([1], np.int64),
         "w": (np.random.default_rng(0).standard_normal((3, 1, 8)) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("Shape", ["x"], ["n"], start=1, end=2), helper.make_node("Sub", ["tot", "n"], ["d"]),
             helper.make_node("Mul", ["d", "sel"], ["pads"]), helper.make_node("Pad", ["x", "pads"], ["p"]),
             helper.make_node("Unsqueeze", ["p", "ax"], ["p3"]),
             helper.make_node("Conv", ["p3", "w"], ["y"], strides=[4])]
    g = helper.make_graph(nodes, "pad_to", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in c.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_pad_to_a_fixed_length_is_static_where_the_profile_keeps_the_amount_non_negative() -> None:
    """`total - N` is a pad amount only where the profile proves it >= 0 (N <= total; here N < total, as the Pad's
    own shape function must also know whether it pads at all); then the padded length is `total` for every
    accepted input, and the conv after it is static. Past that (N may exceed total) the amount could be a crop,
    and nothing is claimed."""
    rng = np.random.default_rng()
    m = _pad_to(96)
    g = load_onnx(m)
    from kiln.ops.infer import infer_types
    from kiln.ops.symbolic import symbol_bounds
    with symbol_bounds({"B": (1, 4), "N": (8, 95)}):
        infer_types(g)
    assert g.outputs[0].type.shape == ("B", 3, 23), g.outputs[0].type
    g = load_onnx(m)
    with symbol_bounds({"B": (1, 4), "N": (8, 97)}):
        infer_types(g)
    assert g.outputs[0].type.shape[2] is None, g.outputs[0].type
    prof = OptimizationProfile().set_shape("x", (1, 8), (1, 50), (4, 95))
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[prof]))
    assert plan.graph["values"]["y"]["type"]["shape"] == ["B", 3, 23]
    ctx = Engine(plan).create_execution_context()
    for shape in [(1, 8), (4, 95), (2, int(rng.integers(9, 95)))]:
        x = rng.standard_normal(shape).astype(np.float32)
        got, want = np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0]
        assert got.shape == want.shape == (shape[0], 3, 23)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
