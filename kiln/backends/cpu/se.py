"""SEGate of float32 tensors on the CPU in C (``native/se_gate.c``): the squeeze-excite gate in one call.

Inside a network each torch op pays its dispatcher's cold paths (docs/ARCHITECTURE.md, 11); the gate as
torch ops (mean, addmm, activation, addmm, activation) is five of them on vectors of a few hundred values,
and before the SEGate fusion it was a pool and two [N, C, 1, 1] convolutions that oneDNN declines. Here it
is one ctypes call: the pixel sum (float rows added into double totals, on torch's thread count for large maps),
then the two products over transposed weights prepacked at build. Inputs the kernel was not made for
(another dtype or device, other channels, 2**31 or more pixels) run the op's reference. Declines
everything where no C compiler works.
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
from kiln.ops.activations import TABLE
from kiln.ops.attrs import read
from kiln.ops.registry import lookup

Tensor = torch.Tensor
_P, _L, _F, _I = C.c_void_p, C.c_long, C.c_float, C.c_int
_I32 = 2**31 - 1
PARALLEL_MIN = 1 << 17
"""Images with fewer elements are summed on one thread (the OpenMP fork costs more than the second thread
saves below about this size); larger ones on torch's intra-op thread count."""


def _library() -> Any:
    lib = native.load("se_gate")
    if lib is not None and not hasattr(lib, "_kiln_typed"):
        lib.kiln_se_gate_f32.argtypes = [_P, _L, _L, _L, _L, _L, _L, _L, _L, _P, _P, _L, _P, _P, _L,
                                         _I, _F, _F, _I, _F, _F, _P, _L, _L, _L]
        lib.kiln_se_gate_f32.restype = C.c_int
        lib._kiln_typed = True
    return lib


def _weights(node: Node) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """W1 [R, C], B1 [R], W2 [O, R], B2 [O]: float32 constants whose shapes chain, else None."""
    if len(node.inputs) != 5 or any(v is None or v.const is None for v in node.inputs[1:]):
        return None
    w1, b1, w2, b2 = (v.const for v in node.inputs[1:])  # type: ignore[union-attr]
    if any(t.dtype != torch.float32 for t in (w1, b1, w2, b2)):
        return None
    if w1.dim() != 2 or w2.dim() != 2 or b1.shape != (w1.shape[0],) or w2.shape[1] != w1.shape[0] \
            or b2.shape != (w2.shape[0],) or min(w1.shape[0], w1.shape[1], w2.shape[0]) < 1:
        return None
    return w1, b1, w2, b2


class CpuSEGateTactic(CpuTactic):
    """SEGate on float32: pixel mean and both products in one C call per layer."""

    id = "cpu.se_gate"
    priority = 10
    ops = (("kiln", "SEGate"),)

    def accepts(self, node: Node) -> bool:
        x = node.input(0)
        if x is None or not is_f32(x) or x.type.rank != 4 or len(node.outputs) != 1 or not is_f32(node.outputs[0]):
            return False
        c = x.type.shape[1]  # type: ignore[index]
        ws = _weights(node)
        return ws is not None and (not isinstance(c, int) or c == ws[0].shape[1]) and _library() is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = _library()
        if lib is None:
            raise KilnError(f"cpu.se_gate: no C compiler builds its kernel here ({native.error('se_gate')})")
        ws = _weights(node)
        assert ws is not None, f"{self.id} does not support node {node.name}"
        w1, b1, w2, b2 = ws
        r, c_w, o = int(w1.shape[0]), int(w1.shape[1]), int(w2.shape[0])
        w1t, w2t = w1.t().contiguous(), w2.t().contiguous()
        b1, b2 = b1.contiguous(), b2.contiguous()
        a1, a2 = str(read(node, "reduce_activation")), str(read(node, "gate_activation"))
        acts = (TABLE[a1].code, float(read(node, "reduce_alpha")), float(read(node, "reduce_beta")),
                TABLE[a2].code, float(read(node, "gate_alpha")), float(read(node, "gate_beta")))
        reference = lookup(node.op_type, node.domain).compute

        def k_se_gate(x: Tensor, *_: Any) -> Tensor:
            if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4 or int(x.shape[1]) != c_w \
                    or int(x.shape[2]) * int(x.shape[3]) > _I32 or x.numel() == 0:
                return reference(node, x, w1, b1, w2, b2)  # its checks, and empty tensors
            n, _c, h, w = (int(d) for d in x.shape)
            y = torch.empty((n, o, 1, 1), dtype=torch.float32)
            threads = torch.get_num_threads() if c_w * h * w >= PARALLEL_MIN else 1
            if lib.kiln_se_gate_f32(x.data_ptr(), n, c_w, h, w, *x.stride(), w1t.data_ptr(), b1.data_ptr(), r,
                                    w2t.data_ptr(), b2.data_ptr(), o, *acts, y.data_ptr(), o, 1, threads) != 0:
                raise KilnError("SEGate: out of memory")
            return y
        return Kernel(k_se_gate, prepacked=frozenset({1, 2, 3, 4}))


register_tactic(CpuSEGateTactic())
