"""The kernel shells the oneDNN layer tactics share: shape-cached primitives behind the runtime's calling convention.

`channels_last_kernel` (convolutions: input and residual brought to channels-last, the layout the primitives are
made for) and `rows_kernel` (gemms: the input's leading dims flattened into the rows of one 2-D primitive). Both
build each primitive on first sight of a shape (`make(x, z) -> (primitive, output shape)`), fall back to the op's
reference where oneDNN declines a shape (ReferenceFallback), take `out=` and release their primitives with the
kernel. `shape_cached` is the per-shape cache under both (and under the pooling and linear tactics).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from kiln.backends.cpu.dnnl import FLOAT32, released
from kiln.backends.cpu.dnnl_primitive import ChannelsLast, Primitive
from kiln.backends.cpu.fallback import ReferenceFallback
from kiln.backends.kernel import Kernel
from kiln.backends.strides import channels_innermost
from kiln.errors import KilnError
from kiln.ir.graph import Node

Tensor = torch.Tensor
Make = Callable[[Tensor, Tensor | None], Any]
Made = tuple[Primitive, tuple[int, ...]]


def channels_last_kernel(node: Node, lib: Any, make: Make, x_types: tuple[torch.dtype, ...],
                         z_types: tuple[torch.dtype, ...], out_type: torch.dtype) -> Kernel:
    """A conv layer's kernel: channels-last input and residual, one primitive per shape; W, B live in it."""
    fb = ReferenceFallback(node)
    run = shape_cached(node.name, make, fb, lambda x, z: (x, None, None, z), x_types, z_types, out_type)
    x_cl, z_cl = ChannelsLast(lib, x_types), ChannelsLast(lib, z_types)

    def k_conv(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None,
               out: Tensor | None = None) -> Tensor:
        return run(x_cl(x), None if z is None else z_cl(z), out)

    def bind(args: Any, out: Any) -> Any:
        x, z = args[0], (args[3] if len(args) > 3 else None)
        if z is not None and not _dense(z):  # the call copied it to channels-last first
            return None
        if _dense(x):
            return run.bind(x, z, out)  # type: ignore[attr-defined]
        if not isinstance(x, Tensor) or not channels_innermost(x):
            return None
        # a channel slice of a wider NHWC buffer (a GhostNet cheap conv reading the primary conv's part of an
        # elided Concat): the bound call copies it into a dense buffer of its own, then runs as on dense input
        dense = torch.empty(x.shape, dtype=x.dtype, memory_format=torch.channels_last)
        call = run.bind(dense, z, out)  # type: ignore[attr-defined]
        if call is None:
            return None
        copy = dense.copy_

        def bound() -> Any:
            copy(x)
            return call()
        return bound

    def release() -> None:
        run.close()  # type: ignore[attr-defined]
        x_cl.close()
        z_cl.close()
    return Kernel(k_conv, prepacked=frozenset({1, 2}), fallback=fb, release=release, bind=bind)


def _dense(t: Any) -> bool:
    """A tensor ChannelsLast passes through as it is."""
    return isinstance(t, Tensor) and t.is_contiguous(memory_format=torch.channels_last if t.dim() == 4
                                                     else torch.contiguous_format)


def rows_kernel(node: Node, make: Make, n_out: int, x_types: tuple[torch.dtype, ...],
                z_types: tuple[torch.dtype, ...], out_type: torch.dtype) -> Kernel:
    """A gemm layer's kernel over A [..., K]: one 2-D primitive over the flattened rows; W, B live in it."""
    fb = ReferenceFallback(node)
    run = shape_cached(node.name, make, fb, lambda x, z: (x, None, None, z), x_types, z_types, out_type)

    def k_rows(a: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None,
               out: Tensor | None = None) -> Tensor:
        if a.dim() == 2:
            return run(a.contiguous(), None if z is None else z.contiguous(), out)
        lead = a.shape[:-1]
        if z is not None and z.shape != (*lead, n_out):
            raise KilnError(f"'{node.name}' adds a residual of shape {[*lead, n_out]}, got {list(z.shape)}")
        rows = a.contiguous().view(-1, a.shape[-1])
        z2 = None if z is None else z.contiguous().view(-1, n_out)
        o2 = out.view(-1, n_out) if out is not None and out.is_contiguous() else None
        y = run(rows, z2, o2).view(*lead, n_out)
        if out is not None and o2 is None:
            out.copy_(y)
            return out
        return out if out is not None else y
    def bind(args: Any, out: Any) -> Any:
        a, z = args[0], (args[3] if len(args) > 3 else None)
        if not isinstance(a, Tensor) or a.dim() < 2 or not a.is_contiguous() or not isinstance(out, Tensor) \
                or not out.is_contiguous() or (z is not None and not z.is_contiguous()):
            return None  # the call copied them first
        if a.dim() == 2:
            return run.bind(a, z, out)  # type: ignore[attr-defined]
        # N-D rows (a transformer's [B, S, K]): the 2-D views of the same memory the call ran on, made once
        call = run.bind(a.view(-1, a.shape[-1]), None if z is None else z.view(-1, n_out),  # type: ignore[attr-defined]
                        out.view(-1, n_out))
        if call is None:
            return None

        def bound() -> Tensor:
            call()
            return out
        return bound
    return Kernel(k_rows, prepacked=frozenset({1, 2}), fallback=fb, release=run.close,  # type: ignore[attr-defined]
                  out_format="contiguous", bind=bind)


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
    tensors' shapes and strides and refuses other dtypes than it was made for (`Primitive.run`), so every
    call hands oneDNN exactly the layout it was made for. `run.close()` destroys the primitives; a call
    after it raises KilnError.
    """
    cache: dict[tuple[Any, ...], tuple[Primitive, tuple[int, ...], torch.memory_format]] = {}
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

    def bind(x: torch.Tensor, z: torch.Tensor | None, out: Any) -> Callable[[], torch.Tensor] | None:
        """`run(x, z, out)` repeated on these very tensors (Kernel.bind), or None where that call did not run a
        primitive (a fallback) or wrote no given dense destination."""
        entry = cache.get((x.shape, x.stride(), None if z is None else (z.shape, z.stride())))
        if entry is None or not isinstance(out, torch.Tensor):
            return None
        prim, shape, fmt = entry
        if out.shape != shape or not out.is_contiguous(memory_format=fmt) or out.dtype is not out_dtype:
            return None
        call = prim.bind(x, out) if z is None else prim.bind(x, out, z)

        def bound() -> torch.Tensor:
            call()
            return out
        return bound

    def close() -> None:
        closed.append(True)
        entries = list(cache.values())
        cache.clear()
        for prim, _, _ in entries:
            prim.close()
    run.close = close  # type: ignore[attr-defined]
    run.bind = bind  # type: ignore[attr-defined]
    return run
