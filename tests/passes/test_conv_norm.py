"""Depthwise conv + channels-last LayerNorm -> FusedConvNorm (kiln.passes.conv_norm) and its Triton kernel
(cuda.triton_dwconv with NORM).

The pass: ConvNeXt-style blocks built as ONNX, optimized for the CUDA target, then run on the CPU through the ops'
references and compared with onnxruntime on the original model on fresh random inputs; near misses stay unfused.
The kernel: against the FusedConvNorm reference in float64 on the same (rounded) inputs, under the Triton
interpreter without a GPU (TRITON_INTERPRET=1), compiled on one.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

from kiln.backends.tactic import TacticContext, get_tactic  # noqa: E402
from kiln.frontend.onnx import load_onnx  # noqa: E402
from kiln.ir.graph import Node  # noqa: E402
from kiln.logger import Logger  # noqa: E402
from kiln.ops.registry import lookup  # noqa: E402
from kiln.passes.base import PassContext, PassManager  # noqa: E402
from kiln.passes.pipeline import default_pipeline  # noqa: E402
from kiln.runtime.interpreter import GraphFunction  # noqa: E402
from kiln.testing import run_oracle  # noqa: E402
from tests.backends.test_cuda_triton import _val  # noqa: E402

C, H, W = 24, 9, 10


def _block(rng: np.random.Generator, k: int = 7, perm: tuple[int, ...] = (0, 2, 3, 1), axis: int = -1,
           extra_reader: bool = False, bias: bool = True, act: str = ""):
    """x -> depthwise conv k x k (-> act) -> Transpose(perm) -> LayerNorm(axis) -> MatMul -> Transpose back -> + x."""
    consts = {"w": (rng.standard_normal((C, 1, k, k)) / k).astype(np.float32),
              "g": (1 + 0.3 * rng.standard_normal(C)).astype(np.float32),
              "nb": (0.2 * rng.standard_normal(C)).astype(np.float32),
              "fc": (rng.standard_normal((C, C)) / np.sqrt(C)).astype(np.float32)}
    conv_in = ["x", "w"]
    if bias:
        consts["b"] = rng.standard_normal(C).astype(np.float32)
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["y0" if act else "y"], name="dw", group=C, kernel_shape=[k, k],
                              pads=[k // 2] * 4)]
    if act:
        nodes.append(helper.make_node(act, ["y0"], ["y"], name="act", **({"alpha": 0.2} if act == "LeakyRelu" else {})))
    nodes += [helper.make_node("Transpose", ["y"], ["t"], name="to_nhwc", perm=list(perm)),
             helper.make_node("LayerNormalization", ["t", "g", "nb"], ["n"], name="norm", axis=axis, epsilon=1e-6),
             helper.make_node("MatMul", ["n", "fc"], ["m"], name="fc"),
             helper.make_node("Transpose", ["m"], ["mt"], name="to_nchw", perm=[int(np.argsort(perm)[i])
                                                                                 for i in range(4)]),
             helper.make_node("Add", ["mt", "x"], ["out"], name="res")]
    outs = ["out"] + (["y"] if extra_reader else [])
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C, H, W])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                          [numpy_helper.from_array(v, n) for n, v in consts.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _optimized(model, device: str = "cuda"):
    g = load_onnx(model, Logger())
    PassManager(default_pipeline(), subgraphs=True).run(g, PassContext(Logger(), device=device))
    return g


def _ops(g) -> list[str]:
    return [n.op_type for n in g.nodes]


@pytest.mark.parametrize("bias,act", [(True, ""), (False, ""), (True, "Relu"), (False, "LeakyRelu")])
def test_convnext_block_fuses_and_matches_onnxruntime(bias: bool, act: str) -> None:
    """The fused layer keeps the conv's activation (applied before the norm)."""
    rng = np.random.default_rng(7)
    model = _block(rng, bias=bias, act=act)
    g = _optimized(model)
    assert "FusedConvNorm" in _ops(g) and "LayerNormalization" not in _ops(g) and act not in _ops(g), _ops(g)
    x = rng.standard_normal((2, C, H, W)).astype(np.float32)
    got = GraphFunction(g)([torch.from_numpy(x)])
    np.testing.assert_allclose(np.asarray(got[0]), run_oracle(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("why", ["cpu", "other_perm", "conv_read_twice", "norm_axis"])
def test_near_misses_stay_unfused(why: str) -> None:
    rng = np.random.default_rng(3)
    model = _block(rng, perm=(0, 3, 2, 1) if why == "other_perm" else (0, 2, 3, 1),
                   extra_reader=why == "conv_read_twice", axis=2 if why == "norm_axis" else -1)
    g = _optimized(model, device="cpu" if why == "cpu" else "cuda")
    assert "FusedConvNorm" not in _ops(g)
    x = rng.standard_normal((1, C, H, W)).astype(np.float32)
    got = GraphFunction(g)([torch.from_numpy(x)])
    for a, b in zip(got, run_oracle(model, {"x": x})):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4)


pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra has it): Triton tactics untested")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CTX = TacticContext(DEV, fp16=True, extra={"opt_level": 3})
TOL = {torch.float32: 2e-5, torch.float16: 1e-2}


def _norm_node(c: int, k: int, stride: int, dtype: torch.dtype, act: str, bias: bool, nb: bool,
               g: torch.Generator, n: int = 1, h: int = 5, w: int = 6) -> tuple[Node, torch.Tensor]:
    pad = k // 2
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    ins = [_val("x", shape=(n, c, h, w), dtype=dtype), _val("w", (torch.randn(c, 1, k, k, generator=g) / k).to(dtype)),
           _val("b", torch.randn(c, generator=g).to(dtype)) if bias else None,
           _val("s", (1 + 0.3 * torch.randn(c, generator=g)).to(dtype))]
    if nb:
        ins.append(_val("nb", (0.2 * torch.randn(c, generator=g)).to(dtype)))
    node = Node("FusedConvNorm", ins, [_val("y", shape=(n, oh, ow, c), dtype=dtype)],
                dict(strides=[stride, stride], pads=[pad] * 4, dilations=[1, 1], group=c, activation=act,
                     alpha=0.1, epsilon=1e-5), name="dwnorm", domain="kiln")
    x = torch.randn(n, c, h, w, generator=g).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last)
    return node, x


def _want(node: Node, x: torch.Tensor) -> torch.Tensor:
    consts = [None if v is None else v.const.double().to(DEV) for v in node.inputs[1:]]
    return lookup("FusedConvNorm", "kiln").compute(node, x.double(), *consts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c,k,stride,act,bias,nb", [(96, 7, 1, "", True, True), (40, 7, 1, "", True, False),
                                                    (130, 3, 2, "Relu", False, True), (17, 5, 1, "LeakyRelu", True,
                                                                                       True)])
def test_fused_kernel_matches_float64(dtype, c, k, stride, act, bias, nb) -> None:
    g = torch.Generator().manual_seed(c + k)
    node, x = _norm_node(c, k, stride, dtype, act, bias, nb, g)
    t = get_tactic("cuda.triton_dwconv")
    assert t is not None and t.supports(node, CTX)
    want = _want(node, x)
    cfgs = t.configs(node, CTX)
    one = [cfg for cfg in cfgs if not cfg.get("split")]
    two = [cfg for cfg in cfgs if cfg.get("split")]
    assert one and two and all(cfg["BLOCK_C"] >= c for cfg in one)  # one launch: a block holds every channel
    assert any(cfg.get("cudnn") for cfg in two) == (not act)  # cuDNN's conv (no epilogue of its own): no activation
    for cfg in (one[0], one[-1], two[0], two[-1]):
        got = t.make(node, cfg, DEV)(x)
        assert got.dtype == dtype and tuple(got.shape) == tuple(want.shape) and got.is_contiguous()
        err = (got.double() - want).abs().max().item()
        assert err <= TOL[dtype] * max(1.0, want.abs().max().item()), f"{cfg}: max abs error {err:.3g}"


def test_fused_kernel_out_and_nchw_input() -> None:
    """An NCHW input (made channels-last first); out= a destination of the output's shape (written in place) and
    one with another element order (written through a copy)."""
    g = torch.Generator().manual_seed(5)
    node, x = _norm_node(48, 3, 1, torch.float16, "", True, True, g, n=2)
    x = x.contiguous()
    want = _want(node, x)
    t = get_tactic("cuda.triton_dwconv")
    for cfg in (t.configs(node, CTX)[0], t.configs(node, CTX)[-1]):  # one launch, two launches
        _check_out_forms(t.make(node, cfg, DEV), x, want)


def _check_out_forms(kern, x: torch.Tensor, want: torch.Tensor) -> None:
    dst = torch.full(tuple(want.shape), 7.0, dtype=torch.float16, device=DEV)
    got = kern(x, out=dst)
    assert got.data_ptr() == dst.data_ptr()
    assert (dst.double() - want).abs().max().item() <= 1e-2 * max(1.0, want.abs().max().item())
    odd = torch.empty(tuple(want.shape[::-1]), dtype=torch.float16, device=DEV).permute(3, 2, 1, 0)
    kern(x, out=odd)
    assert (odd.double() - want).abs().max().item() <= 1e-2 * max(1.0, want.abs().max().item())
    with pytest.raises(Exception, match="shape"):
        kern(x, out=torch.empty(2, 5, 6, 47, dtype=torch.float16, device=DEV))


def test_refusals() -> None:
    """Too many channels for one block, a missing scale, a norm parameter of the wrong length."""
    t = get_tactic("cuda.triton_dwconv")
    g = torch.Generator().manual_seed(2)
    node, _ = _norm_node(16, 3, 1, torch.float32, "", True, True, g)
    assert t.supports(node, CTX)
    wide, _ = _norm_node(2050, 3, 1, torch.float32, "", False, False, g, n=1, h=3, w=3)
    assert not t.supports(wide, CTX)
    bad = Node("FusedConvNorm", node.inputs[:3] + [_val("s", torch.ones(15))], node.outputs, dict(node.attrs),
               name="bad", domain="kiln")
    assert not t.supports(bad, CTX)
