"""oneDNN's C API through ctypes: loading the library, its constants, and the objects every primitive is made of.

torch's oneDNN ops rebuild their primitive descriptor on every call (about 20-30 us per layer at batch
1). With the library itself (the ``onednn-cpu-gomp`` wheel, ``pip install kiln[cpu]``: ``libdnnl.so.3``
under ``sys.prefix/lib`` or the user base, or the path in ``KILN_DNNL_LIB``) a kernel creates its
primitive once per input shape, reorders its weights once into the layout the primitive chose, and an
inference is two handle updates and one ``dnnl_primitive_execute`` on the tensors' own memory. When
the library is absent, ``library()`` is None and the tactic built on it declines every layer.

This module is the core: the C signatures and constants, ``Library`` (one engine and stream; memory
descriptors, memory objects, attributes, primitive descriptors) and ``Owned`` (who destroys them). The
rest of the oneDNN family builds on it:

- ``dnnl_primitive``: ``Primitive``, the base of every primitive (per-call argument sets, the dtype check,
  weights reordered once), and ``Reorder`` / ``ChannelsLast`` (layout copies);
- ``dnnl_epilogue``: the fused epilogue as post-ops (bias, residual add, activation, requantization);
- ``dnnl_float``: float32 / bfloat16 ``Convolution``, ``Deconvolution``, ``InnerProduct``, ``MatMul`` and
  ``Pooling``;
- ``dnnl_int8``: the integer ``QConvolution`` and ``QMatMul``;
- ``dnnl_kernels``: the kernel shells the tactics share (``shape_cached``: one primitive per input shape);
- ``fallback``: ``ReferenceFallback``, the op's reference for shapes a fast path declines.

Resources: every oneDNN object is owned by exactly one Python object and destroyed exactly once.
Descriptors, attributes and primitive descriptors needed only to create a primitive are destroyed as
soon as it exists; a ``Primitive`` owns its primitive, memory descriptors, memory objects and scratchpad
buffers and frees them in ``close()`` (a kernel's ``release``, called by ``Engine.close``) or, without it,
when it is garbage-collected (``weakref.finalize``).
"""
from __future__ import annotations

import ctypes as C
import glob
import os
import site
import sys
import threading
from typing import Any, Sequence

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
FORWARD_INFERENCE, CONVOLUTION_DIRECT, DECONVOLUTION_DIRECT, BINARY_ADD = 96, 1, 0xA, 0x1FFF0
POOLING_MAX, POOLING_AVG_INCLUDE_PAD, POOLING_AVG_EXCLUDE_PAD = 0x1FF, 0x2FF, 0x3FF
QUERY_IMPL_INFO, QUERY_WEIGHTS_MD, QUERY_SCRATCHPAD_MD = 8, 131, 136
ARG_SRC, ARG_SRC_1, ARG_DST, ARG_WEIGHTS, ARG_BIAS, ARG_SCRATCHPAD = 1, 2, 17, 33, 41, 80
ARG_ATTR_SCALES, ARG_ATTR_ZERO_POINTS = 4096, 8192
ELTWISE_LINEAR, ELTWISE_ROUND = 0x26, 0x32
POST_OP_ARG_BASE = 32768
TAG_ANY = 1
SCRATCHPAD_USER = 1
MAX_NDIMS = 12

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
    "dnnl_deconvolution_forward_primitive_desc_create": [_PP, P, _I, _I, P, P, P, P, _DIMS, _DIMS, _DIMS, _DIMS, P],
    "dnnl_pooling_forward_primitive_desc_create": [_PP, P, _I, _I, P, P, _DIMS, _DIMS, _DIMS, _DIMS, _DIMS, P],
    "dnnl_inner_product_forward_primitive_desc_create": [_PP, P, _I, P, P, P, P, P],
    "dnnl_matmul_primitive_desc_create": [_PP, P, P, P, P, P, P],
    "dnnl_reorder_primitive_desc_create": [_PP, P, P, P, P, P],
}
_KINDS = ("primitive", "primitive_desc", "memory", "memory_desc", "primitive_attr", "post_ops")


class DnnlError(RuntimeError):
    """A oneDNN call returned an error status."""


class Owned:
    """oneDNN objects owned together by one Python object, destroyed together exactly once by `close`."""

    __slots__ = ("lib", "items", "lock")

    def __init__(self, lib: "Library") -> None:
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


class Library:
    """The loaded library, one CPU engine and one in-order stream (a CPU stream holds no per-call state:
    primitives from several threads execute on it at once)."""

    def __init__(self, path: str) -> None:
        self.dll = d = C.CDLL(path)
        for name, argtypes in _SIGNATURES.items():
            getattr(d, name).argtypes = argtypes
        d.dnnl_primitive_desc_query_md.restype = P
        d.dnnl_memory_desc_get_size.restype = C.c_size_t
        # the per-call execute without argument conversion (0.5 us of a 1.5 us call): a separate function object
        # whose callers pass only ctypes objects (c_void_p primitive, stream and argument array address) and the
        # argument count, so no pointer ever goes through ctypes' default int conversion
        self.execute_raw = d["dnnl_primitive_execute"]
        self.execute_raw.restype = C.c_int
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

    def md(self, own: Owned, shape: Sequence[int], strides: Sequence[int] | None, dt: int = F32) -> P:
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

    def memory(self, own: Owned, md: Any, data: int) -> P:
        """A memory object owned by `own` on `data` (0: none yet, set per call)."""
        mem = P()
        self.ok(self.dll.dnnl_memory_create(C.byref(mem), md, self.engine, data or None), "memory")
        return own.add("memory", mem)

    def attr(self, own: Owned) -> P:
        """Primitive attributes owned by `own`, with the user-managed scratchpad (see the module doc)."""
        attr = P()
        self.ok(self.dll.dnnl_primitive_attr_create(C.byref(attr)), "attributes")
        own.add("primitive_attr", attr)
        self.ok(self.dll.dnnl_primitive_attr_set_scratchpad_mode(attr, SCRATCHPAD_USER), "scratchpad mode")
        return attr

    def pd(self, own: Owned, what: str, create: Any, *args: Any) -> P:
        """A primitive descriptor made by `create(&pd, *args)`, owned by `own`."""
        pd = P()
        self.ok(create(C.byref(pd), *args), what)
        return own.add("primitive_desc", pd)

    def scratchpad_md(self, pd: P) -> tuple[Any, int]:
        """(the primitive's scratchpad descriptor, owned by pd, and its size in bytes; 0: it needs none)."""
        md = self.dll.dnnl_primitive_desc_query_md(pd, QUERY_SCRATCHPAD_MD, 0)
        return md, int(self.dll.dnnl_memory_desc_get_size(md)) if md else 0


_LIB: Library | None = None
_LOADED = False
_LOCK = threading.Lock()


def library() -> Library | None:
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
                        _LIB = Library(path)
                        break
                    except (OSError, DnnlError, AttributeError):
                        _LIB = None
    return _LIB


def require_library(node: Any, tactic: str) -> Library:
    """The library for building a layer that a plan assigned to a oneDNN tactic; one clear error without it."""
    lib = library()
    if lib is None:
        raise PlanFormatError(f"layer '{node.name}' uses tactic {tactic}, which needs the oneDNN library "
                              f"(pip install onednn-cpu-gomp); rebuild the plan without it or install it")
    return lib


def released(name: str) -> KilnError:
    """The error of a kernel called after its release (Engine.close)."""
    return KilnError(f"'{name}': the kernel was released (its engine was closed)")


def data_type(t: torch.Tensor) -> int:
    """oneDNN's data type of t (KilnError for a dtype the primitives here do not take)."""
    dt = DATA_TYPES.get(t.dtype)
    if dt is None:
        raise KilnError(f"oneDNN primitives here take {', '.join(map(str, DATA_TYPES))} tensors, got {t.dtype}")
    return dt
