"""YOLOv4-tiny (416x416, 80 classes) as a sample model: torch module and ONNX model, same weights.

Every conv is conv (no bias) + BatchNorm + LeakyReLU(0.1) with "same" padding, except the two
1x1 heads (255 outputs = 3 anchors x 85, with bias, linear).  Input ``input`` [N,3,416,416];
outputs ``head13`` [N,255,13,13] and ``head26`` [N,255,26,26].  Decoding and NMS for the heads
live in :mod:`examples.zoo.yolo_decode` and are re-exported here.
"""
from __future__ import annotations

import os

import onnx
import torch

from examples.zoo.common import NetCache, NetSpec, SpecBuilder, to_onnx
from examples.zoo.yolo_decode import ANCHORS_13, ANCHORS_26, decode, decode_outputs, nms  # noqa: F401

INPUT_SHAPE = (3, 416, 416)
NUM_CLASSES = 80
NUM_ANCHORS = 3
HEAD_CHANNELS = NUM_ANCHORS * (5 + NUM_CLASSES)  # 255
CSP_WIDTHS = (64, 128, 256)
CALIB_HW = (224, 224)  # BN statistics are calibrated at a smaller size (a multiple of 32)


def _conv(b: SpecBuilder, name: str, src: str, cout: int, k: int, stride: int = 1) -> str:
    return b.conv(name, src, cout, k, stride, act="leaky")


def _csp_block(b: SpecBuilder, x: str, prefix: str, c: int) -> tuple[str, str]:
    """One CSP block; returns (pooled output with 2c channels, D with c channels)."""
    a = _conv(b, f"{prefix}.a", x, c, 3)
    half = b.channel_slice(f"{prefix}.half", a, c // 2, c)
    bb = _conv(b, f"{prefix}.b", half, c // 2, 3)
    cc = _conv(b, f"{prefix}.c", bb, c // 2, 3)
    d = _conv(b, f"{prefix}.d", b.concat(f"{prefix}.cat_cb", cc, bb), c, 1)
    out = b.maxpool(f"{prefix}.pool", b.concat(f"{prefix}.cat_ad", a, d), 2, 2)
    return out, d


def _head(b: SpecBuilder, name: str, src: str) -> str:
    return b.conv(name, src, HEAD_CHANNELS, 1, bias=True, bn=False, act=None)


def spec() -> NetSpec:
    """The YOLOv4-tiny layer spec."""
    b = SpecBuilder("yolov4_tiny", "input", INPUT_SHAPE, act="leaky", calib_hw=CALIB_HW)
    x = _conv(b, "stem1", "input", 32, 3, 2)
    x = _conv(b, "stem2", x, 64, 3, 2)
    d_blocks = []
    for i, c in enumerate(CSP_WIDTHS, start=1):
        x, d = _csp_block(b, x, f"csp{i}", c)
        d_blocks.append(d)
    x = _conv(b, "neck.conv1", x, 512, 3)
    e = _conv(b, "neck.e", x, 256, 1)
    x = _conv(b, "neck13.conv", e, 512, 3)
    _head(b, "head13", x)
    y = _conv(b, "neck26.reduce", e, 128, 1)
    y = b.upsample("neck26.up", y, 2)
    y = b.concat("neck26.cat", y, d_blocks[-1])  # D of the third CSP block
    y = _conv(b, "neck26.conv", y, 256, 3)
    _head(b, "head26", y)
    return b.finish("head13", "head26")


_NETS = NetCache(spec)


def build_torch(seed: int = 0) -> torch.nn.Module:
    """YOLOv4-tiny as a torch module in eval mode with deterministic random weights.

    ``forward`` returns the tuple (head13, head26).
    """
    return _NETS.copy(seed)


def onnx_model(seed: int = 0, batch: int | str = 1, opset: int = 17) -> onnx.ModelProto:
    """YOLOv4-tiny as ONNX with the weights of ``build_torch(seed)``; ``batch`` may be a name like "N"."""
    net = _NETS.shared(seed)
    return to_onnx(net.spec, net, batch, opset)


def save_onnx(path: str | os.PathLike, seed: int = 0, batch: int | str = 1) -> str:
    """Write the ONNX model to ``path`` and return the path."""
    onnx.save(onnx_model(seed, batch), os.fspath(path))
    return os.fspath(path)
