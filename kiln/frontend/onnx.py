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
from kiln.ir.dtype import DType, array_to_torch
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.ops.attrs import check_arity, validate_node
from kiln.ops.registry import lookup

MIN_OPSET, MAX_OPSET = 1, 28
MAX_DIM = 2**40
# dim_param spellings exporters use for "unknown" (Paddle2ONNX writes "?" for every dynamic dim): each
# occurrence is its own dim, not one symbol that all of them must share
ANONYMOUS_DIMS = frozenset({"?", "-1"})
"""Largest dimension a declared type may state; a negative one (some exporters write -1) is unknown."""


def tensor_to_torch(t: onnx.TensorProto, base_dir: str | None = None, where: str = "") -> torch.Tensor:
    """Convert a TensorProto (raw, typed or external data) to a CPU torch tensor.

    External data is read by Kiln itself (read_external_data), only from inside `base_dir`.
    """
    dtype = DType.from_onnx(t.data_type, where or t.name)  # clear error for unsupported element types
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return read_external_data(t, base_dir, dtype, where)
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"cannot read tensor '{t.name or where}': {msg}") from None
    return array_to_torch(arr, dtype)


# little-endian numpy types of the raw bytes; bfloat16 and float8 are read as integers and viewed in torch
_RAW_NUMPY = {DType.FLOAT32: "<f4", DType.FLOAT16: "<f2", DType.FLOAT64: "<f8", DType.BFLOAT16: "<u2",
              DType.INT8: "i1", DType.INT16: "<i2", DType.INT32: "<i4", DType.INT64: "<i8", DType.UINT8: "u1",
              DType.UINT16: "<u2", DType.UINT32: "<u4", DType.UINT64: "<u8", DType.BOOL: "u1",
              DType.FLOAT8E4M3FN: "u1", DType.FLOAT8E4M3FNUZ: "u1", DType.FLOAT8E5M2: "u1",
              DType.FLOAT8E5M2FNUZ: "u1", DType.COMPLEX64: "<c8", DType.COMPLEX128: "<c16"}


def _external_file(name: str, location: str, base_dir: str) -> str:
    """realpath of `location` under `base_dir`, or ModelError: no absolute path, no '..', nothing outside."""
    import ntpath
    import posixpath
    where = f"tensor '{name}': external data file '{location}'"
    if not location or "\0" in location:
        raise ModelError(f"{where}: empty or invalid location")
    if posixpath.isabs(location) or ntpath.isabs(location) or ntpath.splitdrive(location)[0]:
        raise ModelError(f"{where}: absolute locations are refused (it must be relative to the model's folder)")
    if ".." in location.replace("\\", "/").split("/"):
        raise ModelError(f"{where}: locations with '..' are refused (it must be inside the model's folder)")
    root = os.path.realpath(base_dir)
    real = os.path.realpath(os.path.join(root, location))
    if os.path.commonpath([root, real]) != root:
        raise ModelError(f"{where}: resolves to {real}, outside the model's folder {root} (symbolic link?)")
    return real


def read_external_data(t: onnx.TensorProto, base_dir: str | None, dtype: DType | None = None,
                       where: str = "") -> torch.Tensor:
    """Kiln's own reader of a tensor's external data: checked location, exact size, open/seek/read.

    Refused (ModelError, one line naming the tensor and file): no base folder (an in-memory model),
    absolute locations, '..', a location resolving outside realpath(base_dir), files that are not
    regular or that have other hard links, an offset/length outside the file, and a byte count that
    differs from the tensor's dims x element size.
    """
    import stat
    name = t.name or where or "?"
    dtype = dtype or DType.from_onnx(t.data_type, name)
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if base_dir is None:
        raise ModelError(f"tensor '{name}' keeps its data in external file '{location}' but the model was "
                         f"passed in memory: pass base_dir=<folder of that file>")
    real = _external_file(name, location, base_dir)
    where_ = f"tensor '{name}': external data file '{location}'"
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length", "") != "" else None
    except ValueError:
        raise ModelError(f"{where_}: offset/length are not integers ({info.get('offset')!r}, "
                         f"{info.get('length')!r})") from None
    if offset < 0 or (length is not None and length < 0):
        raise ModelError(f"{where_}: negative offset or length ({offset}, {length})")
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise ModelError(f"tensor '{name}': negative dimension in {dims}")
    numel = 1
    for d in dims:
        numel *= d
    want = numel * dtype.itemsize
    try:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"{where_}: not a regular file")
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ModelError(f"{where_}: file not found in {os.path.realpath(base_dir)}") from None
    except OSError as e:
        raise ModelError(f"{where_}: cannot open ({e.strerror or type(e).__name__})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # the file actually opened (no swap since the checks above)
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"{where_}: not a regular file")
        if st.st_nlink > 1:
            raise ModelError(f"{where_}: has {st.st_nlink} hard links; refused (copy the file instead)")
        size = st.st_size
        if length is None:
            length = size - offset
        if offset > size or offset + length > size:
            raise ModelError(f"{where_}: offset {offset} + length {length} is beyond the file's {size} bytes")
        if length != want:
            raise ModelError(f"{where_}: holds {length} bytes, but {dtype.value}{dims} needs {want}")
        f.seek(offset)
        data = f.read(length)
    if len(data) != want:
        raise ModelError(f"{where_}: short read ({len(data)} of {want} bytes)")
    arr = np.frombuffer(data, dtype=np.dtype(_RAW_NUMPY[dtype])).reshape(dims)
    if dtype == DType.BOOL:
        return torch.from_numpy(arr != 0)
    out = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    return out.view(dtype.torch) if out.dtype != dtype.torch else out


def _value_type(tp: onnx.TypeProto, where: str) -> tuple[TensorType, str]:
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        tt = tp.tensor_type
        dtype = DType.from_onnx(tt.elem_type, where) if tt.elem_type else None
        if not tt.HasField("shape"):
            return TensorType(dtype, None), "tensor"
        dims: list[Any] = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                if d.dim_value > MAX_DIM:
                    raise ModelError(f"'{where}': dimension {k} is {d.dim_value}, above Kiln's limit of {MAX_DIM}")
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param and d.dim_param not in ANONYMOUS_DIMS:
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

    def defined(self, name: str) -> bool:
        """Whether the name is taken in this scope or an enclosing one (without capturing it)."""
        return name in self.names or (self.parent is not None and self.parent.defined(name))

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
            if any(o is v for o in g.outputs):
                raise ModelError(f"graph '{g.name}' lists output '{vi.name}' twice")
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
            if oname and scope.defined(oname):
                raise ModelError(f"node '{name}' ({np_.op_type}): output '{oname}' is already defined "
                                 "(ONNX values are assigned once)")
            v = g.new_value(oname or f"{name}_unused")
            if oname:
                if oname in infos:  # a declared type is a claim: its kind and element type are kept, its shape
                    try:           # is Kiln's own inference's to prove (kiln.ops.infer)
                        ty, v.kind = _value_type(infos[oname].type, oname)
                        v.type = TensorType(ty.dtype, None)
                    except KilnError:
                        pass
                scope.names[oname] = v
            outputs.append(v)
        node = Node(np_.op_type, inputs, outputs, attrs, name=name, domain=domain, opset=opset or 1)
        for sg in node.subgraphs():
            for c in sg.captures:
                if all(c is not x for x in node.captures):
                    node.captures.append(c)
        validate_node(node, private=False)
        check_arity(node)
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


def load_onnx(path_or_model: str | os.PathLike | onnx.ModelProto, logger: Logger | None = None, *,
              base_dir: str | os.PathLike | None = None) -> Graph:
    """Load and import an ONNX model file (or ModelProto) into a Graph with inferred types.

    base_dir: the folder external data is read from (only from inside it); default the model file's
    folder. A ModelProto with external data needs it.
    """
    base_dir = None if base_dir is None else os.path.abspath(os.fspath(base_dir))
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    else:
        path = os.fspath(path_or_model)
        if not os.path.isfile(path):
            raise ModelError(f"model file not found: {path}")
        if base_dir is None:
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
