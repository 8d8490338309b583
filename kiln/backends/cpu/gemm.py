"""oneDNN linear-layer tactic for FusedGemm, Gemm and MatMul with a constant weight (float32, CPU).

The weight is brought into ``[N, K]`` form once at kernel build (Gemm's ``transB``/``alpha`` and
``beta * C`` are folded into weight and bias; MatMul's ``[K, N]`` is transposed) and then reordered
for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``); an inference is one ``_linear_pointwise``
call with the activation as a post-op where oneDNN has it, the residual through the ``binary`` variant.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import (CpuTactic, act_attrs, const_float, inplace_activation, is_f32, onednn_unary,
                                      static_shape)
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.ir.graph import Node
from kiln.ops.activations import TABLE as ACTIVATION_TABLE

Tensor = torch.Tensor


def _has_linear() -> bool:
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


_LINEAR = _has_linear()


def _onnx(node: Node, op: str) -> bool:
    return node.op_type == op and node.domain in ("", "ai.onnx")


def _gemm_weights(node: Node, bf16: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """(W [N, K], bias [N] or None) of a Gemm whose B (and C) are constants and A is not transposed."""
    b, c = const_float(node.input(1), bf16), node.input(2)
    if b is None or b.dim() != 2 or int(node.attr("transA", 0)):
        return None
    w = b if int(node.attr("transB", 0)) else b.t()
    w = w * float(node.attr("alpha", 1.0))
    if c is None:
        return w.contiguous(), None
    ct = const_float(c, bf16)
    n = w.shape[0]
    if ct is None or ct.numel() not in (1, n) or (ct.dim() == 2 and ct.shape[-1] != ct.numel()) or ct.dim() > 2:
        return None
    bias = (ct.reshape(-1).expand(n) * float(node.attr("beta", 1.0))).contiguous()
    return w.contiguous(), bias


def linear_weights(node: Node, bf16: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """The node's weight as [N, K] (non-empty) and its bias (exactly N values), float32, or None when the node
    is not a constant-weight linear layer (of float32 constants; with `bf16`, float32 or bfloat16 ones)."""
    wb = _linear_weights(node, bf16)
    if wb is None or wb[0].numel() == 0 or (wb[1] is not None and (wb[1].dim() != 1
                                                                    or wb[1].numel() != wb[0].shape[0])):
        return None
    return wb


def _linear_weights(node: Node, bf16: bool) -> tuple[Tensor, Tensor | None] | None:
    if node.domain == "kiln" and node.op_type == "FusedGemm":
        w, b = const_float(node.input(1), bf16), const_float(node.input(2), bf16)
        if w is None or w.dim() != 2 or (node.input(2) is not None and b is None):
            return None
        return w.contiguous(), None if b is None else b.contiguous()
    if _onnx(node, "Gemm"):
        return _gemm_weights(node, bf16)
    if _onnx(node, "MatMul"):
        w = const_float(node.input(1), bf16)
        if w is None or w.dim() != 2:
            return None
        return w.t().contiguous(), None
    return None


class OneDnnLinearTactic(CpuTactic):
    """FusedGemm / Gemm / MatMul (constant weight) through oneDNN with a prepacked weight."""

    id = "cpu.linear_onednn"

    torch_dispatch = True
    priority = 10
    ops = (("kiln", "FusedGemm"), ("", "Gemm"), ("ai.onnx", "Gemm"), ("", "MatMul"), ("ai.onnx", "MatMul"))

    def accepts(self, node: Node) -> bool:
        if not _LINEAR:
            return False
        a = node.input(0)
        if not is_f32(a) or a.type.rank is None or a.type.rank < 2 or len(node.outputs) != 1:  # type: ignore[union-attr]
            return False
        if _onnx(node, "Gemm") and a.type.rank != 2:  # type: ignore[union-attr]
            return False
        if node.domain == "kiln":
            z = node.input(3)
            if (z is not None and not is_f32(z)) or act_attrs(node)[0] not in _ACTS:
                return False
        return linear_weights(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        w, b = linear_weights(node)  # type: ignore[misc]
        a_shape = node.inputs[0].type.shape  # type: ignore[union-attr]
        rows = 1
        for d in (a_shape or [])[:-1]:
            rows = rows * d if isinstance(d, int) else rows
        with torch.no_grad():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            except RuntimeError:
                packed = w
        fused = node.domain == "kiln"
        act, alpha, beta = act_attrs(node) if fused else ("", 0.0, 0.0)
        z = node.input(3) if fused else None
        before_add = bool(int(node.attr("act_before_add", 0))) if fused else False
        same_z = z is not None and static_shape(z) is not None and static_shape(z) == static_shape(node.outputs[0])
        kernel = linear_kernel(packed, b, act, alpha, beta, z is not None, before_add, same_z)
        return Kernel(kernel, prepacked=frozenset({1, 2}))  # weight and bias live in the kernel


_ACTS = tuple(ACTIVATION_TABLE)


def linear_kernel(w: Tensor, b: Tensor | None, act: str, alpha: float, beta: float, has_z: bool,
                  act_before_add: bool, same_z: bool) -> Built:
    """The per-inference closure of a linear layer (see the module doc)."""
    lin = torch.ops.mkldnn._linear_pointwise.default
    binary = torch.ops.mkldnn._linear_pointwise.binary
    unary = onednn_unary(act, alpha, beta)
    attr, scalars, alg = unary if unary is not None else ("none", [], "")
    post = inplace_activation(act, alpha, beta) if unary is None else None
    if not has_z:
        if post is None:
            def k_plain(a: Tensor, *_: Any) -> Tensor:
                return lin(a.contiguous(), w, b, attr, scalars, alg)
            return k_plain

        def k_post(a: Tensor, *_: Any) -> Tensor:
            return post(lin(a.contiguous(), w, b, "none", [], ""))
        return k_post
    full = inplace_activation(act, alpha, beta)
    if not act_before_add:
        if same_z:
            def k_binary(a: Tensor, _w: Any, _b: Any, z: Tensor) -> Tensor:
                y = binary(a.contiguous(), z.contiguous(), w, b, "add")
                return y if full is None else full(y)
            return k_binary

        def k_add_act(a: Tensor, _w: Any, _b: Any, z: Tensor) -> Tensor:
            y = lin(a.contiguous(), w, b, "none", [], "").add_(z)
            return y if full is None else full(y)
        return k_add_act

    def k_act_add(a: Tensor, _w: Any, _b: Any, z: Tensor) -> Tensor:
        y = lin(a.contiguous(), w, b, attr, scalars, alg)
        if post is not None:
            post(y)
        return y.add_(z)
    return k_act_add


register_tactic(OneDnnLinearTactic())
