"""ONNX importer: ModelProto -> kiln.ir.Graph (opsets 7+, external data, subgraphs).

The importer has no per-op code: every node is resolved through the op registry (or a
plugin); a node nothing claims fails the import with one line naming it.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import AttributeProto, numpy_helper

from kiln.errors import KilnError, ModelError, UnsupportedDTypeError
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.ops.registry import lookup

MIN_OPSET, MAX_OPSET = 1, 28


def tensor_to_torch(t: onnx.TensorProto, base_dir: str | None = None, where: str = "") -> torch.Tensor:
    """Convert a TensorProto (raw, typed or external data) to a CPU torch tensor."""
    DType.from_onnx(t.data_type, where or t.name)  # clear error for unsupported element types
    try:
        arr = numpy_helper.to_array(t, base_dir or "")
    except Exception as e:
        raise ModelError(f"cannot read tensor '{t.name or where}': {e}") from None
    return array_to_torch(arr, DType.from_onnx(t.data_type))


def array_to_torch(arr: np.ndarray, dtype: DType | None = None) -> torch.Tensor:
    """numpy (including ml_dtypes bfloat16/float8 arrays) -> torch, without going through float."""
    arr = np.ascontiguousarray(arr).reshape(np.shape(arr))  # ascontiguousarray makes 0-d arrays 1-d
    if arr.dtype.kind == "V" or arr.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz",
                                                    "float8_e5m2", "float8_e5m2fnuz"):
        if dtype is None:
            raise UnsupportedDTypeError(f"unsupported numpy dtype {arr.dtype}")
        bits = arr.view({1: np.uint8, 2: np.uint16}[arr.dtype.itemsize])
        return torch.from_numpy(bits.copy()).view(dtype.torch)
    if arr.dtype.kind in ("U", "S", "O"):
        raise UnsupportedDTypeError("string tensors are not supported")
    return torch.from_numpy(arr.copy())


def _value_type(tp: onnx.TypeProto, where: str) -> tuple[TensorType, str]:
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        tt = tp.tensor_type
        dtype = DType.from_onnx(tt.elem_type, where) if tt.elem_type else None
        if not tt.HasField("shape"):
            return TensorType(dtype, None), "tensor"
        dims: list[Any] = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(f"{where}_dim{k}")
        return TensorType(dtype, tuple(dims)), "tensor"
    if which == "sequence_type":
        return TensorType(None, None), "sequence"
    if which == "optional_type":
        return TensorType(None, None), "optional"
    if which is None:
        return TensorType(None, None), "tensor"
    raise UnsupportedDTypeError(f"'{where}': unsupported value type {which}")


class _Scope:
    """Name -> Value for one graph, resolving outer names as captures of the subgraph."""

    def __init__(self, graph: Graph, parent: "_Scope | None") -> None:
        self.graph, self.parent, self.names = graph, parent, {}  # type: dict[str, Value]

    def resolve(self, name: str) -> Value | None:
        v = self.names.get(name)
        if v is not None:
            return v
        if self.parent is None:
            return None
        v = self.parent.resolve(name)
        if v is not None and not v.is_const and all(c is not v for c in self.graph.captures):
            self.graph.captures.append(v)
        return v


class OnnxImporter:
    """Turns an ONNX ModelProto into a Graph."""

    def __init__(self, logger: Logger | None = None, base_dir: str | None = None) -> None:
        self.logger = logger or Logger()
        self.base_dir = base_dir

    def import_model(self, model: onnx.ModelProto) -> Graph:
        opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        default = opsets.get("", None)
        if default is None:
            raise ModelError("model declares no opset for the default ONNX domain")
        if not MIN_OPSET <= default <= MAX_OPSET:
            raise ModelError(f"model uses ONNX opset {default}; Kiln supports opsets {MIN_OPSET} to {MAX_OPSET}")
        functions = {(f.domain, f.name): f for f in model.functions}
        self.functions = functions
        g = self._graph(model.graph, opsets, None)
        g.opsets = opsets
        self.logger.verbose(f"Imported ONNX graph '{g.name}': {len(g.nodes)} nodes, "
                            f"{len(g.constants())} weights, opsets {opsets}")
        return g

    def _graph(self, gp: onnx.GraphProto, opsets: dict[str, int], parent: _Scope | None) -> Graph:
        g = Graph(gp.name or "graph")
        g.opsets = opsets
        scope = _Scope(g, parent)
        for t in gp.initializer:
            scope.names[t.name] = Value(t.name, const=tensor_to_torch(t, self.base_dir, t.name))
            g.reserve(t.name)
        for st in gp.sparse_initializer:
            dense = _sparse_to_dense(st, self.base_dir)
            scope.names[st.values.name] = Value(st.values.name, const=dense)
        for vi in gp.input:
            if vi.name in scope.names:
                continue  # initializer listed as an input (IR < 4): a weight
            ty, kind = _value_type(vi.type, vi.name)
            v = Value(vi.name, ty, kind=kind)
            g.reserve(vi.name)
            scope.names[vi.name] = v
            g.inputs.append(v)
        infos = {vi.name: vi for vi in gp.value_info}
        for np_ in gp.node:
            self._node(np_, g, scope, opsets, infos)
        for vi in gp.output:
            v = scope.resolve(vi.name)
            if v is None:
                raise ModelError(f"graph output '{vi.name}' is produced by no node")
            ty, kind = _value_type(vi.type, vi.name)
            if v.type.dtype is None and ty.dtype is not None:
                v.type = ty
            v.kind = kind if kind != "tensor" else v.kind
            g.outputs.append(v)
        return g

    def _node(self, np_: onnx.NodeProto, g: Graph, scope: _Scope, opsets: dict[str, int],
              infos: dict[str, onnx.ValueInfoProto]) -> None:
        domain = "" if np_.domain == "ai.onnx" else np_.domain
        name = np_.name or (np_.output[0] if np_.output else np_.op_type)
        if (np_.domain, np_.op_type) in self.functions and (domain, np_.op_type) != ("", np_.op_type):
            raise ModelError(f"node '{name}': model-local function {np_.domain}.{np_.op_type} is not supported")
        opset = opsets.get(domain)
        opdef = lookup(np_.op_type, domain, opset if domain == "" else None, where=name)
        inputs: list[Value | None] = []
        for iname in np_.input:
            if not iname:
                inputs.append(None)
                continue
            v = scope.resolve(iname)
            if v is None:
                raise ModelError(f"node '{name}' ({np_.op_type}): input '{iname}' is not defined before use")
            inputs.append(v)
        attrs = {a.name: self._attr(a, opsets, scope, name) for a in np_.attribute}
        outputs: list[Value] = []
        for oname in np_.output:
            v = g.new_value(oname or f"{name}_unused")
            if oname:
                if oname in infos:
                    try:
                        v.type, v.kind = _value_type(infos[oname].type, oname)
                    except KilnError:
                        pass
                scope.names[oname] = v
            outputs.append(v)
        node = Node(np_.op_type, inputs, outputs, attrs, name=name, domain=domain, opset=opset or 1)
        for sg in node.subgraphs():
            for c in sg.captures:
                if all(c is not x for x in node.captures):
                    node.captures.append(c)
        opdef.check(node)
        g.add_node(node)

    def _attr(self, a: AttributeProto, opsets: dict[str, int], scope: _Scope, where: str) -> Any:
        t = a.type
        if t == AttributeProto.FLOAT:
            return float(a.f)
        if t == AttributeProto.INT:
            return int(a.i)
        if t == AttributeProto.STRING:
            return a.s.decode("utf-8", errors="replace")
        if t == AttributeProto.TENSOR:
            return tensor_to_torch(a.t, self.base_dir, f"{where}.{a.name}")
        if t == AttributeProto.SPARSE_TENSOR:
            return _sparse_to_dense(a.sparse_tensor, self.base_dir)
        if t == AttributeProto.GRAPH:
            return self._graph(a.g, opsets, scope)
        if t == AttributeProto.FLOATS:
            return [float(x) for x in a.floats]
        if t == AttributeProto.INTS:
            return [int(x) for x in a.ints]
        if t == AttributeProto.STRINGS:
            return [s.decode("utf-8", errors="replace") for s in a.strings]
        if t == AttributeProto.TENSORS:
            return [tensor_to_torch(x, self.base_dir, f"{where}.{a.name}") for x in a.tensors]
        if t == AttributeProto.GRAPHS:
            return [self._graph(x, opsets, scope) for x in a.graphs]
        if t == AttributeProto.TYPE_PROTO:
            return a.tp
        raise ModelError(f"node '{where}': attribute '{a.name}' has unsupported type {t}")


def _sparse_to_dense(st: onnx.SparseTensorProto, base_dir: str | None) -> torch.Tensor:
    values = tensor_to_torch(st.values, base_dir)
    idx = tensor_to_torch(st.indices, base_dir).long()
    dims = [int(d) for d in st.dims]
    dense = torch.zeros(dims, dtype=values.dtype)
    flat = dense.view(-1)
    if idx.dim() == 1:
        flat[idx] = values
    else:
        strides = torch.tensor(dense.stride(), dtype=torch.long)
        flat[(idx * strides).sum(-1)] = values
    return dense


def load_onnx(path_or_model: str | os.PathLike | onnx.ModelProto, logger: Logger | None = None) -> Graph:
    """Load and import an ONNX model file (or ModelProto) into a Graph with inferred types."""
    base_dir = None
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    else:
        path = os.fspath(path_or_model)
        if not os.path.isfile(path):
            raise ModelError(f"model file not found: {path}")
        base_dir = os.path.dirname(os.path.abspath(path))
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as e:
            raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'parse error'})") from None
        if not model.graph.node and not model.graph.output:
            raise ModelError(f"{path}: not an ONNX model (empty graph)")
    g = OnnxImporter(logger, base_dir).import_model(model)
    from kiln.passes.shape_inference import infer_types
    infer_types(g, logger)
    return g


Loader = Callable[[str], Graph]
