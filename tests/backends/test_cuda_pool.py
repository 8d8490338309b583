"""Triton MaxPool and nearest Resize/Upsample tactics against the op references on random inputs.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, small shapes, CPU
tensors); with one they run compiled on CUDA. When triton is absent these tests skip. Max and nearest
sampling move values without arithmetic, so results must equal the reference exactly.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra has it): Triton tactics untested")

from kiln.backends.tactic import TacticContext, get_tactic  # noqa: E402
from kiln.ir.dtype import DType  # noqa: E402
from kiln.ir.graph import Node, Value  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.ops.registry import lookup  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CTX = TacticContext(DEV, fp16=True)
CL = torch.channels_last


def _x(name: str, dtype: torch.dtype, shape: tuple) -> Value:
    return Value(name, TensorType(DType.from_torch(dtype), shape))


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x as contiguous NCHW, channels_last, or a channel slice of a bigger channels_last tensor."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "nhwc":
        return x.contiguous(memory_format=CL)
    n, c, h, w = x.shape
    big = _rand(n, c + 5, h, w, dtype=x.dtype, seed=99).contiguous(memory_format=CL)
    big[:, 3:3 + c] = x
    return big[:, 3:3 + c]


def _reference(node: Node, x: torch.Tensor) -> torch.Tensor:
    consts = [None if v is None else v.const for v in node.inputs[1:]]
    return lookup(node.op_type, node.domain).compute(node, x.float(), *consts).to(x.dtype)


def _kernel(tactic_id: str, node: Node, cfg: int = 0):
    t = get_tactic(tactic_id)
    assert t is not None and t.supports(node, CTX), f"{tactic_id} should support {node}"
    assert t.writes_out and t.devices == ("cuda",) and t.priority == 20
    return t.make(node, t.configs(node, CTX)[cfg], DEV)


def _check(tactic_id: str, node: Node, x: torch.Tensor, cfg: int = 0) -> torch.Tensor:
    got = _kernel(tactic_id, node, cfg)(x, *[None] * (len(node.inputs) - 1))
    want = _reference(node, x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert got.is_contiguous(memory_format=CL)
    assert torch.equal(got, want), f"max abs diff {(got.float() - want.float()).abs().max()}"
    return want


def _check_out(tactic_id: str, node: Node, x: torch.Tensor) -> None:
    """out= a channel slice of a bigger channels_last buffer: the slice gets the result, the rest is untouched."""
    want = _reference(node, x)
    n, c, oh, ow = want.shape
    buf = _rand(n, c + 7, oh, ow, dtype=x.dtype, seed=7).contiguous(memory_format=CL)
    before = buf.clone()
    out = buf[:, 4:4 + c]
    got = _kernel(tactic_id, node)(x, *[None] * (len(node.inputs) - 1), out=out)
    assert got is out
    assert torch.equal(buf[:, 4:4 + c], want)
    assert torch.equal(buf[:, :4], before[:, :4]) and torch.equal(buf[:, 4 + c:], before[:, 4 + c:])


# ---- MaxPool ------------------------------------------------------------------------------------

def maxpool(dtype: torch.dtype, shape: tuple = ("N", 24, "H", "W"), outputs: int = 1, **attrs) -> Node:
    outs = [_x("y", dtype, ("N", shape[1], None, None))] + [_x("i", torch.int64, None)] * (outputs - 1)
    return Node("MaxPool", [_x("x", dtype, shape)], outs, attrs, name="pool", opset=12)


POOL_CASES = {
    "k2s2": dict(kernel_shape=[2, 2], strides=[2, 2]),
    "k3s1p1": dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
    "k5s1p2": dict(kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
    "k3s2ceil": dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "dilated": dict(kernel_shape=[3, 2], strides=[1, 2], dilations=[2, 3], pads=[1, 1, 1, 1]),
    "asym_pads": dict(kernel_shape=[3, 3], strides=[2, 1], pads=[0, 2, 1, 0]),
    "same_upper": dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
}


@pytest.mark.parametrize("case", list(POOL_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "slice"])
def test_maxpool_matches_reference(case, dtype, layout) -> None:
    x = _layout(_rand(2, 24, 9, 10, dtype=dtype, seed=1), layout)
    _check("cuda.triton_maxpool", maxpool(dtype, **POOL_CASES[case]), x)


@pytest.mark.parametrize("case", list(POOL_CASES))
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("layout", ["nchw", "slice"])
def test_maxpool_8bit_matches_reference(case, dtype, layout) -> None:
    """An INT8 plan's max pool on its 8-bit activations: the lowest values of the type included (padding must
    never win), exact."""
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    g = torch.Generator().manual_seed(5)
    x = _layout(torch.randint(lo, hi, (2, 24, 9, 10), generator=g).to(dtype).to(DEV), layout)
    x[0, :, :3] = lo  # whole windows at the type's lowest value, next to the padding
    _check("cuda.triton_maxpool", maxpool(dtype, **POOL_CASES[case]), x)


@pytest.mark.parametrize("case", ["k2s2", "k3s2ceil", "asym_pads"])
def test_maxpool_writes_into_out_slice(case) -> None:
    x = _rand(2, 12, 8, 7, dtype=torch.float16, seed=2).contiguous(memory_format=CL)
    _check_out("cuda.triton_maxpool", maxpool(torch.float16, **POOL_CASES[case]), x)


def test_maxpool_dynamic_sizes_second_config_bf16() -> None:
    node = maxpool(torch.bfloat16, **POOL_CASES["k3s2ceil"])
    kern = _kernel("cuda.triton_maxpool", node, cfg=1)
    for shape in [(1, 3, 7, 7), (2, 3, 12, 5)]:
        x = _rand(*shape, dtype=torch.bfloat16, seed=3).contiguous(memory_format=CL)
        assert torch.equal(kern(x), _reference(node, x))


# ---- Resize / Upsample --------------------------------------------------------------------------

def _const(name: str, vals: list | None, dtype: torch.dtype) -> Value | None:
    return None if vals is None else Value(name, const=torch.tensor(vals, dtype=dtype))


def resize(dtype: torch.dtype, scales: list[float] | None = None, sizes: list[int] | None = None,
           shape: tuple = ("N", 6, "H", "W"), opset: int = 13, op: str = "Resize", **attrs) -> Node:
    attrs.setdefault("mode", "nearest")
    if op == "Upsample" or opset == 10:
        ins = [_x("x", dtype, shape)] + ([_const("scales", scales, torch.float32)] if scales is not None else [])
    else:
        ins = [_x("x", dtype, shape), None, _const("scales", scales, torch.float32),
               _const("sizes", sizes, torch.int64)]
        while ins[-1] is None:
            ins.pop()
    return Node(op, ins, [_x("y", dtype, ("N", shape[1], None, None))], attrs, name="up", opset=opset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8])
def test_resize_yolo_scale2_asymmetric_floor(dtype) -> None:
    node = resize(dtype, [1, 1, 2, 2], coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    for layout in ["nchw", "nhwc", "slice"]:
        _check("cuda.triton_resize", node, _layout(_rand(2, 6, 5, 7, dtype=dtype, seed=4), layout))
    _check_out("cuda.triton_resize", node, _rand(1, 6, 4, 3, dtype=dtype, seed=5))


def test_resize_sizes_input_and_half_pixel() -> None:
    node = resize(torch.float32, sizes=[2, 6, 13, 7], shape=(2, 6, "H", "W"))
    _check("cuda.triton_resize", node, _rand(2, 6, 6, 5, seed=6))
    _check("cuda.triton_resize", node, _rand(2, 6, 4, 9, seed=6).contiguous(memory_format=CL))
    hp = resize(torch.float32, [1, 1, 2, 2], coordinate_transformation_mode="half_pixel",
                nearest_mode="round_prefer_floor")
    _check("cuda.triton_resize", hp, _rand(1, 6, 5, 4, seed=7), cfg=1)


@pytest.mark.parametrize("ctm", ["asymmetric", "half_pixel", "pytorch_half_pixel", "align_corners",
                                 "tf_half_pixel_for_nn"])
@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
def test_resize_non_integer_scales(ctm, nearest_mode) -> None:
    x = _rand(1, 6, 7, 6, dtype=torch.float16, seed=8).contiguous(memory_format=CL)
    for scales in ([1, 1, 1.5, 0.5], [1, 1, 0.4, 2.7], [1, 1, 1, 1 / 7]):
        node = resize(torch.float16, scales, coordinate_transformation_mode=ctm, nearest_mode=nearest_mode)
        _check("cuda.triton_resize", node, x)


def test_upsample_and_legacy_resize() -> None:
    x = _rand(2, 6, 5, 4, seed=9)
    _check("cuda.triton_resize", resize(torch.float32, [1, 1, 2, 3], op="Upsample", opset=9), x)
    up7 = Node("Upsample", [_x("x", torch.float32, ("N", 6, "H", "W"))], [_x("y", torch.float32, None)],
               {"mode": "nearest", "scales": [1.0, 1.0, 2.0, 2.0]}, opset=7)
    _check("cuda.triton_resize", up7, x)
    _check("cuda.triton_resize", resize(torch.float32, [1, 1, 0.5, 1.5], opset=10), x)


def test_resize_axes_attribute() -> None:
    node = resize(torch.float32, [2.0, 3.0], opset=18, axes=[2, 3], coordinate_transformation_mode="asymmetric",
                  nearest_mode="floor")
    _check("cuda.triton_resize", node, _rand(1, 6, 3, 4, seed=10))


def test_unsupported_cases_are_refused() -> None:
    f32 = torch.float32
    pool, res = get_tactic("cuda.triton_maxpool"), get_tactic("cuda.triton_resize")
    assert pool is not None and res is not None
    assert not pool.supports(maxpool(f32, outputs=2, kernel_shape=[2, 2]), CTX)  # Indices output
    assert not pool.supports(maxpool(f32, shape=("N", 4, "L"), kernel_shape=[2]), CTX)  # 1-D
    assert not pool.supports(maxpool(torch.int32, kernel_shape=[2, 2]), CTX)
    assert not pool.supports(maxpool(f32), CTX)  # no kernel_shape
    assert not res.supports(resize(f32, [1, 1, 2, 2], mode="linear"), CTX)
    assert not res.supports(resize(f32, [1, 2, 2, 2]), CTX)  # scales C
    assert not res.supports(resize(f32, sizes=[1, 6, 8, 8]), CTX)  # batch not known to be 1
    assert not res.supports(resize(f32, [1, 1, 2, 2], coordinate_transformation_mode="tf_crop_and_resize"), CTX)
    assert not res.supports(resize(f32, [1, 1, 2, 2], antialias=1), CTX)
    assert not res.supports(resize(f32, [1, 1, 1.5, 0.5], coordinate_transformation_mode="half_pixel_symmetric"), CTX)
    assert not res.supports(resize(f32, sizes=[1, 6, 8, 8], shape=(1, 6, 4, 4),
                                   keep_aspect_ratio_policy="not_larger"), CTX)
    runtime_scales = Node("Resize", [_x("x", f32, (1, 6, 4, 4)), None, _x("s", f32, (4,))],
                          [_x("y", f32, None)], {"mode": "nearest"}, opset=13)
    assert not res.supports(runtime_scales, CTX)


def test_reference_dilated_maxpool_with_wide_pads() -> None:
    """kernel 3, dilation 2, pads 2: torch's own padding refuses pads above half the undilated kernel,
    so the reference must pad explicitly; checked against a float64 window max."""
    node = Node("MaxPool", [Value("x", TensorType(DType.FLOAT32, (1, 3, 9, 9)))],
                [Value("y", TensorType(DType.FLOAT32, None))],
                {"kernel_shape": [3, 3], "dilations": [2, 2], "pads": [2, 2, 2, 2]}, name="pool", opset=12)
    x = torch.randn(1, 3, 9, 9)
    got = lookup("MaxPool", "").compute(node, x)
    xp = torch.nn.functional.pad(x.double(), [2, 2, 2, 2], value=float("-inf"))
    want = torch.stack([xp[:, :, i:i + 9, j:j + 9] for i in (0, 2, 4) for j in (0, 2, 4)]).amax(0)
    assert got.shape == (1, 3, 9, 9)
    torch.testing.assert_close(got.double(), want)
