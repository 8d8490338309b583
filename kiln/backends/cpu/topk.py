"""TopK of float32 tensors on the CPU in C (``native/topk.c``): a selection of the k first, then a sort of those k.

The reference (kiln.ops.reduce.TopK) stable-sorts the whole axis, O(n log n), which dominates small
selections: SSDlite keeps 300 of ~3,200 boxes per class, 90 times per inference (50-80 us each through
torch.sort; here about 16 us, 8 of them in C). The order is the reference's: largest (or smallest) first, NaN above
every number, -0.0 equal to 0.0, equal values by ascending index; values are copied bit for bit. Calls
the kernel was not made for (another dtype, k outside [1, n], an axis of 2^32 or more elements) run the
reference. Declines everything where no C compiler works.
"""
from __future__ import annotations

import ctypes as C
from typing import Any

import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.common import CpuTactic, is_f32
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node
from kiln.ops.registry import ints, lookup, norm_axis

Tensor = torch.Tensor
_P, _L = C.c_void_p, C.c_long


def _library() -> Any:
    lib = native.load("topk")
    if lib is not None and not hasattr(lib, "_kiln_typed"):
        lib.kiln_topk_f32.argtypes = [_P, _L, _L, _L, _L, C.c_int, _P, _P]
        lib.kiln_topk_f32.restype = C.c_int
        lib._kiln_typed = True
    return lib


def _prod(xs: Any) -> int:
    p = 1
    for d in xs:
        p *= int(d)
    return p


class CpuTopKTactic(CpuTactic):
    """TopK of a float32 input along any axis: one C selection per row, in the reference's order."""

    id = "cpu.topk"
    priority = 10
    ops = (("", "TopK"),)

    def accepts(self, node: Node) -> bool:
        return is_f32(node.input(0)) and len(node.outputs) == 2 and _library() is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = _library()
        if lib is None:
            raise KilnError(f"cpu.topk: no C compiler builds its kernel here ({native.error('topk')})")
        reference = lookup(node.op_type, node.domain).bind(node)
        axis_attr = int(node.attr("axis", -1))
        largest = int(bool(node.attr("largest", 1)))
        k_attr = int(node.attr("k", 0)) if node.opset < 10 else None

        def k_topk(x: Tensor, *k_in: Tensor) -> tuple[Tensor, Tensor]:  # k_in: K from opset 10
            if x.dtype != torch.float32 or x.dim() == 0 or x.device.type != "cpu":
                return reference(x, *k_in)
            k = k_attr if k_attr is not None else ints(k_in[0])[0]
            axis = norm_axis(axis_attr, x.dim())
            n = int(x.shape[axis]) if 0 <= axis < x.dim() else 0
            if not 0 < k <= n or n >= 1 << 32:
                return reference(x, *k_in)  # its checks, and k = 0
            x = x.contiguous()
            shape = list(x.shape)
            shape[axis] = k
            vals = torch.empty(shape, dtype=torch.float32)
            idx = torch.empty(shape, dtype=torch.int64)
            if lib.kiln_topk_f32(x.data_ptr(), _prod(x.shape[:axis]), n, _prod(x.shape[axis + 1:]), k, largest,
                                 vals.data_ptr(), idx.data_ptr()) != 0:
                raise KilnError("TopK: out of memory")
            return vals, idx
        return Kernel(k_topk)


register_tactic(CpuTopKTactic())
