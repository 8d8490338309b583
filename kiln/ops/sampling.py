"""Spatial sampling: GridSample (nearest/linear/cubic, zeros/border/reflection, any spatial rank) and AffineGrid.

GridSample follows the ONNX reference semantics: an out-of-range coordinate is first clamped
(border) or reflected (reflection) as a whole, then every interpolation tap is padded on its own;
nearest rounds half to even. One exception, cubic with border padding, clamps only the taps, as
onnxruntime and torch do (the ONNX reference also clamps the coordinate; no conformance case
covers it).
"""
from __future__ import annotations

import itertools

import torch

from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ops.conv import require_float
from kiln.ops.registry import OpDef, ints, register

Tensor = torch.Tensor

_MODES = {"bilinear": "linear", "linear": "linear", "nearest": "nearest", "bicubic": "cubic", "cubic": "cubic"}
_PADDINGS = ("zeros", "border", "reflection")
_CUBIC_A = -0.75


def _reflect(x: Tensor, lo: float, hi: float) -> Tensor:
    """Reflect x off the borders lo and hi until it lies in [lo, hi]."""
    rng = hi - lo
    if rng <= 0:
        return torch.full_like(x, lo)
    below, above = x < lo, x > hi
    dx = torch.where(below, lo - x, x - hi)
    n = torch.trunc(dx / rng)
    r = dx - n * rng
    even = torch.remainder(n, 2) == 0
    from_below = torch.where(even, lo + r, hi - r)
    from_above = torch.where(even, hi - r, lo + r)
    return torch.where(below, from_below, torch.where(above, from_above, x))


def _cubic_weights(t: Tensor) -> list[Tensor]:
    """Keys cubic convolution weights of the taps at -1, 0, 1, 2 for fractional offset t."""
    a = _CUBIC_A

    def near(d: Tensor) -> Tensor:
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: Tensor) -> Tensor:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@register
class GridSample(OpDef):
    op_type = "GridSample"
    opsets = (16, 28)

    def compute(self, node: Node, x: Tensor, grid: Tensor) -> Tensor:
        require_float(node, x, grid)
        mode = _MODES.get(node.attr("mode", "bilinear" if node.opset < 20 else "linear"))
        padding = node.attr("padding_mode", "zeros")
        if mode is None or padding not in _PADDINGS:
            raise UnsupportedOpError(f"node '{node.name}': GridSample mode '{node.attr('mode')}' / "
                                     f"padding_mode '{padding}' is not supported")
        align = bool(node.attr("align_corners", 0))
        nd = x.dim() - 2
        if nd < 1 or grid.dim() != nd + 2 or int(grid.shape[-1]) != nd:
            raise UnsupportedOpError(f"node '{node.name}': GridSample grid shape {tuple(grid.shape)} does not "
                                     f"match input shape {tuple(x.shape)}")
        n, c = int(x.shape[0]), int(x.shape[1])
        sizes = [int(s) for s in x.shape[2:]]
        out_sizes = [int(s) for s in grid.shape[1:-1]]
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = grid.to(dt).reshape(n, -1, nd)
        coords, bounds = [], []
        for i, size in enumerate(sizes):
            v = g[..., nd - 1 - i]
            if align:
                p, lo, hi = (v + 1) / 2 * (size - 1), 0.0, size - 1.0
            else:
                p, lo, hi = ((v + 1) * size - 1) / 2, -0.5, size - 0.5
            if mode == "nearest":
                p = torch.round(p)
            if padding == "border" and mode != "cubic":
                p = torch.where((p < lo) | (p > hi), p.clamp(0, size - 1), p)
            elif padding == "reflection":
                p = _reflect(p, lo, hi)
            coords.append(p)
            bounds.append((lo, hi))

        taps: list[list[tuple[Tensor, Tensor | None]]] = []  # per dim: (index, weight) of each tap
        for p in coords:
            if mode == "nearest":
                taps.append([(torch.trunc(p), None)])
                continue
            base = torch.floor(p)
            t = p - base
            if mode == "linear":
                taps.append([(base, 1 - t), (base + 1, t)])
            else:
                taps.append([(base + k - 1, w) for k, w in enumerate(_cubic_weights(t))])

        flat = x.reshape(n, c, -1)
        out = torch.zeros((n, c, g.shape[1]), dtype=dt, device=x.device)
        for combo in itertools.product(*taps):
            index = None
            weight = None
            valid = None
            for i, (idx, w) in enumerate(combo):
                size = sizes[i]
                if padding == "zeros":
                    ok = (idx >= 0) & (idx <= size - 1)
                    valid = ok if valid is None else valid & ok
                elif padding == "reflection":
                    idx = torch.trunc(_reflect(idx, *bounds[i]))
                ii = idx.clamp(0, size - 1).to(torch.int64)
                index = ii if index is None else index * size + ii
                if w is not None:
                    weight = w if weight is None else weight * w
            vals = torch.gather(flat, 2, index.unsqueeze(1).expand(n, c, -1)).to(dt)  # type: ignore[union-attr]
            if weight is None:
                weight = torch.ones_like(vals[:, 0])
            if valid is not None:
                weight = weight * valid
            out = out + vals * weight.unsqueeze(1)
        return out.reshape(n, c, *out_sizes).to(x.dtype)


@register
class AffineGrid(OpDef):
    op_type = "AffineGrid"
    opsets = (20, 28)
    value_inputs = (1,)

    def compute(self, node: Node, theta: Tensor, size: Tensor) -> Tensor:
        require_float(node, theta)
        shape = ints(size)
        nd = len(shape) - 2
        if nd not in (2, 3) or tuple(theta.shape[1:]) != (nd, nd + 1):
            raise UnsupportedOpError(f"node '{node.name}': AffineGrid theta {tuple(theta.shape)} does not match "
                                     f"size {shape}")
        align = bool(node.attr("align_corners", 0))
        dt = torch.float32 if theta.dtype in (torch.float16, torch.bfloat16) else theta.dtype
        axes = []
        for s in shape[2:]:
            r = torch.arange(s, device=theta.device, dtype=dt)
            if align:
                axes.append(r * (2.0 / (s - 1)) - 1 if s > 1 else r - 1)
            else:
                axes.append((2 * r + 1) / s - 1)
        mesh = torch.meshgrid(*axes, indexing="ij")  # spatial dims in order (D,) H, W
        ones = torch.ones_like(mesh[0])
        base = torch.stack([*reversed(mesh), ones], -1).reshape(-1, nd + 1)  # (x, y[, z], 1)
        grid = torch.matmul(base.unsqueeze(0), theta.to(dt).transpose(1, 2))
        return grid.reshape(int(theta.shape[0]), *shape[2:], nd).to(theta.dtype)
