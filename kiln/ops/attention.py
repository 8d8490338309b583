"""Attention family: Attention (opset 23+), RotaryEmbedding (23+), LinearAttention (27+).

Attention builds one additive bias from the attention mask (bool or float), the causal frontier
(bottom-right aligned: offset = past length, or nonpad_kv_seqlen - q_len for an external cache),
the sliding window (opset 25) and the nonpad padding mask. Rows whose bias is -inf everywhere
produce zeros. Like the ONNX reference, Attention computes in the precision of Q (softmax_precision
selects another one for the softmax); RotaryEmbedding and LinearAttention compute half-precision
inputs in float32 and cast back.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ir.types import Dim, TensorType
from kiln.ops.registry import OpDef, register

Tensor = torch.Tensor

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SOFTMAX_PRECISIONS = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def _check_float(node: Node, *xs: Tensor | None) -> None:
    for x in xs:
        if x is not None and x.dtype not in _FLOATS:
            raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} does not support dtype {x.dtype}")


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    b, s, hd = x.shape
    return x.reshape(b, s, heads, hd // heads).transpose(1, 2)


def _allowed_to_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=allowed.device))


def _frontier(offset: Tensor | int, sq: int, skv: int, device: torch.device) -> Tensor:
    """p - j for absolute query position p = offset + i; shape (Sq, Skv) or (B, 1, Sq, Skv)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(skv, device=device).unsqueeze(0)
    if isinstance(offset, Tensor):
        return (i + offset.reshape(-1, 1, 1, 1)) - j
    return (i + offset) - j


@register
class Attention(OpDef):
    """Scaled dot-product attention with masks, causal/window masking, KV cache, softcap and GQA."""

    op_type = "Attention"
    opsets = (23, 28)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """Y's type by rule, on symbolic dims: [B, H, Sq, Dv] (4-D) or [B, Sq, q_num_heads * Dv] (3-D). A meta run
        of the reference guards on symbolic sizes (torch 2.11 lost every type after a fused attention)."""
        q, v = (types[0], types[2]) if len(types) >= 3 else (None, None)
        if len(node.outputs) != 1 or q is None or v is None or q.shape is None or v.shape is None or q.dtype is None:
            return super().infer(node, types, consts)
        if len(q.shape) == 4 and len(v.shape) == 4:
            return [TensorType(q.dtype, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]))]
        hq, hkv = int(node.attr("q_num_heads", 0) or 0), int(node.attr("kv_num_heads", 0) or 0)
        dv = v.shape[2]
        if len(q.shape) == 3 and len(v.shape) == 3 and hq > 0 and hkv > 0 and isinstance(dv, int) and dv % hkv == 0:
            return [TensorType(q.dtype, (q.shape[0], q.shape[1], hq * (dv // hkv)))]
        return super().infer(node, types, consts)

    def check(self, node: Node) -> None:
        mode = node.attr("qk_matmul_output_mode", 0)
        if mode not in (0, 1, 2, 3):
            raise UnsupportedOpError(f"node '{node.name}': qk_matmul_output_mode {mode} is not supported")
        sp = node.attr("softmax_precision")
        if sp is not None and sp not in _SOFTMAX_PRECISIONS:
            raise UnsupportedOpError(f"node '{node.name}': softmax_precision {sp} is not supported")
        for key in ("left_window_size", "right_window_size"):
            if node.attr(key, -1) < -1:
                raise UnsupportedOpError(f"node '{node.name}': {key} must be -1 or nonnegative")

    def compute(self, node: Node, Q: Tensor, K: Tensor, V: Tensor, attn_mask: Tensor | None = None,
                past_key: Tensor | None = None, past_value: Tensor | None = None,
                nonpad_kv_seqlen: Tensor | None = None) -> object:
        self.check(node)
        _check_float(node, Q, K, V, past_key, past_value)
        if (past_key is None) != (past_value is None):
            raise UnsupportedOpError(f"node '{node.name}': past_key and past_value must be given together")
        dt = Q.dtype
        rank3 = Q.dim() == 3
        if rank3:
            hq, hkv = node.attr("q_num_heads"), node.attr("kv_num_heads")
            if not hq or not hkv:
                raise UnsupportedOpError(f"node '{node.name}': 3-D Attention needs q_num_heads and kv_num_heads")
            Q, K, V = _split_heads(Q, hq), _split_heads(K, hkv), _split_heads(V, hkv)
        if past_key is not None:
            K = torch.cat([past_key.to(K.dtype), K], 2)
            V = torch.cat([past_value.to(V.dtype), V], 2)
        present_k, present_v = K, V

        scale = node.attr("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(Q.shape[-1])
        root = torch.tensor(math.sqrt(scale), dtype=dt, device=Q.device)
        q, k, v = Q * root, K.to(dt) * root, V.to(dt)
        hq, hkv = q.shape[1], k.shape[1]
        if hq != hkv:
            if hq % hkv:
                raise UnsupportedOpError(f"node '{node.name}': q heads {hq} not a multiple of kv heads {hkv}")
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)

        scores = torch.matmul(q, k.transpose(-1, -2))
        mode = node.attr("qk_matmul_output_mode", 0)
        qk_out = scores
        softcap = float(node.attr("softcap", 0.0) or 0.0)
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        if mode == 1:
            qk_out = scores

        bias = self._bias(node, attn_mask, past_key, nonpad_kv_seqlen, q.shape[2], k.shape[2], dt, q.device)
        logits = scores + bias
        if mode == 2:
            qk_out = logits
        sp = node.attr("softmax_precision")
        sdt = _SOFTMAX_PRECISIONS[sp] if sp is not None else dt
        row_max = logits.to(sdt).amax(-1, keepdim=True)
        safe_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
        e = torch.exp(logits.to(sdt) - safe_max)
        total = e.sum(-1, keepdim=True)
        probs = e / torch.where(total == 0, torch.ones_like(total), total)
        masked_rows = torch.isneginf(bias.amax(-1, keepdim=True))
        probs = torch.where(masked_rows, torch.zeros_like(probs), probs).to(dt)
        if mode == 3:
            qk_out = probs
        y = torch.matmul(probs, v)
        if rank3:
            y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
        outs = (y, present_k, present_v, qk_out.to(dt))
        n = len(node.outputs)
        return outs[0] if n == 1 else outs[:n]

    @staticmethod
    def _bias(node: Node, mask: Tensor | None, past_key: Tensor | None, nonpad: Tensor | None,
              sq: int, skv: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        bias = torch.zeros(sq, skv, dtype=dtype, device=device)
        if mask is not None:
            m = _allowed_to_bias(mask, dtype) if mask.dtype == torch.bool else mask.to(dtype)
            pad = skv - m.shape[-1]
            if pad > 0:
                m = torch.nn.functional.pad(m, (0, pad), value=float("-inf"))
            bias = bias + m
        if nonpad is not None and past_key is None:
            offset: Tensor | int = nonpad.to(device=device, dtype=torch.int64) - sq
        else:
            offset = past_key.shape[2] if past_key is not None else 0
        diff = None
        if node.attr("is_causal", 0):
            diff = _frontier(offset, sq, skv, device)
            bias = bias + _allowed_to_bias(diff >= 0, dtype)
        left, right = node.attr("left_window_size", -1), node.attr("right_window_size", -1)
        if left >= 0 or right >= 0:
            diff = _frontier(offset, sq, skv, device) if diff is None else diff
            allowed = torch.ones_like(diff, dtype=torch.bool)
            if left >= 0:
                allowed = allowed & (diff <= left)
            if right >= 0:
                allowed = allowed & (-diff <= right)
            bias = bias + _allowed_to_bias(allowed, dtype)
        if nonpad is not None:
            keep = torch.arange(skv, device=device) < nonpad.to(device=device, dtype=torch.int64).reshape(-1, 1)
            bias = bias + _allowed_to_bias(keep, dtype).reshape(-1, 1, 1, skv)
        return bias


@register
class RotaryEmbedding(OpDef):
    """Rotary positional embedding (half-split or interleaved, full or partial rotation)."""

    op_type = "RotaryEmbedding"
    opsets = (23, 28)

    def compute(self, node: Node, X: Tensor, cos_cache: Tensor, sin_cache: Tensor,
                position_ids: Tensor | None = None) -> Tensor:
        _check_float(node, X)
        shape = X.shape
        if X.dim() == 4:
            x = X.transpose(1, 2)  # (B, S, H, D)
        elif X.dim() == 3:
            heads = node.attr("num_heads")
            if not heads:
                raise UnsupportedOpError(f"node '{node.name}': 3-D RotaryEmbedding needs num_heads")
            x = X.reshape(shape[0], shape[1], heads, shape[2] // heads)
        else:
            raise UnsupportedOpError(f"node '{node.name}': input must be 3-D or 4-D, got rank {X.dim()}")
        cdt = _compute_dtype(X.dtype)
        x = x.to(cdt)
        dim = node.attr("rotary_embedding_dim", 0) or x.shape[-1]
        if position_ids is not None:
            pos = position_ids.to(device=X.device, dtype=torch.int64)
            cos, sin = cos_cache[pos], sin_cache[pos]
        else:
            cos, sin = cos_cache, sin_cache
        cos, sin = cos.to(cdt).unsqueeze(-2), sin.to(cdt).unsqueeze(-2)
        rot, rest = x[..., :dim], x[..., dim:]
        if node.attr("interleaved", 0):
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        else:
            x1, x2 = rot[..., :dim // 2], rot[..., dim // 2:]
        real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
        if node.attr("interleaved", 0):
            rot = torch.stack([real, imag], -1).reshape(rot.shape)
        else:
            rot = torch.cat([real, imag], -1)
        y = torch.cat([rot, rest], -1).to(X.dtype)
        return y.reshape(shape) if X.dim() == 3 else y.transpose(1, 2)


@register
class LinearAttention(OpDef):
    """Recurrent linear attention (linear, gated, delta, gated_delta update rules) with GQA."""

    op_type = "LinearAttention"
    opsets = (27, 28)

    _RULES = ("linear", "gated", "delta", "gated_delta")

    def check(self, node: Node) -> None:
        rule = node.attr("update_rule", "gated_delta")
        if rule not in self._RULES:
            raise UnsupportedOpError(f"node '{node.name}': unknown update_rule '{rule}'")
        hq, hkv = node.attr("q_num_heads"), node.attr("kv_num_heads")
        if not hq or not hkv or hq % hkv:
            raise UnsupportedOpError(f"node '{node.name}': q_num_heads must be a positive multiple of "
                                     "kv_num_heads (both required)")

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        q, v = types[0], types[2] if len(types) > 2 else None
        past = types[3] if len(types) > 3 else None
        dtype = q.dtype if q is not None else None
        state_dtype = past.dtype if past is not None else dtype
        hq, hkv = node.attr("q_num_heads") or 1, node.attr("kv_num_heads") or 1

        def per_head(t: TensorType | None, heads: int) -> Dim:
            last = t.shape[-1] if t is not None and t.shape else None
            return last // heads if isinstance(last, int) else None

        if q is None or q.shape is None or len(q.shape) != 3:
            return [TensorType(dtype, None), TensorType(state_dtype, None)]
        dk, dv = per_head(q, hq), per_head(v, hkv)
        out_last = dv * hq if dv is not None else None
        return [TensorType(dtype, (q.shape[0], q.shape[1], out_last)),
                TensorType(state_dtype, (q.shape[0], hkv, dk, dv))]

    def compute(self, node: Node, query: Tensor, key: Tensor, value: Tensor, past_state: Tensor | None = None,
                decay: Tensor | None = None, beta: Tensor | None = None) -> object:
        self.check(node)
        _check_float(node, query, key, value, past_state, decay, beta)
        rule = node.attr("update_rule", "gated_delta")
        gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
        if gated != (decay is not None) or delta != (beta is not None):
            raise UnsupportedOpError(f"node '{node.name}': update_rule '{rule}' "
                                     f"{'requires' if gated else 'forbids'} decay and "
                                     f"{'requires' if delta else 'forbids'} beta")
        hq, hkv = node.attr("q_num_heads"), node.attr("kv_num_heads")
        f32 = torch.float32 if query.dtype != torch.float64 else torch.float64
        b, t, _ = query.shape
        dk, dv = query.shape[-1] // hq, value.shape[-1] // hkv
        q = _split_heads(query.to(f32), hq)
        k = _split_heads(key.to(f32), hkv)
        v = _split_heads(value.to(f32), hkv)
        g = None
        if decay is not None:
            g = decay.to(f32).reshape(b, t, hkv, -1).transpose(1, 2)  # (B, Hkv, T, 1 or dk)
        bt = None
        if beta is not None:
            bt = beta.to(f32).reshape(b, t, beta.shape[-1], 1).transpose(1, 2)  # (B, Hkv or 1, T, 1)
        if past_state is not None:
            state, state_dtype = past_state.to(f32), past_state.dtype
        else:
            state = torch.zeros(b, hkv, dk, dv, dtype=f32, device=query.device)
            state_dtype = query.dtype
        scale = node.attr("scale", 0.0) or 1.0 / math.sqrt(dk)
        group = hq // hkv
        outs = []
        for i in range(t):
            kt, vt = k[:, :, i], v[:, :, i]
            if g is not None:
                state = state * torch.exp(g[:, :, i]).unsqueeze(-1)
            if bt is not None:
                retrieved = torch.einsum("bhdm,bhd->bhm", state, kt)
                vt = bt[:, :, i] * (vt - retrieved)
            state = state + kt.unsqueeze(-1) * vt.unsqueeze(-2)
            read = state.repeat_interleave(group, dim=1) if group > 1 else state
            outs.append(scale * torch.einsum("bhd,bhdm->bhm", q[:, :, i], read))
        out = torch.stack(outs, 2) if outs else torch.zeros(b, hq, 0, dv, dtype=f32, device=query.device)
        out = out.transpose(1, 2).reshape(b, t, hq * dv).to(query.dtype)
        return out, state.to(state_dtype)

