"""SSA graph: Values (runtime tensors or build-time constants), Nodes, Graphs (with subgraphs)."""
from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch

from kiln.ir.dtype import DType
from kiln.ir.types import QuantParams, TensorType


class Value:
    """One SSA value. `const` holds the payload of build-time constants (weights)."""

    __slots__ = ("name", "type", "const", "producer", "quant", "kind")

    def __init__(self, name: str, type: TensorType | None = None, const: torch.Tensor | None = None,
                 kind: str = "tensor") -> None:
        self.name = name
        if const is not None:
            type = TensorType(DType.from_torch(const.dtype), tuple(const.shape))
        self.type = type or TensorType(None, None)
        self.const = const
        self.producer: Node | None = None
        self.quant: QuantParams | None = None
        self.kind = kind  # "tensor", "sequence" or "optional"

    @property
    def is_const(self) -> bool:
        return self.const is not None

    def __repr__(self) -> str:
        return f"%{self.name}:{self.type}" + (" (const)" if self.is_const else "")


def is_op(n: "Node | None", *ops: str) -> bool:
    """Node of the default ONNX domain with one of these op types."""
    return n is not None and n.domain in ("", "ai.onnx") and n.op_type in ops


class Node:
    """One operator application. `captures` are outer-scope values read by its subgraphs. `guards`: the dim
    equalities its output types rest on (kiln.ir.dims.DimGuard), set by type inference and checked at run time."""

    __slots__ = ("op_type", "domain", "name", "inputs", "outputs", "attrs", "opset", "captures", "guards")

    def __init__(self, op_type: str, inputs: list[Value | None], outputs: list[Value],
                 attrs: dict[str, Any] | None = None, name: str = "", domain: str = "",
                 opset: int = 21) -> None:
        self.op_type = op_type
        self.domain = domain
        self.name = name or op_type
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.attrs = dict(attrs or {})
        self.opset = opset
        self.captures: list[Value] = []
        self.guards: tuple[Any, ...] = ()
        for o in self.outputs:
            o.producer = self

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def input(self, i: int) -> Value | None:
        return self.inputs[i] if i < len(self.inputs) else None

    def subgraphs(self) -> list["Graph"]:
        out: list[Graph] = []
        for v in self.attrs.values():
            if isinstance(v, Graph):
                out.append(v)
            elif isinstance(v, list) and v and isinstance(v[0], Graph):
                out.extend(v)
        return out

    @property
    def all_inputs(self) -> list[Value | None]:
        return self.inputs + list(self.captures)

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op_type})"


class Graph:
    """A list of nodes in topological order between graph inputs and outputs.

    For a subgraph, `captures` lists values of enclosing scopes that its nodes read.
    """

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.opsets: dict[str, int] = {"": 21}
        self.captures: list[Value] = []
        self._names: set[str] = set()
        self._counter = itertools.count()

    # -- names -------------------------------------------------------------------------
    def reserve(self, name: str) -> None:
        self._names.add(name)

    def unique_name(self, base: str) -> str:
        if base and base not in self._names:
            self._names.add(base)
            return base
        while True:
            cand = f"{base or 'v'}__{next(self._counter)}"
            if cand not in self._names:
                self._names.add(cand)
                return cand

    def new_value(self, base: str, type: TensorType | None = None) -> Value:
        return Value(self.unique_name(base), type)

    def constant(self, base: str, tensor: torch.Tensor) -> Value:
        return Value(self.unique_name(base), const=tensor)

    # -- structure -----------------------------------------------------------------------
    def add_node(self, node: Node, index: int | None = None) -> Node:
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return node

    def consumers(self) -> dict[int, list[Node]]:
        """Map id(value) -> nodes reading it (explicit inputs and captures)."""
        users: dict[int, list[Node]] = {}
        for n in self.nodes:
            for v in n.all_inputs:
                if v is not None:
                    users.setdefault(id(v), []).append(n)
        return users

    def replace_uses(self, old: Value, new: Value) -> None:
        """Redirect every reader of `old` (nodes, subgraph captures, graph outputs) to `new`."""
        for n in self.nodes:
            n.inputs = [new if v is old else v for v in n.inputs]
            n.captures = [new if v is old else v for v in n.captures]
            for g in n.subgraphs():
                g._replace_captured(old, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def _replace_captured(self, old: Value, new: Value) -> None:
        if any(v is old for v in self.captures):
            self.captures = [new if v is old else v for v in self.captures]
            for n in self.nodes:
                n.inputs = [new if v is old else v for v in n.inputs]
                n.captures = [new if v is old else v for v in n.captures]
                for g in n.subgraphs():
                    g._replace_captured(old, new)
            self.outputs = [new if v is old else v for v in self.outputs]

    def input_symbols(self) -> set[str]:
        """Symbolic dims named by the graph inputs' shapes (bound from the actual inputs at run time)."""
        return {d for v in self.inputs for d in (v.type.shape or ()) if isinstance(d, str)}

    def all_graphs(self) -> list["Graph"]:
        """This graph and every subgraph in it, recursively (each graph before the graphs it holds)."""
        out = [self]
        for n in self.nodes:
            for sg in n.subgraphs():
                out.extend(sg.all_graphs())
        return out

    def values(self) -> Iterable[Value]:
        """Every distinct value of this graph (not of its subgraphs)."""
        seen: set[int] = set()
        for v in itertools.chain(self.inputs, self.captures, *(n.all_inputs + n.outputs for n in self.nodes), self.outputs):
            if v is not None and id(v) not in seen:
                seen.add(id(v))
                yield v

    def constants(self) -> list[Value]:
        return [v for v in self.values() if v.is_const]

    def __repr__(self) -> str:
        return f"Graph({self.name}: {len(self.nodes)} nodes)"
