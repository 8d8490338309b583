"""The activation of a oneDNN layer as a C pass after its primitive (config ``{"act": "c"}`` of ``cpu.conv_dnnl``
and ``cpu.linear_dnnl``).

oneDNN's exp-based post-ops (swish, logistic, gelu, mish) cost 25-30 cycles per 16 values on a 2-core AVX-512
EPYC: on EfficientNet-B0's depthwise 144 x 56 x 56 layer the convolution took 0.082 ms and SiLU on top of it
0.13 ms more. ``native/act.c`` computes them with a polynomial exp in ~12 cycles, in place over the layer's dense
output while it is still in cache (and adds the residual where the node adds it after the activation). The
autotuner times both configs; the C pass wins where the activation dominates, the fused post-op on small outputs.
The activations are those of ``C_ACTS``; the pass reads and writes float32 only.
"""
from __future__ import annotations

import ctypes as C
from typing import Any, Callable

import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.common import act_attrs, is_f32
from kiln.errors import KilnError
from kiln.ir.graph import Node

Tensor = torch.Tensor
C_ACTS = {"Sigmoid": 1, "SiLU": 2, "Mish": 3, "Gelu": 4, "GeluTanh": 5}
"""Fused activations (kiln.ops.fused names) native/act.c computes -> its activation code."""
PARALLEL_MIN = 16384
"""Outputs of fewer values run on one thread (a second one saves less than it costs to wake)."""


def library() -> Any:
    """native/act.c's library (kiln_act, kiln_softmax, kiln_layernorm, kiln_rmsnorm), or None where no C compiler
    works."""
    lib = native.load("act")
    if lib is not None and not hasattr(lib, "_kiln_typed"):
        P, L, I = C.c_void_p, C.c_long, C.c_int
        lib.kiln_act.argtypes = [P, P, L, I, I]
        lib.kiln_act.restype = C.c_int
        lib.kiln_softmax.argtypes = [P, L, L, L, L, P, I, L, L, L, L, I, I]
        lib.kiln_softmax.restype = C.c_int
        lib.kiln_layernorm.argtypes = [P, P, P, P, L, L, L, L, C.c_float, I]
        lib.kiln_layernorm.restype = C.c_int
        lib.kiln_rmsnorm.argtypes = [P, P, P, L, L, L, L, C.c_float, I]
        lib.kiln_rmsnorm.restype = C.c_int
        lib._kiln_typed = True
    return lib


def available(act: str) -> bool:
    """Whether `act` can run as the C pass here (a known activation and a working C compiler)."""
    return act in C_ACTS and library() is not None


def c_activation_configs(node: Node) -> list[dict[str, Any]]:
    """A fused float32 layer whose activation native/act.c computes is timed with oneDNN's post-op ({}) and with
    the C pass after the primitive ({"act": "c"}, kiln.backends.cpu.activation_c)."""
    fused = node.domain == "kiln" and node.op_type in ("FusedConv", "FusedGemm")
    if fused and is_f32(node.outputs[0]) and is_f32(node.inputs[0]) and available(act_attrs(node)[0]):
        return [{}, {"act": "c"}]
    return [{}]


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


class InPlaceActivation:
    """y = act(y), or act(y) + z, over a dense float32 tensor y (z: the same shape, strides and dtype)."""

    def __init__(self, act: str) -> None:
        lib = library()
        if lib is None or act not in C_ACTS:
            raise KilnError(f"the C activation pass cannot run {act!r} here ({native.error('act') or 'unknown'})")
        self.act, self.code, self.fn = act, C_ACTS[act], lib.kiln_act

    def _check(self, y: Tensor, z: Tensor | None) -> None:
        if y.dtype is not torch.float32 or y.device.type != "cpu" or not _dense(y):
            raise KilnError(f"the C {self.act} pass takes a dense float32 CPU tensor, got {y.dtype} {list(y.shape)} "
                            f"with strides {list(y.stride())}")
        if z is not None and (z.dtype is not torch.float32 or z.device.type != "cpu" or z.shape != y.shape
                              or z.stride() != y.stride()):
            raise KilnError(f"the C {self.act} pass adds a residual laid out as its output {list(y.shape)} "
                            f"{list(y.stride())}, got {z.dtype} {list(z.shape)} {list(z.stride())}")

    def __call__(self, y: Tensor, z: Tensor | None = None) -> None:
        self._check(y, z)
        self.bind(y, z)()

    def bind(self, y: Tensor, z: Tensor | None = None) -> Callable[[], None]:
        """The pass on these very tensors (checked once here; the caller keeps them alive and unchanged)."""
        self._check(y, z)
        fn, code, n = self.fn, self.code, y.numel()
        yp, zp = C.c_void_p(y.data_ptr()), C.c_void_p(None if z is None else z.data_ptr())
        get_threads = torch.get_num_threads

        def call() -> None:
            if fn(yp, zp, n, code, get_threads() if n >= PARALLEL_MIN else 1) != 0:
                raise KilnError(f"the C {self.act} pass failed")
        call.tensors = (y, z)  # type: ignore[attr-defined]
        return call


def split_epilogue(config: dict[str, Any], act: str, z: Tensor | None, act_first: bool
                   ) -> tuple[str, Tensor | None, InPlaceActivation | None, bool]:
    """(the primitive's activation, the residual it adds as a post-op, the C pass or None, whether the C pass adds
    the residual) for a layer computing act(v) + z (act_first) or act(v + z), under `config`."""
    if config.get("act") != "c":
        return act, z, None, False
    after = act_first and z is not None
    return "", None if after else z, InPlaceActivation(act), after


class ActivatedPrimitive:
    """A primitive followed by the C activation pass over its output: `run(x, y[, z])`, `bind`, `close` as the
    primitive's (kiln.backends.cpu.dnnl_primitive.Primitive)."""

    def __init__(self, prim: Any, act: InPlaceActivation, z_after: bool) -> None:
        self.prim, self.act, self.z_after = prim, act, z_after
        self.impl = f"{prim.impl} + C {act.act}"

    def run(self, x: Tensor, y: Tensor, z: Tensor | None = None) -> None:
        if z is None or self.z_after:
            self.prim.run(x, y)
        else:
            self.prim.run(x, y, z)
        self.act(y, z if self.z_after else None)

    def bind(self, x: Tensor, y: Tensor, z: Tensor | None = None) -> Callable[[], None]:
        prim = self.prim.bind(x, y) if z is None or self.z_after else self.prim.bind(x, y, z)
        act = self.act.bind(y, z if self.z_after else None)

        def call() -> None:
            prim()
            act()
        call.tensors = (x, y, z)  # type: ignore[attr-defined]
        return call

    def close(self) -> None:
        self.prim.close()
