"""Small helpers shared by the rewrite passes: use counts, constants, node replacement, bypassing."""
from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node, Value, is_op  # noqa: F401  (is_op: the passes import it from here)
from kiln.ir.types import TensorType

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIN_ONNX_OPSET = 13  # opset given to ONNX-domain nodes the passes create (numpy broadcasting, axes as attrs)


class Uses:
    """Consumer index of one graph (explicit inputs and subgraph captures); rebuild after rewrites."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.refresh()

    def refresh(self) -> None:
        self.map = self.g.consumers()
        self.outputs = {id(v) for v in self.g.outputs}
        self.index = {id(n): i for i, n in enumerate(self.g.nodes)}

    def of(self, v: Value) -> list[Node]:
        """Nodes reading v, once per read."""
        return self.map.get(id(v), [])

    def is_output(self, v: Value) -> bool:
        return id(v) in self.outputs

    def only(self, v: Value) -> Node | None:
        """The one node reading v exactly once, if v is not a graph output and has no other reader."""
        users = self.of(v)
        if len(users) != 1 or self.is_output(v) or v.is_const:
            return None
        return users[0]

    def pos(self, n: Node) -> int:
        return self.index[id(n)]


def const(v: Value | None) -> Tensor | None:
    """The payload of a constant value (None for runtime values and omitted inputs)."""
    return None if v is None else v.const


def scalar(v: Value | None) -> float | None:
    """A one-element constant as a Python float."""
    c = const(v)
    if c is None or c.numel() != 1:
        return None
    return float(c.reshape(()).item())


def runtime(v: Value | None) -> bool:
    return v is not None and not v.is_const


def is_float_weight(t: Tensor | None) -> bool:
    return t is not None and t.dtype in FLOAT_DTYPES


def same_shape(a: TensorType, b: TensorType) -> bool:
    """Both shapes fully known (ints or symbols) and equal."""
    return (a.shape is not None and b.shape is not None and a.shape == b.shape
            and all(d is not None for d in a.shape))


def per_channel(c: Tensor, rank: int, channels: int, axis: int = 1) -> Tensor | None:
    """c as a [channels] vector if it broadcasts against a rank-`rank` tensor along `axis` only.

    The broadcast must not grow the other operand: c's rank <= rank and every dim of c other than
    `axis` (aligned from the right) is 1; the `axis` dim is 1 (uniform) or `channels`.
    """
    if c.dim() > rank:
        return None
    shape = [1] * (rank - c.dim()) + list(c.shape)
    for i, d in enumerate(shape):
        if i != axis and d != 1:
            return None
    if shape[axis] not in (1, channels):
        return None
    return c.reshape(-1).expand(channels).clone() if shape[axis] == 1 else c.reshape(channels).clone()


def replace_nodes(g: Graph, old: list[Node], new: list[Node], first: bool = False) -> None:
    """Put `new` where the last of `old` stood (all of whose inputs are computed by then); drop `old`.

    With first=True `new` goes where the first of `old` stood instead (for rewrites whose inputs are
    all computed before every node of `old`, and whose outputs are read right after it).
    """
    ids = {id(n) for n in old}
    where = [i for i, n in enumerate(g.nodes) if id(n) in ids]
    at = where[0] if first else where[-1]
    head = [n for n in g.nodes[:at] if id(n) not in ids]
    tail = [n for n in g.nodes[at + 1:] if id(n) not in ids]
    g.nodes = head + list(new) + tail


def remove_node(g: Graph, node: Node) -> None:
    g.nodes = [n for n in g.nodes if n is not node]


def bypass(g: Graph, node: Node, src: Value, out: Value) -> bool:
    """Remove `node`, whose output `out` equals its input `src`; False where that is impossible.

    Readers of `out` read `src` instead. When `out` is a graph output its name must survive, so
    src's producer is made to produce `out` instead (impossible when src is itself a graph input,
    graph output or constant: the node is kept).
    """
    if out.kind != src.kind:
        return False
    if not any(v is out for v in g.outputs):
        g.replace_uses(out, src)
        remove_node(g, node)
        return True
    p = src.producer
    if src.is_const or p is None or p not in g.nodes or any(v is src for v in g.outputs) \
            or any(v is src for v in g.inputs):
        return False
    remove_node(g, node)
    p.outputs = [out if v is src else v for v in p.outputs]
    out.producer = p
    if out.type.shape is None or out.type.dtype is None:
        out.type = src.type
    g.replace_uses(src, out)
    return True


def take_output(producer: Node, old: Value, new: Value) -> None:
    """Make `producer` write `new` (a later value it now computes directly) instead of `old`."""
    producer.outputs = [new if v is old else v for v in producer.outputs]
    new.producer = producer


def cast_like(t: Tensor, like: Tensor) -> Tensor:
    """A folded constant back in the dtype of the weight it replaces, contiguous, on the CPU."""
    return t.to(like.dtype).contiguous()


def onnx_opset(n: Node) -> int:
    """Opset for an ONNX-domain node that replaces `n` (at least MIN_ONNX_OPSET)."""
    return max(n.opset, MIN_ONNX_OPSET) if n.domain in ("", "ai.onnx") else MIN_ONNX_OPSET


def columns_slice(g: Graph, x: Value, start: int, end: int, out: Value, name: str) -> Node:
    """A Slice of x's last axis [start, end) with constant parameters, writing `out` (kiln.backends.views runs
    it as a view: no copy)."""
    consts = [g.constant(f"{name}_{k}", torch.tensor([a], dtype=torch.int64))
              for k, a in (("starts", start), ("ends", end), ("axes", -1))]
    return Node("Slice", [x, *consts], [out], {}, name=g.unique_name(name), opset=13)


def restore_order(g: Graph) -> None:
    """Re-sort g's nodes topologically after a rewire that may read a value before its producer, keeping the
    present order wherever it is already valid (Kahn's algorithm, earliest-placed ready node first)."""
    import heapq
    producer = {id(o): n for n in g.nodes for o in n.outputs}
    pos = {id(n): i for i, n in enumerate(g.nodes)}
    waiting: dict[int, int] = {}
    readers: dict[int, list[Node]] = {}
    for n in g.nodes:
        deps = {id(producer[id(v)]) for v in n.all_inputs
                if v is not None and id(v) in producer and producer[id(v)] is not n}
        waiting[id(n)] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(n)
    ready = [(pos[id(n)], n) for n in g.nodes if waiting[id(n)] == 0]
    heapq.heapify(ready)
    out: list[Node] = []
    while ready:
        _, n = heapq.heappop(ready)
        out.append(n)
        for r in readers.get(id(n), []):
            waiting[id(r)] -= 1
            if waiting[id(r)] == 0:
                heapq.heappush(ready, (pos[id(r)], r))
    if len(out) != len(g.nodes):
        raise ValueError("the graph has a cycle")
    g.nodes = out
