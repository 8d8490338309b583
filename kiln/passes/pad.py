"""Pad folding: a constant-mode Pad of the spatial dims only, read by Convs or pools only, becomes their pads.

* Conv: the Pad value must be 0 (convolution pads with zeros).
* AveragePool: value 0, and the pool must count padding (count_include_pad=1, or have no pads of its
  own so that it can be switched to count_include_pad=1); ceil_mode pools are left alone.
* MaxPool: MaxPool pads with -inf, so the Pad value must be -inf; a zero Pad is also folded when
  the padded tensor is known to be >= 0 (it comes from Relu, Clip(min >= 0) or Sigmoid) and every
  window still holds a real element (each pad smaller than the window). Never with an Indices output,
  nor with ceil_mode (which drops windows relative to the end of the unpadded input) unless every stride
  is 1, where no window reaches past the padded input and ceil_mode changes nothing (HGNetV2's stem pool).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from kiln.ir.graph import Graph, Node
from kiln.ops.registry import ints
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, const, is_op, remove_node, scalar


def pad_spec(pad: Node) -> tuple[list[int], list[int], float] | None:
    """(begins, ends, value) per axis of a constant-mode Pad with constant arguments; None otherwise."""
    if not is_op(pad, "Pad") or (pad.attr("mode", "constant") or "constant") != "constant":
        return None
    x = pad.input(0)
    rank = x.type.rank if x is not None else None
    if rank is None:
        return None
    if pad.opset < 11:
        raw = list(pad.attr("paddings" if pad.opset < 2 else "pads", []))
        value = float(pad.attr("value", 0.0))
    else:
        if const(pad.input(1)) is None or (pad.input(2) is not None and const(pad.input(2)) is None):
            return None
        raw = ints(const(pad.input(1)))
        v = const(pad.input(2))
        value = 0.0 if v is None or v.numel() == 0 else float(v.reshape(-1)[0].item())
    axes = list(range(rank))
    if pad.opset >= 18 and pad.input(3) is not None:
        if const(pad.input(3)) is None:
            return None
        axes = [a + rank if a < 0 else a for a in ints(const(pad.input(3)))]
    if len(raw) != 2 * len(axes):
        return None
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begins[a], ends[a] = raw[i], raw[len(axes) + i]
    return begins, ends, value


def _nonnegative(n: Node | None) -> bool:
    """Whether n's output is known to be >= 0 everywhere."""
    if n is None:
        return False
    if is_op(n, "Relu", "Sigmoid", "HardSigmoid"):
        return True
    if is_op(n, "Clip"):
        lo = n.attr("min") if n.opset < 11 else scalar(n.input(1))
        return lo is not None and lo >= 0
    if n.domain == "kiln" and n.op_type in ("FusedConv", "FusedGemm"):
        act = n.attr("activation", "")
        if n.attr("act_before_add", 0) and n.input(3) is not None:
            return False
        return act in ("Relu", "Sigmoid", "HardSigmoid") or (act == "Clip" and float(n.attr("alpha", -1.0)) >= 0)
    return False


class FoldPad(Pass):
    """Folds an explicit zero (or -inf for MaxPool) Pad into the Convs / pools that read it: every reader must
    take it (each then reads the unpadded tensor with pads of its own), else none does."""

    name = "pad folding"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for pad in list(g.nodes):
            spec = pad_spec(pad)
            if spec is None:
                continue
            begins, ends, value = spec
            readers = uses.of(pad.outputs[0])
            if not readers or uses.is_output(pad.outputs[0]) or len(begins) < 3 \
                    or any(begins[:2]) or any(ends[:2]) or min(begins + ends) < 0:
                continue
            commits = [self._fold(c, begins[2:], ends[2:], value, pad) if c.input(0) is pad.outputs[0]
                       and sum(i is pad.outputs[0] for i in c.inputs) == 1 else None for c in readers]
            if any(commit is None for commit in commits):
                continue
            for c, commit in zip(readers, commits):
                commit()  # type: ignore[misc]
                c.inputs[0] = pad.inputs[0]
                ctx.logger.verbose(f"Fusing {pad.name} with {c.name}")
            remove_node(g, pad)
            changed = True
            uses.refresh()
        return changed

    @staticmethod
    def _fold(c: Node, begins: list[int], ends: list[int], value: float, pad: Node) -> Callable[[], None] | None:
        """How c takes the Pad's spatial pads as its own (a function changing its attributes), or None where it
        cannot. Nothing changes until the function runs."""
        auto = c.attr("auto_pad", "NOTSET") or "NOTSET"
        if auto not in ("NOTSET", "VALID") or len(c.outputs) != 1:
            return None
        nd = len(begins)
        old = [0] * (2 * nd) if auto == "VALID" else list(c.attr("pads", None) or [0] * (2 * nd))
        total = [o + p for o, p in zip(old, begins + ends)]
        extra: dict[str, Any] = {}
        if is_op(c, "Conv"):
            if value != 0.0:
                return None
        elif is_op(c, "AveragePool"):
            if value != 0.0 or c.attr("ceil_mode", 0):
                return None
            if not c.attr("count_include_pad", 0):
                if any(old):
                    return None
                extra["count_include_pad"] = 1
        elif is_op(c, "MaxPool"):
            if c.attr("ceil_mode", 0):
                if any(int(s) != 1 for s in (c.attr("strides", None) or [1] * nd)):
                    return None
                extra["ceil_mode"] = 0  # stride 1: every window ends inside the input, ceil and floor agree
            kernel = list(c.attr("kernel_shape", None) or [])
            if value != -math.inf and (value != 0.0 or len(kernel) != nd or not _nonnegative(pad.inputs[0].producer)
                                       or not all(t < k for t, k in zip(total, kernel + kernel))):
                return None
        else:
            return None

        def commit() -> None:
            c.attrs.update(extra, pads=total, auto_pad="NOTSET")
        return commit
