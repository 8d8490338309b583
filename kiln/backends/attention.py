"""Fused attention tactics shared by both targets: the forms fast kernels take, and torch's SDPA.

The Attention layers FuseAttention (kiln.passes.attention) makes, and opset-23 models' own, come in two
forms: 4-D (Q [B, H, Sq, D], K [B, Hkv, Skv, D], V [B, Hkv, Skv, Dv] -> [B, H, Sq, Dv]) and 3-D (Q
[B, Sq, H*D], K/V [B, Skv, Hkv*D] -> [B, Sq, H*Dv], heads by q_num_heads / kv_num_heads). A fast kernel
takes either as strided 4-D views (`heads`): the 3-D form's head split is a view, and its output is
written through a [B, Sq, H, Dv] view of the [B, Sq, H*Dv] result, so no layer copies heads.

`spec` says whether a node is one that fast kernels run: Q, K, V and an optional mask (float additive, or
bool where True attends) broadcastable to [B, H, Sq, Skv] over the whole key length, at most `is_causal`
and `scale` set (no past/present key values, softcap, windows, other qk outputs), float16 / bfloat16 /
float32, and a float32 softmax (softmax_precision 1, as FuseAttention sets it; an imported float16 layer
without it asks for a float16 softmax, which the reference computes). Anything else runs the reference
(kiln.ops.attention).

``attention.sdpa``: torch's scaled_dot_product_attention, each of its backends a config the autotuner
times (flash and efficient kernels, cuDNN on the GPU; on the CPU its flash kernel and its unfused math).
A row whose keys are all masked gives zeros, as the reference: torch gives NaN there, so a masked call
clears NaNs from its result.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node

Tensor = torch.Tensor
FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AttentionSpec:
    """What a fast kernel needs to know about an Attention layer."""

    rank3: bool            # the 3-D form (heads by q_num_heads / kv_num_heads)
    q_heads: int           # 3-D form only (0 for 4-D)
    kv_heads: int
    scale: float | None    # None: 1 / sqrt(D)
    causal: bool
    has_mask: bool


def _same_head_dims(node: Node, s: AttentionSpec) -> bool:
    """Whether Q's and V's head dims are known equal (LeViT's V heads are wider than its Q/K heads)."""
    q, v = node.inputs[0].type.shape, node.inputs[2].type.shape  # type: ignore[union-attr]
    if q is None or v is None or not isinstance(q[-1], int) or not isinstance(v[-1], int):
        return False
    return q[-1] // (s.q_heads or 1) == v[-1] // (s.kv_heads or 1)


def spec(node: Node) -> AttentionSpec | None:
    """The layer's AttentionSpec when fast kernels run it (module doc), else None."""
    if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if not 3 <= len(node.inputs) <= 4 or any(v is None for v in node.inputs[:3]):
        return None
    if int(node.attr("qk_matmul_output_mode", 0) or 0) != 0 or float(node.attr("softcap", 0.0) or 0.0) != 0.0:
        return None
    if node.attr("left_window_size", -1) != -1 or node.attr("right_window_size", -1) != -1:
        return None
    q, k, v = node.inputs[:3]
    ranks = {x.type.rank for x in (q, k, v)}  # type: ignore[union-attr]
    dts = {x.type.dtype for x in (q, k, v)}  # type: ignore[union-attr]
    if len(ranks) != 1 or ranks.pop() not in (3, 4) or len(dts) != 1:
        return None
    dt = dts.pop()
    if dt is None or dt.torch not in FAST_DTYPES or node.outputs[0].type.dtype not in (None, dt):
        return None
    sp = node.attr("softmax_precision")
    if not (sp == 1 or (sp is None and dt.torch == torch.float32)):
        return None  # the kernels' softmax is float32; without the attribute ONNX asks for Q's own type
    rank3 = q.type.rank == 3  # type: ignore[union-attr]
    hq, hkv = int(node.attr("q_num_heads", 0) or 0), int(node.attr("kv_num_heads", 0) or 0)
    if rank3 and (hq <= 0 or hkv <= 0 or hq % hkv):
        return None
    mask = node.input(3)
    if mask is not None and (mask.type.rank is None or mask.type.rank > 4 or mask.type.dtype is None
                             or not (mask.type.dtype.is_float or mask.type.dtype.torch == torch.bool)):
        return None
    scale = node.attr("scale")
    return AttentionSpec(rank3, hq if rank3 else 0, hkv if rank3 else 0, None if scale is None else float(scale),
                         bool(int(node.attr("is_causal", 0) or 0)), mask is not None)


def heads(x: Tensor, n: int) -> Tensor:
    """[B, S, n*D] -> the [B, n, S, D] view."""
    return x.unflatten(-1, (n, x.shape[-1] // n)).transpose(1, 2)


def views(s: AttentionSpec, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """The 4-D views a kernel reads, or None when the shapes do not fit the spec (the reference decides)."""
    if s.rank3:
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or q.shape[-1] % s.q_heads or k.shape[-1] % s.kv_heads \
                or v.shape[-1] % s.kv_heads:
            return None
        q, k, v = heads(q, s.q_heads), heads(k, s.kv_heads), heads(v, s.kv_heads)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1] \
            or q.shape[-1] != k.shape[-1] or k.shape[2] != v.shape[2] or q.shape[0] != k.shape[0]:
        return None
    return q, k, v


def mask_fits(mask: Tensor | None, q4: Tensor, k4: Tensor) -> bool:
    """The mask broadcasts to [B, H, Sq, Skv] and covers every key (no padding of a short mask)."""
    if mask is None:
        return True
    if mask.dim() > 4 or mask.shape[-1] != k4.shape[2]:
        return False
    want = (q4.shape[0], q4.shape[1], q4.shape[2], k4.shape[2])
    return all(m in (1, w) for m, w in zip(reversed(mask.shape), reversed(want)))


def merged_output(s: AttentionSpec, q4: Tensor, v4: Tensor) -> tuple[Tensor, Tensor]:
    """(the layer's output tensor, the [B, H, Sq, Dv] view of it a kernel writes)."""
    b, h, sq, dv = q4.shape[0], q4.shape[1], q4.shape[2], v4.shape[-1]
    if s.rank3:
        y = torch.empty((b, sq, h * dv), dtype=q4.dtype, device=q4.device)
        return y, y.view(b, sq, h, dv).transpose(1, 2)
    y = torch.empty((b, h, sq, dv), dtype=q4.dtype, device=q4.device)
    return y, y


def _backend(device: str, name: str) -> Callable[[], AbstractContextManager[Any]]:
    if name == "auto":
        return nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    return lambda: sdpa_kernel([which])


class SdpaAttention(Tactic):
    """Attention through torch's scaled_dot_product_attention, one config per backend (module doc)."""

    id = "attention.sdpa"
    devices = ("cpu", "cuda")
    priority = 15

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return spec(node) is not None

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        s = spec(node)
        assert s is not None, f"{self.id} does not support node {node.name}"
        flash = _same_head_dims(node, s)  # torch's flash kernels take one head dim for Q, K and V
        if ctx.device.type == "cuda":
            names = ["auto", "efficient", "cudnn"] + (["flash"] if flash and not s.has_mask else [])
        else:
            names = ["auto"] + (["flash"] if flash else []) + ["math"]
        return [{"backend": n} for n in names]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        s = spec(node)
        assert s is not None, f"{self.id} does not support node {node.name}"
        from kiln.ops.registry import lookup
        reference = lookup(node.op_type, node.domain).compute
        name = str(config.get("backend", "auto"))
        backend = _backend(device.type, name)
        fused = name not in ("auto", "math")  # torch's fused kernels read rows of stride 1 only
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def k_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
            vs = views(s, q, k, v)
            if vs is None or q.dtype not in FAST_DTYPES or not mask_fits(mask, vs[0], vs[1]) \
                    or q.dtype != k.dtype or q.dtype != v.dtype or (s.causal and mask is not None):
                return reference(node, q, k, v, mask)  # type: ignore[return-value]
            q4, k4, v4 = vs
            if fused:  # a head view whose last dim is strided (a packed qkv split head-major) is copied first
                q4, k4, v4 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q4, k4, v4))
            if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
                mask = mask.to(q.dtype)
            if mask is not None and mask.dim() < 4:  # torch's fused backends take 2-D or 4-D masks: [H, S, S] -> 4-D
                mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            if k4.shape[1] != q4.shape[1]:
                rep = q4.shape[1] // k4.shape[1]
                k4, v4 = k4.repeat_interleave(rep, 1), v4.repeat_interleave(rep, 1)
            with backend():
                y = sdpa(q4, k4, v4, attn_mask=mask, is_causal=s.causal, scale=s.scale)
            if mask is not None:
                y = torch.nan_to_num_(y, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
            if s.rank3:
                return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
            return y
        return Kernel(k_sdpa)


register_tactic(SdpaAttention())
