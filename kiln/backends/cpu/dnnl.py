"""oneDNN's C API through ctypes: convolution primitives created once per shape, executed on torch memory.

torch's oneDNN ops rebuild their primitive descriptor on every call (about 20-30 us per layer at batch
1). With the library itself (the ``onednn-cpu-gomp`` wheel, ``pip install kiln[cpu]``: ``libdnnl.so.3``
under ``sys.prefix/lib`` or the user base, or the path in ``KILN_DNNL_LIB``) a kernel creates its
primitive once per input shape, reorders its weights once into the layout the primitive chose, and an
inference is two handle updates and one ``dnnl_primitive_execute`` on the tensors' own memory. When
the library is absent, ``library()`` is None and the tactic built on it declines every layer.

Resources: every oneDNN object is owned by exactly one Python object and destroyed exactly once.
Descriptors, attributes and primitive descriptors needed only to create a primitive are destroyed as
soon as it exists; a ``_Primitive`` owns its primitive, memory descriptors, memory objects and scratchpad
buffers and frees them in ``close()`` (a kernel's ``release``, called by ``Engine.close``) or, without it,
when it is garbage-collected (``weakref.finalize``).

Threads: a primitive may run on several threads at once (one Engine shared by many execution contexts).
Each call takes its own argument set (memory objects re-pointed at the call's tensors, and a private
scratchpad: primitives use oneDNN's user-managed scratchpad, as the library's global one is per
creating thread) from a free list, so nothing mutable is shared between concurrent calls; the list
holds as many sets as calls ever ran at once. Closing a kernel while another thread runs it is not
allowed (as destroying a TensorRT engine with contexts still executing).

Safety: a primitive is made for fixed shapes, strides and element types (callers key their caches on
the shapes and strides) and ``_Primitive.run`` refuses any tensor whose dtype is not the one its argument
was made for (float32 unless the primitive says otherwise), so a tensor of another dtype never reaches
the native code.

bfloat16 layers (a bf16 build on a CPU with BF16 instructions): ``Convolution`` and ``InnerProduct`` take a
bfloat16 source with bfloat16 weights (reordered once from the float32 values of the constant into the
primitive's bfloat16 layout), a float32 bias and a bfloat16 or float32 destination and residual; ``Pooling``
reads and writes bfloat16. oneDNN accumulates in float32 and applies the post-ops before the one rounding on
store. Without BF16 instructions it has only reference loops for these, which `_finish` refuses.

Integer layers (``QConvolution``, ``QMatMul``: kiln.ops.qlayers' QConv / QGemm): int8/uint8 sources, int8
weights reordered once (with the compensation oneDNN's int8 kernels need), the combined multiplier
``x_scale * w_scales[k]`` as oneDNN 3.x's weights scales and the zero points as attributes, their values
fixed memory arguments (``DNNL_ARG_ATTR_SCALES | arg``, ``DNNL_ARG_ATTR_ZERO_POINTS | arg``); the
requantization ``v * (1 / y_scale)`` is the last post-op (an eltwise linear, so it rounds as the reference
does) and oneDNN adds the output zero point, rounds half to even and saturates (it rounds v + zp, so an odd
zero point gets an eltwise round first: the reference rounds v).
"""
from __future__ import annotations

import ctypes as C
import glob
import os
import site
import sys
import threading
import weakref
from typing import Any, Callable, Sequence, TypeVar

import torch

from kiln.errors import KilnError, PlanFormatError

P = C.c_void_p
Dims = C.c_int64 * 12
_PP, _DIMS, _I, _F = C.POINTER(C.c_void_p), C.POINTER(C.c_int64), C.c_int, C.c_float

F16, BF16, F32, S32, S8, U8 = 1, 2, 3, 4, 5, 6  # dnnl_data_type_t
FLOAT32 = torch.float32
DATA_TYPES: dict[torch.dtype, int] = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16,
                                      torch.int32: S32, torch.int8: S8, torch.uint8: U8}
"""torch dtype -> oneDNN data type of the tensors primitives here read and write."""
CPU_ENGINE, IN_ORDER = 1, 1
FORWARD_INFERENCE, CONVOLUTION_DIRECT, BINARY_ADD = 96, 1, 0x1FFF0
POOLING_MAX, POOLING_AVG_INCLUDE_PAD, POOLING_AVG_EXCLUDE_PAD = 0x1FF, 0x2FF, 0x3FF
QUERY_IMPL_INFO, QUERY_WEIGHTS_MD, QUERY_SCRATCHPAD_MD = 8, 131, 136
ARG_SRC, ARG_SRC_1, ARG_DST, ARG_WEIGHTS, ARG_BIAS, ARG_SCRATCHPAD = 1, 2, 17, 33, 41, 80
ARG_ATTR_SCALES, ARG_ATTR_ZERO_POINTS = 4096, 8192
ELTWISE_LINEAR, ELTWISE_ROUND = 0x26, 0x32
POST_OP_ARG_BASE = 32768
TAG_ANY = 1
SCRATCHPAD_USER = 1
MAX_NDIMS = 12

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

_SIGNATURES: dict[str, list[Any]] = {  # argument types: pointers must never go through ctypes' default int
    "dnnl_engine_create": [_PP, _I, C.c_size_t],
    "dnnl_stream_create": [_PP, P, C.c_uint],
    "dnnl_memory_desc_create_with_tag": [_PP, _I, _DIMS, _I, _I],
    "dnnl_memory_desc_create_with_strides": [_PP, _I, _DIMS, _I, _DIMS],
    "dnnl_memory_desc_clone": [_PP, P],
    "dnnl_memory_desc_get_size": [P],
    "dnnl_memory_create": [_PP, P, P, P],
    "dnnl_memory_set_data_handle": [P, P],
    "dnnl_primitive_attr_create": [_PP],
    "dnnl_primitive_attr_set_scratchpad_mode": [P, _I],
    "dnnl_primitive_attr_set_post_ops": [P, P],
    "dnnl_primitive_attr_set_scales_mask": [P, _I, _I],
    "dnnl_primitive_attr_set_zero_points_mask": [P, _I, _I],
    "dnnl_post_ops_create": [_PP],
    "dnnl_post_ops_len": [P],
    "dnnl_post_ops_append_eltwise": [P, _I, _F, _F],
    "dnnl_post_ops_append_binary": [P, _I, P],
    "dnnl_primitive_desc_query": [P, _I, _I, P],
    "dnnl_primitive_desc_query_md": [P, _I, _I],
    "dnnl_primitive_create": [_PP, P],
    "dnnl_primitive_execute": [P, P, _I, P],
    "dnnl_convolution_forward_primitive_desc_create": [_PP, P, _I, _I, P, P, P, P, _DIMS, _DIMS, _DIMS, _DIMS, P],
    "dnnl_pooling_forward_primitive_desc_create": [_PP, P, _I, _I, P, P, _DIMS, _DIMS, _DIMS, _DIMS, _DIMS, P],
    "dnnl_inner_product_forward_primitive_desc_create": [_PP, P, _I, P, P, P, P, P],
    "dnnl_matmul_primitive_desc_create": [_PP, P, P, P, P, P, P],
    "dnnl_reorder_primitive_desc_create": [_PP, P, P, P, P, P],
}
_KINDS = ("primitive", "primitive_desc", "memory", "memory_desc", "primitive_attr", "post_ops")


class DnnlError(RuntimeError):
    """A oneDNN call returned an error status."""


class _Arg(C.Structure):
    _fields_ = [("arg", C.c_int), ("memory", P)]


class _Owned:
    """oneDNN objects owned together by one Python object, destroyed together exactly once by `close`."""

    __slots__ = ("lib", "items", "lock")

    def __init__(self, lib: "_Lib") -> None:
        self.lib, self.items, self.lock = lib, [], threading.Lock()

    def add(self, kind: str, handle: P) -> P:
        if handle.value:
            with self.lock:
                self.items.append((kind, handle.value))
        return handle

    def close(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        destroy = self.lib.destroy
        for kind, h in reversed(items):
            destroy[kind](h)

    def __len__(self) -> int:
        return len(self.items)


class _Lib:
    """The loaded library, one CPU engine and one in-order stream (a CPU stream holds no per-call state:
    primitives from several threads execute on it at once)."""

    def __init__(self, path: str) -> None:
        self.dll = d = C.CDLL(path)
        for name, argtypes in _SIGNATURES.items():
            getattr(d, name).argtypes = argtypes
        d.dnnl_primitive_desc_query_md.restype = P
        d.dnnl_memory_desc_get_size.restype = C.c_size_t
        self.destroy: dict[str, Any] = {}
        for kind in _KINDS:
            fn = getattr(d, f"dnnl_{kind}_destroy")
            fn.argtypes = [P]
            self.destroy[kind] = fn
        self.engine, self.stream = P(), P()
        self.ok(d.dnnl_engine_create(C.byref(self.engine), CPU_ENGINE, 0), "engine")
        self.ok(d.dnnl_stream_create(C.byref(self.stream), self.engine, IN_ORDER), "stream")

    @staticmethod
    def ok(status: int, what: str) -> None:
        if status != 0:
            raise DnnlError(f"oneDNN {what} failed with status {status}")

    def md(self, own: _Owned, shape: Sequence[int], strides: Sequence[int] | None, dt: int = F32) -> P:
        """A memory descriptor of data type `dt` (float32 by default) owned by `own`: plain with these strides,
        or format `any` (strides None)."""
        if not 0 < len(shape) <= MAX_NDIMS or (strides is not None and len(strides) != len(shape)):
            raise DnnlError(f"oneDNN takes 1 to {MAX_NDIMS} dims, got shape {list(shape)}")
        md = P()
        if strides is None:
            self.ok(self.dll.dnnl_memory_desc_create_with_tag(C.byref(md), len(shape), Dims(*shape), dt, TAG_ANY),
                    "memory descriptor")
        else:
            self.ok(self.dll.dnnl_memory_desc_create_with_strides(C.byref(md), len(shape), Dims(*shape), dt,
                                                                  Dims(*strides)), "memory descriptor")
        return own.add("memory_desc", md)

    def memory(self, own: _Owned, md: Any, data: int) -> P:
        """A memory object owned by `own` on `data` (0: none yet, set per call)."""
        mem = P()
        self.ok(self.dll.dnnl_memory_create(C.byref(mem), md, self.engine, data or None), "memory")
        return own.add("memory", mem)

    def attr(self, own: _Owned) -> P:
        """Primitive attributes owned by `own`, with the user-managed scratchpad (see the module doc)."""
        attr = P()
        self.ok(self.dll.dnnl_primitive_attr_create(C.byref(attr)), "attributes")
        own.add("primitive_attr", attr)
        self.ok(self.dll.dnnl_primitive_attr_set_scratchpad_mode(attr, SCRATCHPAD_USER), "scratchpad mode")
        return attr

    def pd(self, own: _Owned, what: str, create: Any, *args: Any) -> P:
        """A primitive descriptor made by `create(&pd, *args)`, owned by `own`."""
        pd = P()
        self.ok(create(C.byref(pd), *args), what)
        return own.add("primitive_desc", pd)

    def scratchpad_md(self, pd: P) -> tuple[Any, int]:
        """(the primitive's scratchpad descriptor, owned by pd, and its size in bytes; 0: it needs none)."""
        md = self.dll.dnnl_primitive_desc_query_md(pd, QUERY_SCRATCHPAD_MD, 0)
        return md, int(self.dll.dnnl_memory_desc_get_size(md)) if md else 0


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


def released(name: str) -> KilnError:
    """The error of a kernel called after its release (Engine.close)."""
    return KilnError(f"'{name}': the kernel was released (its engine was closed)")


class _ArgSet:
    """One call's execute arguments: memory objects re-pointed at the call's tensors, and a scratchpad.
    Used by one call at a time (taken from and returned to its primitive's free list)."""

    __slots__ = ("args", "nargs", "mems", "ptrs", "scratch")


class _Primitive:
    """A created primitive; `run` executes it on given tensors (see the module doc for threads and resources)."""

    impl = ""

    def _begin(self, lib: _Lib) -> _Owned:
        """Start building: what lives as long as the primitive goes to self.own (destroyed by close() or when
        this object is collected, even half-built); returns an owner for the temporaries, which the caller
        closes once the primitive exists."""
        self.lib, self.dll, self.stream = lib, lib.dll, lib.stream
        self.own = own = _Owned(lib)
        self.closed = False
        self.free: list[_ArgSet] = []
        fin = weakref.finalize(self, own.close)
        fin.atexit = False  # at interpreter exit the process frees everything anyway
        self._finalizer = fin
        return _Owned(lib)

    def _finish(self, pd: P, fixed: list[tuple[int, Any, int]], dynamic: Sequence[tuple[Any, ...]]) -> None:
        """fixed: (arg, md, data pointer kept alive by self); dynamic: (arg, md) or (arg, md, torch dtype; default
        float32) set per call, in run's order (run refuses a tensor of another dtype)."""
        lib, d = self.lib, self.dll
        impl = C.c_char_p()
        lib.ok(d.dnnl_primitive_desc_query(pd, QUERY_IMPL_INFO, 0, C.byref(impl)), "implementation query")
        self.impl = (impl.value or b"").decode()
        if self.impl.startswith("ref"):  # oneDNN's reference loops: orders of magnitude slower than torch's path
            raise DnnlError(f"oneDNN has only its reference implementation ({self.impl}) here")
        prim = P()
        lib.ok(d.dnnl_primitive_create(C.byref(prim), pd), "primitive")
        self.prim = self.own.add("primitive", prim)
        self.fixed = [_Arg(a, lib.memory(self.own, md, ptr)) for a, md, ptr in fixed]
        self.dynamic = [(a, self._keep(md)) for a, md, *_ in dynamic]
        self.dtypes = [dt[0] if dt else FLOAT32 for _, _, *dt in dynamic]
        scratch_md, self.scratch_bytes = lib.scratchpad_md(pd)
        self.scratch_md = self._keep(scratch_md) if self.scratch_bytes else None
        self.free.append(self._argset())  # a single-threaded caller never needs another

    def _keep(self, md: Any) -> P:
        """A copy of a memory descriptor that lives as long as the primitive (argument sets are made from it)."""
        out = P()
        self.lib.ok(self.dll.dnnl_memory_desc_clone(C.byref(out), md), "memory descriptor copy")
        return self.own.add("memory_desc", out)

    def _argset(self) -> _ArgSet:
        """A new argument set, for a call while all others are in use (a call on another thread)."""
        if self.closed:
            raise KilnError(f"oneDNN {self.impl} primitive was released")
        lib, own = self.lib, self.own
        a = _ArgSet()
        a.mems = [lib.memory(own, md, 0) for _, md in self.dynamic]
        args = self.fixed + [_Arg(arg, m) for (arg, _), m in zip(self.dynamic, a.mems)]
        a.scratch = None
        if self.scratch_md is not None:
            a.scratch = torch.empty(self.scratch_bytes, dtype=torch.uint8)
            args.append(_Arg(ARG_SCRATCHPAD, lib.memory(own, self.scratch_md, a.scratch.data_ptr())))
        a.args, a.nargs, a.ptrs = (_Arg * len(args))(*args), len(args), [0] * len(a.mems)
        return a

    def _finish_layer(self, tmp: _Owned, pd: P, w: torch.Tensor, w_shape: list[int], b: torch.Tensor | None,
                      b_md: Any, src_md: Any, dst_md: Any, z_arg: int, z_md: Any,
                      dtypes: Sequence[torch.dtype] = (FLOAT32, FLOAT32, FLOAT32)) -> None:
        """`_finish` for a layer with constant weights, an optional bias and an optional residual post-op;
        `dtypes`: those of the source, destination and residual run() takes."""
        w_md = self._weights(tmp, pd, w, w_shape)
        self.bias = None if b is None else b.detach().float().contiguous()
        fixed = [(ARG_WEIGHTS, w_md, self.weights.data_ptr())]
        if self.bias is not None:
            fixed.append((ARG_BIAS, b_md, self.bias.data_ptr()))
        dynamic = [(ARG_SRC, src_md, dtypes[0]), (ARG_DST, dst_md, dtypes[1])]
        if z_md is not None:
            dynamic.append((z_arg, z_md, dtypes[2]))
        self._finish(pd, fixed, dynamic)

    def _weights(self, tmp: _Owned, pd: P, w: torch.Tensor, shape: list[int]) -> Any:
        """Reorder the weights once into the layout the primitive chose (self.weights); returns that layout's
        descriptor, owned by pd."""
        return self._weights_from(tmp, pd, w.detach().float().contiguous().reshape(shape))

    def _weights_from(self, tmp: _Owned, pd: P, plain: torch.Tensor) -> Any:
        """`_weights` from a tensor of the primitive's logical weights shape and data type, any strides (the
        reorder also computes the compensation an int8 layout carries)."""
        lib = self.lib
        w_md = lib.dll.dnnl_primitive_desc_query_md(pd, QUERY_WEIGHTS_MD, 0)
        self.weights = torch.empty(lib.dll.dnnl_memory_desc_get_size(w_md), dtype=torch.uint8)
        _reorder(lib, lib.md(tmp, plain.shape, plain.stride(), _data_type(plain)), plain.data_ptr(), w_md,
                 self.weights.data_ptr())
        return w_md

    def run(self, *tensors: torch.Tensor) -> None:
        """Execute on these tensors, of the shapes and strides the primitive was made for (its callers key their
        primitives on them) and of its dtypes (checked here: float32 unless made otherwise). Safe on several
        threads at once: each call takes its own argument set."""
        free = self.free
        try:
            a = free.pop()
        except IndexError:
            a = self._argset()
        try:
            d, ptrs, mems, dtypes = self.dll, a.ptrs, a.mems, self.dtypes
            if len(tensors) != len(dtypes):
                raise KilnError(f"oneDNN {self.impl} takes {len(dtypes)} tensors, got {len(tensors)}")
            for i, t in enumerate(tensors):
                if t.dtype is not dtypes[i]:
                    raise KilnError(f"oneDNN {self.impl} takes {dtypes[i]} tensors, got {t.dtype}")
                p = t.data_ptr()
                if p != ptrs[i]:  # arena slots keep their addresses from one inference to the next
                    d.dnnl_memory_set_data_handle(mems[i], p)
                    ptrs[i] = p
            status = d.dnnl_primitive_execute(self.prim, self.stream, a.nargs, a.args)
        finally:
            free.append(a)
        if status != 0:
            raise DnnlError(f"oneDNN {self.impl} failed with status {status}")

    def close(self) -> None:
        """Destroy the native objects now (idempotent); the primitive cannot run afterwards."""
        self.closed = True
        self.free = []
        self._finalizer()


def _post_ops(lib: _Lib, tmp: _Owned, act: str, alpha: float, beta: float, z: torch.Tensor | None,
              act_first: bool, z_scale: float = 1.0, z_zero_point: int = 0,
              out_scale: float = 1.0, out_round: bool = False,
              mid: tuple[float, int, int, int] | None = None) -> tuple[P, int, Any]:
    """Primitive attributes with the residual add (`z`) and the activation as post-ops in the node's order:
    (attributes, the execute argument of z or -1, z's memory descriptor or None), all owned by `tmp`.

    An integer z is added dequantized, v + (z - z_zero_point) * z_scale, as v * (1 / z_scale) - z_zero_point,
    + z, * z_scale (exact with power-of-two scales); a last eltwise linear multiplies by `out_scale` (the
    reciprocal output scale of an integer layer), and `out_round` rounds half to even before oneDNN adds the
    output zero point (it would round v + zp otherwise: -17.5 - 5 gives -22, not -18 - 5). `mid` (scale,
    zero point, lo, hi): the layer's own result is requantized to that grid and dequantized before the residual
    (a Q/DQ pair of the model kept inside a fused residual add, kiln.ops.qlayers' a_scale)."""
    d = lib.dll
    attr, po = lib.attr(tmp), P()
    lib.ok(d.dnnl_post_ops_create(C.byref(po)), "post-ops")
    tmp.add("post_ops", po)

    def linear(a: float, b: float) -> None:
        lib.ok(d.dnnl_post_ops_append_eltwise(po, ELTWISE_LINEAR, a, b), "eltwise post-op")
    z_arg, z_md = -1, None
    for op in (["act", "mid", "z"] if act_first else ["mid", "z", "act"]):
        if op == "mid" and mid is not None:
            scale, zp, lo, hi = mid
            linear(1.0 / scale, 0.0)
            lib.ok(d.dnnl_post_ops_append_eltwise(po, ELTWISE_ROUND, 0.0, 0.0), "eltwise post-op")
            lib.ok(d.dnnl_post_ops_append_eltwise(po, ELTWISE["Clip"][0], float(lo - zp), float(hi - zp)),
                   "eltwise post-op")
            linear(scale, 0.0)
        elif op == "act" and act:
            alg, params = ELTWISE[act]
            a, bb = params(alpha, beta)
            lib.ok(d.dnnl_post_ops_append_eltwise(po, alg, a, bb), "eltwise post-op")
        elif op == "z" and z is not None:
            dequant = z.dtype in (torch.int8, torch.uint8) and (z_scale != 1.0 or z_zero_point != 0)
            if dequant:
                linear(1.0 / z_scale, float(-z_zero_point))
            z_arg = POST_OP_ARG_BASE * (d.dnnl_post_ops_len(po) + 1) | ARG_SRC_1
            z_md = lib.md(tmp, z.shape, z.stride(), _data_type(z))
            lib.ok(d.dnnl_post_ops_append_binary(po, BINARY_ADD, z_md), "binary post-op")
            if dequant and z_scale != 1.0:
                linear(z_scale, 0.0)
    if out_scale != 1.0:
        linear(out_scale, 0.0)
    if out_round:
        lib.ok(d.dnnl_post_ops_append_eltwise(po, ELTWISE_ROUND, 0.0, 0.0), "eltwise post-op")
    lib.ok(d.dnnl_primitive_attr_set_post_ops(attr, po), "post-op attribute")
    return attr, z_arg, z_md


def _data_type(t: torch.Tensor) -> int:
    """oneDNN's data type of t (KilnError for a dtype the primitives here do not take)."""
    dt = DATA_TYPES.get(t.dtype)
    if dt is None:
        raise KilnError(f"oneDNN primitives here take {', '.join(map(str, DATA_TYPES))} tensors, got {t.dtype}")
    return dt


LAYER_DTYPES = (FLOAT32, torch.bfloat16)
"""Activation dtypes of the float layers here (Convolution, InnerProduct, Pooling)."""


def _layer_dtypes(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None
                  ) -> tuple[tuple[torch.dtype, torch.dtype, torch.dtype], int]:
    """(source, destination, residual dtypes; the weights' oneDNN data type) of a float layer: all float32, or a
    bfloat16 source and weights with a float32 or bfloat16 destination and residual (KilnError otherwise)."""
    zt = y.dtype if z is None else z.dtype
    if x.dtype is FLOAT32 and y.dtype is FLOAT32 and zt is FLOAT32:
        return (FLOAT32, FLOAT32, FLOAT32), F32
    if x.dtype is torch.bfloat16 and y.dtype in LAYER_DTYPES and zt in LAYER_DTYPES:
        return (x.dtype, y.dtype, zt), BF16
    raise KilnError(f"a float layer reads float32 or bfloat16 tensors (float32 or bfloat16 output and residual "
                    f"of a bfloat16 one), got {x.dtype} -> {y.dtype}{'' if z is None else f' + {z.dtype}'}")


def _bias_md(lib: _Lib, tmp: _Owned, b: torch.Tensor | None, n: int, shape: list[int], strides: list[int]) -> Any:
    """The bias descriptor, after checking that the bias holds exactly the n values the primitive reads."""
    if b is None:
        return None
    if b.dtype != torch.float32 or b.numel() != n:
        raise KilnError(f"the bias must hold {n} float32 values, got {list(b.shape)} {b.dtype}")
    return lib.md(tmp, shape, strides)


def conv_weight_shape(x: torch.Tensor, w: torch.Tensor, groups: int) -> tuple[int, list[int]]:
    """(output channels, oneDNN's weight dims: [K, C/g, kh, kw], or [g, K/g, C/g, kh, kw] when grouped) of a 2-D
    convolution of `groups` groups reading x; KilnError where the weight cannot read x."""
    k, cg, kh, kw = (int(s) for s in w.shape)
    if groups < 1 or k % groups or x.dim() != 4 or int(x.shape[1]) != cg * groups:
        raise KilnError(f"a convolution of {groups} group(s) with weights {list(w.shape)} cannot read an "
                        f"input of shape {list(x.shape)}")
    return k, [k, cg, kh, kw] if groups == 1 else [groups, k // groups, cg, kh, kw]


class Convolution(_Primitive):
    """One oneDNN convolution primitive for fixed input/residual/output shapes, strides and dtypes (all float32,
    or a bfloat16 input with a bfloat16 or float32 output and residual: see the module doc).

    Weights are reordered once into the primitive's chosen layout; bias and residual add and the
    activation are post-ops in the node's order. `run(x, y[, z])` is safe to call from several threads.
    """

    def __init__(self, lib: _Lib, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 z: torch.Tensor | None, strides: Sequence[int], dilations: Sequence[int], pad_l: Sequence[int],
                 pad_r: Sequence[int], groups: int, act: str, alpha: float, beta: float, act_first: bool) -> None:
        tmp = self._begin(lib)
        try:
            k, w_shape = conv_weight_shape(x, w, groups)
            dtypes, w_dt = _layer_dtypes(x, y, z)
            src_md = lib.md(tmp, x.shape, x.stride(), _data_type(x))
            dst_md = lib.md(tmp, y.shape, y.stride(), _data_type(y))
            b_md = _bias_md(lib, tmp, b, k, [k], [1])
            attr, z_arg, z_md = _post_ops(lib, tmp, act, alpha, beta, z, act_first)
            pd = lib.pd(tmp, "convolution descriptor", lib.dll.dnnl_convolution_forward_primitive_desc_create,
                        lib.engine, FORWARD_INFERENCE, CONVOLUTION_DIRECT, src_md, lib.md(tmp, w_shape, None, w_dt),
                        b_md, dst_md, Dims(*strides), Dims(*[dd - 1 for dd in dilations]), Dims(*pad_l),
                        Dims(*pad_r), attr)
            self._finish_layer(tmp, pd, w, w_shape, b, b_md, src_md, dst_md, z_arg, z_md, dtypes)
        finally:
            tmp.close()


class Pooling(_Primitive):
    """One oneDNN pooling primitive (max, or average with/without pads) for fixed input/output shapes and
    strides: `run(x, y)`."""

    def __init__(self, lib: _Lib, x: torch.Tensor, y: torch.Tensor, algorithm: int, kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int], pad_l: Sequence[int],
                 pad_r: Sequence[int]) -> None:
        tmp = self._begin(lib)
        try:
            eight_bit = x.dtype in (torch.int8, torch.uint8) and algorithm == POOLING_MAX
            if (x.dtype not in LAYER_DTYPES and not eight_bit) or y.dtype is not x.dtype:
                raise KilnError(f"a pooling reads and writes float32 or bfloat16 tensors (a max pooling also "
                                f"int8/uint8), got {x.dtype} -> {y.dtype}")
            src_md = lib.md(tmp, x.shape, x.stride(), _data_type(x))
            dst_md = lib.md(tmp, y.shape, y.stride(), _data_type(y))
            pd = lib.pd(tmp, "pooling descriptor", lib.dll.dnnl_pooling_forward_primitive_desc_create, lib.engine,
                        FORWARD_INFERENCE, algorithm, src_md, dst_md, Dims(*strides), Dims(*kernel),
                        Dims(*[dd - 1 for dd in dilations]), Dims(*pad_l), Dims(*pad_r), lib.attr(tmp))
            self._finish(pd, [], [(ARG_SRC, src_md, x.dtype), (ARG_DST, dst_md, y.dtype)])
        finally:
            tmp.close()


class InnerProduct(_Primitive):
    """One oneDNN inner product y = x W^T (+ b) for a fixed [N, K] input: weights [O, K] reordered once into
    the primitive's layout; residual add and activation as post-ops. `run(x, y[, z])`."""

    def __init__(self, lib: _Lib, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 z: torch.Tensor | None, act: str, alpha: float, beta: float, act_first: bool) -> None:
        tmp = self._begin(lib)
        try:
            if x.dim() != 2 or w.dim() != 2 or int(x.shape[1]) != int(w.shape[1]):
                raise KilnError(f"an inner product with weights {list(w.shape)} cannot read an input of shape "
                                f"{list(x.shape)}")
            dtypes, w_dt = _layer_dtypes(x, y, z)
            src_md = lib.md(tmp, x.shape, x.stride(), _data_type(x))
            dst_md = lib.md(tmp, y.shape, y.stride(), _data_type(y))
            n = int(w.shape[0])
            b_md = _bias_md(lib, tmp, b, n, [n], [1])
            attr, z_arg, z_md = _post_ops(lib, tmp, act, alpha, beta, z, act_first)
            pd = lib.pd(tmp, "inner product descriptor", lib.dll.dnnl_inner_product_forward_primitive_desc_create,
                        lib.engine, FORWARD_INFERENCE, src_md, lib.md(tmp, w.shape, None, w_dt), b_md, dst_md, attr)
            self._finish_layer(tmp, pd, w, list(w.shape), b, b_md, src_md, dst_md, z_arg, z_md, dtypes)
        finally:
            tmp.close()


class MatMul(_Primitive):
    """One oneDNN (batched) matmul dst = src @ weights (+ bias) for fixed shapes and strides, with constant
    weights reordered once into the primitive's layout; residual add and activation as post-ops.
    `run(src, dst[, z])`."""

    def __init__(self, lib: _Lib, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, b: torch.Tensor | None = None,
                 z: torch.Tensor | None = None, act: str = "", alpha: float = 0.0, beta: float = 0.0,
                 act_first: bool = False) -> None:
        tmp = self._begin(lib)
        try:
            if x.dim() != w.dim() or int(x.shape[-1]) != int(w.shape[-2]):
                raise KilnError(f"a matmul with weights {list(w.shape)} cannot read an input of shape {list(x.shape)}")
            src_md, dst_md = lib.md(tmp, x.shape, x.stride()), lib.md(tmp, y.shape, y.stride())
            n = int(y.shape[-1])
            b_md = _bias_md(lib, tmp, b, n, [1] * (y.dim() - 1) + [n], [n] * (y.dim() - 1) + [1])
            attr, z_arg, z_md = _post_ops(lib, tmp, act, alpha, beta, z, act_first)
            pd = lib.pd(tmp, "matmul descriptor", lib.dll.dnnl_matmul_primitive_desc_create, lib.engine, src_md,
                        lib.md(tmp, w.shape, None), b_md, dst_md, attr)
            self._finish_layer(tmp, pd, w, list(w.shape), b, b_md, src_md, dst_md, z_arg, z_md)
        finally:
            tmp.close()




class Reorder(_Primitive):
    """One oneDNN reorder (a jit copy between layouts) for fixed source and destination shapes, strides and
    dtypes (those of x and y)."""

    def __init__(self, lib: _Lib, x: torch.Tensor, y: torch.Tensor) -> None:
        tmp = self._begin(lib)
        try:
            src_md = lib.md(tmp, x.shape, x.stride(), _data_type(x))
            dst_md = lib.md(tmp, y.shape, y.stride(), _data_type(y))
            pd = lib.pd(tmp, "reorder descriptor", lib.dll.dnnl_reorder_primitive_desc_create, src_md, lib.engine,
                        dst_md, lib.engine, lib.attr(tmp))
            self._finish(pd, [], [(ARG_SRC, src_md, x.dtype), (ARG_DST, dst_md, y.dtype)])
        finally:
            tmp.close()


class ChannelsLast:
    """Brings a kernel input into the dense channels-last layout its primitives were made for.

    A tensor already in it passes through; any other (a network's NCHW input, a strided view) is copied
    by a cached oneDNN reorder into a buffer this object keeps per thread and reuses on every call
    (about half the time of torch's permuting copy, and no allocation). Copies tensors of `dtypes` only
    (float32 by default; int8 layers pass their int8/uint8 activations). `close()` frees the reorders and
    every thread's buffer.
    """

    def __init__(self, lib: _Lib, dtypes: tuple[torch.dtype, ...] = (FLOAT32,)) -> None:
        self.lib, self.dtypes = lib, dtypes
        self.reorders: dict[tuple[Any, ...], Reorder] = {}
        self.local = threading.local()
        self.closed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return x.contiguous()
        if x.is_contiguous(memory_format=torch.channels_last):
            return x
        if x.dtype not in self.dtypes:
            raise KilnError(f"takes {' or '.join(map(str, self.dtypes))} tensors, got {x.dtype}")
        local = self.local
        buf = getattr(local, "buf", None)
        if buf is None or buf.shape != x.shape or buf.dtype is not x.dtype:
            buf = local.buf = torch.empty(x.shape, dtype=x.dtype, memory_format=torch.channels_last)
        key = (x.shape, x.stride(), x.dtype)
        prim = self.reorders.get(key)
        if prim is None:
            if self.closed:
                raise KilnError("the kernel was released (its engine was closed)")
            prim = self.reorders[key] = Reorder(self.lib, x, buf)
        prim.run(x, buf)
        return buf

    def close(self) -> None:
        self.closed = True
        prims = list(self.reorders.values())
        self.reorders.clear()
        self.local = threading.local()
        for p in prims:
            p.close()


def _reorder(lib: _Lib, src_md: Any, src: int, dst_md: Any, dst: int) -> None:
    """Copy src into dst's layout once (weights into the layout a primitive chose); everything made for the
    copy is destroyed before returning."""
    d = lib.dll
    tmp = _Owned(lib)
    try:
        pd = lib.pd(tmp, "reorder descriptor", d.dnnl_reorder_primitive_desc_create, src_md, lib.engine, dst_md,
                    lib.engine, lib.attr(tmp))
        prim = P()
        lib.ok(d.dnnl_primitive_create(C.byref(prim), pd), "reorder")
        tmp.add("primitive", prim)
        args = [_Arg(ARG_SRC, lib.memory(tmp, src_md, src)), _Arg(ARG_DST, lib.memory(tmp, dst_md, dst))]
        scratch_md, size = lib.scratchpad_md(pd)
        scratch = torch.empty(size, dtype=torch.uint8) if size else None
        if scratch is not None:
            args.append(_Arg(ARG_SCRATCHPAD, lib.memory(tmp, scratch_md, scratch.data_ptr())))
        lib.ok(d.dnnl_primitive_execute(prim, lib.stream, len(args), (_Arg * len(args))(*args)), "reorder")
    finally:
        tmp.close()


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
                 args: Callable[[torch.Tensor, torch.Tensor | None], tuple[Any, ...]] = lambda x, z: (x,),
                 x_dtypes: tuple[torch.dtype, ...] = (FLOAT32,), z_dtypes: tuple[torch.dtype, ...] = (FLOAT32,),
                 out_dtype: torch.dtype = FLOAT32
                 ) -> Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]:
    """A layer's per-call function over primitives made once per input shape and strides.

    make(x, z) -> (primitive, output shape) on a miss; the call `run(x, z, out)` executes the primitive
    into `out` (dense `out_dtype`, float32 by default, channels-last for 4-D outputs: an arena slot) or a
    new tensor, and returns it. Shapes oneDNN declines go to `fallback`, with the node's inputs `args(x, z)`.
    x and z must have one of `x_dtypes` / `z_dtypes` (float32 by default). A primitive is keyed on its
    tensors' shapes and strides and refuses other dtypes than it was made for (`_Primitive.run`), so every
    call hands oneDNN exactly the layout it was made for. `run.close()` destroys the primitives; a call
    after it raises KilnError.
    """
    cache: dict[tuple[Any, ...], tuple[_Primitive, tuple[int, ...], torch.memory_format]] = {}
    closed: list[bool] = []

    def run(x: torch.Tensor, z: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
        key = (x.shape, x.stride(), None if z is None else (z.shape, z.stride()))
        entry = cache.get(key)
        if entry is None:
            if closed:
                raise released(name)
            if x.dtype not in x_dtypes or (z is not None and z.dtype not in z_dtypes):
                want = " or ".join(str(t).replace("torch.", "") for t in x_dtypes)
                raise KilnError(f"'{name}' takes {want} tensors, got {x.dtype}"
                                f"{'' if z is None else f' and {z.dtype}'}")
            made = fallback.attempt(key, lambda: make(x, z), f"input shape {list(x.shape)}")
            if made is None:
                return fallback(key, args(x, z), out)
            prim, shape = made
            entry = cache[key] = (prim, shape, torch.channels_last if len(shape) == 4 else torch.contiguous_format)
        prim, shape, fmt = entry
        if out is None:
            out = torch.empty(shape, dtype=out_dtype, memory_format=fmt)
        elif out.shape != shape or not out.is_contiguous(memory_format=fmt) or out.dtype is not out_dtype:
            raise KilnError(f"'{name}' takes a dense destination of shape {list(shape)} "
                            f"({str(out_dtype).replace('torch.', '')}{', channels-last' if len(shape) == 4 else ''}), "
                            f"got {list(out.shape)} {out.dtype} with strides {list(out.stride())}")
        prim.run(x, out) if z is None else prim.run(x, out, z)  # run refuses a tensor of another dtype
        return out

    def close() -> None:
        closed.append(True)
        entries = list(cache.values())
        cache.clear()
        for prim, _, _ in entries:
            prim.close()
    run.close = close  # type: ignore[attr-defined]
    return run
