"""The library-call CUDA tactics' torch compositions (patch gathering, cuBLASLt's fused GELU) checked on the CPU,
so that CI without a GPU runs them: the same code runs on the GPU (tests/backends/test_cuda_backend.py times
and checks it there). Oracle: the FusedConv / FusedGemm reference in float64 on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from kiln.backends.tactic import TacticContext, get_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.registry import lookup
from tests.conftest import rel_error

CPU = torch.device("cpu")


def _patch_conv(k: int, hw: tuple[int, int], cin: int, cout: int, act: str, dtype: torch.dtype, n: int = 2,
                residual: bool = False, stride: int | None = None):
    s = k if stride is None else stride
    oh, ow = (hw[0] - k) // s + 1, (hw[1] - k) // s + 1
    dt = DType.from_torch(dtype)
    w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
    ins = [Value("x", TensorType(dt, (n, cin, *hw))), Value("w", const=w), Value("b", const=torch.randn(cout).to(dtype))]
    if residual:
        ins.append(Value("z", TensorType(dt, (n, cout, oh, ow))))
    node = Node("FusedConv", ins, [Value("y", TensorType(dt, (n, cout, oh, ow)))],
                {"strides": [s, s], "pads": [0] * 4, "dilations": [1, 1], "group": 1, "kernel_shape": [k, k],
                 "activation": act}, name="patch", domain="kiln")
    return node, (n, cout, oh, ow)


@pytest.mark.parametrize("k,hw", [(16, (64, 48)), (4, (18, 13)), (1, (7, 5))])
@pytest.mark.parametrize("act", ["", "Relu", "GeluTanh"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_patch_conv_gemm_matches_reference(k, hw, act, layout):
    """A conv whose kernel equals its stride (ViT's patch embedding; sizes not divisible by the patch drop the
    ragged edge as the conv does) runs as one GEMM over gathered patches, any input layout, every config."""
    node, oshape = _patch_conv(k, hw, cin=3, cout=24, act=act, dtype=torch.float32)
    t = get_tactic("cuda.conv1x1_gemm")
    ctx = TacticContext(CPU, fp16=False)
    assert t.supports(node, ctx)
    x = torch.randn(2, 3, *hw)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    want = lookup("FusedConv", "kiln").compute(node, x.double(), node.inputs[1].const.double(),
                                               node.inputs[2].const.double())
    cfgs = t.configs(node, ctx)
    assert ({"epilogue": "lt_gelu"} in cfgs) == (act == "GeluTanh")
    for cfg in cfgs:
        if cfg.get("epilogue") == "triton":
            continue  # a Triton kernel: run on the GPU by test_cuda_backend / under the interpreter elsewhere
        got = t.make(node, cfg, CPU)(x)
        assert tuple(got.shape) == oshape
        assert rel_error(got.numpy(), want.numpy()) < 1e-5, cfg


def test_patch_conv_declines_overlapping_windows():
    node, _ = _patch_conv(4, (16, 16), cin=3, cout=8, act="", dtype=torch.float32, stride=2)
    assert not get_tactic("cuda.conv1x1_gemm").supports(node, TacticContext(CPU, fp16=False))


@pytest.mark.parametrize("dtype,offered", [(torch.float32, False), (torch.bfloat16, True)])
def test_lt_gelu_offered_for_erf_gelu_only_in_reduced_precision(dtype, offered):
    """cuBLASLt's GELU is the tanh form: offered for the erf form only when the layer runs in FP16/BF16, and
    then within the type's rounding of the exact erf GELU; the tanh form is exact and offered always."""
    dt = DType.from_torch(dtype)
    w = (torch.randn(48, 40) / 6).to(dtype)
    node = Node("FusedGemm", [Value("a", TensorType(dt, (3, 7, 40))), Value("w", const=w),
                              Value("b", const=torch.randn(48).to(dtype))],
                [Value("y", TensorType(dt, (3, 7, 48)))], {"activation": "Gelu"}, name="g", domain="kiln")
    t = get_tactic("cuda.cublas_gemm")
    ctx = TacticContext(CPU, fp16=dtype != torch.float32)
    cfgs = t.configs(node, ctx)
    assert ({"epilogue": "lt_gelu"} in cfgs) == offered
    a = torch.randn(3, 7, 40).to(dtype)
    want = lookup("FusedGemm", "kiln").compute(node, a.double(), w.double(), node.inputs[2].const.double())
    for cfg in cfgs:
        if cfg.get("epilogue") == "triton":
            continue
        got = t.make(node, cfg, CPU)(a)
        assert got.dtype == dtype and tuple(got.shape) == (3, 7, 48)
        assert rel_error(got.float().numpy(), want.numpy()) < (1e-2 if offered else 1e-5), cfg
    node.attrs["activation"] = "GeluTanh"
    assert {"epilogue": "lt_gelu"} in t.configs(node, ctx)
