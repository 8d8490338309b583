"""cpu.attention_dnnl (oneDNN matmuls around the C softmax of native/act.c) against softmax(Q K^T * scale + bias) V in
float64, on random inputs: odd lengths, 3-D and 4-D forms, float and bool masks by broadcast, causal, all-masked
rows; and the layers it leaves to others."""
from __future__ import annotations

import math

import pytest
import torch

from kiln.backends.cpu.activation_c import library as act_library
from kiln.backends.cpu.dnnl import library as dnnl_library
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType

pytestmark = pytest.mark.skipif(dnnl_library() is None or act_library() is None,
                                reason="needs the oneDNN library (onednn-cpu-gomp) and a C compiler")
CPU = TacticContext(torch.device("cpu"))
TID = "cpu.attention_dnnl"


def _attention64(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 causal: bool) -> torch.Tensor:
    sq, skv = q4.shape[2], k4.shape[2]
    bias = torch.zeros(sq, skv, dtype=torch.float64)
    if mask is not None:
        bias = bias + (torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask.double())
    if causal:
        i, j = torch.arange(sq)[:, None], torch.arange(skv)[None, :]
        bias = bias + torch.where(j <= i, 0.0, -math.inf).double()
    s = q4.double() @ k4.double().transpose(-1, -2) * scale + bias
    mx = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isinf(mx), torch.zeros_like(mx), mx))
    total = e.sum(-1, keepdim=True)
    return (e @ v4.double()) / torch.where(total == 0, torch.ones_like(total), total)


def _tt(shape: tuple, dtype: torch.dtype = torch.float32) -> TensorType:
    return TensorType(DType.from_torch(dtype), shape)


def _node(qs: tuple, ks: tuple, vs: tuple, mask: torch.Tensor | None, rank3_heads: int = 0, **attrs) -> Node:
    ins = [Value("q", _tt(qs)), Value("k", _tt(ks)), Value("v", _tt(vs))]
    if mask is not None:
        ins.append(Value("m", _tt(tuple(mask.shape), mask.dtype)))
    if rank3_heads:
        attrs.update(q_num_heads=rank3_heads, kv_num_heads=rank3_heads)
    out = Value("y", _tt((qs[0], qs[1], qs[2], vs[-1]) if len(qs) == 4 else (qs[0], qs[1], None)))
    return Node("Attention", ins, [out], {"softmax_precision": 1, **attrs}, name="attn", opset=23)


def _mask(kind: str | None, b: int, h: int, sq: int, skv: int, g: torch.Generator) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "keys":  # [B, 1, 1, Skv] additive padding mask, some keys at -inf
        m = torch.randn(b, 1, 1, skv, generator=g)
        m[..., skv // 2::3] = -math.inf
        return m
    if kind == "full":  # [B, H, Sq, Skv] additive, one row with every key at -inf
        m = torch.randn(b, h, sq, skv, generator=g)
        m[0, 0, 1] = -math.inf
        return m
    m = torch.rand(sq, skv, generator=g) > 0.3  # bool [Sq, Skv], True attends; one row attends nothing
    m[0] = False
    return m


@pytest.mark.parametrize("b, h, sq, skv, d", [(1, 6, 197, 197, 64), (2, 3, 17, 33, 32), (1, 2, 5, 5, 8)])
@pytest.mark.parametrize("mask", [None, "keys", "full", "bool"])
@pytest.mark.parametrize("causal", [False, True])
def test_4d_matches_float64(b: int, h: int, sq: int, skv: int, d: int, mask: str | None, causal: bool) -> None:
    g = torch.Generator().manual_seed(b * 1000 + sq)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (sq, skv, skv))
    m = _mask(mask, b, h, sq, skv, g)
    node = _node(tuple(q.shape), tuple(k.shape), tuple(v.shape), m, is_causal=int(causal))
    t = get_tactic(TID)
    assert t is not None and t.supports(node, CPU)
    got = t.make(node, {}, torch.device("cpu"))(q, k, v, m)
    want = _attention64(q, k, v, m, d ** -0.5, causal)
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("rep", [2, 4])
@pytest.mark.parametrize("mask", [None, "keys", "bool"])
def test_grouped_query_attention_matches_float64(rep: int, mask: str | None) -> None:
    """Fewer K/V heads than Q heads (Llama's GQA): query head i reads K/V head i // rep, as Attention defines."""
    g = torch.Generator().manual_seed(rep)
    b, hkv, sq, d = 2, 2, 13, 16
    q = torch.randn(b, hkv * rep, sq, d, generator=g)
    k, v = torch.randn(b, hkv, sq, d, generator=g), torch.randn(b, hkv, sq, d, generator=g)
    m = _mask(mask, b, hkv * rep, sq, sq, g)
    node = _node(tuple(q.shape), tuple(k.shape), tuple(v.shape), m, is_causal=1 if mask is None else 0)
    t = get_tactic(TID)
    assert t.supports(node, CPU)  # type: ignore[union-attr]
    got = t.make(node, {}, torch.device("cpu"))(q, k, v, m)  # type: ignore[union-attr]
    want = _attention64(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), m, d ** -0.5, mask is None)
    assert (got.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("scale", [None, 0.3])
def test_3d_form_reads_and_writes_head_views(scale: float | None) -> None:
    """Q, K, V as [B, S, H*D] slices of one fused QKV projection (strided), the output [B, Sq, H*Dv]."""
    g = torch.Generator().manual_seed(7)
    b, s, h, d = 2, 29, 4, 16
    qkv = torch.randn(b, s, 3 * h * d, generator=g)
    q, k, v = qkv[..., :h * d], qkv[..., h * d:2 * h * d], qkv[..., 2 * h * d:]
    node = _node((b, s, h * d), (b, s, h * d), (b, s, h * d), None, rank3_heads=h, scale=scale)
    got = get_tactic(TID).make(node, {}, torch.device("cpu"))(q, k, v)  # type: ignore[union-attr]
    heads = lambda x: x.unflatten(-1, (h, d)).transpose(1, 2)  # noqa: E731
    want = _attention64(heads(q), heads(k), heads(v), None, d ** -0.5 if scale is None else scale, False)
    assert got.shape == (b, s, h * d)
    assert (got.double() - want.transpose(1, 2).reshape(b, s, h * d)).abs().max().item() <= 1e-5 * max(
        1.0, want.abs().max().item())


def test_declines_what_it_does_not_run() -> None:
    t = get_tactic(TID)
    assert t is not None
    f16 = Node("Attention", [Value(n, _tt((1, 2, 4, 8), torch.float16)) for n in "qkv"],
               [Value("y", _tt((1, 2, 4, 8), torch.float16))], {"softmax_precision": 1}, name="a", opset=23)
    uneven = _node((1, 3, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8), None)  # 3 query heads over 2 K/V heads
    assert not t.supports(f16, CPU) and not t.supports(uneven, CPU)
    assert not t.supports(_node((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8), None), TacticContext(torch.device("cuda")))


@pytest.mark.parametrize("rank3", [True, False])
def test_writes_its_destination_and_binds(rank3: bool) -> None:
    """Into the runtime's arena slot (out=), and as a bound call repeating it on the same tensors with new values."""
    g = torch.Generator().manual_seed(21)
    b, s, h, d = 1, 23, 3, 16
    if rank3:
        qkv = torch.randn(b, s, 3 * h * d, generator=g)
        q, k, v = qkv[..., :h * d], qkv[..., h * d:2 * h * d], qkv[..., 2 * h * d:]
        node = _node((b, s, h * d), (b, s, h * d), (b, s, h * d), None, rank3_heads=h)
        heads = lambda x: x.unflatten(-1, (h, d)).transpose(1, 2)  # noqa: E731
        dest = torch.full((b, s, h * d), float("nan"))
    else:
        qkv = torch.randn(3, b, h, s, d, generator=g)
        q, k, v = qkv[0], qkv[1], qkv[2]
        node = _node(tuple(q.shape), tuple(k.shape), tuple(v.shape), None)
        heads = lambda x: x  # noqa: E731
        dest = torch.full((b, h, s, d), float("nan"))
    kern = get_tactic(TID).make(node, {}, torch.device("cpu"))  # type: ignore[union-attr]

    def want() -> torch.Tensor:
        w = _attention64(heads(q), heads(k), heads(v), None, d ** -0.5, False)
        return w.transpose(1, 2).reshape(b, s, h * d) if rank3 else w
    with torch.inference_mode():  # buffers made in inference mode serve calls outside it too
        assert kern(q, k, v, out=dest) is dest
    assert (dest.double() - want()).abs().max().item() <= 1e-5
    call = kern.bind([q, k, v], dest)
    assert call is not None
    qkv.copy_(torch.randn(qkv.shape, generator=g))  # new values in the same tensors
    dest.fill_(float("nan"))
    assert call() is dest
    assert (dest.double() - want()).abs().max().item() <= 1e-5
