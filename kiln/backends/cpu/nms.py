"""NonMaxSuppression on the CPU: the reference's candidate ranking, then the greedy selection in C.

`kiln.ops.detection` ranks each (batch, class) row's candidates (`rank_candidates`) and, in torch, runs
the greedy selection over blocks of ranks in memory linear in the box count; here the same ranked
candidates go through one sequential greedy loop in C (``native/nms.c``) that files the kept boxes in
a grid, so a candidate is only tested against kept boxes near it, each test with the reference's float
operations. SSDlite's 27,000 boxes (90 classes separated by torchvision's coordinate offsets): about
170 ms -> a few ms on 2 threads. Float32 (and float16/bfloat16, which the reference computes in float32)
only: a call with float64 boxes runs the reference. Declines everything where no C compiler works.
"""
from __future__ import annotations

import ctypes as C
from typing import Any

import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.common import CpuTactic
from kiln.backends.detection import nms_kernel
from kiln.backends.tactic import Built, register_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.detection import Ranked

Tensor = torch.Tensor
_FLOATS = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16)
_P, _L = C.c_void_p, C.c_long


def _library() -> Any:
    lib = native.load("nms")
    if lib is not None and not hasattr(lib, "_kiln_typed"):
        lib.kiln_nms.argtypes = [_L, _L, _L, _P, _P, _P, _P, _P, _P, _P, _P, _L, C.c_float, C.c_int, _P]
        lib.kiln_nms.restype = C.c_int
        lib._kiln_typed = True
    return lib


def greedy(lib: Any, c: Ranked) -> Tensor:
    """Keys (row * m + rank, ascending) of the candidates greedy NMS keeps, computed in C."""
    order = c.order.contiguous()
    counts = c.counts.to(torch.int64).contiguous()
    base = (c.row_batch() * c.n).contiguous()
    cols = [t.contiguous() for t in c.cols]
    rows, m = (int(d) for d in order.shape)
    keep = torch.zeros((rows, m), dtype=torch.uint8)
    status = lib.kiln_nms(rows, m, c.n, order.data_ptr(), counts.data_ptr(), base.data_ptr(),
                          *(t.data_ptr() for t in cols), c.limit, c.thr, int(not c.thr < 1), keep.data_ptr())
    if status != 0:
        raise KilnError("NonMaxSuppression: " + ("out of memory" if status == -1 else "candidate index out of range"))
    return keep.view(-1).nonzero().view(-1)


class CpuNmsTactic(CpuTactic):
    """NonMaxSuppression: ranked by the reference, selected by one greedy C loop over a grid of kept boxes."""

    id = "cpu.nms"
    priority = 10
    ops = (("", "NonMaxSuppression"),)

    def accepts(self, node: Node) -> bool:
        b, s = node.input(0), node.input(1)
        return (b is not None and s is not None and b.type.dtype in _FLOATS and s.type.dtype in _FLOATS
                and len(node.outputs) == 1 and _library() is not None)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = _library()
        if lib is None:
            raise KilnError(f"cpu.nms: no C compiler builds its kernel here ({native.error('nms')})")
        return nms_kernel(node, lambda c: greedy(lib, c))


register_tactic(CpuNmsTactic())
