"""SEGate of float32 tensors on the CPU in C (``native/se_gate.c``): the squeeze-excite gate in one call.

Inside a network each torch op pays its dispatcher's cold paths (docs/ARCHITECTURE.md, 11); the gate as
torch ops (mean, addmm, activation, addmm, activation) is five of them on vectors of a few hundred values,
and before the SEGate fusion it was a pool and two [N, C, 1, 1] convolutions that oneDNN declines. Here it
is one ctypes call: the pixel sum (float partial sums in registers added into double totals, on torch's thread
count for large maps), then the two products over transposed, zero-padded weights prepacked at build (their
pointers, sizes and activations in a struct made once, so a call passes 11 arguments, not 27). Inputs the
kernel was not made for (another dtype or device, other channels, 2**31 or more pixels) run the op's
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
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.activations import TABLE
from kiln.ops.attrs import read
from kiln.ops.registry import lookup

Tensor = torch.Tensor
_P, _L, _F, _I = C.c_void_p, C.c_long, C.c_float, C.c_int
_I32 = 2**31 - 1
PARALLEL_MIN = 100_000
"""Layers that read fewer floats than this (N * C * (H * W + ld1): the pixels, and W1t's rows whose product
the threads share) run on one thread, larger ones on torch's intra-op thread count. Measured on a 2-core
AVX-512 machine, the worker thread still spinning (as between a network's layers): 2 threads took 0.56-0.68
of 1 thread's time from about 190k floats up, mostly about 0.8 at 110k-150k (1152 x 7 x 7 with R = 48: 8.4
vs 10.7 us), and anything from 0.8 to 1.2 from run to run below 100k, where a second thread saves 2 us at
most. A worker
that has gone to sleep costs far more (some 40 us to wake here) for torch's own ops as much as here."""


class _Params(C.Structure):
    """struct kiln_se_params of native/se_gate.c."""

    _fields_ = [("w1t", _P), ("b1", _P), ("w2t", _P), ("b2", _P), ("C", _L), ("R", _L), ("ld1", _L), ("O", _L),
                ("ld2", _L), ("act1", _I), ("act2", _I), ("alpha1", _F), ("beta1", _F), ("alpha2", _F),
                ("beta2", _F)]


def _library() -> Any:
    lib = native.load("se_gate")
    if lib is not None and not hasattr(lib, "_kiln_typed"):
        lib.kiln_se_gate_f32.argtypes = [_P, _P, _L, _L, _L, _L, _L, _L, _L, _P, _L]
        lib.kiln_se_gate_f32.restype = C.c_int
        lib.kiln_channel_means_bf16.argtypes = [_P, _L, _L, _L, _L, _L, _L, _L, _L, _P, _L]
        lib.kiln_channel_means_bf16.restype = None
        lib._kiln_typed = True
    return lib


def _padded(t: Tensor, cols: int) -> Tensor:
    """`t` (a matrix or a vector) with zero columns appended up to `cols`, contiguous."""
    out = t.new_zeros((*t.shape[:-1], cols))
    out[..., :t.shape[-1]] = t
    return out


def _weights(node: Node, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
             ) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """W1 [R, C], B1 [R], W2 [O, R], B2 [O]: constants of `dtypes` whose shapes chain, else None."""
    if len(node.inputs) != 5 or any(v is None or v.const is None for v in node.inputs[1:]):
        return None
    w1, b1, w2, b2 = (v.const for v in node.inputs[1:])  # type: ignore[union-attr]
    if any(t.dtype not in dtypes for t in (w1, b1, w2, b2)):
        return None
    if w1.dim() != 2 or w2.dim() != 2 or b1.shape != (w1.shape[0],) or w2.shape[1] != w1.shape[0] \
            or b2.shape != (w2.shape[0],) or min(w1.shape[0], w1.shape[1], w2.shape[0]) < 1:
        return None
    return w1, b1, w2, b2


def _dense_gate(out: Tensor, n: int, o: int) -> Tensor:
    """`out` when it is a float32 [n, o, 1, 1] destination whose n x o values are dense (the kernel's store)."""
    if out.dtype != torch.float32 or tuple(out.shape) != (n, o, 1, 1) or (o > 1 and out.stride(1) != 1) \
            or (n > 1 and out.stride(0) != o):
        raise KilnError(f"SEGate writes a dense float32 [{n}, {o}, 1, 1] gate, got a destination "
                        f"{out.dtype} {list(out.shape)} with strides {list(out.stride())}")
    return out


def _into(y: Tensor, out: Tensor | None) -> Tensor:
    """The reference's result, stored into the destination when there is one."""
    if out is None:
        return y
    out.copy_(y)
    return out


class CpuSEGateTactic(CpuTactic):
    """SEGate on float32: pixel mean and both products in one C call per layer."""

    id = "cpu.se_gate"
    priority = 10
    ops = (("kiln", "SEGate"),)
    writes_out = 1  # into its arena slot: [N, O, 1, 1] is dense in either 4-D layout
    strided_out = False

    def accepts(self, node: Node) -> bool:
        x = node.input(0)
        if x is None or not is_f32(x) or x.type.rank != 4 or len(node.outputs) != 1 or not is_f32(node.outputs[0]):
            return False
        c = x.type.shape[1]  # type: ignore[index]
        ws = _weights(node)
        return ws is not None and (not isinstance(c, int) or c == ws[0].shape[1]) and _library() is not None

    def _prepare(self, node: Node, ws: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Any, int, int, int]:
        """(state: the params struct's address first, then what it points into; C; O; ld1) for float32 `ws`."""
        if _library() is None:
            raise KilnError(f"{self.id}: no C compiler builds its kernel here ({native.error('se_gate')})")
        w1, b1, w2, b2 = ws
        r, c_w, o = int(w1.shape[0]), int(w1.shape[1]), int(w2.shape[0])
        ld1, ld2 = -(-r // 16) * 16, -(-o // 16) * 16
        w1t, w2t = _padded(w1.t(), ld1), _padded(w2.t(), ld2)  # [C, ld1], [R, ld2]
        b1p, b2p = _padded(b1, ld1), _padded(b2, ld2)
        a1, a2 = str(read(node, "reduce_activation")), str(read(node, "gate_activation"))
        params = _Params(w1t.data_ptr(), b1p.data_ptr(), w2t.data_ptr(), b2p.data_ptr(), c_w, r, ld1, o, ld2,
                         TABLE[a1].code, TABLE[a2].code, float(read(node, "reduce_alpha")),
                         float(read(node, "reduce_beta")), float(read(node, "gate_alpha")),
                         float(read(node, "gate_beta")))
        state = (C.addressof(params), params, w1t, b1p, w2t, b2p)  # the closure keeps what the struct points to
        return state, c_w, o, ld1

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        ws = _weights(node)
        assert ws is not None, f"{self.id} does not support node {node.name}"
        w1, b1, w2, b2 = ws
        state, c_w, o, ld1 = self._prepare(node, ws)
        reference = lookup(node.op_type, node.domain).compute
        f32, call = torch.float32, _library().kiln_se_gate_f32

        def k_se_gate(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            if x.dtype != f32 or not x.is_cpu or x.dim() != 4:
                return _into(reference(node, x, w1, b1, w2, b2), out)  # its checks
            n, c, h, w = x.shape
            if c != c_w or h * w > _I32 or n * h * w == 0:
                return _into(reference(node, x, w1, b1, w2, b2), out)  # its checks, and empty tensors
            y = torch.empty((n, o, 1, 1), dtype=f32) if out is None else _dense_gate(out, n, o)
            threads = torch.get_num_threads() if n * c * (h * w + ld1) >= PARALLEL_MIN else 1
            if call(state[0], x.data_ptr(), n, h, w, *x.stride(), y.data_ptr(), threads) != 0:
                raise KilnError("SEGate: out of memory")
            return y

        def bind(args: Any, out: Any) -> Any:
            x = args[0]
            if not isinstance(x, Tensor) or x.dtype != f32 or not x.is_cpu or x.dim() != 4 \
                    or not isinstance(out, Tensor):
                return None
            n, c, h, w = x.shape
            if c != c_w or h * w > _I32 or n * h * w == 0:
                return None  # the reference ran
            y = _dense_gate(out, n, o)
            big = n * c * (h * w + ld1) >= PARALLEL_MIN
            fixed = (state[0], x.data_ptr(), n, h, w, *x.stride(), y.data_ptr())

            def bound() -> Tensor:
                if call(*fixed, torch.get_num_threads() if big else 1) != 0:
                    raise KilnError("SEGate: out of memory")
                return y
            bound.kept = (x, state)  # type: ignore[attr-defined]  # what the pointers point into stays alive
            return bound
        return Kernel(k_se_gate, prepacked=frozenset({1, 2, 3, 4}), bind=bind)


class CpuSEGateBf16Tactic(CpuSEGateTactic):
    """SEGate on a bfloat16 map (CPU BF16 builds): the channel means in float32 by one C pass over the bfloat16
    map (native/se_gate.c's kiln_channel_means_bf16), both products by the float32 kernel over those
    [N, C, 1, 1] means (the weights widened once, exactly), the gate rounded to bfloat16 once, as the reference
    computes it. Without it the gate stays float32 in a BF16 build, between two Casts per block."""

    id = "cpu.se_gate_bf16"

    def accepts(self, node: Node) -> bool:
        x = node.input(0)
        if x is None or x.type.dtype != DType.BFLOAT16 or x.type.rank != 4 or len(node.outputs) != 1 \
                or node.outputs[0].type.dtype != DType.BFLOAT16:
            return False
        c = x.type.shape[1]  # type: ignore[index]
        ws = _weights(node, (torch.float32, torch.bfloat16))
        return ws is not None and (not isinstance(c, int) or c == ws[0].shape[1]) and _library() is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        ws = _weights(node, (torch.float32, torch.bfloat16))
        assert ws is not None, f"{self.id} does not support node {node.name}"
        state, c_w, o, _ = self._prepare(node, tuple(t.float() for t in ws))  # type: ignore[arg-type]
        reference = lookup(node.op_type, node.domain).compute
        lib = _library()
        f32, bf16, call, means = torch.float32, torch.bfloat16, lib.kiln_se_gate_f32, lib.kiln_channel_means_bf16

        def k_se_gate_bf16(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            if x.dtype != bf16 or not x.is_cpu or x.dim() != 4 or x.shape[1] != c_w or x.numel() == 0 \
                    or x.shape[2] * x.shape[3] > _I32:
                return _into(reference(node, x, *ws), out)  # its checks, and empty tensors
            n, c, h, w = x.shape
            m = torch.empty((n, c), dtype=f32)
            threads = torch.get_num_threads() if n * c * h * w >= PARALLEL_MIN else 1
            means(x.data_ptr(), n, c, h, w, *x.stride(), m.data_ptr(), threads)
            y = torch.empty((n, o, 1, 1), dtype=f32)
            if call(state[0], m.data_ptr(), n, 1, 1, c, 1, 1, 1, y.data_ptr(), 1) != 0:
                raise KilnError("SEGate: out of memory")
            return y.to(bf16) if out is None else out.copy_(y)
        return Kernel(k_se_gate_bf16, prepacked=frozenset({1, 2, 3, 4}))


register_tactic(CpuSEGateTactic())
register_tactic(CpuSEGateBf16Tactic())
