"""A layer's own reference implementation as the slow path of a fast kernel (CPU and CUDA tactics alike)."""
from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import torch

from kiln.backends.cpu.dnnl import DnnlError

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
        dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if dev is not None:  # a GPU kernel's fallback: the node's constants live on the host
            xs = [x.to(dev) if isinstance(x, torch.Tensor) and x.device != dev else x for x in xs]
        while xs and xs[-1] is None:
            xs.pop()
        r = self.compute(node, *xs)
        rest: tuple[Any, ...] = ()
        if isinstance(r, (tuple, list)):  # out= is the first output's; a layer of several returns them all
            r, rest = r[0], tuple(r[1:len(node.outputs)])
        if out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            for o in outs:
                o.copy_(r)
            r = outs[0]
        return (r, *rest) if rest else r
