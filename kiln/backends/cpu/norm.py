"""LayerNormalization on the CPU as one vectorised aten pass per row (``torch.nn.functional.layer_norm``).

ONNX LayerNormalization over the trailing axes ``[axis, rank)`` with float32 statistics (stash_type 1)
is exactly aten's layer_norm: biased variance, epsilon inside the square root, then scale and bias. The
scale and bias are constants broadcast once, at kernel build, to the normalized shape; the normalized
shape itself is read from the input at run time, so dynamic leading dims (batch, sequence) need nothing.
Only the Y output is produced (nodes asking for Mean / InvStdDev keep the reference). A non-contiguous
input (a Transpose view) is read through aten's own copy. A bfloat16 layer (a bf16 build) runs the same
call on bfloat16 rows with the float32 scale and bias: aten keeps the statistics and the arithmetic in float32
and rounds each result once, as the reference does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kiln.backends.cpu.common import CpuTactic, const_float
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.registry import norm_axis

Tensor = torch.Tensor


def _axis(node: Node) -> int | None:
    rank = node.inputs[0].type.rank if node.inputs and node.inputs[0] is not None else None
    if rank is None:
        return None
    a = int(node.attr("axis", -1))
    return norm_axis(a, rank) if -rank <= a < rank else None


def _affine(node: Node, i: int, norm: tuple[int, ...] | None) -> Tensor | None:
    """Scale (i=1) or bias (i=2) broadcast to the normalized shape; None if it does not fit."""
    c = const_float(node.input(i), bf16=True)
    if c is None or norm is None or c.dim() > len(norm):
        return None
    try:
        return torch.broadcast_to(c, norm).contiguous()
    except RuntimeError:
        return None


class CpuLayerNormTactic(CpuTactic):
    """LayerNormalization (Y only, float32 or bfloat16, constant scale/bias, static normalized dims) via aten
    layer_norm."""

    id = "cpu.layernorm"

    torch_dispatch = True
    ops = (("", "LayerNormalization"), ("ai.onnx", "LayerNormalization"))
    priority = 20

    @staticmethod
    def _norm(node: Node) -> tuple[int, ...] | None:
        axis = _axis(node)
        shape = node.inputs[0].type.shape
        if axis is None or shape is None or not all(isinstance(d, int) for d in shape[axis:]):
            return None
        return tuple(int(d) for d in shape[axis:])  # type: ignore[arg-type]

    def accepts(self, node: Node) -> bool:
        x = node.inputs[0]
        if len(node.outputs) != 1 or x is None or int(node.attr("stash_type", 1)) != 1:
            return False
        if x.type.dtype not in (DType.FLOAT32, DType.BFLOAT16) or node.outputs[0].type.dtype != x.type.dtype:
            return False
        norm = self._norm(node)
        return _affine(node, 1, norm) is not None and (node.input(2) is None or _affine(node, 2, norm) is not None)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        norm = self._norm(node)
        w = _affine(node, 1, norm)
        b = _affine(node, 2, norm) if node.input(2) is not None else None
        eps = float(node.attr("epsilon", 1e-5))
        shape = list(norm)  # type: ignore[arg-type]
        layer_norm = F.layer_norm

        def k_layernorm(x: Tensor, *_: Any) -> Tensor:
            return layer_norm(x, shape, w, b, eps)
        return Kernel(k_layernorm, prepacked=frozenset({1, 2}))


class CLayerNormTactic(CpuLayerNormTactic):
    """Float32 LayerNormalization over the last axis as one C call (``kiln_layernorm``, native/act.c: two passes
    per row, float vector sums, as aten) writing into the runtime's arena slot, so it binds (Kernel.bind: one ctypes
    call per inference, no torch dispatch) and the layers reading it bind too. A row layout it cannot address (a
    non-contiguous input) runs aten's layer_norm into the destination."""

    id = "cpu.layernorm_c"
    torch_dispatch = False
    writes_out = 1
    strided_out = False
    priority = 21

    def accepts(self, node: Node) -> bool:
        from kiln.backends.cpu.activation_c import library
        x = node.inputs[0]
        return (super().accepts(node) and x.type.dtype == DType.FLOAT32 and _axis(node) == (x.type.rank or 0) - 1
                and library() is not None)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        from kiln.backends.cpu.activation_c import library
        ln = library().kiln_layernorm  # type: ignore[union-attr]
        norm = self._norm(node)
        w = _affine(node, 1, norm).float().contiguous()  # type: ignore[union-attr]
        b_ = _affine(node, 2, norm) if node.input(2) is not None else None
        b = None if b_ is None else b_.float().contiguous()
        eps = float(node.attr("epsilon", 1e-5))
        n = int(w.numel())
        wp, bp = w.data_ptr(), None if b is None else b.data_ptr()
        threads = torch.get_num_threads

        def run(xp: int, yp: int, count: int) -> int:
            return ln(xp, yp, wp, bp, count, n, n, n, eps, threads())
        return _row_kernel(node, n, run, lambda x: F.layer_norm(x, [n], w, b, eps), (w, b))


def _row_kernel(node: Node, n: int, run: Any, fallback: Any, keep: tuple[Any, ...]) -> Kernel:
    """A kernel normalising float32 rows of n with one C call `run(x_ptr, y_ptr, rows) -> status` into the
    destination (the arena slot), bound where its input and output are the same tensors every call; `fallback(x)`
    (torch) for a row layout the C loop cannot address (a non-contiguous input)."""

    def rows(t: Tensor) -> bool:
        return t.dtype is torch.float32 and t.dim() >= 1 and t.shape[-1] == n and t.is_contiguous()

    def k_rows(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
        y = torch.empty(x.shape, dtype=x.dtype) if out is None else out
        if not rows(x) or not rows(y) or y.shape != x.shape:
            y.copy_(fallback(x))
            return y
        if run(x.data_ptr(), y.data_ptr(), x.numel() // n) != 0:
            raise KilnError(f"'{node.name}': the {node.op_type} kernel failed")
        return y

    def bind(args: Any, out: Any) -> Any:
        x = args[0]
        if not isinstance(x, Tensor) or not isinstance(out, Tensor) or not rows(x) or not rows(out) \
                or out.shape != x.shape:
            return None
        xp, yp, count = x.data_ptr(), out.data_ptr(), x.numel() // n

        def bound() -> Tensor:
            if run(xp, yp, count) != 0:
                raise KilnError(f"'{node.name}': the {node.op_type} kernel failed")
            return out
        bound.tensors = (x, out, *keep)  # type: ignore[attr-defined]
        return bound
    return Kernel(k_rows, prepacked=frozenset({1, 2}), out_format="contiguous", bind=bind)


class CRMSNormTactic(CLayerNormTactic):
    """Float32 RMSNormalization over the last axis (exporters' Pow / ReduceMean / Add / Sqrt / Reciprocal / Mul,
    recognised by passes/recognise.py) as one C call per inference (``kiln_rmsnorm``, native/act.c: one pass for
    the sum of squares, one to scale), into the arena slot and bound like ``cpu.layernorm_c``."""

    id = "cpu.rmsnorm_c"
    ops = (("", "RMSNormalization"), ("ai.onnx", "RMSNormalization"))

    def accepts(self, node: Node) -> bool:
        from kiln.backends.cpu.activation_c import library
        x = node.inputs[0]
        if len(node.outputs) != 1 or x is None or x.type.dtype != DType.FLOAT32 or library() is None \
                or int(node.attr("stash_type", 1)) != 1 or node.outputs[0].type.dtype != DType.FLOAT32:
            return False
        return _axis(node) == (x.type.rank or 0) - 1 and _affine(node, 1, self._norm(node)) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        from kiln.backends.cpu.activation_c import library
        rms = library().kiln_rmsnorm  # type: ignore[union-attr]
        w = _affine(node, 1, self._norm(node)).float().contiguous()  # type: ignore[union-attr]
        eps = float(node.attr("epsilon", 1e-5))
        n, wp = int(w.numel()), w.data_ptr()
        threads = torch.get_num_threads

        def run(xp: int, yp: int, count: int) -> int:
            return rms(xp, yp, wp, count, n, n, n, eps, threads())

        def fallback(x: Tensor) -> Tensor:
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w
        return _row_kernel(node, n, run, fallback, (w,))


class CpuGroupNormTactic(CpuTactic):
    """GroupNormalization and InstanceNormalization (float32 or bfloat16, constant scale and bias) via aten's
    group_norm: one fused pass for the statistics and one to normalise, reading NCHW or channels-last input in
    place (an instance norm is a group norm with one channel per group). Statistics in float32, as the
    reference's stash type 1. Opset 18's per-group scale and bias are spread to the channels once, at build."""

    id = "cpu.groupnorm"

    torch_dispatch = True
    ops = (("", "GroupNormalization"), ("ai.onnx", "GroupNormalization"),
           ("", "InstanceNormalization"), ("ai.onnx", "InstanceNormalization"))
    priority = 20

    @staticmethod
    def _groups(node: Node) -> tuple[int, int] | None:
        """(groups, channels) where both are known and the channels split into the groups."""
        shape = node.inputs[0].type.shape
        if shape is None or len(shape) < 3 or not isinstance(shape[1], int):
            return None
        c = int(shape[1])
        g = c if node.op_type == "InstanceNormalization" else int(node.attr("num_groups", 0))
        return (g, c) if g > 0 and c % g == 0 else None

    @staticmethod
    def _affine(node: Node, i: int, groups: int, channels: int) -> Tensor | None:
        c = const_float(node.input(i), bf16=True)
        if c is None or c.dim() != 1:
            return None
        if c.numel() == groups and groups != channels:  # opset 18: one value per group
            return c.repeat_interleave(channels // groups).contiguous()
        return c.contiguous() if c.numel() == channels else None

    def accepts(self, node: Node) -> bool:
        x = node.inputs[0]
        if len(node.outputs) != 1 or x is None or int(node.attr("stash_type", 1)) != 1 or len(node.inputs) != 3:
            return False
        if x.type.dtype not in (DType.FLOAT32, DType.BFLOAT16) or node.outputs[0].type.dtype != x.type.dtype:
            return False
        gc = self._groups(node)
        return gc is not None and all(self._affine(node, i, *gc) is not None for i in (1, 2))

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        groups, channels = self._groups(node)  # type: ignore[misc]
        w, b = (self._affine(node, i, groups, channels) for i in (1, 2))
        eps = float(node.attr("epsilon", 1e-5))
        group_norm = F.group_norm

        def k_groupnorm(x: Tensor, *_: Any) -> Tensor:
            return group_norm(x, groups, w, b, eps)
        return Kernel(k_groupnorm, prepacked=frozenset({1, 2}))


register_tactic(CpuLayerNormTactic())
register_tactic(CpuGroupNormTactic())
register_tactic(CLayerNormTactic())
register_tactic(CRMSNormTactic())
