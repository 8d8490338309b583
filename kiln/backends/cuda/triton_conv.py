"""Triton implicit-GEMM 2-D convolution over NHWC activations with a fused epilogue.

GEMM view: M = N*OH*OW output pixels, N = output channels, K = KH*KW*C. The weight is prepacked once
as [KH*KW*C, K_out] (tap-major, then input channel). The reduction loop walks (tap, channel block)
pairs in one flat loop so that Triton software-pipelines it; with few input channels (a network's
stem) config FLAT walks the flattened (tap, channel) index instead, so that one block spans several
taps. The epilogue adds the bias, the residual Z (read in place, any NHWC-compatible strides) and the
activation in float32, and stores in the output's type (the cast is fused), into a new channels-last
tensor or into one or two given destinations (slices of elided Concats). The input may be a
channel-sliced view and of another float type than the weight (converted on load).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kiln.backends.cuda.common import (ConvGeometry, Epilogue, apply_epilogue_, conv_geometry, conv_static_ok,
                                       check_out, epilogue_of, float_io, nhwc_outs, out_list, prepacked, tf32_precision,
                                       write_out, Out)
from kiln.backends.cuda.triton_act import conv_pixels, finish, split_k_gather, tile_offsets, tile_schedule
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node

Tensor = torch.Tensor
_I32 = 2**31 - 1


_RUNTIME = ["alpha", "beta", "has_bias", "has_z", "act", "act_before_add", "has_y2"]


@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "CB", "ITS",
                               *_RUNTIME])
def _conv2d_nhwc_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, y_ptr, y2_ptr, ws_ptr, cnt_ptr,
    M, C, H, W, K, OH, OW,
    sxn, sxh, sxw, szn, szh, szw, syn, syh, syw, s2n, s2h, s2w,
    KH, KW, SH, SW, PH, PW, DH, DW, CB, ITS,
    alpha, beta,
    has_bias, has_z, act, act_before_add, has_y2,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, FLAT: tl.constexpr,
):
    tile, pid_m, pid_n, it_lo, it_hi = tile_schedule(M, K, ITS, BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K)

    offs_m, offs_n, offs_k, m_mask, n_mask = tile_offsets(pid_m, pid_n, M, K, BLOCK_M, BLOCK_N, BLOCK_K)
    nb, oh, ow, ih0, iw0 = conv_pixels(offs_m, OH, OW, SH, SW, PH, PW)
    x_row = nb * sxn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(it_lo, it_hi):
        if FLAT:  # few input channels: one reduction step spans several taps (k = tap * C + c)
            ks = it * BLOCK_K + offs_k
            k_ok = ks < KH * KW * C
            tap_k = ks // C
            c_k = ks - tap_k * C
            kh_k = tap_k // KW
            ih2 = ih0[:, None] + (kh_k * DH)[None, :]
            iw2 = iw0[:, None] + ((tap_k - kh_k * KW) * DW)[None, :]
            a = tl.load(x_ptr + x_row[:, None] + ih2 * sxh + iw2 * sxw + c_k[None, :],
                        mask=m_mask[:, None] & k_ok[None, :] & (ih2 >= 0) & (ih2 < H) & (iw2 >= 0) & (iw2 < W),
                        other=0.0).to(w_ptr.dtype.element_ty)
            b = tl.load(w_ptr + ks[:, None] * K + offs_n[None, :], mask=k_ok[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
        else:
            tap = it // CB
            c0 = (it - tap * CB) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * DH
            iw = iw0 + kw * DW
            a_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            cs = c0 + offs_k
            c_mask = cs < C
            a = tl.load(x_ptr + (x_row + ih * sxh + iw * sxw)[:, None] + cs[None, :],
                        mask=a_mask[:, None] & c_mask[None, :], other=0.0).to(w_ptr.dtype.element_ty)
            b = tl.load(w_ptr + (tap * C + cs)[:, None] * K + offs_n[None, :],
                        mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)

    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        acc, y_mask = split_k_gather(acc, ws_ptr, cnt_ptr, tile, offs_m, offs_n, y_mask, K, SPLIT_K)
    z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if has_z != 0:
        z = tl.load(z_ptr + (nb * szn + oh * szh + ow * szw)[:, None] + offs_n[None, :],
                    mask=y_mask, other=0.0).to(tl.float32)
    acc = finish(acc, b_ptr, offs_n, n_mask, z, has_bias, act, act_before_add, alpha, beta)
    tl.store(y_ptr + (nb * syn + oh * syh + ow * syw)[:, None] + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    if has_y2 != 0:  # a second destination (a value written into two elided Concats)
        tl.store(y2_ptr + (nb * s2n + oh * s2h + ow * s2w)[:, None] + offs_n[None, :],
                 acc.to(y2_ptr.dtype.element_ty), mask=y_mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), most generally useful first; every distinct tile is
# one more Triton compile per epilogue variant, so optimization level 3 stops after the first five that fit
TILES: list[tuple[int, int, int, int, int]] = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (64, 64, 32, 4, 5),
    (32, 32, 32, 2, 4),
    (64, 32, 64, 4, 4),  # narrow layers (<= 32 output channels) get more than one tile to try
    (128, 32, 32, 4, 3),
]


def _p2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


SPLIT_TILES: list[tuple[int, int, int, int, int]] = [(64, 64, 64, 4, 4), (32, 64, 64, 4, 4)]
_TARGET_PROGRAMS = 264  # two waves on a 132-SM Hopper


def split_k_workspace(m: int, n: int, tiles: int, split: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Zeroed float32 partial sums [M, N] and int32 tile counters (one memset); dummies without split-K."""
    if split <= 1:
        return like, like
    cells = (m * n + 3) // 4 * 4  # counters start 16-byte aligned
    buf = torch.zeros(cells + tiles, dtype=torch.int32, device=like.device)
    return buf[:cells].view(torch.float32), buf[cells:]


def split_k_bytes(m: int, n: int, cfg: dict[str, Any]) -> int:
    """Bytes of split_k_workspace for an M x N output under a config (0 without split-K)."""
    if int(cfg.get("SPLIT_K", 1)) <= 1:
        return 0
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    return ((m * n + 3) // 4 * 4 + tiles) * 4


def split_configs(m: int | None, n: int, k_red: int) -> list[dict[str, Any]]:
    """Split-K configs for problems with few output tiles and a long reduction (small batch, wide layers)."""
    if m is None or k_red < 1024:
        return []
    out = []
    for bm, bn, bk, warps, stages in SPLIT_TILES:
        tiles = -(-m // bm) * -(-n // bn)
        if tiles >= _TARGET_PROGRAMS // 2:
            continue
        split = min(16, _p2(max(2, _TARGET_PROGRAMS // tiles)), max(2, k_red // (4 * bk)))
        split = 1 << (split.bit_length() - 1)
        if split >= 2:
            out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": split,
                        "num_warps": warps, "num_stages": stages})
    return out


def tile_configs(m: int | None, n: int, k: int | None, level: int, k_red: int | None = None) -> list[dict[str, Any]]:
    """Tile configs that fit a problem of M x N (reduction chunk k, whole reduction k_red): smaller tiles
    for small problems, plus split-K configs (level >= 2) when there are too few tiles to fill the GPU."""
    out = []
    for bm, bn, bk, warps, stages in TILES:
        if m is not None and bm > max(32, _p2(m)):
            continue
        if bn > max(32, _p2(n)) or (k is not None and bk > max(16, _p2(k))):
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                    "num_warps": warps, "num_stages": stages})
    if not out:
        out.append({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 2, "num_stages": 3})
    limit = {0: 1, 1: 2, 2: 3, 3: 5}.get(level, len(out))  # level 4+: every tile (more Triton compiles)
    out = out[:limit]
    if level >= 2 and k_red is not None:
        out += split_configs(m, n, k_red)
    return out


def pack_conv_weight(w: Tensor) -> Tensor:
    """[K, C, KH, KW] -> [KH*KW*C, K] contiguous (tap-major, then channel)."""
    k, c, kh, kw = w.shape
    return w.permute(2, 3, 1, 0).reshape(kh * kw * c, k).contiguous()


def _nhwc_ok(t: Tensor) -> Tensor:
    """A tensor whose channel stride is 1 and whose (h, w) strides let pixel rows be addressed directly."""
    if t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def nhwc_dests(out: Out, shape: tuple[int, ...], x: Tensor, out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """The one or two destinations a conv kernel stores into: those given, else a new channels-last tensor of
    `shape` in `out_dtype` (default x's); the second is the first when there is one only."""
    outs = out_list(out)
    y = outs[0] if outs else torch.empty(shape, device=x.device, dtype=out_dtype or x.dtype,
                                         memory_format=torch.channels_last)
    return y, outs[1] if len(outs) > 1 else y


def conv2d_nhwc(x: Tensor, wp: Tensor, bias: Tensor | None, z: Tensor | None, geo: ConvGeometry, ep: Epilogue,
                cfg: dict[str, Any], allow_tf32: bool = True, out: Out = None,
                out_dtype: torch.dtype | None = None) -> Tensor:
    """Launch the implicit-GEMM conv: x [N,C,H,W] (any NHWC-like strides, any float type: cast on load)
    -> y [N,K,OH,OW], channels_last in `out_dtype` (default x's), or stored into the one or two `out`
    tensors (channel stride 1)."""
    x = _nhwc_ok(x)
    n, c, h, w = x.shape
    k = wp.shape[1]
    oh, ow = geo.out_hw(h, w)
    y, y2 = nhwc_dests(out, (n, k, oh, ow), x, out_dtype)
    if z is not None:
        z = _nhwc_ok(z)
    m = n * oh * ow
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(m, bm) * triton.cdiv(k, bn)
    split = int(cfg.get("SPLIT_K", 1))
    ws, cnt = split_k_workspace(m, k, tiles, split, y)
    zs = (z.stride(0), z.stride(2), z.stride(3)) if z is not None else (0, 0, 0)
    flat = bool(cfg.get("FLAT", False))
    taps = geo.kernel[0] * geo.kernel[1]
    its = triton.cdiv(taps * c, bk) if flat else taps * triton.cdiv(c, bk)
    launch(_conv2d_nhwc_kernel, (tiles * split,), [
        x, wp, bias if bias is not None else y, z if z is not None else y, y, y2, ws, cnt,
        m, c, h, w, k, oh, ow,
        x.stride(0), x.stride(2), x.stride(3), zs[0], zs[1], zs[2], y.stride(0), y.stride(2), y.stride(3),
        y2.stride(0), y2.stride(2), y2.stride(3),
        geo.kernel[0], geo.kernel[1], geo.strides[0], geo.strides[1], geo.pads[0], geo.pads[1],
        geo.dilations[0], geo.dilations[1], triton.cdiv(c, bk), its,
        ep.alpha, ep.beta, int(bias is not None), int(z is not None), ep.code, int(ep.act_before_add),
        int(y2 is not y)],
        dict(PREC=tf32_precision(allow_tf32) if wp.dtype == torch.float32 else "tf32",
             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 8), SPLIT_K=split, FLAT=flat,
             num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3)))
    return y


class TritonConv(Tactic):
    """Implicit-GEMM conv in Triton with bias/residual/activation/cast fused; several tile configs."""

    id = "cuda.triton_conv"
    devices = ("cuda",)
    priority = 30
    writes_out = 2

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return conv_static_ok(node) and float_io(node, cast_ok=True) and conv_geometry(node).group == 1

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        w = node.inputs[1].const  # type: ignore[union-attr]
        k_out, c = int(w.shape[0]), int(w.shape[1])
        out_t = node.outputs[0].type
        m = None
        if out_t.is_static and out_t.rank == 4:
            s = out_t.shape
            m = int(s[0]) * int(s[2]) * int(s[3])  # type: ignore[arg-type]
        kh, kw = int(w.shape[2]), int(w.shape[3])
        cfgs = tile_configs(m, k_out, c, int(ctx.extra.get("opt_level", 3)), c * kh * kw)
        if c < 16 and kh * kw > 1:  # a stem conv: most of each per-tap channel block would be padding
            bn = 32 if k_out <= 32 else 64
            cfgs = [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "GROUP_M": 8, "FLAT": True, "num_warps": 4,
                     "num_stages": 3} for bm in (128, 64)] + cfgs
        if node.inputs[0].type.dtype == DType.FLOAT32:  # type: ignore[union-attr]
            cfgs = [{**cfg, "tf32": ctx.tf32} for cfg in cfgs]
        return cfgs

    def workspace_bytes(self, node: Node, config: dict[str, Any], out_shape: tuple[int, ...] | None = None) -> int:
        if out_shape is None or len(out_shape) != 4:
            return 0
        return split_k_bytes(out_shape[0] * out_shape[2] * out_shape[3], out_shape[1], config)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        geo = conv_geometry(node)
        ep = epilogue_of(node)
        w = node.inputs[1].const.to(device)  # type: ignore[union-attr]
        wp = pack_conv_weight(w)
        b_in = node.input(2)
        bias = None if b_in is None else b_in.const.to(device)  # type: ignore[union-attr]
        allow_tf32 = bool(config.get("tf32", True))
        k_out, c_in, kh, kw = (int(d) for d in w.shape)
        del w  # the device holds the packed weight only

        out_dtype = node.outputs[0].type.dtype.torch  # type: ignore[union-attr]

        def kernel(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None, out: Out = None) -> Tensor:
            oh, ow = geo.out_hw(x.shape[2], x.shape[3])
            if out is not None:
                check_out(out, (x.shape[0], k_out, oh, ow), node.name)
            if max(x.numel(), x.shape[0] * k_out * oh * ow) >= _I32:  # past int32 indexing: cuDNN
                w_nchw = wp.reshape(kh, kw, c_in, k_out).permute(3, 2, 0, 1)
                return write_out(_torch_conv(x.to(wp.dtype), w_nchw, bias, z, geo, ep).to(out_dtype), out)
            if not nhwc_outs(out):
                return write_out(conv2d_nhwc(x, wp, bias, z, geo, ep, config, allow_tf32, None, out_dtype), out)
            return conv2d_nhwc(x, wp, bias, z, geo, ep, config, allow_tf32, out, out_dtype)
        return prepacked(kernel, (1, 2))


def _torch_conv(x: Tensor, w: Tensor, b: Tensor | None, z: Tensor | None, geo: ConvGeometry,
                ep: Epilogue) -> Tensor:
    """Fallback for tensors past int32 indexing."""
    if not geo.symmetric:
        t, l, bo, r = geo.pads
        x = F.pad(x, [l, r, t, bo])
        padding = [0, 0]
    else:
        padding = [geo.pads[0], geo.pads[1]]
    y = F.conv2d(x, w, b, list(geo.strides), padding, list(geo.dilations), geo.group)
    return apply_epilogue_(y, z, ep).contiguous(memory_format=torch.channels_last)


register_tactic(TritonConv())
