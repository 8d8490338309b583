"""Zero-copy layers: constant Slices as views, and Concats elided into their producers' outputs.

* ``view.slice``: a Slice with constant starts/ends/axes and positive steps. For positive steps ONNX
  Slice clamps starts and ends exactly like Python slices do (negative values count from the end,
  out-of-range values clamp), so the node becomes ``x[key]`` with ``key`` built once: a view, no
  kernel, on any device and element type.
* ``view.gather``: a Gather whose indices are a constant scalar (``x.select(axis, i)``: BERT's pooler and
  ViT's class token read row 0) or a constant run of consecutive indices of one sign (``x.narrow``); a
  negative index counts from the end of the axis at run time, as the op's reference does.
* ``concat.elide``: a Concat the optimizer marked ``kiln_elide`` (see kiln.passes.concat) whose
  inputs are all stored in place (kiln.plan.elision): their producers run tactics that write into a given
  output (``Tactic.writes_out``), or they are Concats laid out in place themselves, nested in this one's
  buffer. The runtime allocates the Concat's output before the first write into it and hands each
  producer its slice as ``out=``; the Concat itself launches nothing.
* ``concat.partial``: the same layout where only some inputs are stored in place; the layer's step copies the
  others into their slices (a oneDNN convolution, which writes only dense outputs, feeding DenseNet's block
  buffer costs one copy of its own output instead of one per Concat reading it).

Both kernels are one function: with ``out=`` (the buffer) they copy each input not already stored in its
slice; without, a plain ``torch.cat`` (a caller's own kernel factory, or a shape the runtime cannot resolve).
Views and elided Concats do not count as layers (``Tactic.launches`` is False); a partial Concat does.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node

Tensor = torch.Tensor


def _ints(node: Node, i: int) -> list[int] | None:
    v = node.input(i)
    if v is None:
        return None
    if v.const is None:
        raise ValueError("runtime slice parameter")
    return [int(a) for a in v.const.reshape(-1).tolist()]


def slice_key(node: Node) -> tuple[slice, ...] | None:
    """The indexing key realising the node, or None when it is not a constant, positive-step Slice."""
    rank = node.inputs[0].type.rank if node.inputs and node.inputs[0] is not None else None
    if rank is None:
        return None
    try:
        if node.opset < 10:
            starts, ends = [int(a) for a in node.attr("starts")], [int(a) for a in node.attr("ends")]
            axes, steps = node.attr("axes"), None
        else:
            starts, ends, axes, steps = _ints(node, 1), _ints(node, 2), _ints(node, 3), _ints(node, 4)
    except (ValueError, TypeError):
        return None
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = [int(a) for a in axes] if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    if len(axes) != len(starts) or len(steps) != len(starts) or any(s <= 0 for s in steps):
        return None
    norm = [a + rank if a < 0 else a for a in axes]
    if any(not 0 <= a < rank for a in norm) or len(set(norm)) != len(norm):
        return None
    key = [slice(None)] * rank
    for a, s, e, st in zip(norm, starts, ends, steps):
        key[a] = slice(s, e, st)
    while key and key[-1] == slice(None):
        key.pop()
    return tuple(key)


class SliceView(Tactic):
    """Constant-parameter Slice as a prebuilt view."""

    id = "view.slice"
    devices = ("cpu", "cuda")
    priority = 50
    is_view = True

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return (node.op_type == "Slice" and node.domain in ("", "ai.onnx")
                and len(node.outputs) == 1 and slice_key(node) is not None)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        key = slice_key(node)

        def k_slice(x: Tensor, *_: Any) -> Tensor:
            return x[key]
        return view_kernel(k_slice, frozenset({1, 2, 3, 4}))  # parameters baked in


def view_kernel(fn: Any, prepacked: frozenset[int]) -> Kernel:
    """A view layer's kernel: fn(x) on its first input, the other inputs baked in (`prepacked`); bound (CPU
    runtime), the same view object at every call on the same tensor."""
    def bind(args: Any, out: Any) -> Any:
        view = fn(args[0]) if out is None and isinstance(args[0], Tensor) else None
        return None if view is None else (lambda: view)
    return Kernel(fn, prepacked=prepacked, bind=bind)


def gather_key(node: Node) -> tuple[int, int, int | None] | None:
    """(axis, first index, run length or None for a scalar index) of a Gather that is a view, else None."""
    x, idx = node.input(0), node.input(1)
    if x is None or idx is None or idx.const is None or x.type.rank is None or len(node.outputs) != 1:
        return None
    rank = x.type.rank
    axis = int(node.attr("axis", 0))
    if not -rank <= axis < rank or idx.const.dim() > 1 or idx.const.dtype not in (torch.int32, torch.int64):
        return None
    vals = [int(v) for v in idx.const.reshape(-1).tolist()]
    if idx.const.dim() == 0:
        return axis % rank, vals[0], None
    if not vals or any(b != a + 1 for a, b in zip(vals, vals[1:])) or (vals[0] < 0) != (vals[-1] < 0):
        return None
    return axis % rank, vals[0], len(vals)


class GatherView(Tactic):
    """Gather by a constant scalar index or a constant run of consecutive indices, as a view (select / narrow)."""

    id = "view.gather"
    devices = ("cpu", "cuda")
    priority = 50
    is_view = True

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and gather_key(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        axis, first, run = gather_key(node)  # type: ignore[misc]

        def k_gather(x: Tensor, *_: Any) -> Tensor:
            n = x.shape[axis]
            start = first + n if first < 0 else first
            if run is None:
                if not 0 <= start < n:
                    raise KilnError(f"node '{node.name}': Gather index {first} is out of range for size {n}")
                return x.select(axis, start)
            if not (0 <= start and start + run <= n):
                raise KilnError(f"node '{node.name}': Gather indices {first}..{first + run - 1} are out of range "
                                f"for size {n}")
            return x.narrow(axis, start, run)
        return view_kernel(k_gather, frozenset({1}))


def concat_axis(node: Node) -> int | None:
    """The Concat's axis normalized to [0, rank), or None when the rank is unknown."""
    rank = node.inputs[0].type.rank if node.inputs and node.inputs[0] is not None else None
    if rank is None:
        return None
    axis = int(node.attr("axis", 1))
    return axis % rank if -rank <= axis < rank else None


def _in_place(x: Tensor, dst: Tensor) -> bool:
    """Whether x is the very slice `dst` of the buffer (its producer wrote there): same memory, same strides."""
    return x.data_ptr() == dst.data_ptr() and x.stride() == dst.stride() and x.shape == dst.shape


def cat_into(xs: tuple[Tensor, ...], axis: int, out: Tensor | None) -> Tensor:
    """torch.cat(xs, axis), or each x copied into its slice of `out` along axis (skipping any already stored there)."""
    if out is None:
        return torch.cat(xs, axis)
    start = 0
    for x in xs:
        n = x.shape[axis]
        dst = out.narrow(axis, start, n)
        if n and not _in_place(x, dst):
            dst.copy_(x)
        start += n
    return out


def concat_kernel(axis: int) -> Kernel:
    """A Concat laid out in place along `axis` (see the module doc)."""

    def k_cat(*xs: Tensor, out: Tensor | None = None) -> Tensor:
        return cat_into(xs, axis, out)
    return Kernel(k_cat, elide_axis=axis, channels_last=True)  # conv producers on both backends store NHWC


class ConcatElide(Tactic):
    """A marked Concat written in place by its producers (chosen by the autotuner, never timed)."""

    id = "concat.elide"
    devices = ("cpu", "cuda")
    priority = 100
    elides = True

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return (node.op_type == "Concat" and node.domain in ("", "ai.onnx") and bool(node.attr("kiln_elide", 0))
                and concat_axis(node) is not None)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        return concat_kernel(concat_axis(node))  # type: ignore[arg-type]


class ConcatPartial(ConcatElide):
    """A marked Concat some of whose inputs are stored in place; its step copies the rest (chosen by the
    autotuner, never timed)."""

    id = "concat.partial"
    priority = 99
    elides = False
    elides_partly = True


register_tactic(SliceView())
register_tactic(GatherView())
register_tactic(ConcatElide())
register_tactic(ConcatPartial())
