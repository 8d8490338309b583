"""ResNet-50 v1.5 (torchvision layout) as a sample model: torch module and ONNX model, same weights.

Stride 2 sits on the 3x3 conv of the bottleneck (v1.5); conv without bias + BatchNorm + ReLU;
residual add then ReLU; maxpool 3x3/2 pad 1; global average pool; flatten; Gemm 2048 -> 1000.
Input ``input`` [N,3,224,224] float32, output ``logits`` [N,1000].
"""
from __future__ import annotations

import os

import onnx
import torch

from examples.zoo.common import NetCache, NetSpec, SpecBuilder, to_onnx

INPUT_SHAPE = (3, 224, 224)
NUM_CLASSES = 1000
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride of first block)
EXPANSION = 4
CALIB_HW = (112, 112)  # BN statistics are calibrated at half resolution (4x cheaper)
RESIDUAL_BN_GAMMA = (0.2, 0.4)  # small scale on each block's last BN keeps the residual sum O(1)


def _bottleneck(b: SpecBuilder, x: str, prefix: str, width: int, stride: int) -> str:
    cin = b.shape(x)[0]
    out = width * EXPANSION
    y = b.conv(f"{prefix}.conv1", x, width, 1)
    y = b.conv(f"{prefix}.conv2", y, width, 3, stride)
    y = b.conv(f"{prefix}.conv3", y, out, 1, act=None, bn_gamma=RESIDUAL_BN_GAMMA)
    if stride != 1 or cin != out:
        x = b.conv(f"{prefix}.downsample", x, out, 1, stride, act=None)
    s = b.add(f"{prefix}.add", y, x)
    return b.act(f"{prefix}.relu", s, "relu")


def spec() -> NetSpec:
    """The ResNet-50 layer spec."""
    b = SpecBuilder("resnet50", "input", INPUT_SHAPE, act="relu", calib_hw=CALIB_HW)
    x = b.conv("conv1", "input", 64, 7, 2)
    x = b.maxpool("maxpool", x, 3, 2, 1)
    for i, (width, blocks, stride) in enumerate(STAGES, start=1):
        for j in range(blocks):
            x = _bottleneck(b, x, f"layer{i}.{j}", width, stride if j == 0 else 1)
    x = b.global_pool("avgpool", x)
    b.linear("logits", x, NUM_CLASSES)
    return b.finish("logits")


_NETS = NetCache(spec)


def build_torch(seed: int = 0) -> torch.nn.Module:
    """ResNet-50 as a torch module in eval mode with deterministic random weights."""
    return _NETS.copy(seed)


def onnx_model(seed: int = 0, batch: int | str = 1, opset: int = 17) -> onnx.ModelProto:
    """ResNet-50 as ONNX with the weights of ``build_torch(seed)``; ``batch`` may be a name like "N"."""
    net = _NETS.shared(seed)
    return to_onnx(net.spec, net, batch, opset)


def save_onnx(path: str | os.PathLike, seed: int = 0, batch: int | str = 1) -> str:
    """Write the ONNX model to ``path`` and return the path."""
    onnx.save(onnx_model(seed, batch), os.fspath(path))
    return os.fspath(path)
