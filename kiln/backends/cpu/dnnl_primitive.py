"""The base of every oneDNN primitive here (``Primitive``) and the layout copies (``Reorder``, ``ChannelsLast``).

Resources (see kiln.backends.cpu.dnnl): a ``Primitive`` owns its primitive, memory descriptors, memory
objects and scratchpad buffers and frees them in ``close()`` or, without it, when it is garbage-collected.

Threads: a primitive may run on several threads at once (one Engine shared by many execution contexts).
Each call takes its own argument set (memory objects re-pointed at the call's tensors, and a private
scratchpad: primitives use oneDNN's user-managed scratchpad, as the library's global one is per
creating thread) from a free list, so nothing mutable is shared between concurrent calls; the list
holds as many sets as calls ever ran at once. Closing a kernel while another thread runs it is not
allowed (as destroying a TensorRT engine with contexts still executing).

Safety: a primitive is made for fixed shapes, strides and element types (callers key their caches on
the shapes and strides) and ``Primitive.run`` refuses any tensor whose dtype is not the one its argument
was made for (float32 unless the primitive says otherwise), so a tensor of another dtype never reaches
the native code.
"""
from __future__ import annotations

import ctypes as C
import threading
import weakref
from typing import Any, Callable, Sequence

import torch

from kiln.backends.cpu.dnnl import (ARG_BIAS, ARG_DST, ARG_SCRATCHPAD, ARG_SRC, ARG_WEIGHTS, FLOAT32, QUERY_IMPL_INFO,
                                    QUERY_WEIGHTS_MD, P, DnnlError, Library, Owned, data_type)
from kiln.backends.strides import channels_innermost
from kiln.errors import KilnError
from kiln.ir.layout import canonical


class _Arg(C.Structure):
    _fields_ = [("arg", C.c_int), ("memory", P)]


class _ArgSet:
    """One call's execute arguments: memory objects re-pointed at the call's tensors, and a scratchpad.
    Used by one call at a time (taken from and returned to its primitive's free list). `address`: the
    argument array's address as a c_void_p (what Library.execute_raw takes)."""

    __slots__ = ("args", "nargs", "mems", "ptrs", "scratch", "address")


class Primitive:
    """A created primitive; `run` executes it on given tensors (see the module doc for threads and resources)."""

    impl = ""

    def _begin(self, lib: Library) -> Owned:
        """Start building: what lives as long as the primitive goes to self.own (destroyed by close() or when
        this object is collected, even half-built); returns an owner for the temporaries, which the caller
        closes once the primitive exists."""
        self.lib, self.dll, self.stream = lib, lib.dll, lib.stream
        self.own = own = Owned(lib)
        self.closed = False
        self.free: list[_ArgSet] = []
        fin = weakref.finalize(self, own.close)
        fin.atexit = False  # at interpreter exit the process frees everything anyway
        self._finalizer = fin
        return Owned(lib)

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
        self.execute = lib.execute_raw
        self.set_handle = d.dnnl_memory_set_data_handle
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
        a.address = P(C.addressof(a.args))
        return a

    def _finish_layer(self, tmp: Owned, pd: P, w: torch.Tensor, w_shape: list[int], b: torch.Tensor | None,
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

    def _weights(self, tmp: Owned, pd: P, w: torch.Tensor, shape: list[int]) -> Any:
        """Reorder the weights once into the layout the primitive chose (self.weights); returns that layout's
        descriptor, owned by pd."""
        return self._weights_from(tmp, pd, w.detach().float().contiguous().reshape(shape))

    def _weights_from(self, tmp: Owned, pd: P, plain: torch.Tensor) -> Any:
        """`_weights` from a tensor of the primitive's logical weights shape and data type, any strides (the
        reorder also computes the compensation an int8 layout carries)."""
        lib = self.lib
        w_md = lib.dll.dnnl_primitive_desc_query_md(pd, QUERY_WEIGHTS_MD, 0)
        self.weights = torch.empty(lib.dll.dnnl_memory_desc_get_size(w_md), dtype=torch.uint8)
        _reorder(lib, lib.md(tmp, plain.shape, plain.stride(), data_type(plain)), plain.data_ptr(), w_md,
                 self.weights.data_ptr())
        return w_md

    def run(self, *tensors: torch.Tensor) -> None:
        """Execute on these tensors, of the shapes and strides the primitive was made for (its callers key their
        primitives on them) and of its dtypes (checked here: float32 unless made otherwise). Safe on several
        threads at once: each call takes its own argument set."""
        free = self.free
        try:
            a = free.pop()
        except IndexError:  # another thread holds every argument set
            a = self._argset()
        try:
            ptrs, dtypes = a.ptrs, self.dtypes
            if len(tensors) != len(dtypes):
                raise KilnError(f"oneDNN {self.impl} takes {len(dtypes)} tensors, got {len(tensors)}")
            i = 0
            for t in tensors:
                if t.dtype is not dtypes[i]:
                    raise KilnError(f"oneDNN {self.impl} takes {dtypes[i]} tensors, got {t.dtype}")
                p = t.data_ptr()
                if p != ptrs[i]:  # arena slots keep their addresses from one inference to the next
                    self.set_handle(a.mems[i], p)
                    ptrs[i] = p
                i += 1
            status = self.execute(self.prim, self.stream, a.nargs, a.address)
        finally:
            free.append(a)
        if status != 0:
            raise DnnlError(f"oneDNN {self.impl} failed with status {status}")

    def bind(self, *tensors: torch.Tensor) -> Callable[[], None]:
        """A zero-argument call executing the primitive on these tensors, as `run(*tensors)` would, with its own
        argument set pointed at them once (checked here as `run` checks them). The caller guarantees that the
        tensors stay alive and unchanged in shape, strides and dtype while the call may run (the runtime's
        arena views). The argument set goes back to the free list when the call is dropped; after `close()`
        the call raises KilnError."""
        if self.closed:
            raise KilnError(f"oneDNN {self.impl} primitive was released")
        dtypes = self.dtypes
        if len(tensors) != len(dtypes) or any(t.dtype is not d for t, d in zip(tensors, dtypes)):
            raise KilnError(f"oneDNN {self.impl} takes {[str(d) for d in dtypes]} tensors, "
                            f"got {[str(t.dtype) for t in tensors]}")
        try:
            a = self.free.pop()  # one a call dropped earlier, or the single-threaded caller's
        except IndexError:
            a = self._argset()
        for i, t in enumerate(tensors):
            a.ptrs[i] = t.data_ptr()
            self.set_handle(a.mems[i], a.ptrs[i])
        execute, prim, stream, nargs, address = self.execute, self.prim, self.stream, a.nargs, a.address

        def call() -> None:
            if self.closed:
                raise KilnError(f"oneDNN {self.impl} primitive was released")
            status = execute(prim, stream, nargs, address)
            if status != 0:
                raise DnnlError(f"oneDNN {self.impl} failed with status {status}")
        call.tensors = tensors  # type: ignore[attr-defined]  # what the argument set points to stays alive
        weakref.finalize(call, self.free.append, a)
        return call

    def close(self) -> None:
        """Destroy the native objects now (idempotent); the primitive cannot run afterwards."""
        self.closed = True
        self.free = []
        self._finalizer()


def _reorder(lib: Library, src_md: Any, src: int, dst_md: Any, dst: int) -> None:
    """Copy src into dst's layout once (weights into the layout a primitive chose); everything made for the
    copy is destroyed before returning."""
    d = lib.dll
    tmp = Owned(lib)
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


class Reorder(Primitive):
    """One oneDNN reorder (a jit copy between layouts) for fixed source and destination shapes, strides and
    dtypes (those of x and y)."""

    def __init__(self, lib: Library, x: torch.Tensor, y: torch.Tensor) -> None:
        tmp = self._begin(lib)
        try:
            src_md = lib.md(tmp, x.shape, x.stride(), data_type(x))
            dst_md = lib.md(tmp, y.shape, y.stride(), data_type(y))
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

    def __init__(self, lib: Library, dtypes: tuple[torch.dtype, ...] = (FLOAT32,)) -> None:
        self.lib, self.dtypes = lib, dtypes
        self.reorders: dict[tuple[Any, ...], Reorder] = {}
        self.local = threading.local()
        self.closed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return x.contiguous()
        if x.is_contiguous(memory_format=torch.channels_last):
            return canonical(x, channels_last=True)  # oneDNN has only reference loops for other strides of size-1 dims
        if x.dtype not in self.dtypes:
            raise KilnError(f"takes {' or '.join(map(str, self.dtypes))} tensors, got {x.dtype}")
        local = self.local
        buf = getattr(local, "buf", None)
        if buf is None or buf.shape != x.shape or buf.dtype is not x.dtype:
            buf = local.buf = torch.empty(x.shape, dtype=x.dtype, memory_format=torch.channels_last)
        if channels_innermost(x):  # a channel slice of a wider NHWC buffer (an elided Concat's part): strided
            return buf.copy_(x)    # rows, which torch copies about twice as fast as oneDNN's generic reorder
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
