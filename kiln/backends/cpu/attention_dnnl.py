"""Attention on the CPU as two oneDNN matmuls around a C softmax (tactic ``cpu.attention_dnnl``, float32).

scores = scale * Q K^T (a oneDNN batched matmul over [B, H]; Q and K read through their strided head views, the
scale a post-op), the masked softmax in place over each row (``kiln_softmax`` in ``native/act.c``: the mask added
or applied by strides, causal keys dropped, the polynomial exp), then out = P V written straight into the layer's
output view (the 3-D form's [B, Sq, H, Dv] head layout). oneDNN's brgemm matmul runs these products at ~190
GFLOP/s on a 2-core AVX-512 EPYC where torch's batched matmul ran ~120, and the flash kernel of torch's SDPA
(``attention.sdpa``) took 0.84 ms for DeiT-S's 6 x 197 x 64 heads. It competes with SDPA under the autotuner.
Takes what `attention.spec` admits in float32, grouped-query attention too (K/V heads fewer than Q heads: each
K/V head is repeated into its query heads' rows by the dense copy the products read anyway); other layers (and
shapes the views reject) run the reference.
"""
from __future__ import annotations

import ctypes as C
import threading
from typing import Any

import torch

from kiln.backends.attention import mask_fits, merged_output, spec, views
from kiln.backends.cpu.activation_c import library as act_library
from kiln.backends.cpu.common import CpuTactic
from kiln.backends.cpu.dnnl import ARG_DST, ARG_SRC, ARG_WEIGHTS, FLOAT32, library, require_library
from kiln.backends.cpu.dnnl_epilogue import post_ops
from kiln.backends.cpu.dnnl_primitive import Primitive
from kiln.backends.tactic import Built, Kernel, TacticContext, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node
from kiln.ops.registry import lookup

Tensor = torch.Tensor


class Product(Primitive):
    """One oneDNN batched matmul dst = scale * (a @ b) of fixed shapes and strides, all three operands given at
    each call: `run(a, b, dst)`."""

    def __init__(self, lib: Any, a: Tensor, b: Tensor, dst: Tensor, scale: float = 1.0) -> None:
        tmp = self._begin(lib)
        try:
            if a.dim() != b.dim() or a.shape[-1] != b.shape[-2] or dst.shape[-1] != b.shape[-1]:
                raise KilnError(f"a matmul of {list(a.shape)} by {list(b.shape)} cannot write {list(dst.shape)}")
            mds = [lib.md(tmp, t.shape, t.stride()) for t in (a, b, dst)]
            attr, _, _ = post_ops(lib, tmp, "", 0.0, 0.0, None, False, out_scale=scale)
            pd = lib.pd(tmp, "matmul descriptor", lib.dll.dnnl_matmul_primitive_desc_create, lib.engine, mds[0],
                        mds[1], None, mds[2], attr)
            self._finish(pd, [], [(ARG_SRC, mds[0], FLOAT32), (ARG_WEIGHTS, mds[1], FLOAT32),
                                  (ARG_DST, mds[2], FLOAT32)])
        finally:
            tmp.close()


def _mask_args(mask: Tensor | None, shape: tuple[int, int, int, int]) -> tuple[Tensor | None, int, list[int]]:
    """(the mask as float32 or bool, its kind for kiln_softmax, its element strides over [B, H, Sq, Skv])."""
    if mask is None:
        return None, 0, [0, 0, 0, 0]
    m = mask if mask.dtype in (torch.bool, torch.float32) else mask.float()
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(shape)
    return m, (2 if m.dtype == torch.bool else 1), list(m.stride())


class CpuAttention(CpuTactic):
    """Attention as oneDNN matmul -> C masked softmax -> oneDNN matmul (see module doc)."""

    id = "cpu.attention_dnnl"
    priority = 5
    writes_out = 1  # into the layer's arena slot (dense), so the call binds and so do the layers reading it
    strided_out = False
    ops = (("", "Attention"), ("ai.onnx", "Attention"))

    def accepts(self, node: Node) -> bool:
        s = spec(node)
        if s is None or library() is None or act_library() is None:
            return False
        q, k = node.inputs[0], node.inputs[1]
        if q.type.dtype is None or q.type.dtype.torch != torch.float32:
            return False
        if s.rank3:
            return s.q_heads % s.kv_heads == 0
        if q.type.shape is None or k.type.shape is None:
            return True
        hq, hk = q.type.shape[1], k.type.shape[1]  # type: ignore[index]
        return not (isinstance(hq, int) and isinstance(hk, int)) or (hk > 0 and hq % hk == 0)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        return [{}]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = require_library(node, self.id)
        soft = act_library().kiln_softmax  # type: ignore[union-attr]
        s = spec(node)
        assert s is not None
        reference = lookup(node.op_type, node.domain).compute
        prims: dict[tuple[Any, ...], tuple[Product, Product]] = {}
        local = threading.local()

        def scratch(name: str, shape: tuple[int, ...]) -> Tensor:
            """This thread's dense buffer `name` of this shape (kept from call to call)."""
            have = getattr(local, name, None)
            if have is None or tuple(have.shape) != shape:
                with torch.inference_mode(False):  # a normal tensor: written in place inside inference mode or not
                    have = torch.empty(shape)
                setattr(local, name, have)
            return have

        def prepare(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor | None) -> Any:
            """Everything one call needs for these tensors (primitives, this thread's buffers, the mask's strides),
            or None where the reference decides (shapes the views reject, other dtypes, a destination it cannot
            write)."""
            vs = views(s, q, k, v)
            if vs is None or any(t.dtype != torch.float32 for t in (q, k, v)) or not mask_fits(mask, vs[0], vs[1]) \
                    or (mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point):
                return None
            rep = int(vs[0].shape[1]) // int(vs[1].shape[1])  # grouped-query attention: K/V heads repeated on copy
            y, y4 = merged_output(s, vs[0], vs[2])
            if out is not None:
                if out.shape != y.shape or out.dtype != y.dtype or not out.is_contiguous():
                    return None
                y = out
                y4 = y.view(y4.shape[0], y4.shape[2], y4.shape[1], y4.shape[3]).transpose(1, 2) if s.rank3 else y
            # dense copies of the head views (a few us): oneDNN runs its brgemm kernel on dense operands and a
            # slower jit gemm on the strided views of a fused QKV projection
            heads = int(vs[0].shape[1])
            q4 = scratch("q", tuple(vs[0].shape))
            kt_shape = vs[1].transpose(-1, -2).shape
            kt = scratch("kt", (kt_shape[0], heads, *kt_shape[2:]))
            v4 = scratch("v", (vs[2].shape[0], heads, *vs[2].shape[2:]))
            b, h, sq, skv = int(q4.shape[0]), int(q4.shape[1]), int(q4.shape[2]), int(kt.shape[3])
            sc = scratch("scores", (b, h, sq, skv))
            key = (q4.shape, v4.shape, y4.stride())
            pair = prims.get(key)
            if pair is None:
                scale = s.scale if s.scale is not None else float(q4.shape[-1]) ** -0.5
                pair = prims[key] = (Product(lib, q4, kt, sc, scale), Product(lib, sc, v4, y4))
            m, kind, ms = _mask_args(mask, (b, h, sq, skv))
            soft_args = (C.c_void_p(sc.data_ptr()), b, h, sq, skv, C.c_void_p(None if m is None else m.data_ptr()),
                         kind, *ms, int(s.causal))
            kt_src, v_src = vs[1].transpose(-1, -2), vs[2]
            if rep > 1:  # each K/V head copied into its rep query heads' slots: the same one copy as without GQA
                kt_src, v_src, kt_dst, v_dst = kt_src.unsqueeze(2), v_src.unsqueeze(2), kt.unflatten(1, (-1, rep)), \
                    v4.unflatten(1, (-1, rep))
            else:
                kt_dst, v_dst = kt, v4
            return (vs[0], kt_src, v_src, q4, kt_dst, v_dst, kt, v4, sc, y, y4, pair, soft_args, m)

        def run(p: Any) -> Tensor:
            q_src, kt_src, v_src, q4, kt_dst, v_dst, kt, v4, sc, y, y4, pair, soft_args, _ = p
            q4.copy_(q_src)
            kt_dst.copy_(kt_src)
            v_dst.copy_(v_src)
            pair[0].run(q4, kt, sc)
            if soft(*soft_args, torch.get_num_threads()) != 0:
                raise KilnError(f"'{node.name}': the attention softmax failed")
            pair[1].run(sc, v4, y4)
            return y

        def k_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                        out: Tensor | None = None) -> Tensor:
            p = prepare(q, k, v, mask, out)
            if p is None:
                y = reference(node, q, k, v, mask)
                if out is None:
                    return y  # type: ignore[return-value]
                out.copy_(y)
                return out
            return run(p)

        def bind(args: Any, out: Any) -> Any:
            if not isinstance(out, Tensor) or len(args) < 3:
                return None
            p = prepare(args[0], args[1], args[2], args[3] if len(args) > 3 else None, out)
            return None if p is None else (lambda: run(p))

        def release() -> None:
            for a, b in prims.values():
                a.close()
                b.close()
            prims.clear()
        return Kernel(k_attention, release=release, out_format="contiguous", bind=bind)


register_tactic(CpuAttention())
