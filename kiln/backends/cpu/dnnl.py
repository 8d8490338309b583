"""oneDNN's C API through ctypes: convolution primitives created once per shape, executed on torch memory.

torch's oneDNN ops rebuild their primitive descriptor on every call (about 20-30 us per layer at batch
1). With the library itself (the ``onednn-cpu-gomp`` wheel, ``pip install kiln[cpu]``: ``libdnnl.so.3``
under ``sys.prefix/lib`` or the user base, or the path in ``KILN_DNNL_LIB``) a kernel creates its
primitive once per input shape, reorders its weights once into the layout the primitive chose, and an
inference is two handle updates and one ``dnnl_primitive_execute`` on the tensors' own memory. When
the library is absent, ``library()`` is None and the tactic built on it declines every layer.
"""
from __future__ import annotations

import ctypes as C
import glob
import os
import site
import sys
import threading
from typing import Any, Callable, Sequence, TypeVar

import torch

from kiln.errors import KilnError, PlanFormatError

P = C.c_void_p
Dims = C.c_int64 * 12

F32 = 3
CPU_ENGINE, IN_ORDER = 1, 1
FORWARD_INFERENCE, CONVOLUTION_DIRECT, BINARY_ADD = 96, 1, 0x1FFF0
POOLING_MAX, POOLING_AVG_INCLUDE_PAD, POOLING_AVG_EXCLUDE_PAD = 0x1FF, 0x2FF, 0x3FF
QUERY_IMPL_INFO, QUERY_WEIGHTS_MD = 8, 131
ARG_SRC, ARG_SRC_1, ARG_DST, ARG_WEIGHTS, ARG_BIAS = 1, 2, 17, 33, 41
POST_OP_ARG_BASE = 32768
TAG_ANY = 1

ELTWISE: dict[str, tuple[int, Any]] = {
    # activation -> (algorithm, (alpha, beta) from the node's alpha/beta)
    "Relu": (0x20, lambda a, b: (0.0, 0.0)),
    "LeakyRelu": (0x20, lambda a, b: (a, 0.0)),
    "Tanh": (0x21, lambda a, b: (0.0, 0.0)),
    "HardSigmoid": (0x28, lambda a, b: (a, b)),
    "Sigmoid": (0x29, lambda a, b: (0.0, 0.0)),
    "GeluTanh": (0x2B, lambda a, b: (0.0, 0.0)),
    "SiLU": (0x2C, lambda a, b: (1.0, 0.0)),
    "Clip": (0x2E, lambda a, b: (a, b)),
    "Gelu": (0x31, lambda a, b: (0.0, 0.0)),
    "Mish": (0x33, lambda a, b: (0.0, 0.0)),
    "HardSwish": (0x34, lambda a, b: (1.0 / 6.0, 0.5)),
}
"""Fused activations oneDNN applies as eltwise post-ops (kiln.ops.fused.ACTIVATIONS names)."""


class DnnlError(RuntimeError):
    """A oneDNN call returned an error status."""


class _Arg(C.Structure):
    _fields_ = [("arg", C.c_int), ("memory", P)]


class _Lib:
    """The loaded library, one CPU engine and one in-order stream."""

    def __init__(self, path: str) -> None:
        self.dll = C.CDLL(path)
        self.dll.dnnl_primitive_desc_query_md.restype = P
        self.dll.dnnl_primitive_desc_query_md.argtypes = [P, C.c_int, C.c_int]
        self.dll.dnnl_memory_desc_get_size.restype = C.c_size_t
        self.dll.dnnl_memory_desc_get_size.argtypes = [P]
        self.dll.dnnl_memory_set_data_handle.argtypes = [P, P]
        self.dll.dnnl_primitive_execute.argtypes = [P, P, C.c_int, P]
        self.engine, self.stream = P(), P()
        self.ok(self.dll.dnnl_engine_create(C.byref(self.engine), CPU_ENGINE, 0), "engine")
        self.ok(self.dll.dnnl_stream_create(C.byref(self.stream), self.engine, IN_ORDER), "stream")

    @staticmethod
    def ok(status: int, what: str) -> None:
        if status != 0:
            raise DnnlError(f"oneDNN {what} failed with status {status}")

    def md(self, shape: Sequence[int], strides: Sequence[int] | None) -> P:
        """A float32 memory descriptor: plain with these strides, or format `any` (strides None)."""
        md = P()
        if strides is None:
            self.ok(self.dll.dnnl_memory_desc_create_with_tag(C.byref(md), len(shape), Dims(*shape), F32, TAG_ANY),
                    "memory descriptor")
        else:
            self.ok(self.dll.dnnl_memory_desc_create_with_strides(C.byref(md), len(shape), Dims(*shape), F32,
                                                                  Dims(*strides)), "memory descriptor")
        return md

    def memory(self, md: Any, data: int) -> P:
        mem = P()
        self.ok(self.dll.dnnl_memory_create(C.byref(mem), P(md) if isinstance(md, int) else md, self.engine,
                                            P(data)), "memory")
        return mem


_LIB: _Lib | None = None
_LOADED = False
_LOCK = threading.Lock()


def library() -> _Lib | None:
    """The oneDNN library when it can be found and loaded, else None (checked once)."""
    global _LIB, _LOADED
    with _LOCK:
        if not _LOADED:
            _LOADED = True
            from kiln.settings import settings
            paths = [settings().dnnl_lib or ""]
            for base in (sys.prefix, site.getuserbase()):
                paths += sorted(glob.glob(os.path.join(base, "lib", "libdnnl.so*")))
            for path in paths:
                if path and os.path.exists(path):
                    try:
                        _LIB = _Lib(path)
                        break
                    except (OSError, DnnlError, AttributeError):
                        _LIB = None
    return _LIB


def require_library(node: Any, tactic: str) -> _Lib:
    """The library for building a layer that a plan assigned to a oneDNN tactic; one clear error without it."""
    lib = library()
    if lib is None:
        raise PlanFormatError(f"layer '{node.name}' uses tactic {tactic}, which needs the oneDNN library "
                              f"(pip install onednn-cpu-gomp); rebuild the plan without it or install it")
    return lib


class _Primitive:
    """A created primitive with its memory objects; `run` points the per-call ones at the given tensors."""

    def _finish(self, lib: _Lib, pd: Any, fixed: list[tuple[int, Any, int]], dynamic: list[tuple[int, Any]]) -> None:
        """fixed: (arg, md, data pointer kept alive by self); dynamic: (arg, md) set per call, in run's order."""
        self.lib = lib
        impl = C.c_char_p()
        lib.ok(lib.dll.dnnl_primitive_desc_query(pd, QUERY_IMPL_INFO, 0, C.byref(impl)), "implementation query")
        self.impl = (impl.value or b"").decode()
        if self.impl.startswith("ref"):  # oneDNN's reference loops: orders of magnitude slower than torch's path
            raise DnnlError(f"oneDNN has only its reference implementation ({self.impl}) here")
        self.prim = P()
        lib.ok(lib.dll.dnnl_primitive_create(C.byref(self.prim), pd), "primitive")
        self.mems = [lib.memory(md, 0) for _, md in dynamic]
        args = [_Arg(a, lib.memory(md, ptr)) for a, md, ptr in fixed] + [_Arg(a, m) for (a, _), m in zip(dynamic, self.mems)]
        self.args, self.nargs = (_Arg * len(args))(*args), len(args)
        self.ptrs = [0] * len(dynamic)
        self.lock = threading.Lock()

    def _finish_layer(self, lib: _Lib, pd: Any, w: torch.Tensor, w_shape: list[int], b: torch.Tensor | None,
                      b_md: Any, src_md: Any, dst_md: Any, z_arg: int, z_md: Any) -> None:
        """`_finish` for a layer with constant weights, an optional bias and an optional residual post-op."""
        self._weights(lib, pd, w, w_shape)
        self.bias = None if b is None else b.detach().float().contiguous()
        fixed = [(ARG_WEIGHTS, self.w_md, self.weights.data_ptr())]
        if self.bias is not None:
            fixed.append((ARG_BIAS, b_md, self.bias.data_ptr()))
        dynamic = [(ARG_SRC, src_md), (ARG_DST, dst_md)] + ([(z_arg, z_md)] if z_md is not None else [])
        self._finish(lib, pd, fixed, dynamic)

    def _weights(self, lib: _Lib, pd: Any, w: torch.Tensor, shape: list[int]) -> None:
        """Reorder the weights once into the layout the primitive chose (self.weights, self.w_md)."""
        self.w_md = lib.dll.dnnl_primitive_desc_query_md(pd, QUERY_WEIGHTS_MD, 0)
        self.weights = torch.empty(lib.dll.dnnl_memory_desc_get_size(self.w_md), dtype=torch.uint8)
        plain = w.detach().float().contiguous().reshape(shape)
        _reorder(lib, lib.md(shape, plain.stride()), plain.data_ptr(), self.w_md, self.weights.data_ptr())

    def run(self, *tensors: torch.Tensor) -> None:
        d = self.lib.dll
        with self.lock:
            ptrs = self.ptrs
            for i, t in enumerate(tensors):
                p = t.data_ptr()
                if p != ptrs[i]:  # arena slots keep their addresses from one inference to the next
                    d.dnnl_memory_set_data_handle(self.mems[i], p)
                    ptrs[i] = p
            status = d.dnnl_primitive_execute(self.prim, self.lib.stream, self.nargs, self.args)
        if status != 0:
            raise DnnlError(f"oneDNN {self.impl} failed with status {status}")


def _post_ops(lib: _Lib, act: str, alpha: float, beta: float, z: torch.Tensor | None,
              act_first: bool) -> tuple[P, int, Any]:
    """Primitive attributes with the residual add (`z`) and the activation as post-ops in the node's order:
    (attributes, the execute argument of z or -1, z's memory descriptor or None)."""
    d = lib.dll
    attr, po = P(), P()
    lib.ok(d.dnnl_primitive_attr_create(C.byref(attr)), "attributes")
    lib.ok(d.dnnl_post_ops_create(C.byref(po)), "post-ops")
    z_arg, z_md = -1, None
    for op in (["act", "z"] if act_first else ["z", "act"]):
        if op == "act" and act:
            alg, params = ELTWISE[act]
            a, bb = params(alpha, beta)
            lib.ok(d.dnnl_post_ops_append_eltwise(po, alg, C.c_float(a), C.c_float(bb)), "eltwise post-op")
        elif op == "z" and z is not None:
            z_arg = POST_OP_ARG_BASE * (d.dnnl_post_ops_len(po) + 1) | ARG_SRC_1
            z_md = lib.md(z.shape, z.stride())
            lib.ok(d.dnnl_post_ops_append_binary(po, BINARY_ADD, z_md), "binary post-op")
    lib.ok(d.dnnl_primitive_attr_set_post_ops(attr, po), "post-op attribute")
    return attr, z_arg, z_md


class Convolution(_Primitive):
    """One oneDNN convolution primitive for fixed input/residual/output shapes and strides.

    Weights are reordered once into the primitive's chosen layout; bias and residual add and the
    activation are post-ops in the node's order. `run(x, y[, z])` is safe to call from several threads.
    """

    def __init__(self, lib: _Lib, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 z: torch.Tensor | None, strides: Sequence[int], dilations: Sequence[int], pad_l: Sequence[int],
                 pad_r: Sequence[int], groups: int, act: str, alpha: float, beta: float, act_first: bool) -> None:
        d = lib.dll
        k, cg, kh, kw = (int(s) for s in w.shape)
        w_shape = [k, cg, kh, kw] if groups == 1 else [groups, k // groups, cg, kh, kw]
        src_md, dst_md = lib.md(x.shape, x.stride()), lib.md(y.shape, y.stride())
        b_md = lib.md([k], [1]) if b is not None else None
        attr, z_arg, z_md = _post_ops(lib, act, alpha, beta, z, act_first)
        pd = P()
        lib.ok(d.dnnl_convolution_forward_primitive_desc_create(
            C.byref(pd), lib.engine, FORWARD_INFERENCE, CONVOLUTION_DIRECT, src_md, lib.md(w_shape, None),
            b_md, dst_md, Dims(*strides), Dims(*[dd - 1 for dd in dilations]), Dims(*pad_l), Dims(*pad_r), attr),
            "convolution descriptor")
        self._finish_layer(lib, pd, w, w_shape, b, b_md, src_md, dst_md, z_arg, z_md)


class Pooling(_Primitive):
    """One oneDNN pooling primitive (max, or average with/without pads) for fixed input/output shapes and
    strides: `run(x, y)`."""

    def __init__(self, lib: _Lib, x: torch.Tensor, y: torch.Tensor, algorithm: int, kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int], pad_l: Sequence[int],
                 pad_r: Sequence[int]) -> None:
        src_md, dst_md = lib.md(x.shape, x.stride()), lib.md(y.shape, y.stride())
        pd = P()
        lib.ok(lib.dll.dnnl_pooling_forward_primitive_desc_create(
            C.byref(pd), lib.engine, FORWARD_INFERENCE, algorithm, src_md, dst_md, Dims(*strides), Dims(*kernel),
            Dims(*[dd - 1 for dd in dilations]), Dims(*pad_l), Dims(*pad_r), None), "pooling descriptor")
        self._finish(lib, pd, [], [(ARG_SRC, src_md), (ARG_DST, dst_md)])


class InnerProduct(_Primitive):
    """One oneDNN inner product y = x W^T (+ b) for a fixed [N, K] input: weights [O, K] reordered once into
    the primitive's layout; residual add and activation as post-ops. `run(x, y[, z])`."""

    def __init__(self, lib: _Lib, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 z: torch.Tensor | None, act: str, alpha: float, beta: float, act_first: bool) -> None:
        d = lib.dll
        src_md, dst_md = lib.md(x.shape, x.stride()), lib.md(y.shape, y.stride())
        b_md = lib.md([int(w.shape[0])], [1]) if b is not None else None
        attr, z_arg, z_md = _post_ops(lib, act, alpha, beta, z, act_first)
        pd = P()
        lib.ok(d.dnnl_inner_product_forward_primitive_desc_create(
            C.byref(pd), lib.engine, FORWARD_INFERENCE, src_md, lib.md(w.shape, None), b_md, dst_md, attr),
            "inner product descriptor")
        self._finish_layer(lib, pd, w, list(w.shape), b, b_md, src_md, dst_md, z_arg, z_md)


class MatMul(_Primitive):
    """One oneDNN (batched) matmul dst = src @ weights (+ bias) for fixed shapes and strides, with constant
    weights reordered once into the primitive's layout; residual add and activation as post-ops.
    `run(src, dst[, z])`."""

    def __init__(self, lib: _Lib, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, b: torch.Tensor | None = None,
                 z: torch.Tensor | None = None, act: str = "", alpha: float = 0.0, beta: float = 0.0,
                 act_first: bool = False) -> None:
        src_md, dst_md = lib.md(x.shape, x.stride()), lib.md(y.shape, y.stride())
        b_shape = [1] * (y.dim() - 1) + [int(y.shape[-1])]
        b_md = lib.md(b_shape, [int(y.shape[-1])] * (y.dim() - 1) + [1]) if b is not None else None
        attr, z_arg, z_md = _post_ops(lib, act, alpha, beta, z, act_first)
        pd = P()
        lib.ok(lib.dll.dnnl_matmul_primitive_desc_create(C.byref(pd), lib.engine, src_md, lib.md(w.shape, None),
                                                         b_md, dst_md, attr), "matmul descriptor")
        self._finish_layer(lib, pd, w, list(w.shape), b, b_md, src_md, dst_md, z_arg, z_md)


class Reorder(_Primitive):
    """One oneDNN reorder (a jit copy between layouts) for fixed source and destination shapes and strides."""

    def __init__(self, lib: _Lib, x: torch.Tensor, y: torch.Tensor) -> None:
        src_md, dst_md = lib.md(x.shape, x.stride()), lib.md(y.shape, y.stride())
        pd = P()
        lib.ok(lib.dll.dnnl_reorder_primitive_desc_create(C.byref(pd), src_md, lib.engine, dst_md, lib.engine, None),
               "reorder descriptor")
        self._finish(lib, pd, [], [(ARG_SRC, src_md), (ARG_DST, dst_md)])


class ChannelsLast:
    """Brings a kernel input into the dense channels-last layout its primitives were made for.

    A tensor already in it passes through; any other (a network's NCHW input, a strided view) is copied
    by a cached oneDNN reorder into a buffer this object keeps per thread and reuses on every call
    (about half the time of torch's permuting copy, and no allocation).
    """

    def __init__(self, lib: _Lib) -> None:
        self.lib = lib
        self.reorders: dict[tuple[Any, ...], Reorder] = {}
        self.local = threading.local()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return x.contiguous()
        if x.is_contiguous(memory_format=torch.channels_last):
            return x
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.shape != x.shape:
            buf = self.local.buf = torch.empty(x.shape, memory_format=torch.channels_last)
        key = (x.shape, x.stride())
        prim = self.reorders.get(key)
        if prim is None:
            prim = self.reorders[key] = Reorder(self.lib, x, buf)
        prim.run(x, buf)
        return buf


def _reorder(lib: _Lib, src_md: Any, src: int, dst_md: Any, dst: int) -> None:
    """Copy src into dst's layout once (weights into the layout a primitive chose)."""
    d = lib.dll
    pd, prim = P(), P()
    lib.ok(d.dnnl_reorder_primitive_desc_create(C.byref(pd), src_md, lib.engine, P(dst_md), lib.engine, None),
           "reorder descriptor")
    lib.ok(d.dnnl_primitive_create(C.byref(prim), pd), "reorder")
    args = (_Arg * 2)(_Arg(ARG_SRC, lib.memory(src_md, src)), _Arg(ARG_DST, lib.memory(dst_md, dst)))
    lib.ok(d.dnnl_primitive_execute(prim, lib.stream, 2, args), "reorder")


Made = tuple[_Primitive, tuple[int, ...]]
T = TypeVar("T")


class ReferenceFallback:
    """A layer's own reference implementation (OpDef.compute), for input shapes at which oneDNN declines
    the layer's primitive: only its reference loops for that shape on this CPU, a shape the build never
    saw (a dynamic profile, an O0 plan that timed nothing, a plan built on another machine).

    `attempt(key, make, what)` makes a kernel's per-shape state, or records why oneDNN declined and
    returns None (at once for a key already declined); the call `fallback(key, args, out)` then runs the
    reference on the kernel's inputs in the node's order (prepacked constants may be None) into its
    destination(s). Warns once per layer unless `quiet`; `reason` is set once it ran, and the autotuner
    skips a candidate that ran through it, so no timing credits a tactic with its fallback.
    """

    def __init__(self, node: Any) -> None:
        from kiln.ops.registry import lookup
        self.node = node
        self.compute = lookup(node.op_type, node.domain).compute
        self.declined: dict[Any, str] = {}
        self.reason: str | None = None
        self.quiet = False

    def attempt(self, key: Any, make: Callable[[], T], what: str) -> T | None:
        if key in self.declined:
            return None
        try:
            return make()
        except (DnnlError, ValueError) as e:  # ValueError: a geometry oneDNN cannot express at this shape
            self.declined[key] = f"{what}: {e}"
            return None

    def __call__(self, key: Any, args: Sequence[Any], out: torch.Tensor | tuple[torch.Tensor, ...] | None
                 ) -> torch.Tensor:
        node, reason = self.node, self.declined[key]
        if self.reason is None and not self.quiet:
            from kiln.logger import Logger
            Logger().warning(f"layer '{node.name}' ({node.op_type}): {reason}; running the op's reference "
                             f"implementation instead")
        self.reason = reason
        xs = [a if a is not None or node.input(i) is None else node.inputs[i].const for i, a in enumerate(args)]
        xs += [None if v is None else v.const for v in node.inputs[len(xs):]]
        while xs and xs[-1] is None:
            xs.pop()
        r = self.compute(node, *xs)
        r = r[0] if isinstance(r, (tuple, list)) else r
        if out is None:
            return r
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            o.copy_(r)
        return outs[0]


def shape_cached(name: str, make: Callable[[torch.Tensor, torch.Tensor | None], Made], fallback: ReferenceFallback,
                 args: Callable[[torch.Tensor, torch.Tensor | None], tuple[Any, ...]] = lambda x, z: (x,)
                 ) -> Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]:
    """A layer's per-call function over primitives made once per input shape and strides.

    make(x, z) -> (primitive, output shape) on a miss; the call `run(x, z, out)` executes the primitive
    into `out` (dense, channels-last for 4-D outputs: an arena slot) or a new tensor, and returns it.
    Shapes oneDNN declines go to `fallback`, with the node's inputs `args(x, z)`.
    """
    cache: dict[tuple[Any, ...], tuple[_Primitive, tuple[int, ...], torch.memory_format]] = {}

    def run(x: torch.Tensor, z: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
        key = (x.shape, x.stride(), None if z is None else (z.shape, z.stride()))
        entry = cache.get(key)
        if entry is None:
            made = fallback.attempt(key, lambda: make(x, z), f"input shape {list(x.shape)}")
            if made is None:
                return fallback(key, args(x, z), out)
            prim, shape = made
            entry = cache[key] = (prim, shape, torch.channels_last if len(shape) == 4 else torch.contiguous_format)
        prim, shape, fmt = entry
        if out is None:
            out = torch.empty(shape, memory_format=fmt)
        elif out.shape != shape or not out.is_contiguous(memory_format=fmt):
            raise KilnError(f"'{name}' takes a dense destination of shape {list(shape)}"
                            f"{' (channels-last)' if len(shape) == 4 else ''}, got {list(out.shape)} with "
                            f"strides {list(out.stride())}")
        prim.run(x, out) if z is None else prim.run(x, out, z)
        return out
    return run
