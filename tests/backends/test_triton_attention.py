"""Triton flash attention (cuda.triton_attention) against a float64 softmax(Q K^T * scale + bias) V.

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, small shapes, CPU
tensors); with one it runs compiled on CUDA. Float32 results must agree with the float64 formula to 1e-5
of the values' scale; float16 / bfloat16 ones to 1e-2 / 2e-2 (the kernel keeps float32 statistics and
accumulators, P is rounded to the input type for the P V product). Rows whose keys are all masked must be
exact zeros. The tactic is also checked on a node imported from an opset-23 ONNX model: its candidate
list, a CPU build (which must not pick it) and, on a CUDA machine, a CUDA build against onnxruntime.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra has it): Triton tactics untested")

from kiln.backends.cuda.triton_attention import flash_attention, unsupported  # noqa: E402
from kiln.backends.tactic import TacticContext, candidate_tactics, get_tactic  # noqa: E402
from kiln.ir.dtype import DType  # noqa: E402
from kiln.ir.graph import Node, Value  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.ops.registry import lookup  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_CTX = TacticContext(torch.device("cuda"), fp16=True)  # candidate lists only: nothing runs there
TID = "cuda.triton_attention"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-5, F16: 1e-2, BF16: 2e-2}


def _rand(*shape: int, dtype: torch.dtype = F32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEV)


def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                scale: float | None = None, causal: bool = False) -> torch.Tensor:
    """The formula in float64: GQA by repeating K/V heads, a mask shorter than Skv padded with -inf, causal
    top-left aligned, rows with every key masked -> 0."""
    h, hkv, sq, skv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kk = k.double().repeat_interleave(h // hkv, 1)
    vv = v.double().repeat_interleave(h // hkv, 1)
    bias = torch.zeros(sq, skv, dtype=torch.float64, device=q.device)
    if mask is not None:
        m = torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask.double()
        bias = bias + torch.nn.functional.pad(m.double(), (0, skv - m.shape[-1]), value=-math.inf)
    if causal:
        i, j = torch.arange(sq, device=q.device)[:, None], torch.arange(skv, device=q.device)[None, :]
        bias = bias + torch.where(j <= i, 0.0, -math.inf).double()
    s = q.double() @ kk.transpose(-1, -2) * scale + bias
    mx = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isinf(mx), torch.zeros_like(mx), mx))
    total = e.sum(-1, keepdim=True)
    return (e @ vv) / torch.where(total == 0, torch.ones_like(total), total)


def _close(got: torch.Tensor, want64: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want64.shape, (got.dtype, got.shape, want64.shape)
    assert torch.isfinite(got).all(), "non-finite output"
    err = (got.double() - want64).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want64.abs().max().item() if got.numel() else 1.0)
    assert err <= TOL[dtype] * scale, f"max abs error {err:.3g} (scale {scale:.3g}, dtype {dtype})"


def _mask(kind: str | None, b: int, sq: int, skv: int, seed: int) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "add_keys":  # [B, 1, 1, Skv], a padding mask with some keys at -inf
        m = _rand(b, 1, 1, skv, seed=seed)
        m[..., skv // 2:: 3] = -math.inf
        return m
    if kind == "add_full":  # [B, 1, Sq, Skv]
        return _rand(b, 1, sq, skv, seed=seed)
    if kind == "add_2d_f16":  # [Sq, Skv] in another float type than Q
        return _rand(sq, skv, seed=seed).half()
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(b, 1, sq, skv, generator=g) > 0.3
    allowed[..., 0] = True  # no fully masked row here (tested separately)
    return allowed.to(DEV)


# (B, H, Hkv, Sq, Skv, D, Dv, mask kind, causal, dtype)
CASES = [
    (2, 2, 2, 1, 7, 16, 16, None, False, F32),
    (2, 2, 2, 7, 33, 32, 32, "add_keys", False, F32),
    (1, 2, 2, 33, 33, 64, 64, "add_full", False, F32),
    (1, 2, 2, 33, 7, 80, 80, "bool", False, F32),
    (1, 2, 2, 197, 197, 64, 64, None, True, F32),
    (1, 2, 2, 33, 40, 32, 32, "add_full", True, F32),
    (1, 1, 1, 7, 33, 128, 128, "add_2d_f16", False, F32),
    (2, 2, 2, 33, 33, 32, 80, "add_keys", False, F32),    # Dv != D
    (1, 4, 2, 33, 33, 64, 64, "bool", True, F32),         # GQA + causal + bool mask
    (1, 2, 2, 33, 7, 16, 16, None, True, F32),            # causal with Sq > Skv
    (1, 2, 2, 197, 197, 64, 64, "add_keys", False, F16),
    (1, 4, 2, 33, 33, 128, 128, "bool", True, F16),
    (2, 2, 2, 7, 33, 80, 48, None, False, F16),
    (1, 2, 2, 197, 197, 64, 64, "add_full", True, BF16),
    (1, 4, 2, 33, 7, 128, 128, "add_keys", False, BF16),
]


@pytest.mark.parametrize("b,h,hkv,sq,skv,d,dv,mask_kind,causal,dtype", CASES)
def test_flash_attention_matches_float64(b, h, hkv, sq, skv, d, dv, mask_kind, causal, dtype) -> None:
    seed = sq * 1000 + skv + d
    q, k = _rand(b, h, sq, d, dtype=dtype, seed=seed), _rand(b, hkv, skv, d, dtype=dtype, seed=seed + 1)
    v = _rand(b, hkv, skv, dv, dtype=dtype, seed=seed + 2)
    mask = _mask(mask_kind, b, sq, skv, seed + 3)
    want = attention64(q, k, v, mask, None, causal)
    tiles = [(64, 32, 4, 2)] if sq >= 197 else [(64, 32, 4, 2), (32, 64, 4, 3)]
    for bm, bn, w, st in tiles:
        got = flash_attention(q, k, v, mask, None, causal, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        _close(got, want, dtype)


def test_scale_attribute_and_kiln_reference() -> None:
    """An explicit scale, and agreement with the op's own reference (kiln.ops.attention) in float32."""
    q, k, v = _rand(2, 2, 9, 32, seed=1), _rand(2, 2, 21, 32, seed=2), _rand(2, 2, 21, 24, seed=3)
    mask = _mask("add_full", 2, 9, 21, 4)
    got = flash_attention(q, k, v, mask, 0.3, True, BLOCK_M=16, BLOCK_N=16)
    _close(got, attention64(q, k, v, mask, 0.3, True), F32)
    node = _node(F32, (2, 2, 9, 32), (2, 2, 21, 32), (2, 2, 21, 24), mask, scale=0.3, is_causal=1)
    ref = lookup("Attention", "").compute(node, q, k, v, mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_zero() -> None:
    """Rows with every key masked (bool False / additive -inf, also a whole row block, also by causal plus a
    mask) are exact zeros, never NaN; the other rows are right."""
    b, h, sq, skv, d = 2, 2, 20, 45, 32
    q, k, v = _rand(b, h, sq, d, seed=5), _rand(b, h, skv, d, seed=6), _rand(b, h, skv, d, seed=7)
    allowed = _mask("bool", b, sq, skv, 8)
    allowed[0, 0, 3] = False            # one row of batch 0
    allowed[1] = False                  # every row of batch 1 (whole row blocks)
    additive = torch.where(allowed, _rand(b, 1, sq, skv, seed=9), torch.full((), -math.inf, device=DEV))
    causal_mask = allowed.clone()
    causal_mask[0, 0, 5, :6] = False    # row 5 sees keys <= 5 under causal: all of them masked here
    for mask, causal, dead in ((allowed, False, [(0, 3)]), (additive, False, [(0, 3)]),
                               (causal_mask, True, [(0, 3), (0, 5)])):
        for bm, bn in ((16, 16), (64, 32)):
            got = flash_attention(q, k, v, mask, None, causal, BLOCK_M=bm, BLOCK_N=bn)
            assert torch.isfinite(got).all()
            assert (got[1] == 0).all()
            for bi, row in dead:
                assert (got[bi, :, row] == 0).all()
            _close(got, attention64(q, k, v, mask, None, causal), F32)


def test_blocks_past_the_frontier_are_not_read() -> None:
    """Keys past the causal frontier of every row block, and past a mask shorter than Skv, are never loaded:
    NaN there (which 0 * NaN in P V would spread) does not reach the output."""
    q, k, v = _rand(1, 2, 7, 16, seed=10), _rand(1, 2, 100, 16, seed=11), _rand(1, 2, 100, 16, seed=12)
    k[:, :, 64:] = math.nan
    v[:, :, 64:] = math.nan
    got = flash_attention(q, k, v, None, None, True, BLOCK_M=64, BLOCK_N=32)
    _close(got, attention64(q[:, :, :, :], k[:, :, :7], v[:, :, :7], None, None, True), F32)
    mask = _rand(1, 1, 7, 40, seed=13)  # 40 keys of 100: the reference pads the rest with -inf
    got = flash_attention(q, k, v, mask, None, False, BLOCK_M=16, BLOCK_N=32)
    _close(got, attention64(q, k[:, :, :40], v[:, :, :40], mask, None, False), F32)


def test_strided_inputs_and_out() -> None:
    """Q as the transposed view of [B, Sq, H, D], K / V as slices of wider tensors, a mask broadcast over
    heads, and out= a transposed view and a slice of a wider buffer (the rest left untouched)."""
    b, h, sq, skv, d = 2, 4, 19, 37, 32
    q = _rand(b, sq, h, d, seed=14).transpose(1, 2)
    k = _rand(b, 2, skv, 2 * d, seed=15)[..., d:]
    v = _rand(b, skv, 2, 48, seed=16).transpose(1, 2)[..., 8:40]
    mask = _rand(1, 1, sq, skv + 5, seed=17)[..., :skv]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    want = attention64(q, k, v, mask, None, False)
    _close(flash_attention(q, k, v, mask, None, False, BLOCK_M=16, BLOCK_N=16), want, F32)
    base = torch.zeros(b, sq, h, 32, device=DEV)
    out = base.transpose(1, 2)
    assert flash_attention(q, k, v, mask, None, False, out, BLOCK_M=16, BLOCK_N=32) is out
    _close(out, want, F32)
    wide = torch.zeros(b, h, sq, 40, device=DEV)
    got = flash_attention(q, k, v, mask, None, False, wide[..., 4:36], BLOCK_M=32, BLOCK_N=16)
    _close(got, want, F32)
    assert not wide[..., :4].any() and not wide[..., 36:].any()
    # float16 inputs written into a float32 destination (the kernel rounds once, to the destination's type)
    out32 = torch.empty(b, h, sq, 32, device=DEV)
    flash_attention(q.half(), k.half(), v.half(), mask, None, False, out32, BLOCK_M=16, BLOCK_N=16)
    assert (out32.double() - attention64(q.half(), k.half(), v.half(), mask)).abs().max().item() < 1e-2


def test_unsupported_inputs_are_named() -> None:
    q, k, v = _rand(1, 2, 5, 16, seed=18), _rand(1, 2, 6, 16, seed=19), _rand(1, 2, 6, 16, seed=20)
    assert unsupported(q, k, v, None) is None
    assert "dtypes" in unsupported(q.double(), k.double(), v.double(), None)
    assert "4-D" in unsupported(q[0], k[0], v[0], None)
    assert "multiple" in unsupported(_rand(1, 3, 5, 16), k, v, None)
    assert "broadcast" in unsupported(q, k, v, _rand(1, 2, 4, 6))
    assert "keys" in unsupported(q, k, v, _rand(1, 1, 5, 7))
    assert "head dims" in unsupported(_rand(1, 2, 5, 300), _rand(1, 2, 6, 300), v, None)
    with pytest.raises(ValueError):
        flash_attention(q, k, v, None, None, False, torch.empty(1, 2, 5, 8, device=DEV))


# ---- the tactic ---------------------------------------------------------------------------------

def _tt(dtype: torch.dtype, shape: tuple | None) -> TensorType:
    return TensorType(DType.from_torch(dtype), shape)


def _node(dtype: torch.dtype, qs: tuple, ks: tuple, vs: tuple, mask: torch.Tensor | tuple | None = None,
          outputs: int = 1, extra_inputs: int = 0, mask_dtype: torch.dtype | None = None, **attrs) -> Node:
    ins: list[Value | None] = [Value("q", _tt(dtype, qs)), Value("k", _tt(dtype, ks)), Value("v", _tt(dtype, vs))]
    if mask is not None or extra_inputs:
        if mask is None:
            ins.append(None)
        else:
            mshape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else mask
            mdt = mask_dtype or (mask.dtype if isinstance(mask, torch.Tensor) else F32)
            ins.append(Value("m", _tt(mdt, mshape)))
    for i in range(extra_inputs):
        ins.append(Value(f"past{i}", _tt(dtype, ks)))
    out_shape = (qs[0], qs[1], qs[2], vs[-1]) if len(qs) == 4 else None
    outs = [Value("y", _tt(dtype, out_shape))] + [Value(f"o{i}", _tt(dtype, None)) for i in range(1, outputs)]
    attrs = {k: v for k, v in {"softmax_precision": 1, **attrs}.items() if v is not None}  # float32 softmax
    return Node("Attention", ins, outs, attrs, name="attn", opset=23)


def test_tactic_supports_and_configs() -> None:
    t = get_tactic(TID)
    assert t is not None and t.devices == ("cuda",) and t.writes_out == 1
    qs, ks = ("B", 8, "S", 64), ("B", 8, "T", 64)
    ok = _node(F16, qs, ks, ks, ("B", 1, 1, "T"), is_causal=1)
    assert t.supports(ok, CUDA_CTX)
    assert t.supports(_node(BF16, qs, ks, ks, ("S", "T"), mask_dtype=torch.bool), CUDA_CTX)
    assert t.supports(_node(F32, qs, ks, ks, softmax_precision=1, scale=0.1), CUDA_CTX)
    assert t.supports(_node(F16, ("B", "S", 512), ("B", "T", 512), ("B", "T", 512), q_num_heads=8, kv_num_heads=8),
                      CUDA_CTX)  # the 3-D form FuseAttention makes, read through head views
    assert [c.id for c in candidate_tactics(ok, CUDA_CTX)][0] == TID
    refused = {
        "3-D head dim 512": _node(F16, ("B", "S", 4096), ("B", "T", 4096), ("B", "T", 4096), q_num_heads=8,
                                  kv_num_heads=8),
        "3-D without heads": _node(F16, ("B", "S", 512), ("B", "T", 512), ("B", "T", 512)),
        "float64": _node(torch.float64, qs, ks, ks),
        "past kv": _node(F16, qs, ks, ks, extra_inputs=2),
        "present outputs": _node(F16, qs, ks, ks, outputs=3),
        "qk output mode": _node(F16, qs, ks, ks, qk_matmul_output_mode=1),
        "softcap": _node(F16, qs, ks, ks, softcap=30.0),
        "window": _node(F16, qs, ks, ks, left_window_size=16),
        "softmax precision": _node(F16, qs, ks, ks, softmax_precision=10),
        "fp16 softmax asked (no attribute)": _node(F16, qs, ks, ks, softmax_precision=None),
        "int mask": _node(F16, qs, ks, ks, ("B", 1, 1, "T"), mask_dtype=torch.int64),
        "rank-5 mask": _node(F16, qs, ks, ks, (1, "B", 1, 1, "T")),
        "head dim 512": _node(F16, ("B", 8, "S", 512), ("B", 8, "T", 512), ("B", 8, "T", 512)),
        "mixed types": Node("Attention", [Value("q", _tt(F16, qs)), Value("k", _tt(F32, ks)), Value("v", _tt(F16, ks))],
                            [Value("y", _tt(F16, qs))], {}, opset=23),
    }
    for what, node in refused.items():
        assert not t.supports(node, CUDA_CTX), what
        assert TID not in [c.id for c in candidate_tactics(node, CUDA_CTX)], what
    for d in (64, 128, 256):
        node = _node(F16, ("B", 8, "S", d), ("B", 8, "T", d), ("B", 8, "T", d))
        cfgs = t.configs(node, CUDA_CTX)
        assert len(cfgs) >= 3 and len({tuple(sorted(c.items())) for c in cfgs}) == len(cfgs)
        assert len({c["BLOCK_M"] for c in cfgs}) > 1 and len({c["BLOCK_N"] for c in cfgs}) > 1
        if d >= 128:
            assert all(c["num_warps"] == 8 for c in cfgs if c["BLOCK_M"] == 128)
    decode = _node(F16, (4, 8, 1, 64), (4, 8, "T", 64), (4, 8, "T", 64))
    assert t.configs(decode, CUDA_CTX)[0]["BLOCK_M"] == 32
    # float32 at D = 256: only tiles whose pipelined K / V blocks fit the shared memory estimate remain
    wide = t.configs(_node(F32, ("B", 8, "S", 256), ("B", 8, "T", 256), ("B", 8, "T", 256)), CUDA_CTX)
    assert len(wide) >= 2 and all(c["BLOCK_M"] <= 64 and c["num_stages"] == 1 for c in wide)


def test_tactic_kernel_out_and_fallback() -> None:
    t = get_tactic(TID)
    mask = _mask("bool", 2, 11, 30, 21)
    node = _node(F32, (2, 4, 11, 32), (2, 2, 30, 32), (2, 2, 30, 32), mask, is_causal=1,
                 softmax_precision=None)  # float32 layer: its softmax is float32 (a float64 run stays float64)
    ctx = TacticContext(DEV)
    cfgs = t.configs(node, ctx)
    q, k, v = _rand(2, 4, 11, 32, seed=22), _rand(2, 2, 30, 32, seed=23), _rand(2, 2, 30, 32, seed=24)
    want = attention64(q, k, v, mask, None, True)
    for cfg in (cfgs[0], cfgs[-1]):
        kern = t.make(node, cfg, DEV)
        assert kern.writes_out == 1 and kern.out_format == "contiguous"
        _close(kern(q, k, v, mask), want, F32)
        out = torch.empty(2, 11, 4, 32, device=DEV).transpose(1, 2)
        assert kern(q, k, v, mask, out=out) is out
        _close(out, want, F32)
        assert kern.fallback.reason is None
    # the 3-D form: [B, S, H*D] in (a packed projection's column view), [B, S, H*Dv] out, heads by strides
    node3 = _node(F32, (2, 11, 4 * 32), (2, 30, 2 * 32), (2, 30, 2 * 32), mask, is_causal=1, q_num_heads=4,
                  kv_num_heads=2)
    packed = _rand(2, 30, 3 * 64, seed=25)
    k3, v3 = packed[..., 64:128], packed[..., 128:]
    q3 = q.transpose(1, 2).reshape(2, 11, 128)
    want3 = attention64(q, k3.unflatten(-1, (2, 32)).transpose(1, 2), v3.unflatten(-1, (2, 32)).transpose(1, 2),
                        mask, None, True).transpose(1, 2).reshape(2, 11, 128)
    for cfg in t.configs(node3, ctx)[:2]:
        kern3 = t.make(node3, cfg, DEV)
        _close(kern3(q3, k3, v3, mask), want3, F32)
        out3 = torch.empty(2, 11, 128, device=DEV)
        assert kern3(q3, k3, v3, mask, out=out3) is out3
        _close(out3, want3, F32)
        assert kern3.fallback.reason is None
    # float64 at run time: the kernel cannot take it and runs the op's reference instead
    kern = t.make(node, cfgs[0], DEV)
    kern.fallback.quiet = True
    got = kern(q.double(), k.double(), v.double(), mask)
    assert kern.fallback.reason is not None and "dtypes" in kern.fallback.reason
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def _onnx_model(dtype: int = 1, **attrs):
    from onnx import TensorProto, helper
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], **attrs)
    g = helper.make_graph([node], "attention", [
        helper.make_tensor_value_info("q", dtype, ["B", 4, "S", 32]),
        helper.make_tensor_value_info("k", dtype, ["B", 2, "T", 32]),
        helper.make_tensor_value_info("v", dtype, ["B", 2, "T", 16]),
        helper.make_tensor_value_info("m", TensorProto.BOOL, ["B", 1, "S", "T"])],
        [helper.make_tensor_value_info("y", dtype, ["B", 4, "S", 16])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def _feeds(np_dtype: type = np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = rng.random((2, 1, 9, 13)) > 0.3
    m[..., 0] = True
    shapes = {"q": (2, 4, 9, 32), "k": (2, 2, 13, 32), "v": (2, 2, 13, 16)}
    return {**{n: rng.standard_normal(s).astype(np_dtype) for n, s in shapes.items()}, "m": m}


def test_onnx_node_is_a_cuda_candidate_and_cpu_build_runs_without_it() -> None:
    onnx = pytest.importorskip("onnx")
    from kiln.builder import Builder, BuilderConfig
    from kiln.frontend.onnx import load_onnx
    from kiln.logger import Logger, Severity
    from kiln.runtime.engine import Engine
    from kiln.testing import run_oracle
    model = _onnx_model(is_causal=1, scale=0.25)
    onnx.checker.check_model(model)
    node = load_onnx(model, Logger()).nodes[0]
    t = get_tactic(TID)
    assert t.supports(node, CUDA_CTX) and len(t.configs(node, CUDA_CTX)) >= 3
    assert [c.id for c in candidate_tactics(node, CUDA_CTX)][0] == TID
    assert TID not in [c.id for c in candidate_tactics(node, TacticContext(torch.device("cpu")))]
    feeds = _feeds()
    want = run_oracle(model, feeds)[0]
    # the kernel on this node (interpreted on the CPU without a GPU) against onnxruntime
    args = [torch.from_numpy(feeds[n]).to(DEV) for n in "qkvm"]
    got = t.make(node, t.configs(node, CUDA_CTX)[0], DEV)(*args)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5)
    plan = Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(device="cpu", optimization_level=0))
    tactics = [s.get("tactic") for s in plan.graph["steps"]]
    assert TID not in tactics and tactics
    y = Engine(plan).create_execution_context().execute(feeds)["y"]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to build for the CUDA target")
@pytest.mark.parametrize("precision,level", [("fp32", 0), ("fp16", 0), ("fp32", 2)])
def test_cuda_build_matches_onnxruntime(precision, level) -> None:
    from onnx import TensorProto

    from kiln.builder import Builder, BuilderConfig, OptimizationProfile
    from kiln.logger import Logger, Severity
    from kiln.runtime.engine import Engine
    from kiln.testing import run_oracle
    onnx_dt, np_dt = (TensorProto.FLOAT, np.float32) if precision == "fp32" else (TensorProto.FLOAT16, np.float16)
    model = _onnx_model(onnx_dt, is_causal=1, softmax_precision=1)
    prof = OptimizationProfile()
    for name, heads, dim in (("q", 4, 32), ("k", 2, 32), ("v", 2, 16)):
        seq = 9 if name == "q" else 13
        prof.set_shape(name, (1, heads, 1, dim), (2, heads, seq, dim), (4, heads, 64, dim))
    prof.set_shape("m", (1, 1, 1, 1), (2, 1, 9, 13), (4, 1, 64, 64))
    cfg = BuilderConfig(device="cuda", optimization_level=level, tf32=False, profiles=[prof])
    plan = Builder(Logger(Severity.ERROR)).build(model, cfg)
    tactics = [s.get("tactic") for s in plan.graph["steps"]]
    if level == 0:
        assert TID in tactics, tactics
    feeds = _feeds(np_dt, seed=1)
    y = np.asarray(Engine(plan).create_execution_context().execute(feeds)["y"], np.float64)
    if precision == "fp32":
        want = run_oracle(model, feeds)[0].astype(np.float64)
        tol = 1e-5
    else:  # onnxruntime's float16 Attention rounds in between: the float64 formula instead
        t = {n: torch.from_numpy(feeds[n]) for n in "qkvm"}
        want = attention64(t["q"], t["k"], t["v"], t["m"], None, True).numpy()
        tol = 1e-2
    assert np.abs(y - want).max() <= tol * max(1.0, np.abs(want).max())
