"""Config S2D of the int8 conv (cuda.triton_qconv): a strided conv over few input channels (a network's stem,
7x7 / stride 2 over 3 channels) run as a stride-1 conv over its space-to-depth image.

A conv of stride s computes out[oh] = sum_kh x[s*oh - p + kh] w[kh] (per spatial dim; p its begin pad). With
e = ceil(p/s)*s - p, P = ceil(p/s) and kh = s*t + b - e (b in [0, s)), the input row is s*(oh - P + t) + b:
row oh - P + t of the space-to-depth image X2, whose "pixel" (r, q) holds the s x s input block at rows
s*r.. and columns s*q.. as s*s*C channels (block position, then channel). So the conv equals a stride-1 conv
over X2 with kernel ceil((K + e)/s) and begin pad P, its weight W2[t][(b, c)] = w[s*t + b - e] (zero where
that tap falls outside the kernel). ResNet-50's stem becomes a 4x4 conv over 12 channels (16 with a zero
tail), YOLOv4-tiny's 3x3 / stride-2 stem a 2x2 one.

The layout that makes it fast: X2 is written padded (the begin pad and the rows/columns past the image filled
with the input's raw zero point, as a padded tap would load) and its channels rounded up to CP, so one window
row of X2 (KW2 pixels of CP channels) is KW2*CP contiguous, aligned bytes. The conv then runs on config TAPS
over a view of X2 whose pixel (r, q) is that window row: a KH2 x 1 conv without padding over KW2*CP channels
(pixels overlap in memory; the kernel only reads). Same sums of products as the direct conv plus terms whose
weight is zero: bit-exact, the zero-point correction unchanged.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.backends.cuda.common import ConvGeometry, Out
from kiln.backends.cuda.triton_conv import _p2
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.cuda.triton_qconv import QuantEpilogue, qconv_taps

Tensor = torch.Tensor

_MAX_CP = 32  # s*s*C up to this (C <= 8 at stride 2): more channels gain nothing over TAPS on the input itself
_MAX_ROW = 128  # bytes of one X2 window row (the reduction step of the TAPS launch)


@dataclass(frozen=True)
class S2DPlan:
    """The space-to-depth form of one conv: stride s, C input channels padded to CP per X2 pixel, the stride-1
    kernel (kh2, kw2) over X2, X2's begin pads (ph2, pw2) and the tap shifts (eh, ew)."""

    s: int
    c: int
    cp: int
    kh2: int
    kw2: int
    ph2: int
    pw2: int
    eh: int
    ew: int

    @classmethod
    def of(cls, c: int, geo: ConvGeometry) -> "S2DPlan | None":
        """The plan for an ungrouped, undilated 2-D conv of equal strides >= 2 over c channels, else None."""
        if len(geo.kernel) != 2 or geo.group != 1 or tuple(geo.dilations) != (1, 1):
            return None
        s = int(geo.strides[0])
        if s < 2 or geo.strides[1] != s or s * s * c > _MAX_CP:
            return None
        cp = max(4, _p2(s * s * c))
        ph, pw = (int(p) for p in geo.pads[:2])
        eh, ew = -ph % s, -pw % s
        kh2, kw2 = -(-(geo.kernel[0] + eh) // s), -(-(geo.kernel[1] + ew) // s)
        if kw2 * cp > _MAX_ROW:
            return None
        return cls(s, c, cp, kh2, kw2, (ph + eh) // s, (pw + ew) // s, eh, ew)

    @property
    def row(self) -> int:
        """Bytes of one X2 window row: the channel count of the TAPS launch."""
        return self.kw2 * self.cp

    @functools.cached_property
    def geometry(self) -> ConvGeometry:
        """The TAPS launch's geometry: KH2 x 1, stride 1, no padding (X2 is padded in memory); made once."""
        return ConvGeometry((1, 1), (0, 0, 0, 0), (1, 1), 1, (self.kh2, 1))

    def pack_weight(self, w: Tensor) -> Tensor:
        """int8 [K_out, C, KH, KW] -> [K_out, KH2 * KW2 * CP]: kernel row t, then X2 column, then (b_h, b_w, c),
        zero where the tap falls outside the kernel or in the channel tail."""
        k_out, c, kh, kw = w.shape
        s = self.s
        w2 = torch.zeros((k_out, self.kh2, self.kw2, self.cp), dtype=w.dtype, device=w.device)
        for t in range(self.kh2):
            for u in range(self.kw2):
                for bh in range(s):
                    for bw in range(s):
                        i, j = s * t + bh - self.eh, s * u + bw - self.ew
                        if 0 <= i < kh and 0 <= j < kw:
                            blk = bh * s + bw
                            w2[:, t, u, blk * c:(blk + 1) * c] = w[:, :, i, j]
        return w2.reshape(k_out, -1).contiguous()

    def image(self, x: Tensor, oh: int, ow: int, pad: int) -> Tensor:
        """X2 of x [N, C, H, W] (any strides) for an output of oh x ow: [N, oh + KH2 - 1, ow + KW2 - 1, CP] in x's
        type, the positions outside the image holding `pad`."""
        n, c, h, w = x.shape
        h2, w2 = oh + self.kh2 - 1, ow + self.kw2 - 1
        x2 = torch.empty((n, h2, w2, self.cp), device=x.device, dtype=x.dtype)
        block = min(2048, _p2(w2 * self.cp))
        launch(_s2d_kernel, (n * h2, triton.cdiv(w2 * self.cp, block)), [
            x, x2, h, w, x.stride(0), x.stride(1), x.stride(2), x.stride(3), h2, w2, pad],
            dict(S=self.s, C=c, CP=self.cp, PH2=self.ph2, PW2=self.pw2, BLOCK=block))
        return x2

    def window_rows(self, x2: Tensor, ow: int) -> Tensor:
        """X2 seen as the TAPS launch's input: [N, KW2*CP, H2, ow] whose pixel (r, q) is the window row starting at
        X2's pixel (r, q) (channel stride 1; consecutive pixels overlap)."""
        n, h2, w2, cp = x2.shape
        return x2.as_strided((n, self.row, h2, ow), (h2 * w2 * cp, 1, w2 * cp, cp))

    def numel(self, n: int, oh: int, ow: int) -> int:
        """Elements of X2 for n images and an oh x ow output."""
        return n * (oh + self.kh2 - 1) * (ow + self.kw2 - 1) * self.cp


@triton.jit(do_not_specialize=["H", "W", "H2", "W2", "pad"])
def _s2d_kernel(x_ptr, y_ptr, H, W, sxn, sxc, sxh, sxw, H2, W2, pad,
                S: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, PH2: tl.constexpr, PW2: tl.constexpr,
                BLOCK: tl.constexpr):
    """X2[n, r, q, (b_h*S + b_w)*C + c] = x[n, c, S*(r - PH2) + b_h, S*(q - PW2) + b_w], `pad` outside the image
    and in the channel tail (it meets zero weights there). Program (n*H2 + r, j): block j of X2's row r."""
    row = tl.program_id(0)
    n = row // H2
    r = row - n * H2
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # q * CP + c2 within the row
    ok = offs < W2 * CP
    q = offs // CP
    c2 = offs % CP
    blk = c2 // C
    c = c2 - blk * C
    ih = S * (r - PH2) + blk // S
    iw = S * (q - PW2) + blk % S
    inside = ok & (blk < S * S) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    v = tl.load(x_ptr + n * sxn + c * sxc + ih * sxh + iw * sxw, mask=inside, other=pad)
    tl.store(y_ptr + row * (W2 * CP) + offs, v, mask=ok)


def s2d_configs(k_out: int, plan: S2DPlan) -> list[dict[str, Any]]:
    """Config S2D tiles (the TAPS kernel over X2's window rows): the reduction step one window row (at least 32)."""
    bk = max(32, _p2(plan.row))
    bn = min(64, max(32, _p2(k_out)))
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages,
             "S2D": True} for bm, warps, stages in ((128, 4, 4), (256, 8, 3), (64, 4, 4))]


def qconv_s2d(x: Tensor, wk: Tensor, qe: QuantEpilogue, z: Tensor | None, geo: ConvGeometry, plan: S2DPlan,
              cfg: dict[str, Any], out: Out = None) -> Tensor:
    """Config S2D of a conv of geometry `geo` over x [N, C, H, W] int8/uint8: X2 written, then config TAPS over
    its window rows with the weight of `plan.pack_weight` -> as qconv2d_nhwc."""
    oh, ow = geo.out_hw(x.shape[2], x.shape[3])
    x2 = plan.image(x, oh, ow, qe.x_pad)
    return qconv_taps(plan.window_rows(x2, ow), wk, qe, z, plan.geometry, cfg, out)
