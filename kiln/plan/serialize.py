"""Graph <-> JSON-able spec for plan files. Tensors go to a weight table, never into JSON."""
from __future__ import annotations

import base64
from typing import Any

import onnx
import torch

from kiln.errors import PlanFormatError
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType


def type_to_json(t: TensorType) -> dict[str, Any]:
    return {"dtype": t.dtype.value if t.dtype else None, "shape": None if t.shape is None else list(t.shape)}


def type_from_json(d: dict[str, Any]) -> TensorType:
    try:
        dtype = DType(d["dtype"]) if d.get("dtype") else None
        shape = None if d.get("shape") is None else tuple(d["shape"])
    except (KeyError, ValueError, TypeError) as e:
        raise PlanFormatError(f"plan holds an invalid tensor type {d!r}") from e
    return TensorType(dtype, shape)


class GraphWriter:
    """Serializes graphs; collects tensors into `weights` under unique keys."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def _tensor(self, t: torch.Tensor) -> str:
        key = f"w{len(self.weights)}"
        self.weights[key] = t.detach().to("cpu").contiguous().clone()
        return key

    def _attr(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return {"__tensor__": self._tensor(a)}
        if isinstance(a, Graph):
            return {"__graph__": self.graph(a)}
        if isinstance(a, onnx.TypeProto):
            return {"__typeproto__": base64.b64encode(a.SerializeToString()).decode()}
        if isinstance(a, (list, tuple)):
            return [self._attr(x) for x in a]
        if isinstance(a, dict):
            return {"__dict__": {k: self._attr(v) for k, v in a.items()}}
        return a

    def graph(self, g: Graph, tactics: dict[int, tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
        tactics = tactics or {}
        values: dict[str, Any] = {}
        for v in g.values():
            entry: dict[str, Any] = {"type": type_to_json(v.type), "kind": v.kind}
            if v.is_const:
                entry["const"] = self._tensor(v.const)  # type: ignore[arg-type]
            values[v.name] = entry
        steps = []
        for n in g.nodes:
            tid, cfg = tactics.get(id(n), ("ref", {}))
            steps.append({
                "name": n.name, "op": n.op_type, "domain": n.domain, "opset": n.opset,
                "attrs": {k: self._attr(a) for k, a in n.attrs.items()},
                "inputs": [None if v is None else v.name for v in n.inputs],
                "outputs": [v.name for v in n.outputs],
                "captures": [v.name for v in n.captures],
                "tactic": tid, "config": cfg,
            })
        return {"name": g.name, "inputs": [v.name for v in g.inputs], "outputs": [v.name for v in g.outputs],
                "captures": [v.name for v in g.captures], "values": values, "steps": steps,
                "opsets": g.opsets}


class GraphReader:
    """Rebuilds graphs from specs; tactic choices come back as {id(node): (tactic, config)}."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        self.tactics: dict[int, tuple[str, dict[str, Any]]] = {}

    def _tensor(self, key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in self.weights:
            raise PlanFormatError(f"plan refers to a missing weight {key!r}")
        return self.weights[key]

    def _attr(self, a: Any, outer: dict[str, Value]) -> Any:
        if isinstance(a, dict):
            if "__tensor__" in a:
                return self._tensor(a["__tensor__"])
            if "__graph__" in a:
                return self.graph(a["__graph__"], outer)
            if "__typeproto__" in a:
                tp = onnx.TypeProto()
                tp.ParseFromString(base64.b64decode(a["__typeproto__"]))
                return tp
            if "__dict__" in a:
                return {k: self._attr(v, outer) for k, v in a["__dict__"].items()}
            raise PlanFormatError("plan holds an unknown attribute encoding")
        if isinstance(a, list):
            return [self._attr(x, outer) for x in a]
        return a

    def graph(self, spec: dict[str, Any], outer: dict[str, Value] | None = None) -> Graph:
        try:
            return self._graph(spec, outer or {})
        except PlanFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanFormatError(f"plan graph is malformed ({type(e).__name__}: {e})") from None

    def _graph(self, spec: dict[str, Any], outer: dict[str, Value]) -> Graph:
        g = Graph(spec["name"])
        g.opsets = dict(spec.get("opsets") or {"": 21})
        scope: dict[str, Value] = {}
        for name, e in spec["values"].items():
            g.reserve(name)
            if "const" in e:
                scope[name] = Value(name, const=self._tensor(e["const"]))
            elif name in spec["captures"]:
                if name not in outer:
                    raise PlanFormatError(f"plan subgraph captures unknown value '{name}'")
                scope[name] = outer[name]
            else:
                scope[name] = Value(name, type_from_json(e["type"]), kind=e.get("kind", "tensor"))
        g.inputs = [scope[n] for n in spec["inputs"]]
        g.captures = [scope[n] for n in spec["captures"]]
        inner = {**outer, **scope}
        for st in spec["steps"]:
            node = Node(st["op"], [None if n is None else scope[n] for n in st["inputs"]],
                        [scope[n] for n in st["outputs"]],
                        {k: self._attr(a, inner) for k, a in st["attrs"].items()},
                        name=st["name"], domain=st["domain"], opset=int(st["opset"]))
            node.captures = [scope[n] for n in st["captures"]]
            g.add_node(node)
            self.tactics[id(node)] = (str(st.get("tactic", "ref")), dict(st.get("config") or {}))
        g.outputs = [scope[n] for n in spec["outputs"]]
        return g
