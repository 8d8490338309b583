"""What the builder records per layer for `kiln inspect`: the model's nodes folded into each layer of the main
graph, each layer's workspace (scratch memory beside its outputs at the opt shape), and the formats (element type
and memory layout) its kernel reads and writes.

All are plan.build entries, flat objects as the plan schema wants them:
    build["fused"]     = {layer name: JSON text of [[node name, op type], ...]}   (layers that are not simply
                          the model's node of the same name and op; [] for a layer the optimizer added, such as a
                          Cast; a trailing int counts members left out)
    build["workspace"] = {layer name: bytes}                                      (layers that need any)
    build["formats"]   = {layer name: "fp32 NCHW -> fp32 NHWC"}                   (kiln.plan.formats; every layer
                          of the main graph, when the build could run it: see `layer_formats`)

Which nodes a layer holds is read from the names and the data flow, not recorded by each pass: fused layers
keep the name of the node they grew from, and the passes keep value names (a fused node writes the last fused
node's output); see `fused_members`. Constant-only nodes (folded by the build) belong to no layer.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from kiln.ir.graph import Graph, Value
from kiln.ir.types import TensorType
from kiln.plan.formats import HOST, UNKNOWN, make_record, tensor_format

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
                  types: Mapping[str, TensorType], device: Any = None) -> dict[str, Any]:
    """The build entries "fused" and "workspace" (see the module docstring) for the optimized main graph g;
    `types`: its values' types at the opt shape. With the target `device`: also "formats" (`layer_formats`), or,
    where they cannot be recorded, "formats_note" saying why."""
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
    out: dict[str, Any] = {"fused": fused, "workspace": work}
    if device is not None:
        try:
            out["formats"] = layer_formats(g, tactics, types, device)
        except Exception as e:  # the formats are a description: a run they need that fails leaves them out
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            out["formats_note"] = f"not recorded: {why}"[:200]
    return out


class FormatsNotRecorded(Exception):
    """Why a build records no layer formats (the model's inputs cannot be made up at the opt shape)."""


def layer_formats(g: Graph, tactics: Mapping[int, tuple[str, dict[str, Any]]], types: Mapping[str, TensorType],
                  device: Any) -> dict[str, str]:
    """build["formats"]: what each layer of the main graph reads and writes, seen on one run of the plan's own
    kernels at the opt shape.

    In Kiln a layer's output layout is decided where it runs (a kernel's `out_format` for the arena slot the
    runtime places, a channel slice of an elided Concat's buffer, `like_input` kernels following their input,
    kernels that allocate their own output), so it is observed rather than predicted: the chosen tactics' kernels
    run once, through the runtime's own GraphFunction, on made-up inputs of the opt shape (floats standard normal,
    integers and booleans zero), each main-graph kernel wrapped to note the format of every tensor it is given and
    returns. Shape layers computed on the host (kiln.runtime.prologue) are "host". `types`: the graph's value types
    at the opt shape. Raises FormatsNotRecorded when the inputs cannot be made up (a dynamic dim without an opt
    size, a sequence input); a failing run raises what the runtime raises."""
    import torch

    from kiln.backends.tactic import get_tactic
    from kiln.runtime.interpreter import GraphFunction
    dev = torch.device(device)
    feeds = [_made_up(v, types.get(v.name), dev) for v in g.inputs]
    main = {id(v) for n in g.nodes for v in (*n.inputs, *n.outputs) if v is not None}
    seen: dict[int, str] = {}  # id(Value) -> format, first seen
    built: list[Any] = []

    def note(v: Any, x: Any) -> None:
        if v is not None and id(v) in main and id(v) not in seen:
            seen[id(v)] = _format(x)

    def factory(node: Any) -> Any:
        tid, cfg = tactics.get(id(node), ("ref", {}))
        tactic = get_tactic(tid) or get_tactic("ref")
        kernel = tactic.make(node, cfg, dev)  # type: ignore[union-attr]
        built.append(kernel)
        if kernel.fallback is not None:  # its one warning is the runtime's to give, not the build's
            kernel.fallback.quiet = True
        fn = kernel.fn

        def observed(*args: Any, **kw: Any) -> Any:
            r = fn(*args, **kw)
            for v, x in zip(node.inputs, args):
                note(v, x)
            if len(node.outputs) == 1:  # as the runtime reads a result (GraphFunction.__call__)
                results = (r[0] if isinstance(r, tuple) else r,)
            else:
                results = r if isinstance(r, (tuple, list)) else (r,)
            for v, x in zip(node.outputs, results):
                note(v, x)
            return r
        kernel.fn = observed
        return kernel

    def typed(node: Any) -> bool:
        return tactics.get(id(node), ("ref", {}))[0] != "ref"

    try:
        with warnings.catch_warnings():  # as above: a subgraph run on the reference kernels warns at run time
            warnings.simplefilter("ignore")
            run = GraphFunction(g, dev, factory, typed)
            outs = run(feeds)
        for v, x in zip(g.outputs, outs):
            note(v, x)  # an elided Concat's buffer no layer reads
        host = run.prologue_nodes
    finally:
        for k in built:
            k.close()
    out: dict[str, str] = {}
    for i, n in enumerate(g.nodes[:MAX_ENTRIES]):
        if i in host:
            out[n.name] = HOST
            continue
        ins = [seen.get(id(v), UNKNOWN) for v in n.inputs if v is not None and not v.is_const]
        out[n.name] = make_record(ins, [seen.get(id(v), UNKNOWN) for v in n.outputs])
    return {name: text for name, text in out.items() if len(text) <= MAX_TEXT}


def _made_up(v: Value, t: TensorType | None, device: Any) -> Any:
    """A stand-in for graph input v of type t at the opt shape (standard normal floats, zero integers and
    booleans), seeded."""
    import torch
    if v.kind != "tensor":
        raise FormatsNotRecorded(f"input '{v.name}' is a {v.kind}: no stand-in for it")
    if t is None or t.dtype is None or t.shape is None or not all(isinstance(d, int) for d in t.shape):
        raise FormatsNotRecorded(f"input '{v.name}' has no concrete type at the opt shape ({t})")
    dtype = t.dtype.torch
    if dtype.is_floating_point or dtype.is_complex:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(tuple(t.shape), generator=gen, dtype=torch.float64).to(dtype).to(device)
    return torch.zeros(tuple(t.shape), dtype=dtype, device=device)


def _format(x: Any) -> str:
    """The format of a runtime value: a tensor's type and layout; "-" for anything else."""
    import torch
    if not isinstance(x, torch.Tensor):
        return UNKNOWN
    return tensor_format(str(x.dtype), tuple(x.shape), x.stride())
