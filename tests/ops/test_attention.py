"""Attention, RotaryEmbedding and LinearAttention against onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import check_model, make_node_model

B, SQ, SKV, D = 2, 3, 5, 8


def _f(rng: np.random.Generator, *shape: int, dtype: type = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _run(op: str, feeds: dict[str, np.ndarray], outputs: list[str], attrs: dict, opset: int,
         rtol: float = 1e-4, atol: float = 1e-5) -> None:
    model = make_node_model(op, feeds, outputs, attrs, opset=opset)
    kept = [o for o in model.graph.output if o.name]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    check_model(model, {k: v for k, v in feeds.items() if not k.startswith("_")}, rtol=rtol, atol=atol)


def _qkv(rng: np.random.Generator, hq: int, hkv: int, rank: int = 4, dv: int = D, skv: int = SKV,
         dtype: type = np.float32) -> dict[str, np.ndarray]:
    if rank == 3:
        return {"Q": _f(rng, B, SQ, hq * D, dtype=dtype), "K": _f(rng, B, skv, hkv * D, dtype=dtype),
                "V": _f(rng, B, skv, hkv * dv, dtype=dtype)}
    return {"Q": _f(rng, B, hq, SQ, D, dtype=dtype), "K": _f(rng, B, hkv, skv, D, dtype=dtype),
            "V": _f(rng, B, hkv, skv, dv, dtype=dtype)}


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("causal", [0, 1])
def test_attention_heads(hq: int, hkv: int, rank: int, causal: int) -> None:
    rng = np.random.default_rng()
    attrs = {"is_causal": causal}
    if rank == 3:
        attrs.update(q_num_heads=hq, kv_num_heads=hkv)
    _run("Attention", _qkv(rng, hq, hkv, rank, dv=6), ["Y"], attrs, 23)


@pytest.mark.parametrize("kind", ["bool2d", "bool4d", "float2d", "float3d", "float4d", "short"])
@pytest.mark.parametrize("causal", [0, 1])
def test_attention_masks(kind: str, causal: int) -> None:
    rng = np.random.default_rng()
    feeds = _qkv(rng, 2, 2)
    shape = {"bool2d": (SQ, SKV), "bool4d": (B, 1, SQ, SKV), "float2d": (SQ, SKV), "float3d": (2, SQ, SKV),
             "float4d": (B, 2, SQ, SKV), "short": (SQ, SKV - 2)}[kind]
    if kind.startswith("bool"):
        mask = rng.random(shape) > 0.3
        mask[..., 0] = True
    else:
        mask = _f(rng, *shape)
    feeds["attn_mask"] = mask
    _run("Attention", feeds, ["Y"], {"is_causal": causal}, 23)


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("rank", [3, 4])
def test_attention_past_present(causal: int, rank: int) -> None:
    rng = np.random.default_rng()
    feeds = _qkv(rng, 4, 2, rank)
    past = 4
    feeds["attn_mask"] = _f(rng, SQ, past + SKV)
    feeds["past_key"] = _f(rng, B, 2, past, D)
    feeds["past_value"] = _f(rng, B, 2, past, D)
    attrs = {"is_causal": causal}
    if rank == 3:
        attrs.update(q_num_heads=4, kv_num_heads=2)
    _run("Attention", feeds, ["Y", "present_key", "present_value"], attrs, 23)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_attention_qk_output_modes(mode: int) -> None:
    rng = np.random.default_rng()
    feeds = _qkv(rng, 2, 2)
    feeds["attn_mask"] = _f(rng, SQ, SKV)
    attrs = {"qk_matmul_output_mode": mode, "softcap": 2.0, "scale": 0.3}
    _run("Attention", feeds, ["Y", "", "", "qk"], attrs, 23)


def test_attention_softcap_scale() -> None:
    rng = np.random.default_rng()
    _run("Attention", _qkv(rng, 4, 2), ["Y"], {"softcap": 1.5, "scale": 0.2}, 23)


def test_attention_fully_masked_row_is_zero() -> None:
    rng = np.random.default_rng()
    feeds = _qkv(rng, 2, 2)
    mask = rng.random((SQ, SKV)) > 0.3
    mask[0] = False
    mask[1:, 0] = True
    feeds["attn_mask"] = mask
    _run("Attention", feeds, ["Y", "", "", "qk"], {"qk_matmul_output_mode": 3}, 24)


@pytest.mark.parametrize("causal", [0, 1])
def test_attention_nonpad_kv_seqlen(causal: int) -> None:
    rng = np.random.default_rng()
    feeds = _qkv(rng, 4, 2, skv=6)
    feeds["_m"], feeds["_pk"], feeds["_pv"] = np.zeros(0), np.zeros(0), np.zeros(0)
    feeds["nonpad_kv_seqlen"] = np.array([4, 6], dtype=np.int64)
    _run("Attention", feeds, ["Y"], {"is_causal": causal}, 24)


@pytest.mark.parametrize("left,right,causal", [(2, -1, 1), (1, 2, 0), (0, 0, 0)])
def test_attention_sliding_window(left: int, right: int, causal: int) -> None:
    rng = np.random.default_rng()
    feeds = _qkv(rng, 2, 2)
    attrs = {"left_window_size": left, "right_window_size": right, "is_causal": causal}
    _run("Attention", feeds, ["Y"], attrs, 25)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_attention_dtypes(dtype: type) -> None:
    rng = np.random.default_rng()
    feeds = _qkv(rng, 4, 2, dtype=dtype)
    tol = 2e-3 if dtype == np.float16 else 1e-6
    _run("Attention", feeds, ["Y"], {"is_causal": 1}, 23, rtol=tol, atol=tol)


def test_attention_softmax_precision() -> None:
    rng = np.random.default_rng()
    feeds = _qkv(rng, 2, 2, dtype=np.float16)
    _run("Attention", feeds, ["Y"], {"softmax_precision": 1}, 23, rtol=2e-3, atol=2e-3)


# ---- RotaryEmbedding -----------------------------------------------------------------------

@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rot_dim", [0, 4])
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("pos_ids", [True, False])
def test_rotary(interleaved: int, rot_dim: int, rank: int, pos_ids: bool) -> None:
    rng = np.random.default_rng()
    heads, seq, maxpos = 2, 3, 10
    half = (rot_dim or D) // 2
    x = _f(rng, B, heads, seq, D) if rank == 4 else _f(rng, B, seq, heads * D)
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rot_dim}
    if rank == 3:
        attrs["num_heads"] = heads
    if pos_ids:
        feeds = {"X": x, "cos": _f(rng, maxpos, half), "sin": _f(rng, maxpos, half),
                 "pos": rng.integers(0, maxpos, (B, seq)).astype(np.int64)}
    else:
        feeds = {"X": x, "cos": _f(rng, B, seq, half), "sin": _f(rng, B, seq, half)}
    _run("RotaryEmbedding", feeds, ["Y"], attrs, 23)


def test_rotary_fp16() -> None:
    rng = np.random.default_rng()
    feeds = {"X": _f(rng, B, 2, 3, D, dtype=np.float16), "cos": _f(rng, 6, D // 2, dtype=np.float16),
             "sin": _f(rng, 6, D // 2, dtype=np.float16), "pos": rng.integers(0, 6, (B, 3)).astype(np.int64)}
    _run("RotaryEmbedding", feeds, ["Y"], {}, 23, rtol=2e-3, atol=2e-3)


# ---- LinearAttention -----------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["linear", "gated", "delta", "gated_delta"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2)])
@pytest.mark.parametrize("past", [False, True])
def test_linear_attention(rule: str, hq: int, hkv: int, past: bool) -> None:
    rng = np.random.default_rng()
    t, dk, dv = 4, 4, 3
    feeds = {"q": _f(rng, B, t, hq * dk), "k": _f(rng, B, t, hkv * dk) * 0.5, "v": _f(rng, B, t, hkv * dv)}
    feeds["state" if past else "_state"] = _f(rng, B, hkv, dk, dv)
    feeds["decay" if "gated" in rule else "_decay"] = -rng.random((B, t, hkv * dk)).astype(np.float32)
    if "delta" in rule:
        feeds["beta"] = rng.random((B, t, hkv)).astype(np.float32)
    while next(reversed(feeds)).startswith("_"):
        feeds.pop(next(reversed(feeds)))
    attrs = {"q_num_heads": hq, "kv_num_heads": hkv, "update_rule": rule}
    _run("LinearAttention", feeds, ["out", "present"], attrs, 27)


def test_linear_attention_per_head_decay_scale() -> None:
    rng = np.random.default_rng()
    feeds = {"q": _f(rng, B, 3, 8), "k": _f(rng, B, 3, 8) * 0.5, "v": _f(rng, B, 3, 6), "_s": np.zeros(0),
             "decay": -rng.random((B, 3, 2)).astype(np.float32), "beta": rng.random((B, 3, 1)).astype(np.float32)}
    attrs = {"q_num_heads": 2, "kv_num_heads": 2, "scale": 0.3}
    _run("LinearAttention", feeds, ["out", "present"], attrs, 27)
