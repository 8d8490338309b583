"""Control flow: If, Loop, Scan, SequenceMap.

At run time the subgraph attributes are GraphFunctions (kiln.runtime.interpreter); compute receives
the node's explicit inputs followed by the values of `node.captures`, which the subgraphs read by name.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from kiln.errors import KilnError, UnsupportedOpError
from kiln.ir.graph import Graph, Node
from kiln.ir.types import TensorType
from kiln.ops.registry import OpDef, register


def _split(node: Node, inputs: tuple[Any, ...]) -> tuple[list[Any], dict[str, Any]]:
    n = len(node.inputs)
    outer = {v.name: x for v, x in zip(node.captures, inputs[n:])}
    return list(inputs[:n]), outer


def _body(node: Node, key: str) -> Any:
    fn = node.attr(key)
    if not callable(fn):
        raise UnsupportedOpError(f"node '{node.name}': {node.op_type} subgraph '{key}' is only executable at run time")
    return fn


def _iteration_cap() -> int:
    from kiln.settings import settings
    return settings().max_loop_iterations


def _over_cap(node: Node, cap: int) -> KilnError:
    """The error of a Loop or Scan that reached the configured iteration cap (KILN_MAX_LOOP_ITERATIONS)."""
    return KilnError(f"node '{node.name}': {node.op_type} reached {cap} iterations, the cap on loop iterations "
                        "(KILN_MAX_LOOP_ITERATIONS, see docs/SETTINGS.md)")


def _pack(outs: list[Any]) -> Any:
    return outs[0] if len(outs) == 1 else tuple(outs)


def _device(xs: list[Any], fn: Any) -> torch.device:
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return getattr(fn, "device", torch.device("cpu"))


@register
class If(OpDef):
    op_type = "If"

    def compute(self, node: Node, *inputs: Any) -> Any:
        (cond,), outer = _split(node, inputs)
        branch = _body(node, "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
        return _pack(branch([], outer))

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[torch.Tensor | None]) -> list[TensorType]:
        """Each output: what both branches' outputs agree on (element type, rank, each dim both give alike)."""
        branches = [node.attr(k) for k in ("then_branch", "else_branch")]
        out: list[TensorType] = []
        for k in range(len(node.outputs)):
            ts = [b.outputs[k].type for b in branches if isinstance(b, Graph) and k < len(b.outputs)
                  and b.outputs[k].kind == "tensor"]
            if len(ts) != 2:
                out.append(TensorType(None, None))
                continue
            a, b = ts
            dtype = a.dtype if a.dtype == b.dtype else None
            if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
                out.append(TensorType(dtype, None))
                continue
            out.append(TensorType(dtype, tuple(x if x == y else None for x, y in zip(a.shape, b.shape))))
        return out


@register
class Loop(OpDef):
    op_type = "Loop"

    def compute(self, node: Node, *inputs: Any) -> Any:
        explicit, outer = _split(node, inputs)
        body = _body(node, "body")
        m, cond, carried = explicit[0], explicit[1], list(explicit[2:])
        dev = _device(explicit, body)
        trip = None if m is None else int(m.reshape(-1)[0])
        go = True if cond is None else bool(cond.reshape(-1)[0])
        n_scan = len(body.output_slots) - 1 - len(carried)
        scans: list[list[Any]] = [[] for _ in range(n_scan)]
        i = 0
        cap = _iteration_cap()
        while (trip is None or i < trip) and go:
            if i >= cap:
                raise _over_cap(node, cap)
            outs = body([torch.tensor(i, dtype=torch.int64, device=dev), torch.tensor(go, device=dev), *carried], outer)
            go = bool(outs[0].reshape(-1)[0])
            carried = list(outs[1:1 + len(carried)])
            for k in range(n_scan):
                scans[k].append(outs[1 + len(carried) + k])
            i += 1
        stacked = [torch.stack(s) if s else torch.empty(0, device=dev) for s in scans]
        return _pack(carried + stacked)


@register
class Scan(OpDef):
    op_type = "Scan"

    def compute(self, node: Node, *inputs: Any) -> Any:
        explicit, outer = _split(node, inputs)
        if node.opset < 9:
            return self._batched(node, explicit, outer)
        return self._scan(node, explicit, outer, node.attr("scan_input_directions"))

    def _batched(self, node: Node, explicit: list[Any], outer: dict[str, Any]) -> Any:
        """Opset 8: a leading batch axis on every state and scan input, an optional sequence_lens first."""
        if explicit[0] is not None:
            raise UnsupportedOpError(f"node '{node.name}': Scan-8 with sequence_lens is not supported")
        rows = [self._scan(node, [x[b] for x in explicit[1:]], outer, node.attr("directions"))
                for b in range(explicit[1].shape[0])]
        rows = [r if isinstance(r, tuple) else (r,) for r in rows]
        return _pack([torch.stack([r[k] for r in rows]) for k in range(len(rows[0]))])

    def _scan(self, node: Node, explicit: list[Any], outer: dict[str, Any], in_dirs: Any) -> Any:
        body = _body(node, "body")
        m = int(node.attr("num_scan_inputs"))
        n_state = len(explicit) - m
        states, scan_in = list(explicit[:n_state]), explicit[n_state:]
        in_axes = node.attr("scan_input_axes") or [0] * m
        in_dirs = in_dirs or [0] * m
        in_axes = [a + x.dim() if a < 0 else a for a, x in zip(in_axes, scan_in)]
        steps = scan_in[0].shape[in_axes[0]] if m else 0
        per_step: list[list[Any]] = []
        if steps > _iteration_cap():
            raise _over_cap(node, _iteration_cap())
        for t in range(steps):
            slices = [x.select(a, steps - 1 - t if d else t) for x, a, d in zip(scan_in, in_axes, in_dirs)]
            outs = body(states + slices, outer)
            states = list(outs[:n_state])
            per_step.append(list(outs[n_state:]))
        n_out = len(body.output_slots) - n_state
        out_axes = node.attr("scan_output_axes") or [0] * n_out
        out_dirs = node.attr("scan_output_directions") or [0] * n_out
        results = []
        for k in range(n_out):
            seq = [s[k] for s in per_step]
            if out_dirs[k]:
                seq = seq[::-1]
            y = torch.stack(seq)
            axis = out_axes[k] + y.dim() if out_axes[k] < 0 else out_axes[k]
            results.append(torch.movedim(y, 0, axis) if axis else y)
        return _pack(states + results)


@register
class SequenceMap(OpDef):
    op_type = "SequenceMap"

    def compute(self, node: Node, *inputs: Any) -> Any:
        explicit, outer = _split(node, inputs)
        body = _body(node, "body")
        n = len(explicit[0])
        outs: list[list[Any]] = []
        for i in range(n):
            args = [x[i] if isinstance(x, list) else x for x in explicit]
            r = body(args, outer)
            if not outs:
                outs = [[] for _ in r]
            for k, v in enumerate(r):
                outs[k].append(v)
        if not outs:
            outs = [[] for _ in node.outputs]
        return _pack(outs)
