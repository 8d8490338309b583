"""Pooling tactic for the CPU: MaxPool / AveragePool (2-D) and global / spatial-mean pooling.

The window geometry (auto_pad, pads, ceil_mode) is resolved once at kernel build from the static
input sizes, so an inference is one torch pooling call (2x2/stride-2 max pooling: two maxima of
strided views, which skips the indices aten's pooling computes). torch's CPU pooling kernels keep the
channels-last layout of their input (what the oneDNN convolutions produce), so no reformat happens
between a conv chain and its pools. Geometries torch cannot express (asymmetric pads, pads larger
than half a window) stay with the reference tactic, and so do nodes the reference itself refuses
(`kiln.ops.pool.Window`: attribute lists without one value per spatial dim, sizes above
`kiln.ops.conv.MAX_WINDOW`, a window larger than the padded input): every loop here runs at most once per
tap of a window that fits its (static) input.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, is_f32, shape_hint
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.ir.graph import Node
from kiln.ops.conv import MAX_WINDOW
from kiln.ops.pool import Window

Tensor = torch.Tensor

SEPARABLE_MAX_TAPS = 64
"""Largest window side the separable max pool takes: it runs 2k - 1 elementwise passes per axis, which only
pay off for small windows (aten's pool wins long before), so a plan cannot make it loop by a huge kernel."""


def _window(node: Node) -> Window | None:
    """The pooling geometry at the node's static input sizes, when torch's own pooling realises it; None
    for a geometry the reference refuses (wrong attribute lengths, sizes above MAX_WINDOW, a window larger
    than the padded input) and for a dynamic spatial size."""
    x = node.input(0)
    hint = shape_hint(x) if x is not None else None  # type: ignore[arg-type]
    if hint is None or len(hint) != 4:
        return None
    try:
        win = Window(node, torch.empty(hint, device="meta"), ranks=(2,))
    except Exception:
        return None
    return win if win.torch_ceil_mode() is not None else None


def spatial_mean(node: Node) -> tuple[bool, bool] | None:
    """(is a mean over H, W; keepdims) for ReduceMean nodes reducing exactly axes 2 and 3 of a 4-D input."""
    if node.op_type != "ReduceMean":
        return None
    axes = node.attr("axes", None)
    if axes is None and node.input(1) is not None and node.inputs[1].const is not None:  # type: ignore[union-attr]
        axes = [int(a) for a in node.inputs[1].const.reshape(-1).tolist()]  # type: ignore[union-attr]
    if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
        return None
    return True, bool(int(node.attr("keepdims", 1)))


class CpuPoolTactic(CpuTactic):
    """MaxPool / AveragePool / GlobalAveragePool / GlobalMaxPool / spatial ReduceMean, channels-last friendly."""

    id = "cpu.pool"

    torch_dispatch = True
    priority = 10
    ops = (("", "MaxPool"), ("", "AveragePool"), ("", "GlobalAveragePool"), ("", "GlobalMaxPool"),
           ("", "ReduceMean"))

    def accepts(self, node: Node) -> bool:
        x = node.input(0)
        if not is_f32(x) or x.type.rank != 4 or len(node.outputs) != 1:  # type: ignore[union-attr]
            return False
        op = node.op_type
        if op in ("GlobalAveragePool", "GlobalMaxPool"):
            return True
        if op == "ReduceMean":
            return spatial_mean(node) is not None
        win = _window(node)
        if win is None:
            return False
        return op == "MaxPool" or win.dilations == [1, 1]

    def configs(self, node: Node, ctx: Any) -> list[dict[str, Any]]:
        win = _window(node) if node.op_type == "MaxPool" else None
        if win is None:
            return [{}]
        algos = (["separable"] if _separable_ok(win) else []) + ["aten"]
        return [{"algo": a} for a in algos]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        op = node.op_type
        if op == "GlobalAveragePool":
            return _global_avg(True)
        if op == "GlobalMaxPool":
            def k_gmax(x: Tensor, *_: Any) -> Tensor:
                return torch.amax(x, (2, 3), keepdim=True)
            return k_gmax
        if op == "ReduceMean":
            kernel = _global_avg(spatial_mean(node)[1])  # type: ignore[index]
            return Kernel(kernel, prepacked=frozenset({1}))  # the axes input is baked in
        win = _window(node)
        assert win is not None
        kernel_size, stride, pad, dil = win.kernel, win.strides, win.begin, win.dilations
        ceil = bool(win.torch_ceil_mode())
        if op == "MaxPool":
            if kernel_size == [2, 2] and stride == [2, 2] and pad == [0, 0] and dil == [1, 1] and not ceil:
                return _max_pool_2x2
            if config.get("algo") == "separable" and _separable_ok(win):
                return _separable_max_pool(win)
            mp = getattr(torch.ops.aten.max_pool2d.default, "_op", torch.ops.aten.max_pool2d.default)

            def k_max(x: Tensor) -> Tensor:
                return mp(x, kernel_size, stride, pad, dil, ceil)
            return k_max
        include_pad = bool(int(node.attr("count_include_pad", 0)))
        ap = torch.ops.aten.avg_pool2d.default

        def k_avg(x: Tensor) -> Tensor:
            return ap(x, kernel_size, stride, pad, ceil, include_pad)
        return k_avg


def _max_pool_2x2(x: Tensor) -> Tensor:
    """2x2 / stride 2 max pooling as two maxima of strided views (aten's pool also computes indices)."""
    oh, ow = x.shape[2] // 2, x.shape[3] // 2
    rows = torch.maximum(x[:, :, 0:2 * oh:2], x[:, :, 1:2 * oh:2])
    return torch.maximum(rows[:, :, :, 0:2 * ow:2], rows[:, :, :, 1:2 * ow:2])


def _axis_taps(n: int, k: int, s: int, p: int) -> tuple[int, list[tuple[int, int, slice]]]:
    """Output length of one pooled axis and, per window tap, (first, last + 1) output index it reaches
    inside the input and the strided input slice feeding those outputs."""
    if not (0 < n and 0 < k <= MAX_WINDOW and 0 < s <= MAX_WINDOW and 0 <= p <= MAX_WINDOW):
        raise ValueError(f"pool axis of size {n} with kernel {k}, stride {s}, pad {p} is out of bounds")
    out = (n + 2 * p - k) // s + 1
    taps: list[tuple[int, int, slice]] = []
    if out <= 0:
        return out, taps
    # only taps t with 0 <= j * s + t - p < n for some output j read the input: p - (out - 1) * s <= t < p + n
    for t in range(max(0, p - (out - 1) * s), min(k, p + n)):
        off = t - p
        j0 = max(0, (-off + s - 1) // s)
        j1 = min(out, (n - 1 - off) // s + 1)
        if j1 > j0:
            start = j0 * s + off
            taps.append((j0, j1, slice(start, start + (j1 - j0 - 1) * s + 1, s)))
    return out, taps


def _separable_ok(win: Window) -> bool:
    """Floor-mode, undilated windows whose every axis has a tap covering all outputs (center tap)."""
    if (win.dilations != [1, 1] or win.begin != win.end or win.torch_ceil_mode()
            or max(win.kernel) > SEPARABLE_MAX_TAPS):
        return False
    for n, k, s, p in zip(win.sizes, win.kernel, win.strides, win.begin):
        try:
            out, taps = _axis_taps(n, k, s, p)
        except ValueError:
            return False
        if not any(j0 == 0 and j1 == out for j0, j1, _ in taps):
            return False
    return True


def _separable_max_pool(win: Window) -> Built:
    """Max pooling as a max over W taps, then over H taps: elementwise maxima of strided views, written
    in place (2k - 1 passes over small tensors instead of aten's per-window loop, which also stays
    channels-last)."""
    plan = []
    for dim, (n, k, s, p) in zip((3, 2), zip(win.sizes[::-1], win.kernel[::-1], win.strides[::-1], win.begin[::-1])):
        out, taps = _axis_taps(n, k, s, p)
        full = [t for t in taps if t[0] == 0 and t[1] == out]
        rest = [t for t in taps if t is not full[0] and (len(full) < 2 or t is not full[1])]
        plan.append((dim, full[:2], rest))

    def k_sep(x: Tensor) -> Tensor:
        for dim, full, rest in plan:
            key = [slice(None)] * 4

            def view(t: Tensor, sl: slice) -> Tensor:
                key[dim] = sl
                return t[tuple(key)]
            a = view(x, full[0][2])
            r = torch.maximum(a, view(x, full[1][2])) if len(full) > 1 else a.clone()
            for j0, j1, sl in rest:
                dst = view(r, slice(j0, j1))
                torch.max(dst, view(x, sl), out=dst)
            x = r
        return x
    return k_sep


def _global_avg(keep: bool) -> Built:
    def k_mean(x: Tensor, *_: Any) -> Tensor:
        return torch.mean(x, (2, 3), keep)
    return k_mean


register_tactic(CpuPoolTactic())
