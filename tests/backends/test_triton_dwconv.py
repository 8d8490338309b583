"""Triton depthwise conv tactic (cuda.triton_dwconv) against torch's conv2d in float64 on random inputs.

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, small shapes, CPU tensors);
with one it runs compiled on CUDA. When triton is absent these tests skip. The oracle is the FusedConv
reference on float64 copies of the same (already rounded) inputs, weights and residual.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra has it): Triton tactics untested")

from kiln.backends.tactic import TacticContext, candidate_tactics, get_tactic  # noqa: E402
from kiln.ir.dtype import DType  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.ops.registry import lookup  # noqa: E402
from tests.backends.test_cuda_triton import fused_conv  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CTX = TacticContext(DEV, fp16=True, extra={"opt_level": 3})
DW = "cuda.triton_dwconv"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

CASES = {
    # name: (C, H, W, kernel, strides, pads (t, l, b, r), dilations, activation, residual, act_before_add)
    "convnext_7x7": (40, 9, 11, 7, 1, (3, 3, 3, 3), 1, "", False, 0),
    "mbv3_5x5_s2": (24, 13, 10, 5, 2, (2, 2, 2, 2), 1, "HardSwish", False, 0),
    "effnet_3x3_silu": (36, 8, 8, 3, 1, (1, 1, 1, 1), 1, "SiLU", False, 0),
    "asym_pads_s2": (20, 11, 9, 3, 2, (0, 0, 1, 1), 1, "Relu", False, 0),
    "dilated_residual": (130, 7, 6, 3, 1, (2, 2, 2, 2), 2, "Relu", True, 0),
    "act_then_add": (17, 6, 7, 3, 1, (1, 1, 1, 1), 1, "LeakyRelu", True, 1),
}


def _case(name: str, dtype: torch.dtype, n: int = 2, seed: int = 0):
    c, h, w, k, s, pads, d, act, residual, before = CASES[name]
    g = torch.Generator().manual_seed(seed)
    wt = (torch.randn(c, 1, k, k, generator=g) / k).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    oh = (h + pads[0] + pads[2] - d * (k - 1) - 1) // s + 1
    ow = (w + pads[1] + pads[3] - d * (k - 1) - 1) // s + 1
    attrs = dict(strides=[s, s], pads=list(pads), dilations=[d, d], group=c, activation=act, alpha=0.1,
                 act_before_add=before)
    node = fused_conv((n, c, h, w), wt, b, (n, c, oh, ow) if residual else None, (n, c, oh, ow), dtype, **attrs)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last)
    z = torch.randn(n, c, oh, ow, generator=g).to(dtype).to(DEV) if residual else None
    return node, x, z


def _want(node, x, z) -> torch.Tensor:
    ref = lookup("FusedConv", "kiln").compute
    consts = [v.const.double().to(DEV) for v in node.inputs[1:3]]
    return ref(node, x.double(), *consts, *([] if z is None else [z.double()]))


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and tuple(got.shape) == tuple(want.shape)
    err = (got.double() - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= TOL[dtype] * scale, f"max abs error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dwconv_matches_float64(case: str, dtype: torch.dtype) -> None:
    node, x, z = _case(case, dtype)
    t = get_tactic(DW)
    assert t is not None and t.supports(node, CTX)
    want = _want(node, x, z)
    cfgs = t.configs(node, CTX)
    assert len(cfgs) >= 3
    for cfg in cfgs[:3]:
        got = t.make(node, cfg, DEV)(x, None, None, z)
        assert got.is_contiguous(memory_format=torch.channels_last)
        _close(got, want, dtype)


@pytest.mark.parametrize("case,dtype", [("convnext_7x7", torch.float16), ("convnext_7x7", torch.float32),
                                        ("effnet_3x3_silu", torch.float16), ("act_then_add", torch.float16)])
def test_dwconv_row_reuse_tiles_match_float64(case: str, dtype: torch.dtype) -> None:
    """The row-reuse kernel (an input row loaded once per column tap, added into up to four output rows): offered
    where the row stride and dilation are 1, each of its tiles (output rows and columns not multiples of the tile,
    a residual, an activation before it) against the float64 reference."""
    node, x, z = _case(case, dtype, n=1, seed=7)
    t = get_tactic(DW)
    rows = [cfg for cfg in t.configs(node, CTX) if "TH" in cfg]
    assert len(rows) >= 4 and {cfg["TH"] for cfg in rows} == {2, 4}
    want = _want(node, x, z)
    if dtype == torch.float32:  # the interpreter is slow on 7x7 taps: float32 through one tile of each height
        rows = [next(cfg for cfg in rows if cfg["TH"] == th) for th in (2, 4)]
    for cfg in rows:
        got = t.make(node, cfg, DEV)(x, None, None, z)
        assert got.is_contiguous(memory_format=torch.channels_last)
        _close(got, want, dtype)


def test_dwconv_row_reuse_not_offered_for_row_stride_or_dilation() -> None:
    t = get_tactic(DW)
    for case in ("mbv3_5x5_s2", "asym_pads_s2", "dilated_residual"):
        node, _, _ = _case(case, torch.float16)
        assert not any("TH" in cfg for cfg in t.configs(node, CTX)), case


@pytest.mark.parametrize("layout", ["nchw", "slice"])
def test_dwconv_input_layouts_and_out_slices(layout: str) -> None:
    """An NCHW input (made channels-last first) or a channel slice of a wider NHWC tensor; out= two channel
    slices of channels-last buffers: the result lands in both, nothing else changes."""
    dtype = torch.float16
    node, x, _ = _case("effnet_3x3_silu", dtype, seed=3)
    if layout == "nchw":
        x = x.contiguous()
    else:
        wide = torch.randn(2, 50, 8, 8).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last)
        wide[:, 5:41] = x
        x = wide[:, 5:41]
    want = _want(node, x, None)
    t = get_tactic(DW)
    bufs = [torch.randn(2, 60, 8, 8).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    before = [b.clone() for b in bufs]
    outs = (bufs[0][:, 10:46], bufs[1][:, 20:56])
    got = t.make(node, t.configs(node, CTX)[1], DEV)(x, out=outs)
    assert got.data_ptr() == outs[0].data_ptr()
    for (lo, hi), b, b0 in zip(((10, 46), (20, 56)), bufs, before):
        _close(b[:, lo:hi], want, dtype)
        assert torch.equal(b[:, :lo], b0[:, :lo]) and torch.equal(b[:, hi:], b0[:, hi:])


def test_dwconv_folded_casts() -> None:
    """float32 input converted on load, float16 weights, float32 output converted on store."""
    node, x, _ = _case("convnext_7x7", torch.float16, seed=4)
    node.inputs[0].type = TensorType(DType.FLOAT32, node.inputs[0].type.shape)
    node.outputs[0].type = TensorType(DType.FLOAT32, node.outputs[0].type.shape)
    node.attrs["out_dtype"] = DType.FLOAT32.onnx
    t = get_tactic(DW)
    assert t.supports(node, CTX)
    x32 = x.float()
    got = t.make(node, t.configs(node, CTX)[0], DEV)(x32)
    _close(got, _want(node, x32, None), torch.float32)


def test_refusals_and_candidates() -> None:
    t = get_tactic(DW)
    g = torch.Generator().manual_seed(1)
    dense = fused_conv((1, 8, 5, 5), torch.randn(8, 8, 3, 3, generator=g), None, None, (1, 8, 5, 5), torch.float32,
                       strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1)
    assert not t.supports(dense, CTX)
    grouped = fused_conv((1, 8, 5, 5), torch.randn(8, 2, 3, 3, generator=g), None, None, (1, 8, 5, 5),
                         torch.float32, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=4)
    assert not t.supports(grouped, CTX)  # groups of two channels: not depthwise
    multiplier = fused_conv((1, 4, 5, 5), torch.randn(8, 1, 3, 3, generator=g), None, None, (1, 8, 5, 5),
                            torch.float32, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=4)
    assert not t.supports(multiplier, CTX)  # two filters per channel
    node, x, _ = _case("effnet_3x3_silu", torch.float16)
    assert DW in [c.id for c in candidate_tactics(node, TacticContext(torch.device("cuda"), fp16=True))]
    kern = t.make(node, t.configs(node, CTX)[0], DEV)
    with pytest.raises(Exception, match="shape"):
        kern(x, out=torch.empty(2, 36, 7, 8, dtype=torch.float16, device=DEV))
