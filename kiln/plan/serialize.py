"""Graph <-> JSON-able spec for plan files. Tensors go to a weight table, never into JSON."""
from __future__ import annotations

import base64
from typing import Any, Iterator, Mapping

import onnx
import torch

from kiln.errors import BuildError, KilnError, PlanFormatError
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.plan.schema import (DTYPES, KINDS, MAX_DIM, MAX_ITEMS, MAX_OPSET, MAX_RANK, MAX_STR, MAX_SUBGRAPH_DEPTH,
                              is_int, is_name, json_config, key, prefix, show)


def type_to_json(t: TensorType) -> dict[str, Any]:
    # a derived dim (kiln.ir.dims.DimExpr) is stored unknown: loading re-derives it
    return {"dtype": t.dtype.value if t.dtype else None,
            "shape": None if t.shape is None else [d if isinstance(d, (int, str)) else None for d in t.shape]}


def type_from_json(d: Any, path: str = "type") -> TensorType:
    """A value type from its JSON form {"dtype": name | null, "shape": [int | symbol | null, ...] | null}."""
    if not isinstance(d, dict) or not set(d) <= {"dtype", "shape"}:
        raise PlanFormatError(f"{path}: expected {{dtype, shape}}, got {show(d)}")
    dtype, shape = d.get("dtype"), d.get("shape")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise PlanFormatError(f"{path}.dtype: expected an element type or null, got {show(dtype)}")
    if shape is not None:
        if not isinstance(shape, list) or len(shape) > MAX_RANK:
            raise PlanFormatError(f"{path}.shape: expected a list of at most {MAX_RANK} dims or null, "
                                  f"got {show(shape)}")
        for k, x in enumerate(shape):
            if not (x is None or is_name(x) or (is_int(x) and 0 <= x <= MAX_DIM)):
                raise PlanFormatError(f"{path}.shape[{k}]: expected an int >= 0, a symbol name or null, got {show(x)}")
    return TensorType(DType(dtype) if dtype else None, None if shape is None else tuple(shape))


class GraphWriter:
    """Serializes graphs; collects tensors into `weights` under unique keys."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self._tactics: dict[int, tuple[str, dict[str, Any]]] = {}  # of the graph being written, for its subgraphs
        self._depth = 0

    def _tensor(self, t: torch.Tensor) -> str:
        span = 1
        for d in t.shape:
            span *= max(int(d), 1)
        if span >= 2**62:  # an empty tensor may state dims whose strides no loader can compute
            raise BuildError(f"a constant of shape {list(t.shape)} is too large to store in a plan")
        key = f"w{len(self.weights)}"
        self.weights[key] = t.detach().to("cpu").contiguous().clone()
        return key

    def _attr(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return {"__tensor__": self._tensor(a)}
        if isinstance(a, Graph):  # a subgraph's steps carry their tactics as the top-level steps do
            self._depth += 1
            try:
                return {"__graph__": self.graph(a, self._tactics)}
            finally:
                self._depth -= 1
        if isinstance(a, onnx.TypeProto):
            return {"__typeproto__": base64.b64encode(a.SerializeToString()).decode()}
        if isinstance(a, (list, tuple)):
            return [self._attr(x) for x in a]
        if isinstance(a, dict):
            return {"__dict__": {k: self._attr(v) for k, v in a.items()}}
        return a

    def graph(self, g: Graph, tactics: dict[int, tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
        """g's spec; `tactics` (id(node) -> (tactic, config)) covers its nodes and those of its subgraphs."""
        tactics = tactics or {}
        self._tactics = tactics
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
        spec = {"name": g.name, "inputs": [v.name for v in g.inputs], "outputs": [v.name for v in g.outputs],
                "captures": [v.name for v in g.captures], "values": values, "steps": steps,
                "opsets": g.opsets}
        if self._depth == 0:  # the plugins the plan needs, subgraphs' steps included (kiln.plugins.registry)
            from kiln.plugins.registry import graph_records
            plugins = graph_records(g)
            if plugins:
                spec["plugins"] = plugins
        return spec


_GRAPH_KEYS = {"name", "inputs", "outputs", "captures", "values", "steps", "opsets", "plugins"}
MAX_PLUGINS = 4096
_VALUE_KEYS = {"type", "kind", "const"}
_STEP_KEYS = {"name", "op", "domain", "opset", "attrs", "inputs", "outputs", "captures", "tactic", "config"}
_ENCODINGS = ("__tensor__", "__graph__", "__typeproto__", "__dict__")


class _Visible(Mapping[str, Value]):
    """The outer values a subgraph may capture: those of enclosing graphs defined before the step that
    holds it (a view, not a copy: `defined` grows as the enclosing graph's steps are read)."""

    def __init__(self, parent: Mapping[str, Value], scope: dict[str, Value], defined: set[str]) -> None:
        self.parent, self.scope, self.defined = parent, scope, defined

    def __contains__(self, k: object) -> bool:
        return (k in self.defined and k in self.scope) or k in self.parent

    def __getitem__(self, k: str) -> Value:
        if k in self.defined and k in self.scope:
            return self.scope[k]
        return self.parent[k]

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self.scope if k in self.defined)
        yield from (k for k in self.parent if not (k in self.defined and k in self.scope))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class GraphReader:
    """Rebuilds graphs from specs; tactic choices come back as {id(node): (tactic, config)}.

    A plan is untrusted input: every field's type is checked and the graph must be well formed (names
    are strings, each step reads values defined before it, each value is defined once, subgraphs capture
    only values of enclosing scopes), with bounded sizes (`kiln.plan.schema` MAX_*). Anything else is a
    PlanFormatError naming the field, e.g. ``plan graph: steps[3] ('conv1').inputs[1]: ...``.
    Attribute *values* are checked against the ops' declarations elsewhere (kiln.ops.attrs).
    """

    def __init__(self, weights: dict[str, torch.Tensor], where: str = "plan") -> None:
        self.weights = weights
        self.where = where
        self.tactics: dict[int, tuple[str, dict[str, Any]]] = {}
        self.plugins: list[tuple[str, str, int]] = []  # (domain, op, version) the plan needs
        self.items = 0

    def _fail(self, path: str, msg: str) -> PlanFormatError:
        return PlanFormatError(f"{prefix(self.where)}plan {path}: {msg}")

    def _tensor(self, ref: Any, path: str) -> torch.Tensor:
        if not isinstance(ref, str) or ref not in self.weights:
            raise self._fail(path, f"refers to a missing weight {show(ref)}")
        t = self.weights[ref]
        if not isinstance(t, torch.Tensor) or t.dtype not in _TORCH_DTYPES:
            raise self._fail(path, f"weight {show(ref)} is not a tensor of a supported element type")
        return t

    def _name(self, x: Any, path: str) -> str:
        if not is_name(x):
            raise self._fail(path, f"expected a non-empty name of at most {MAX_STR} characters, got {show(x)}")
        return x

    def _names(self, x: Any, path: str, optional: bool = False) -> list[Any]:
        if not isinstance(x, list) or len(x) > MAX_ITEMS:
            raise self._fail(path, f"expected a list of names, got {show(x)}")
        return [None if (n is None and optional) else self._name(n, f"{path}[{k}]") for k, n in enumerate(x)]

    def _count(self, n: int, path: str) -> None:
        self.items += n
        if self.items > MAX_ITEMS:
            raise self._fail(path, f"the plan holds more than {MAX_ITEMS} values and steps")

    def _attr(self, a: Any, outer: Mapping[str, Value], path: str, depth: int, nest: int = 0) -> Any:
        if nest > 32:
            raise self._fail(path, "attribute nested too deeply")
        if a is None or isinstance(a, (bool, int, float)):
            return a
        if isinstance(a, str):
            if len(a) > MAX_STR:
                raise self._fail(path, f"string of {len(a)} characters, above the limit of {MAX_STR}")
            return a
        if isinstance(a, list):
            if len(a) > MAX_ITEMS:
                raise self._fail(path, f"list of {len(a)} items, above the limit of {MAX_ITEMS}")
            return [self._attr(x, outer, f"{path}[{k}]", depth, nest + 1) for k, x in enumerate(a)]
        if not isinstance(a, dict) or len(a) != 1 or next(iter(a)) not in _ENCODINGS:
            raise self._fail(path, f"unknown attribute encoding {show(a)}")
        kind, body = next(iter(a.items()))
        if kind == "__tensor__":
            return self._tensor(body, path)
        if kind == "__graph__":
            return self._graph(body, outer, f"{path}.__graph__", depth + 1)
        if kind == "__typeproto__":
            if not isinstance(body, str) or len(body) > MAX_STR:
                raise self._fail(path, f"expected a base64 TypeProto string, got {show(body)}")
            try:
                tp = onnx.TypeProto()
                tp.ParseFromString(base64.b64decode(body, validate=True))
            except Exception as e:  # binascii.Error, protobuf's DecodeError, RecursionError
                raise self._fail(path, f"cannot decode the TypeProto ({type(e).__name__})") from None
            return tp
        if not isinstance(body, dict) or len(body) > MAX_ITEMS:
            raise self._fail(path, f"expected a JSON object, got {show(body)}")
        return {self._name(k, f"{path}.__dict__"): self._attr(v, outer, f"{path}.__dict__.{key(k)}", depth, nest + 1)
                for k, v in body.items()}

    def graph(self, spec: Any, outer: Mapping[str, Value] | None = None) -> Graph:
        try:
            return self._graph(spec, outer or {}, "graph", 0)
        except PlanFormatError:
            raise
        except RecursionError:
            raise self._fail("graph", "nested too deeply") from None
        except KilnError as e:
            raise self._fail("graph", str(e)) from None
        except Exception as e:  # a check missed above: still one line, still a PlanFormatError
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            raise self._fail("graph", f"is malformed ({type(e).__name__}: {msg})") from None

    def _graph(self, spec: Any, outer: Mapping[str, Value], path: str, depth: int) -> Graph:
        if depth > MAX_SUBGRAPH_DEPTH:
            raise self._fail(path, f"subgraphs nested deeper than {MAX_SUBGRAPH_DEPTH} levels")
        if not isinstance(spec, dict):
            raise self._fail(path, f"expected a JSON object, got {type(spec).__name__}")
        for k in spec:
            if k not in _GRAPH_KEYS:
                raise self._fail(f"{path}.{key(k)}", "unknown field")
        for k in ("name", "inputs", "outputs", "values", "steps"):
            if k not in spec:
                raise self._fail(f"{path}.{k}", "missing")
        if "plugins" in spec:
            if depth:
                raise self._fail(f"{path}.plugins", "only the top-level graph lists plugins")
            from kiln.plugins.registry import records_from_json
            self.plugins = records_from_json(spec["plugins"], lambda p, m: self._fail(f"{path}.{p}", m), MAX_PLUGINS)
        g = Graph(self._name(spec["name"], f"{path}.name"))
        opsets = spec.get("opsets") or {"": 21}
        if not isinstance(opsets, dict) or len(opsets) > 1024 or not all(
                isinstance(d, str) and (not d or is_name(d)) and is_int(v) and 1 <= v <= 10_000
                for d, v in opsets.items()):
            raise self._fail(f"{path}.opsets", f"expected {{domain: version >= 1}}, got {show(opsets)}")
        g.opsets = dict(opsets)
        values, steps = spec["values"], spec["steps"]
        if not isinstance(values, dict):
            raise self._fail(f"{path}.values", f"expected a JSON object, got {type(values).__name__}")
        if not isinstance(steps, list):
            raise self._fail(f"{path}.steps", f"expected a list, got {type(steps).__name__}")
        self._count(len(values) + len(steps), path)
        inputs = self._names(spec["inputs"], f"{path}.inputs")
        captures = self._names(spec.get("captures", []), f"{path}.captures")
        if set(inputs) & set(captures):
            raise self._fail(f"{path}.captures", f"{show(next(iter(set(inputs) & set(captures))))} is also an input")
        for field, names in (("inputs", inputs), ("captures", captures)):
            if len(set(names)) != len(names):
                raise self._fail(f"{path}.{field}", "names a value twice")
            for k, name in enumerate(names):
                if name not in values:
                    raise self._fail(f"{path}.{field}[{k}]", f"names {show(name)}, which is not in values")
        scope: dict[str, Value] = {}
        for name, e in values.items():
            at = f"{path}.values.{key(name)}"
            self._name(name, at)
            if not isinstance(e, dict) or not set(e) <= _VALUE_KEYS:
                raise self._fail(at, f"expected {{type, kind, const}}, got {show(e)}")
            kind = e.get("kind", "tensor")
            if kind not in KINDS:
                raise self._fail(f"{at}.kind", f"expected one of {', '.join(KINDS)}, got {show(kind)}")
            g.reserve(name)
            if "const" in e:
                if name in inputs:
                    raise self._fail(at, "a graph input cannot be a constant")
                scope[name] = Value(name, const=self._tensor(e["const"], f"{at}.const"))
            elif name in captures:
                if name not in outer:
                    raise self._fail(at, f"subgraph captures unknown value {show(name)}")
                scope[name] = outer[name]
            else:
                try:
                    t = type_from_json(e.get("type", {"dtype": None, "shape": None}), f"{at}.type")
                except PlanFormatError as err:
                    raise PlanFormatError(f"{prefix(self.where)}plan {err}") from None
                scope[name] = Value(name, t, kind=kind)
        g.inputs = [scope[n] for n in inputs]
        g.captures = [scope[n] for n in captures]
        defined = set(inputs) | set(captures) | {n for n, e in values.items() if "const" in e}
        inner = _Visible(outer, scope, defined)
        for i, st in enumerate(steps):
            node = self._step(st, i, g, scope, inner, defined, path, depth)
            g.add_node(node)
        outputs = self._names(spec["outputs"], f"{path}.outputs")
        for k, name in enumerate(outputs):
            if name not in defined:
                raise self._fail(f"{path}.outputs[{k}]", f"names {show(name)}, which no step defines")
        g.outputs = [scope[n] for n in outputs]
        return g

    def _step(self, st: Any, i: int, g: Graph, scope: dict[str, Value], inner: Mapping[str, Value],
              defined: set[str], path: str, depth: int) -> Node:
        at = f"{path}.steps[{i}]"
        if not isinstance(st, dict):
            raise self._fail(at, f"expected a JSON object, got {type(st).__name__}")
        for k in st:
            if k not in _STEP_KEYS:
                raise self._fail(f"{at}.{key(k)}", "unknown field")
        for k in ("name", "op", "inputs", "outputs"):
            if k not in st:
                raise self._fail(f"{at}.{k}", "missing")
        name = self._name(st["name"], f"{at}.name")
        at = f"{at} ({show(name, 40)})"
        op = self._name(st["op"], f"{at}.op")
        domain = st.get("domain", "")
        if not isinstance(domain, str) or (domain and not is_name(domain)):
            raise self._fail(f"{at}.domain", f"expected a string, got {show(domain)}")
        opset = st.get("opset", 21)
        if not is_int(opset) or not 1 <= opset <= MAX_OPSET:
            raise self._fail(f"{at}.opset", f"expected an int in [1, {MAX_OPSET}], got {show(opset)}")
        ins = self._names(st["inputs"], f"{at}.inputs", optional=True)
        caps = self._names(st.get("captures", []), f"{at}.captures")
        for field, names in (("inputs", ins), ("captures", caps)):
            for k, n in enumerate(names):
                if n is not None and n not in defined:
                    why = "is not in values" if n not in scope else "is used before any step defines it"
                    raise self._fail(f"{at}.{field}[{k}]", f"value {show(n)} {why}")
        outs = self._names(st["outputs"], f"{at}.outputs")
        seen: set[str] = set()
        for k, n in enumerate(outs):
            if n not in scope:
                raise self._fail(f"{at}.outputs[{k}]", f"value {show(n)} is not in values")
            if n in defined or n in seen:
                raise self._fail(f"{at}.outputs[{k}]", f"value {show(n)} is already defined (a graph input, "
                                                       "a constant, a capture or another step's output)")
            seen.add(n)
        attrs = st.get("attrs", {})
        if not isinstance(attrs, dict):
            raise self._fail(f"{at}.attrs", f"expected a JSON object, got {type(attrs).__name__}")
        tactic = st.get("tactic", "ref")
        if not is_name(tactic) or len(tactic) > 256:
            raise self._fail(f"{at}.tactic", f"expected a tactic name, got {show(tactic)}")
        config = st.get("config") or {}
        if not isinstance(config, dict) or not all(isinstance(k, str) and json_config(v) for k, v in config.items()):
            raise self._fail(f"{at}.config", f"expected an object of JSON scalars and lists, got {show(config)}")
        node = Node(op, [None if n is None else scope[n] for n in ins], [scope[n] for n in outs],
                    {self._name(k, f"{at}.attrs"): self._attr(a, inner, f"{at}.attrs.{key(k)}", depth)
                     for k, a in attrs.items()},
                    name=name, domain=domain, opset=opset)
        node.captures = [scope[n] for n in caps]
        self._check_captures(node, at)
        defined.update(outs)
        self.tactics[id(node)] = (tactic, dict(config))
        return node

    def _check_captures(self, node: Node, at: str) -> None:
        """A step's captures are exactly the outer values its subgraph attributes capture, each once, in the
        order the importer lists them (each subgraph's captures in turn): the control-flow ops receive them
        after the explicit inputs, so an extra one would reach any other kernel as an extra input."""
        want: list[str] = []  # by name: a captured constant is its own Value in each graph that holds it
        seen: set[str] = set()
        for sub in node.subgraphs():
            for v in sub.captures:
                if v.name not in seen:
                    seen.add(v.name)
                    want.append(v.name)
        got = [v.name for v in node.captures]
        if got == want:
            return
        if not want:
            raise self._fail(f"{at}.captures", f"is {show(got, 80)}, but the step has no subgraph capturing "
                                               "outer values")
        raise self._fail(f"{at}.captures", f"is {show(got, 80)}, but its subgraphs capture {show(want, 80)} "
                                           "(each once, in this order)")


_TORCH_DTYPES = frozenset(d.torch for d in DType)
