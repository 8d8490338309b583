"""What the builder records per layer for `kiln inspect`: the model's nodes folded into each layer of the main
graph, and each layer's workspace (scratch memory beside its outputs at the opt shape).

Both are plan.build entries, flat objects as the plan schema wants them:
    build["fused"]     = {layer name: JSON text of [[node name, op type], ...]}   (layers that are not simply
                          the model's node of the same name and op; [] for a layer the optimizer added, such as a
                          Cast; a trailing int counts members left out)
    build["workspace"] = {layer name: bytes}                                      (layers that need any)

Which nodes a layer holds is read from the names and the data flow, not recorded by each pass: fused layers
keep the name of the node they grew from, and the passes keep value names (a fused node writes the last fused
node's output); see `fused_members`. Constant-only nodes (folded by the build) belong to no layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from kiln.ir.graph import Graph
from kiln.ir.types import TensorType

MAX_ENTRIES = 4096   # entries of one flat build object (kiln.plan.schema)
MAX_TEXT = 1 << 16   # characters of one string in it


@dataclass(frozen=True)
class Origin:
    """One node of the graph as imported: name, op type, input and output value names, and whether it
    computes from constants only (folded by the build: no layer holds it)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    folded: bool


def snapshot(g: Graph) -> list[Origin]:
    """The main graph's nodes before any pass runs."""
    const = {v.name for v in g.values() if v.is_const}
    out = []
    for n in g.nodes:
        ins = tuple(v.name for v in n.all_inputs if v is not None)
        folded = all(i in const for i in ins) and not n.subgraphs()
        if folded:
            const.update(v.name for v in n.outputs)
        out.append(Origin(n.name, n.op_type, ins, tuple(v.name for v in n.outputs), folded))
    return out


def fused_members(origin: list[Origin], g: Graph) -> dict[str, list[tuple[str, str]]]:
    """Per node of the optimized main graph: the imported nodes it computes, in model order.

    1. A layer holds the model node it is named after (a merge of siblings, 'a+b+c', each of them).
    2. Walking back from its outputs, it holds the nodes up to the values the plan still has (its inputs,
       other layers' outputs). Where a pass renamed those boundary values (INT8 layers write new int8
       values) the walk runs into a node another layer is named after; the layer then keeps only what lies
       downstream of its own named node(s): its epilogue.
    3. A node nothing holds yet (its layer's outputs were renamed) goes with the layer that runs last among
       the holders of its inputs: an epilogue runs in the layer that computed its operands.
    """
    producer = {o: i for i, n in enumerate(origin) for o in n.outputs}
    by_name: dict[str, list[int]] = {}
    for i, o in enumerate(origin):
        if not o.folded:
            by_name.setdefault(o.name, []).append(i)
    owner: dict[int, int] = {}  # model node -> the layer (id) named after it
    for n in g.nodes:
        for part in dict.fromkeys([n.name, *n.name.split("+")]):
            for i in by_name.get(part, []):
                owner.setdefault(i, id(n))
    runtime = {v.name for v in g.inputs} | {v.name for n in g.nodes for v in n.outputs}
    held: dict[int, set[int]] = {id(n): set() for n in g.nodes}
    for i, layer in owner.items():
        held[layer].add(i)
    for n in g.nodes:
        stop = runtime - {v.name for v in n.outputs}
        todo, seen, got, leak = [v.name for v in n.outputs], set(), set(), False
        while todo:
            x = todo.pop()
            if x in seen:
                continue
            seen.add(x)
            i = producer.get(x)
            if i is None or origin[i].folded:
                continue
            if owner.get(i, id(n)) != id(n):
                leak = True
                continue
            got.add(i)
            todo.extend(y for y in origin[i].inputs if y not in stop)
        if leak:
            got &= _downstream(origin, held[id(n)], got)
        held[id(n)] |= got
    taken = {i: k for k, n in enumerate(g.nodes) for i in held[id(n)]}
    for i, o in enumerate(origin):
        if o.folded or i in taken:
            continue
        srcs = [taken[producer[y]] for y in o.inputs if y in producer and producer[y] in taken]
        if srcs:
            k = max(srcs)
            taken[i] = k
            held[id(g.nodes[k])].add(i)
    return {n.name: [(origin[i].name, origin[i].op) for i in sorted(held[id(n)])] for n in g.nodes}


def _downstream(origin: list[Origin], roots: set[int], among: set[int]) -> set[int]:
    """The nodes of `among` reachable forward from `roots` (roots included) in the model graph."""
    readers: dict[str, list[int]] = {}
    for i in among:
        for y in origin[i].inputs:
            readers.setdefault(y, []).append(i)
    out, todo = set(roots), list(roots)
    while todo:
        for y in origin[todo.pop()].outputs:
            for j in readers.get(y, []):
                if j not in out:
                    out.add(j)
                    todo.append(j)
    return out & (among | roots)


def _encode(members: list[tuple[str, str]]) -> str:
    """JSON text of the member list, cut to fit one build string (a trailing int counts what was cut)."""
    text = json.dumps([list(m) for m in members])
    k = len(members)
    while len(text) > MAX_TEXT and k:
        k = max(0, k - max(1, k // 4))
        text = json.dumps([list(m) for m in members[:k]] + [len(members) - k])
    return text


def layer_records(origin: list[Origin], g: Graph, tactics: Mapping[int, tuple[str, dict[str, Any]]],
                  types: Mapping[str, TensorType]) -> dict[str, Any]:
    """The build entries "fused" and "workspace" (see the module docstring) for the optimized main graph g;
    `types`: its values' types at the opt shape."""
    from kiln.backends.tactic import get_tactic
    fused: dict[str, str] = {}
    ops = {n.name: n.op_type for n in g.nodes}
    for name, members in fused_members(origin, g).items():
        if members != [(name, ops[name])] and len(fused) < MAX_ENTRIES:
            fused[name] = _encode(members)
    work: dict[str, int] = {}
    for n in g.nodes:
        tid, cfg = tactics.get(id(n), ("ref", {}))
        t = get_tactic(tid)
        shape = types[n.outputs[0].name].shape if n.outputs and n.outputs[0].name in types else None
        if t is None or shape is None or not all(isinstance(d, int) for d in shape):
            continue
        try:
            need = int(t.workspace_bytes(n, cfg, tuple(shape)))
        except Exception:  # a tactic that cannot tell at this shape: nothing recorded
            continue
        if need > 0:
            work[n.name] = need
    work = dict(sorted(work.items(), key=lambda kv: -kv[1])[:MAX_ENTRIES])
    return {"fused": fused, "workspace": work}
