"""The one table of fused activations and epilogues (kiln.ops.activations) and the one conv geometry."""
from __future__ import annotations

import pytest
import torch

from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.activations import EPILOGUE, TABLE, Epilogue, from_onnx
from kiln.ops.conv import ConvGeometry


def test_triton_codes_never_change() -> None:
    # kiln.backends.cuda.triton_act.apply_act switches on these numbers
    assert {n: a.code for n, a in TABLE.items()} == {
        "": 0, "Relu": 1, "LeakyRelu": 2, "Clip": 3, "Sigmoid": 4, "Tanh": 5, "SiLU": 6, "HardSwish": 7,
        "HardSigmoid": 8, "Mish": 9, "Gelu": 10, "GeluTanh": 11}
    assert EPILOGUE["activation"].choices == tuple(TABLE)


@pytest.mark.parametrize("name", [n for n in TABLE if n])
def test_inplace_matches_reference(name: str) -> None:
    a = TABLE[name]
    x = torch.randn(64)
    want = a.fn(x, 0.1, 0.7)
    y = x.clone()
    got = a.fn(y, 0.1, 0.7) if a.inplace is None else a.inplace(y, 0.1, 0.7)
    torch.testing.assert_close(got, want)


def test_onednn_hardsigmoid_only_at_its_fixed_parameters() -> None:
    post = TABLE["HardSigmoid"].onednn
    assert post is not None and post.args(0.2, 0.5) is None and post.args(1 / 6, 0.5) == ("hardsigmoid", [], "")
    assert TABLE["Mish"].onednn is None


def _node(op: str, opset: int = 21, inputs: list[Value] | None = None, **attrs: object) -> Node:
    return Node(op, inputs or [Value("x")], [Value("y")], dict(attrs), name="n", opset=opset)


def test_from_onnx() -> None:
    assert from_onnx(_node("LeakyRelu")) == ("LeakyRelu", 0.01, 0.0)
    assert from_onnx(_node("HardSigmoid", alpha=0.3)) == ("HardSigmoid", 0.3, 0.5)
    assert from_onnx(_node("Gelu", approximate="tanh")) == ("GeluTanh", 0.0, 0.0)
    assert from_onnx(_node("Gelu")) == ("Gelu", 0.0, 0.0)
    assert from_onnx(_node("Swish", alpha=2.0)) is None
    lo = Value("lo", const=torch.tensor(0.0))
    assert from_onnx(_node("Clip", inputs=[Value("x"), lo])) == ("Relu", 0.0, 0.0)
    assert from_onnx(_node("Clip", opset=6, min=-1.0, max=1.0)) == ("Clip", -1.0, 1.0)
    assert from_onnx(_node("Clip", inputs=[Value("x"), Value("lo")])) is None  # a runtime bound
    assert from_onnx(_node("Elu")) is None


def test_epilogue_round_trip() -> None:
    n = Node("FusedGemm", [Value("a"), Value("w")], [Value("y")],
             {"activation": "Clip", "alpha": -1.0, "beta": 2.0, "act_before_add": 1}, name="g", domain="kiln")
    ep = Epilogue.of(n)
    assert ep == Epilogue("Clip", -1.0, 2.0, True) and ep.code == 3
    assert ep.attrs() == {"activation": "Clip", "alpha": -1.0, "beta": 2.0, "act_before_add": 1}
    assert Epilogue.of(_node("Relu")) == Epilogue()


def _conv(shape: tuple[object, ...] | None, **attrs: object) -> Node:
    x = Value("x", TensorType(None, shape)) if shape is not None else Value("x")
    return Node("Conv", [x, Value("w", const=torch.zeros(8, 4, 3, 3))], [Value("y")], dict(attrs), name="c")


def test_conv_geometry() -> None:
    geo = ConvGeometry.of(_conv((1, 4, 10, 9), auto_pad="SAME_UPPER", strides=[2, 2]))
    assert geo is not None and geo.pads == (0, 1, 1, 1) and geo.begin == (0, 1) and not geo.symmetric
    assert geo.out_sizes((10, 9)) == (5, 5) and geo.out_hw(10, 9) == (5, 5)
    assert geo.symmetric_pads == [0, 1] and geo.extra_pad == [0, 0, 0, 1]
    assert geo.without_extra().pads == (0, 1, 0, 1) and geo.padded_shape([1, 4, 10, 9]) == [1, 4, 11, 9]
    assert geo.attrs() == {"strides": [2, 2], "pads": [0, 1, 1, 1], "dilations": [1, 1], "group": 1}
    # strided SAME needs the input size; at stride 1 the pads total extent - 1 whatever it is
    assert ConvGeometry.of(_conv((1, 4, "h", "w"), auto_pad="SAME_LOWER", strides=[2, 2])) is None
    for h in (1, 7, 10):
        fixed = ConvGeometry.of(_conv((1, 4, h, h + 1), auto_pad="SAME_LOWER"))
        assert fixed is not None and ConvGeometry.of(_conv((1, 4, "h", "w"), auto_pad="SAME_LOWER")) == fixed
    two = Node("Conv", [Value("x", TensorType(None, (1, 4, "h", "w"))), Value("w", const=torch.zeros(8, 4, 2, 2))],
               [Value("y")], {"auto_pad": "SAME_LOWER"}, name="c")
    assert ConvGeometry.of(two).pads == (1, 1, 0, 0)  # type: ignore[union-attr]  # an odd total: more at the start
    same = ConvGeometry.of(_conv((1, 4, "h", "w"), auto_pad="SAME_LOWER"), sizes=[10, 9])
    assert same is not None and same.pads == (1, 1, 1, 1)
    assert ConvGeometry.of(_conv(None, auto_pad="VALID")).pads == (0, 0, 0, 0)  # type: ignore[union-attr]
    assert ConvGeometry.of(_conv(None, strides=[1, 1, 1])) is None
    assert ConvGeometry.of(_conv(None, kernel_shape=[5, 5])) is None
    assert not ConvGeometry.of(_conv(None, pads=[1, 1, 1, 1])).pointwise  # type: ignore[union-attr]
