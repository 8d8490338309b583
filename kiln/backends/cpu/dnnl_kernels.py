"""The kernel shells the oneDNN layer tactics share: shape-cached primitives behind the runtime's calling convention.

`channels_last_kernel` (convolutions: input and residual brought to channels-last, the layout the primitives are
made for) and `rows_kernel` (gemms: the input's leading dims flattened into the rows of one 2-D primitive). Both
build each primitive on first sight of a shape (`make(x, z) -> (primitive, output shape)`), fall back to the op's
reference where oneDNN declines a shape (ReferenceFallback), take `out=` and release their primitives with the
kernel.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from kiln.backends.cpu.dnnl import ChannelsLast, ReferenceFallback, shape_cached
from kiln.backends.kernel import Kernel
from kiln.errors import KilnError
from kiln.ir.graph import Node

Tensor = torch.Tensor
Make = Callable[[Tensor, Tensor | None], Any]


def channels_last_kernel(node: Node, lib: Any, make: Make, x_types: tuple[torch.dtype, ...],
                         z_types: tuple[torch.dtype, ...], out_type: torch.dtype) -> Kernel:
    """A conv layer's kernel: channels-last input and residual, one primitive per shape; W, B live in it."""
    fb = ReferenceFallback(node)
    run = shape_cached(node.name, make, fb, lambda x, z: (x, None, None, z), x_types, z_types, out_type)
    x_cl, z_cl = ChannelsLast(lib, x_types), ChannelsLast(lib, z_types)

    def k_conv(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None,
               out: Tensor | None = None) -> Tensor:
        return run(x_cl(x), None if z is None else z_cl(z), out)

    def release() -> None:
        run.close()  # type: ignore[attr-defined]
        x_cl.close()
        z_cl.close()
    return Kernel(k_conv, prepacked=frozenset({1, 2}), fallback=fb, release=release)


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
    return Kernel(k_rows, prepacked=frozenset({1, 2}), fallback=fb, release=run.close,  # type: ignore[attr-defined]
                  out_format="contiguous")
