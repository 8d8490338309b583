"""Triton matmul with a fused epilogue: FusedGemm, MatMul by a constant, and 1x1 convs over NHWC.

y[M, N] = act(A[M, K] @ Wp[K, N] + bias (+ Z)) with A and Z read through their strides (an NHWC
activation is a [N*H*W, C] matrix view, so a stride-1 1x1 conv is a plain GEMM without copies).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.backends.cuda.common import (Epilogue, channels_last, check_out, conv_geometry, conv_static_ok, epilogue_of,
                                       float_io, nhwc_outs, out_list, prepacked, tf32_precision, write_out,
                                       Out)
from kiln.backends.cuda.cublas_gemm import gemm_static_ok, packed_weight
from kiln.backends.cuda.triton_act import finish, split_k_gather, tile_offsets, tile_schedule
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.cuda.triton_conv import split_k_bytes, split_k_workspace, tile_configs
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["M", "alpha", "beta", "has_bias", "has_z", "act", "act_before_add", "has_y2"])
def _gemm_kernel(
    a_ptr, w_ptr, b_ptr, z_ptr, y_ptr, y2_ptr, ws_ptr, cnt_ptr,
    M, N, K, sam, sak, szm, sym, sym2,
    alpha, beta,
    has_bias, has_z, act, act_before_add, has_y2,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    tile, pid_m, pid_n, it_lo, it_hi = tile_schedule(M, N, tl.cdiv(K, BLOCK_K), BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K)

    offs_m, offs_n, offs_k, m_mask, n_mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(it_lo * BLOCK_K, it_hi * BLOCK_K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        a = tl.load(a_ptr + offs_m[:, None] * sam + ks[None, :] * sak, mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(w_ptr.dtype.element_ty)
        b = tl.load(w_ptr + ks[:, None] * N + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        acc, y_mask = split_k_gather(acc, ws_ptr, cnt_ptr, tile, offs_m, offs_n, y_mask, N, SPLIT_K)
    z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if has_z != 0:
        z = tl.load(z_ptr + offs_m[:, None] * szm + offs_n[None, :], mask=y_mask, other=0.0).to(tl.float32)
    acc = finish(acc, b_ptr, offs_n, n_mask, z, has_bias, act, act_before_add, alpha, beta)
    tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    if has_y2 != 0:  # a second destination (a value written into two elided Concats)
        tl.store(y2_ptr + offs_m[:, None] * sym2 + offs_n[None, :], acc.to(y2_ptr.dtype.element_ty), mask=y_mask)


def gemm(a: Tensor, wp: Tensor, bias: Tensor | None, z: Tensor | None, y: Tensor, ep: Epilogue,
         cfg: dict[str, Any], allow_tf32: bool = True, y2: Tensor | None = None) -> Tensor:
    """y[M, N] = epilogue(a[M, K] @ wp[K, N]), also stored into y2 if given; z, y, y2 need unit column stride."""
    m, k = a.shape
    n = wp.shape[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = int(cfg.get("SPLIT_K", 1))
    ws, cnt = split_k_workspace(m, n, tiles, split, y)
    launch(_gemm_kernel, (tiles * split,), [
        a, wp, bias if bias is not None else y, z if z is not None else y, y, y2 if y2 is not None else y, ws, cnt,
        m, n, k, a.stride(0), a.stride(1), z.stride(0) if z is not None else 0, y.stride(0),
        y2.stride(0) if y2 is not None else 0,
        ep.alpha, ep.beta, int(bias is not None), int(z is not None), ep.code, int(ep.act_before_add),
        int(y2 is not None)],
        dict(PREC=tf32_precision(allow_tf32) if wp.dtype == torch.float32 else "tf32",
             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 8), SPLIT_K=split,
             num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3)))
    return y


def _rows(t: Tensor, cols: int) -> Tensor:
    """t viewed as a [rows, cols] matrix with unit column stride (copying only when no view exists)."""
    t2 = t.reshape(-1, cols)
    return t2 if t2.stride(1) == 1 or cols == 1 else t2.contiguous()


def _out_rows(out: Tensor, cols: int) -> Tensor | None:
    """`out` as a [rows, cols] matrix view with unit column stride, or None when it has none."""
    if out.stride(-1) != 1 and cols != 1:
        return None
    try:
        return out.view(-1, cols)
    except RuntimeError:
        return None


def _is_conv1x1(node: Node) -> bool:
    if not conv_static_ok(node):
        return False
    geo = conv_geometry(node)
    return geo.kernel == (1, 1) and geo.strides == (1, 1) and geo.pads == (0, 0, 0, 0) and geo.group == 1


class TritonGemm(Tactic):
    """FusedGemm / MatMul-by-constant / 1x1 conv as a Triton GEMM with the epilogue fused."""

    id = "cuda.triton_gemm"
    devices = ("cuda",)
    priority = 30
    writes_out = 2

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return (gemm_static_ok(node) or _is_conv1x1(node)) and float_io(node, cast_ok=True)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        w = node.inputs[1].const  # type: ignore[union-attr]
        if _is_conv1x1(node) or node.op_type == "FusedGemm":
            n, k = int(w.shape[0]), int(w.shape[1])
        else:
            k, n = int(w.shape[0]), int(w.shape[1])
        t = node.outputs[0].type
        m = None
        if t.is_static and t.shape:
            m = 1
            for d in t.shape:
                m *= int(d)  # type: ignore[arg-type]
            m //= n
        cfgs = tile_configs(m, n, k, int(ctx.extra.get("opt_level", 3)), k)
        if node.inputs[0].type.dtype == DType.FLOAT32:  # type: ignore[union-attr]
            cfgs = [{**cfg, "tf32": ctx.tf32} for cfg in cfgs]
        return cfgs

    def workspace_bytes(self, node: Node, config: dict[str, Any], out_shape: tuple[int, ...] | None = None) -> int:
        if not out_shape:
            return 0
        n = out_shape[1] if _is_conv1x1(node) and len(out_shape) == 4 else out_shape[-1]
        total = 1
        for d in out_shape:
            total *= d
        return split_k_bytes(total // max(n, 1), n, config)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        ep = epilogue_of(node)
        allow_tf32 = bool(config.get("tf32", True))
        b_in = node.input(2)
        bias = None if b_in is None or node.op_type == "MatMul" else b_in.const.to(device)  # type: ignore[union-attr]
        out_dtype = node.outputs[0].type.dtype.torch  # type: ignore[union-attr]
        name = node.name
        if _is_conv1x1(node):
            w = node.inputs[1].const.to(device)  # type: ignore[union-attr]
            k_out = int(w.shape[0])
            wp = w.reshape(k_out, -1).t().contiguous()

            def conv_kernel(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None,
                            out: Out = None) -> Tensor:
                x = channels_last(x) if x.stride(1) != 1 else x
                n, c, h, wd = x.shape
                if out is not None:
                    check_out(out, (n, k_out, h, wd), name)
                direct = out_list(out) if nhwc_outs(out) else ()
                y = direct[0] if direct else torch.empty((n, k_out, h, wd), device=x.device, dtype=out_dtype,
                                                         memory_format=torch.channels_last)
                y2 = direct[1].permute(0, 2, 3, 1).view(-1, k_out) if len(direct) > 1 else None
                a = _rows(x.permute(0, 2, 3, 1), c)
                z2 = None if z is None else _rows(z.permute(0, 2, 3, 1), k_out)
                gemm(a, wp, bias, z2, y.permute(0, 2, 3, 1).view(-1, k_out), ep, config, allow_tf32, y2)
                return y if direct else write_out(y, out)
            return prepacked(conv_kernel, (1, 2))

        wp = packed_weight(node, device).contiguous()  # [K, N]
        n_out = int(wp.shape[1])

        def gemm_kernel(a: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None,
                        out: Out = None) -> Tensor:
            lead = a.shape[:-1]
            if out is not None:
                check_out(out, (*lead, n_out), name)
            a2 = _rows(a, a.shape[-1])
            rows = [_out_rows(o, n_out) for o in out_list(out)]
            direct = all(r is not None for r in rows) and bool(rows)
            y = rows[0] if direct else torch.empty((a2.shape[0], n_out), device=a.device, dtype=out_dtype)
            z2 = None if z is None else _rows(z, n_out)
            gemm(a2, wp, bias, z2, y, ep, config, allow_tf32, rows[1] if direct and len(rows) > 1 else None)
            return out_list(out)[0] if direct else write_out(y.view(*lead, n_out), out)
        return Kernel(gemm_kernel, prepacked=frozenset({1, 2}), out_format="contiguous")

register_tactic(TritonGemm())
