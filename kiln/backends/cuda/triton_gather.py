"""Triton Gather: rows of a table picked by run-time indices, in one launch (embedding lookups, index maps).

The reference normalizes negative indices with three torch kernels (compare, add, where) before its
``index_select``, four launches per Gather; BERT's embeddings and mask take four Gathers. Here one kernel does
it all: X is viewed as [outer, N, inner] (N the gathered axis), the indices as a flat list of M, and the output
as [outer, M, inner]; a program copies a tile of output rows, each row's index read once, a negative one
counted from the end of the axis. Elements are moved as integers of their width, so every element type (float,
integer, bool) takes the same kernel. An index outside [-N, N) reads zeros: checking it would sync the GPU
(the reference raises; ONNX leaves the result undefined). Nothing is allocated but the output; no sync:
CUDA-graph capturable.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.backends.cuda.common import check_out
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.cuda.triton_pool import _p2
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node

Tensor = torch.Tensor
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TILE = 4096
"""Elements per program (rows x inner block)."""


@triton.jit(do_not_specialize=["R", "M", "N", "INNER"])
def _gather_kernel(x_ptr, i_ptr, y_ptr, R, M, N, INNER, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < R
    idx = tl.load(i_ptr + rows % M, mask=r_mask, other=0).to(tl.int64)
    idx = tl.where(idx < 0, idx + N, idx)
    ok = r_mask & (idx >= 0) & (idx < N)
    src = ((rows // M) * N + idx) * INNER
    dst = rows * INNER
    for c0 in range(0, INNER, BLOCK_I):
        cols = c0 + tl.arange(0, BLOCK_I)
        c_mask = cols < INNER
        v = tl.load(x_ptr + src[:, None] + cols[None, :], mask=ok[:, None] & c_mask[None, :], other=0)
        tl.store(y_ptr + dst[:, None] + cols[None, :], v, mask=r_mask[:, None] & c_mask[None, :])


def gather(x: Tensor, idx: Tensor, axis: int, out: Tensor | None = None) -> Tensor:
    """ONNX Gather(x, idx, axis) on the GPU (see the module doc); into `out` when given (any layout)."""
    shape = (*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])
    if out is not None:
        check_out(out, shape, "Gather")
    y = out if out is not None and out.is_contiguous() else torch.empty(shape, dtype=x.dtype, device=x.device)
    n, inner = x.shape[axis], math.prod(x.shape[axis + 1:])
    m, rows = idx.numel(), math.prod(x.shape[:axis]) * idx.numel()
    if rows and inner:
        x = x.contiguous()
        if idx.device != x.device:
            idx = idx.to(x.device, non_blocking=True)
        bits = _BITS[x.element_size()]
        bi = min(_p2(inner), 1024)
        br = min(max(1, _TILE // bi), _p2(rows))
        launch(_gather_kernel, (triton.cdiv(rows, br),),
               [x.view(bits), idx.reshape(-1), y.view(bits), rows, m, n, inner],
               dict(BLOCK_R=br, BLOCK_I=bi, num_warps=4))
    if out is not None and y is not out:
        out.copy_(y)
        y = out
    return y


class TritonGather(Tactic):
    """Gather by run-time (or constant) indices of any element type, in one kernel."""

    id = "cuda.triton_gather"
    devices = ("cuda",)
    priority = 10
    writes_out = 1
    strided_out = False

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        x, idx = node.input(0), node.input(1)
        if not (node.op_type == "Gather" and node.domain in ("", "ai.onnx") and x is not None and idx is not None
                and len(node.outputs) == 1 and x.type.rank is not None and x.type.rank >= 1):
            return False
        axis = int(node.attr("axis", 0))
        return (-x.type.rank <= axis < x.type.rank and idx.type.dtype in (DType.INT32, DType.INT64)
                and x.type.dtype is not None and x.type.dtype.itemsize in _BITS)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        rank = node.inputs[0].type.rank  # type: ignore[union-attr]
        axis = int(node.attr("axis", 0)) % rank  # type: ignore[operator]
        const = node.inputs[1].const  # type: ignore[union-attr]
        fixed = None if const is None else const.to(device)

        def k_gather(x: Tensor, idx: Tensor | None = None, out: Tensor | None = None) -> Tensor:
            return gather(x, fixed if fixed is not None else idx, axis, out)  # type: ignore[arg-type]
        return Kernel(k_gather, prepacked=frozenset({1}) if fixed is not None else frozenset(),
                      out_format="contiguous")


register_tactic(TritonGather())
