"""Dense tensors whose size-1 dims carry odd strides (a transformer's [1, HW, C] tokens transposed and unflattened to
[1, C, H, W]: channels-last with a batch stride of C) are given canonical strides before library calls pick a code
path by them (kiln.ir.layout): aten's bilinear upsampling and oneDNN's convolutions then take their fast paths.
Checked against onnxruntime on the model as exported (SegFormer's decode head and Mix-FFN do exactly this)."""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig
from kiln.ir.layout import canonical, dense
from kiln.logger import Logger
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle


def _tokens_as_image(c: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(1, h * w, c, generator=torch.Generator().manual_seed(seed)).transpose(1, 2).unflatten(2, (h, w))


def test_canonical_keeps_the_data_and_fixes_the_strides() -> None:
    x = _tokens_as_image(8, 3, 5, seed=1)
    assert x.stride() == (8, 1, 40, 8) and x.is_contiguous(memory_format=torch.channels_last)
    y = canonical(x)
    assert y.stride() == (120, 1, 40, 8) and torch.equal(y, x) and y.data_ptr() == x.data_ptr()
    plain = torch.randn(1, 4, 3, 2).transpose(0, 0)
    assert canonical(plain) is plain
    odd = torch.randn(2, 6, 4, 4)[:, ::2]  # dense in neither order: canonical leaves it, dense copies it
    assert canonical(odd) is odd and dense(odd).is_contiguous() and torch.equal(dense(odd), odd)


def _model(c: int, h: int, w: int) -> object:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(np.array([1, c, h, w], np.int64), "shape"),
             numpy_helper.from_array((rng.standard_normal((c, 1, 3, 3)) / 3).astype(np.float32), "dw"),
             numpy_helper.from_array((rng.standard_normal(c) / 3).astype(np.float32), "bias"),
             numpy_helper.from_array(np.array([1, 1, 4 * h, 4 * w], np.int64), "sizes")]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Reshape", ["t", "shape"], ["img"]),
             helper.make_node("Conv", ["img", "dw", "bias"], ["dwc"], group=c, pads=[1, 1, 1, 1]),
             helper.make_node("Gelu", ["dwc"], ["conv"]),  # SegFormer's Mix-FFN: depthwise conv + GELU
             helper.make_node("Resize", ["img", "", "", "sizes"], ["up"], mode="linear",
                              coordinate_transformation_mode="half_pixel")]
    g = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, h * w, c])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("conv", "up")], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def test_transposed_tokens_feed_fast_conv_and_resize(capfd) -> None:
    c, h, w = 128, 32, 32
    model = _model(c, h, w)
    plan = Builder(Logger()).build(model, BuilderConfig())
    ctx = Engine(plan).create_execution_context()
    for seed in (5, 6):
        x = np.random.default_rng(seed).standard_normal((1, h * w, c)).astype(np.float32)
        got = ctx.execute({"x": x})
        for a, b in zip(got.values(), run_oracle(model, {"x": x})):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)
    assert "reference implementation" not in capfd.readouterr().err


def test_onednn_layers_receive_canonical_strides() -> None:
    """The oneDNN layers' channels-last converter passes such a tensor through without a copy, with the strides
    oneDNN's optimized kernels take (given the odd batch stride, SegFormer's Mix-FFN depthwise convs and
    sequence-reduction convs got only oneDNN's reference implementation: 9 ms against 1.5 ms)."""
    import pytest
    from kiln.backends.cpu.dnnl import library
    from kiln.backends.cpu.dnnl_primitive import ChannelsLast
    lib = library()
    if lib is None:
        pytest.skip("oneDNN (onednn-cpu-gomp) is not installed: the oneDNN layers are not built")
    x = _tokens_as_image(16, 6, 7, seed=2)
    y = ChannelsLast(lib)(x)
    assert y.data_ptr() == x.data_ptr() and y.stride() == (16 * 42, 1, 16 * 7, 16) and torch.equal(y, x)
    pooled = torch.randn(1, 64, 1, 1)  # a head conv after global pooling: dense in both orders
    assert ChannelsLast(lib)(pooled).stride() == (64, 1, 64, 64) and canonical(pooled).stride() == (64, 1, 1, 1)
