"""Mutation strategies (hypothesis) for plan files and ONNX models.

``plan_cases(seeds)`` and ``model_cases(seeds)`` are hypothesis strategies of ``harness.Case``: a seed
picked from ``seeds`` ({name: bytes}) with one to four mutations applied, each described in one line
(``Case.desc``), which the corpus sidecars keep.

Plans are taken apart into (version, flags, header JSON, safetensors entries) and put back together,
so mutations are structural: any JSON leaf replaced by a value of another type (huge and negative ints,
NaN/inf, long strings, strings of Python source that would create a CANARY file if ever executed, names
of other values), keys and list items dropped or duplicated, subtrees spliced, dtypes and shapes
swapped, tactic ids replaced by other registered ids (cuda.* ones too) and configs changed, profiles
bent, Pointwise programs edited (operand references, ops, outputs, constants), weights retyped,
reshaped, emptied, truncated or dropped. The sha256 trailer is recomputed after every mutation (an
unkeyed checksum authenticates nothing: anyone who edits a plan can fix it) except for a share of the
raw byte mutations (bit flips, truncation, extension) that test the checksum itself.

Models are mutated as ModelProto: attribute values and types, op types and domains, opsets,
initializer dims / data types / raw_data length, sparse initializers, input shapes (dim_value -1 and
0, huge), node input/output names, node order, subgraph bodies, value_info, graph outputs, and external
data references to ``../outside/SECRET``, ``/etc/passwd`` and symlinks (files created next to the
model by the worker, see ``Case.files``); plus a share of raw protobuf byte mutations.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import random
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import onnx
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, helper

from tests.fuzz.harness import Case

Draw = Callable[..., Any]
R = random.Random
Path = tuple[Any, ...]

# ---- value pools -----------------------------------------------------------------------------------

_STACK = "''.join(__import__('traceback').format_stack())"
PY = f"__import__('builtins').open('CANARY','w').write({_STACK})"
PAYLOADS = [
    PY,
    f"i0 if {PY} else i0",
    f"t0 if {PY} else t0",
    f"c0 if {PY} else c0",
    f"i0\n{PY}\n",
    f"t0\n{PY}\n",
    f"i0)\n{PY}\n(",
    f"i0 + ({PY})",
    "__import__('os').system('touch CANARY')",
    "'; __import__('os').system('touch CANARY'); '",
    "{__import__('os').system('touch CANARY')}",
]
INTS = [0, 1, -1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 31, 64, 255, 256, 1023, 4096, 65535, 2**31 - 1, 2**31,
        -2**31, 2**32, 2**40, 2**53, 2**63 - 1, -2**63, 2**64, 10**30, -10**30]
SMALL_INTS = [0, 1, -1, 2, 3, 4, -2, 5, 8, 100]
FLOATS = [0.0, -0.0, 0.5, -1.5, 1e-45, 1e38, 3.4e38, 1e308, -1e308, math.nan, math.inf, -math.inf]
STRINGS = ["", "x", "float32", "bfloat16", "ref", "cpu.pointwise", "i0", "t0", "c0", "i99", "t-1", "c1000000",
           "i", "t", "N", "\n", "\x00", "\u00e9\u4e2d", "../../etc/passwd", "A" * 100_000, "__tensor__",
           "__graph__", "Relu", "NOTSET", "SAME_UPPER", "nearest", "tanh", "Bogus"]
DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
          "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "complex64",
          "complex128", "string", "", None, 7, "FLOAT"]
ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}
POINTWISE_OPS = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Relu", "Sigmoid", "Tanh",
                 "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Floor", "Ceil", "Erf", "Clip", "Where",
                 "PRelu", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Gelu", "Softplus",
                 "Not", "And", "Or", "Xor", "Equal", "Less", "Greater", "Identity", "Cast", "Swish",
                 "ThresholdedRelu", "Mish", "Conv", "Loop", "Softmax", "Reshape", "NotAnOp", ""]


def _tactic_ids() -> list[str]:
    from kiln.backends.tactic import _TACTICS, _ensure_loaded
    _ensure_loaded()
    return sorted(_TACTICS)


def _onnx_ops() -> list[str]:
    try:
        from kiln.ops.registry import all_ops
        return sorted({op for (dom, op) in all_ops() if dom in ("", "ai.onnx")})
    except Exception:
        return ["Relu", "Add", "Conv", "MatMul", "Reshape"]


_CACHE: dict[str, Any] = {}


def tactic_ids() -> list[str]:
    if "tactics" not in _CACHE:
        _CACHE["tactics"] = _tactic_ids()
    return _CACHE["tactics"]


def onnx_ops() -> list[str]:
    if "ops" not in _CACHE:
        _CACHE["ops"] = _onnx_ops()
    return _CACHE["ops"]


def short(v: Any, n: int = 60) -> str:
    if isinstance(v, str) and len(v) > n:
        return repr(v[:n]) + f"...({len(v)} chars)"
    s = json.dumps(v, default=str) if not isinstance(v, float) else repr(v)
    return s if len(s) <= n else s[:n] + "..."


def fmt_path(p: Path) -> str:
    return "".join(f"[{k!r}]" if isinstance(k, str) else f"[{k}]" for k in p)


# ---- plan file container -----------------------------------------------------------------------------

_HEAD = struct.Struct("<8sIIQ")
_U64 = struct.Struct("<Q")


@dataclass
class Tensor:
    dtype: str
    shape: list[Any]
    data: bytes
    offsets: list[Any] | None = None  # forced data_offsets (inconsistent on purpose), else computed


@dataclass
class PlanParts:
    magic: bytes
    version: int
    flags: int
    header: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    st_meta: dict[str, Any] | None = None
    raw_weights: bytes | None = None  # used verbatim when set (a raw mutation of the safetensors blob)
    hlen_override: int | None = None
    wlen_override: int | None = None


def split_plan(data: bytes) -> PlanParts:
    magic, version, flags, hlen = _HEAD.unpack_from(data, 0)
    header = json.loads(data[_HEAD.size:_HEAD.size + hlen])
    (wlen,) = _U64.unpack_from(data, _HEAD.size + hlen)
    w = data[_HEAD.size + hlen + _U64.size:_HEAD.size + hlen + _U64.size + wlen]
    parts = PlanParts(magic, version, flags, header)
    if w:
        (n,) = _U64.unpack_from(w, 0)
        meta = json.loads(w[8:8 + n])
        body = w[8 + n:]
        parts.st_meta = meta.pop("__metadata__", None)
        for k, e in meta.items():
            b, en = e["data_offsets"]
            parts.tensors[k] = Tensor(e["dtype"], list(e["shape"]), body[b:en])
    return parts


def encode_safetensors(tensors: dict[str, Tensor], meta: dict[str, Any] | None) -> bytes:
    if not tensors and meta is None:
        return b""
    order = sorted(tensors, key=lambda k: -ST_DTYPES.get(tensors[k].dtype, 1))
    head: dict[str, Any] = {}
    if meta is not None:
        head["__metadata__"] = meta
    body = b""
    for k in order:
        t = tensors[k]
        off = [len(body), len(body) + len(t.data)]
        head[k] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": t.offsets if t.offsets is not None else off}
        body += t.data
    hb = json.dumps(head, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return _U64.pack(len(hb)) + hb + body


def join_plan(p: PlanParts) -> bytes:
    header = json.dumps(p.header, separators=(",", ":")).encode()
    weights = p.raw_weights if p.raw_weights is not None else encode_safetensors(p.tensors, p.st_meta)
    hlen = len(header) if p.hlen_override is None else p.hlen_override
    wlen = len(weights) if p.wlen_override is None else p.wlen_override
    body = _HEAD.pack(p.magic, p.version & 0xFFFFFFFF, p.flags & 0xFFFFFFFF, hlen & (2**64 - 1)) + header \
        + _U64.pack(wlen & (2**64 - 1)) + weights
    return body + hashlib.sha256(body).digest()


# ---- JSON helpers ---------------------------------------------------------------------------------------

def walk(obj: Any, path: Path = ()) -> list[tuple[Path, Any]]:
    out: list[tuple[Path, Any]] = []
    stack = [(path, obj)]
    while stack:
        p, o = stack.pop()
        if p:
            out.append((p, o))
        if isinstance(o, dict):
            stack.extend((p + (k,), v) for k, v in o.items())
        elif isinstance(o, list):
            stack.extend((p + (i,), v) for i, v in enumerate(o))
    out.sort(key=lambda e: [str(x) for x in e[0]])  # a stable order: the same draw picks the same node
    return out


def get(obj: Any, p: Path) -> Any:
    for k in p:
        obj = obj[k]
    return obj


def put(obj: Any, p: Path, v: Any) -> None:
    get(obj, p[:-1])[p[-1]] = v


def pick(r: R, items: list[Any]) -> Any:
    return items[r.randint(0, len(items) - 1)]


def chance(r: R, p: float) -> bool:
    return r.randint(0, 999) < int(p * 1000)


def graph_specs(header: dict[str, Any]) -> list[Path]:
    """Paths of every graph spec (the main graph and subgraphs inside attrs)."""
    return [p for p, o in walk(header) if isinstance(o, dict) and "steps" in o and "values" in o] + (
        [("graph",)] if isinstance(header.get("graph"), dict) else [])


def step_paths(header: dict[str, Any]) -> list[Path]:
    return [p for p, o in walk(header) if isinstance(o, dict) and "op" in o and "tactic" in o]


def value_names(header: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for p in graph_specs(header):
        vals = get(header, p).get("values")
        if isinstance(vals, dict):
            names.extend(vals)
    return sorted(set(names)) or ["x"]


def json_value(r: R, header: dict[str, Any], depth: int = 0) -> Any:
    kind = r.randint(0, 12 if depth < 2 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return (r.random() < 0.5)
    if kind in (2, 3):
        return pick(r, INTS) if chance(r, 0.8) else r.randint(-1000, 1000)
    if kind == 4:
        return pick(r, FLOATS)
    if kind == 5:
        return pick(r, STRINGS)
    if kind == 6:
        return pick(r, PAYLOADS)
    if kind == 7:
        return pick(r, value_names(header))
    if kind == 8:
        return pick(r, tactic_ids() + DTYPES[:14])
    if kind == 9:
        return [json_value(r, header, depth + 1) for _ in range(r.randint(0, 3))]
    if kind == 10:
        return {pick(r, ["dtype", "shape", "min", "max", "name", "op", "x", "__tensor__", "__graph__",
                            "__dict__", "__typeproto__"]): json_value(r, header, depth + 1)
                for _ in range(r.randint(0, 2))}
    if kind == 11:
        return {"__tensor__": pick(r, ["w0", "w1", "w999", "", 0])}
    return {"__typeproto__": pick(r, ["", "AAAA", base64.b64encode(b"\x0a\x02\x08\x01").decode(), "!!"])}


# ---- plan mutators ------------------------------------------------------------------------------------

def m_leaf(r: R, p: PlanParts) -> str:
    nodes = walk(p.header)
    path, _ = pick(r, nodes)
    v = json_value(r, p.header)
    put(p.header, path, v)
    return f"header{fmt_path(path)} = {short(v)}"


def m_drop(r: R, p: PlanParts) -> str:
    path, _ = pick(r, walk(p.header))
    parent = get(p.header, path[:-1])
    del parent[path[-1]]
    return f"drop header{fmt_path(path)}"


def m_dup(r: R, p: PlanParts) -> str:
    lists = [(q, o) for q, o in walk(p.header) if isinstance(o, list) and o]
    if not lists:
        return m_leaf(r, p)
    path, lst = pick(r, lists)
    i = r.randint(0, len(lst) - 1)
    lst.insert(r.randint(0, len(lst)), copy.deepcopy(lst[i]))
    return f"duplicate item {i} of header{fmt_path(path)}"


def m_splice(r: R, p: PlanParts) -> str:
    nodes = walk(p.header)
    a, _ = pick(r, nodes)
    b, ob = pick(r, nodes)
    if a[:len(b)] == b:  # b contains a: copying would not change the structure meaningfully
        return m_leaf(r, p)
    put(p.header, a, copy.deepcopy(ob))
    return f"header{fmt_path(a)} = copy of header{fmt_path(b)}"


def m_dtype(r: R, p: PlanParts) -> str:
    holders = [q for q, o in walk(p.header) if isinstance(o, dict) and "dtype" in o]
    if not holders:
        return m_leaf(r, p)
    q = pick(r, holders)
    v = pick(r, DTYPES)
    get(p.header, q)["dtype"] = v
    return f"header{fmt_path(q)}.dtype = {short(v)}"


def _dim(r: R, names: list[str]) -> Any:
    k = r.randint(0, 5)
    if k == 0:
        return pick(r, INTS)
    if k in (1, 2):
        return pick(r, SMALL_INTS)
    if k == 3:
        return pick(r, ["N", "M", "T", "H", "W", "x_dim0", ""] + names[:5])
    if k == 4:
        return pick(r, [None, 1.5, True, [], "-1"])
    return pick(r, [0, -1])


def m_shape(r: R, p: PlanParts) -> str:
    holders = [q for q, o in walk(p.header) if isinstance(o, dict) and "shape" in o]
    if not holders:
        return m_leaf(r, p)
    q = pick(r, holders)
    d = get(p.header, q)
    shape = d["shape"]
    k = r.randint(0, 5)
    if not isinstance(shape, list) or k == 0:
        new = pick(r, [None, [], [1], [0], [2**31], "N", 3, [-1, 3]])
    else:
        new = list(shape)
        if k in (1, 2) and new:
            new[r.randint(0, len(new) - 1)] = _dim(r, value_names(p.header))
        elif k == 3:
            new.insert(r.randint(0, len(new)), _dim(r, value_names(p.header)))
        elif k == 4 and new:
            del new[r.randint(0, len(new) - 1)]
        else:
            new = [pick(r, SMALL_INTS[1:]) if isinstance(x, int) else x for x in new]
    d["shape"] = new
    return f"header{fmt_path(q)}.shape {short(shape, 30)} -> {short(new, 40)}"


SAME_OP_TACTICS = {  # CPU tactics that may take an op (the loader re-checks `supports`; a swap among these
    # reaches the kernels), plus ref, which takes everything
    "Conv": ["cpu.conv_dnnl", "cpu.conv_matmul", "cpu.conv_onednn", "cpu.conv_winograd"],
    "FusedGemm": ["cpu.linear_dnnl", "cpu.linear_onednn"], "Gemm": ["cpu.linear_dnnl", "cpu.linear_onednn"],
    "MatMul": ["cpu.linear_dnnl", "cpu.linear_onednn"], "Pointwise": ["cpu.pointwise"],
    "MaxPool": ["cpu.pool", "cpu.pool_dnnl"], "AveragePool": ["cpu.pool", "cpu.pool_dnnl"],
    "GlobalAveragePool": ["cpu.pool", "cpu.pool_dnnl"], "ReduceMean": ["cpu.pool", "cpu.pool_dnnl"],
    "Resize": ["cpu.resize_nearest"], "Concat": ["concat.elide", "cpu.concat"], "Slice": ["view.slice"],
    "Gather": ["view.gather"],
}
SAME_OP_TACTICS["FusedConv"] = SAME_OP_TACTICS["Conv"]


def m_tactic(r: R, p: PlanParts) -> str:
    steps = step_paths(p.header)
    if not steps:
        return m_leaf(r, p)
    q = pick(r, steps)
    s = get(p.header, q)
    old = s.get("tactic")
    if chance(r, 0.65):
        new = pick(r, SAME_OP_TACTICS.get(str(s.get("op")), []) + ["ref"])
        s["tactic"] = new
        s["config"] = pick(r, [{}, {}, {"tile": 2}, {"tile": 4}])
        return f"step {s.get('name')!r} ({s.get('op')}) tactic {old} -> {new}, config {short(s['config'])}"
    new = pick(r, tactic_ids() + ["nope", "", "cpu.", "ref "])
    s["tactic"] = new
    extra = ""
    if chance(r, 0.5):
        s["config"] = _config(r, p)
        extra = f", config {short(s['config'])}"
    return f"step {s.get('name')!r} ({s.get('op')}) tactic {old} -> {new}{extra}"


def _config(r: R, p: PlanParts) -> Any:
    k = r.randint(0, 6)
    if k == 0:
        return {}
    if k == 1:
        return {"tile": pick(r, [2, 4, 3, 6, 0, -4, 8, 2**31, "4", None])}
    if k == 2:
        return {"BLOCK": pick(r, [1024, 512, 1, 0, 3, -1, 2**20, 2**31]),
                "num_warps": pick(r, [4, 8, 0, 3, -1, 1024])}
    if k == 3:
        others = [get(p.header, q).get("config") for q in step_paths(p.header)]
        return copy.deepcopy(pick(r, [c for c in others if c] or [{}]))
    if k == 4:
        return {pick(r, ["tile", "BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages",
                            "layout", "algo", "split_k"]): json_value(r, p.header)}
    if k == 5:
        return json_value(r, p.header)
    return {"BLOCK_M": pick(r, [16, 32, 64, 128, 0, 3]), "BLOCK_N": pick(r, [16, 32, 64, 0, 5]),
            "BLOCK_K": pick(r, [16, 32, 0, 7]), "num_warps": 4, "num_stages": pick(r, [1, 2, 0])}


def m_config(r: R, p: PlanParts) -> str:
    steps = step_paths(p.header)
    if not steps:
        return m_leaf(r, p)
    q = pick(r, steps)
    s = get(p.header, q)
    old = s.get("config")
    s["config"] = _config(r, p)
    return f"step {s.get('name')!r} ({s.get('tactic')}) config {short(old, 30)} -> {short(s['config'])}"


def m_profile(r: R, p: PlanParts) -> str:
    profs = p.header.get("profiles")
    inputs = [d.get("name") for d in p.header.get("inputs", []) if isinstance(d, dict)] or ["x"]
    k = r.randint(0, 5)
    if not isinstance(profs, list) or not profs or k == 0:
        name = pick(r, inputs + ["nope"])
        rank = r.randint(0, 4)
        mn = [pick(r, SMALL_INTS) for _ in range(rank)]
        mx = [pick(r, [1, 2, 3, 4, 2**31, 2**40, 0, -1]) for _ in range(rank)]
        p.header["profiles"] = [{name: {"min": mn, "opt": mn, "max": mx}}]
        return f"profiles = [{name}: min {mn} max {mx}]"
    prof = pick(r, profs)
    if not isinstance(prof, dict) or not prof:
        return m_leaf(r, p)
    name = pick(r, sorted(prof))
    ent = prof[name]
    if not isinstance(ent, dict):
        return m_leaf(r, p)
    which = pick(r, ["min", "max", "opt"])
    cur = ent.get(which)
    if k == 1:
        ent["min"], ent["max"] = ent.get("max"), ent.get("min")
        return f"profile {name}: min and max swapped"
    if k == 2 and isinstance(cur, list) and cur:
        i = r.randint(0, len(cur) - 1)
        cur[i] = pick(r, INTS)
        return f"profile {name}.{which}[{i}] = {cur[i]}"
    if k == 3 and isinstance(cur, list):
        ent[which] = cur + [pick(r, SMALL_INTS)] if chance(r, 0.5) else cur[:-1]
        return f"profile {name}.{which} rank -> {len(ent[which])}"
    if k == 4:
        other = pick(r, inputs + ["nope"])
        prof[other] = copy.deepcopy(ent)
        return f"profile entry {name} copied to {other}"
    ent[which] = json_value(r, p.header)
    return f"profile {name}.{which} = {short(ent[which])}"


def _pointwise_steps(p: PlanParts) -> list[dict[str, Any]]:
    out = []
    for q in step_paths(p.header):
        s = get(p.header, q)
        if s.get("op") == "Pointwise" and isinstance(s.get("attrs"), dict):
            out.append(s)
    return out


def _ref(r: R) -> Any:
    k = r.randint(0, 6)
    if k <= 2:
        return pick(r, "itc") + str(pick(r, [0, 1, 2, 3, 5, -1, 99, 10**9]))
    if k == 3:
        return pick(r, PAYLOADS)
    if k == 4:
        return pick(r, ["", None, 0, "x0", "i", "t", "c", "i-0", "i0 ", "i1e3", "t0.5", "c-1"])
    if k == 5:
        return pick(r, PAYLOADS[:8])
    return pick(r, ["i0", "i1", "t0", "t1", "c0"])


def m_pointwise(r: R, p: PlanParts) -> str:
    steps = _pointwise_steps(p)
    if not steps:
        return m_tactic(r, p)
    s = pick(r, steps)
    attrs = s["attrs"]
    prog = attrs.get("program")
    k = r.randint(0, 8)
    if isinstance(prog, list) and prog and k <= 5:
        i = r.randint(0, len(prog) - 1)
        ins = prog[i]
        if not isinstance(ins, dict):
            return m_leaf(r, p)
        if k <= 1:
            args = ins.get("args")
            if isinstance(args, list) and args:
                j = r.randint(0, len(args) - 1)
                args[j] = _ref(r)
                return f"Pointwise program[{i}].args[{j}] = {short(args[j])}"
            ins["args"] = [_ref(r) for _ in range(r.randint(0, 3))]
            return f"Pointwise program[{i}].args = {short(ins['args'])}"
        if k == 2:
            ins["op"] = pick(r, POINTWISE_OPS + PAYLOADS[:2])
            return f"Pointwise program[{i}].op = {short(ins['op'])}"
        if k == 3:
            ins.setdefault("attrs", {})
            if not isinstance(ins["attrs"], dict):
                ins["attrs"] = {}
            key = pick(r, ["alpha", "beta", "gamma", "approximate", "min", "max", "to", "fmod", "axis"])
            ins["attrs"][key] = pick(r, FLOATS + ["tanh", "none", PY, 1, None, [1.0]])
            return f"Pointwise program[{i}].attrs.{key} = {short(ins['attrs'][key])}"
        if k == 4:
            del prog[i]
            return f"Pointwise program[{i}] dropped"
        prog.insert(r.randint(0, len(prog)), copy.deepcopy(ins))
        return f"Pointwise program[{i}] duplicated"
    if k == 6:
        attrs["outputs"] = [_ref(r) for _ in range(r.randint(0, 3))]
        return f"Pointwise outputs = {short(attrs['outputs'])}"
    if k == 7:
        consts = attrs.get("consts")
        if isinstance(consts, list) and consts and chance(r, 0.7):
            j = r.randint(0, len(consts) - 1)
            consts[j] = pick(r, FLOATS + ["1.0", None, [], 2**1024 if False else 10**400, PY])
            return f"Pointwise consts[{j}] = {short(consts[j])}"
        attrs["consts"] = [pick(r, FLOATS) for _ in range(r.randint(0, 3))]
        return f"Pointwise consts = {short(attrs['consts'])}"
    attrs["program"] = json_value(r, p.header)
    return f"Pointwise program = {short(attrs['program'])}"


ATTR_NAMES = ["axis", "axes", "perm", "pads", "strides", "dilations", "kernel_shape", "group", "activation",
              "alpha", "beta", "act_before_add", "out_dtype", "transA", "transB", "mode", "auto_pad", "ceil_mode",
              "count_include_pad", "keepdims", "split", "to", "epsilon", "coordinate_transformation_mode",
              "nearest_mode", "storage_order", "then_branch", "else_branch", "body", "allowzero"]


def _attr_value(r: R, old: Any, header: dict[str, Any]) -> Any:
    if isinstance(old, bool) or old is None:
        return json_value(r, header)
    if isinstance(old, int):
        return pick(r, INTS + SMALL_INTS * 3)
    if isinstance(old, float):
        return pick(r, FLOATS)
    if isinstance(old, str):
        return pick(r, STRINGS[:20] + PAYLOADS[:3] + ["Relu", "LeakyRelu", "Clip", "HardSwish", "Mish",
                                                          "SiLU", "Gelu", "Bogus"])
    if isinstance(old, list) and old and all(isinstance(x, int) for x in old):
        new = list(old)
        k = r.randint(0, 3)
        if k == 0:
            new[r.randint(0, len(new) - 1)] = pick(r, INTS + SMALL_INTS * 3)
        elif k == 1:
            new.append(pick(r, SMALL_INTS))
        elif k == 2:
            new = new[:-1]
        else:
            new = [pick(r, SMALL_INTS) for _ in new]
        return new
    return json_value(r, header)


def m_attr(r: R, p: PlanParts) -> str:
    steps = step_paths(p.header)
    if not steps:
        return m_leaf(r, p)
    s = get(p.header, pick(r, steps))
    attrs = s.get("attrs")
    if not isinstance(attrs, dict):
        return m_leaf(r, p)
    k = r.randint(0, 5)
    if attrs and k <= 3:
        key = pick(r, sorted(attrs))
        old = attrs[key]
        attrs[key] = _attr_value(r, old, p.header)
        return f"step {s.get('name')!r} ({s.get('op')}) attr {key}: {short(old, 30)} -> {short(attrs[key])}"
    if attrs and k == 4:
        key = pick(r, sorted(attrs))
        del attrs[key]
        return f"step {s.get('name')!r} ({s.get('op')}) attr {key} dropped"
    key = pick(r, ATTR_NAMES)
    attrs[key] = _attr_value(r, pick(r, [1, [1, 1], "x", 1.0, None]), p.header)
    return f"step {s.get('name')!r} ({s.get('op')}) attr {key} added = {short(attrs[key])}"


ACTS = ["", "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "SiLU", "HardSwish", "HardSigmoid", "Mish", "Gelu",
        "GeluTanh", "Bogus", None]


def m_layer_attrs(r: R, p: PlanParts) -> str:
    """Attribute changes that keep output shapes (so Kiln's own type inference still agrees with the plan):
    pads moved between begin and end, fused activations and their parameters, act_before_add."""
    cands = [get(p.header, q) for q in step_paths(p.header)
             if isinstance(get(p.header, q).get("attrs"), dict)
             and get(p.header, q).get("op") in ("FusedConv", "Conv", "MaxPool", "AveragePool", "FusedGemm")]
    if not cands:
        return m_attr(r, p)
    s = pick(r, cands)
    a = s["attrs"]
    k = r.randint(0, 4)
    pads = a.get("pads")
    if k <= 1 and isinstance(pads, list) and pads and all(isinstance(x, int) for x in pads) and len(pads) % 2 == 0:
        nd = len(pads) // 2
        new = list(pads)
        for d in range(nd):
            tot = pads[d] + pads[d + nd]
            b = r.randint(0, tot)
            new[d], new[d + nd] = b, tot - b
        a["pads"] = new
        return f"step {s.get('name')!r} ({s.get('op')}, {s.get('tactic')}) pads {pads} -> {new} (same totals)"
    if k == 2:
        a["activation"] = pick(r, ACTS)
        if chance(r, 0.5):
            a["alpha"], a["beta"] = pick(r, FLOATS), pick(r, FLOATS)
        return f"step {s.get('name')!r} ({s.get('op')}, {s.get('tactic')}) activation -> {a['activation']!r} " \
               f"alpha {a.get('alpha')!r} beta {a.get('beta')!r}"
    if k == 3:
        a["act_before_add"] = pick(r, [0, 1, 2, -1, True])
        return f"step {s.get('name')!r} ({s.get('op')}) act_before_add -> {a['act_before_add']!r}"
    key = pick(r, ["alpha", "beta"])
    a[key] = pick(r, FLOATS)
    return f"step {s.get('name')!r} ({s.get('op')}) {key} -> {a[key]!r}"


def m_profile_range(r: R, p: PlanParts) -> str:
    """A wider (or narrower) range for a dynamic dim of a profile: kernels then run at shapes not timed."""
    profs = p.header.get("profiles")
    if not isinstance(profs, list) or not profs or not isinstance(profs[0], dict) or not profs[0]:
        return m_profile(r, p)
    prof = profs[0]
    name = pick(r, sorted(prof))
    ent = prof[name]
    try:
        mn, op, mx = list(ent["min"]), list(ent["opt"]), list(ent["max"])
        d = pick(r, [i for i in range(len(mn)) if mn[i] != mx[i]] or list(range(len(mn))))
        mn[d] = pick(r, [0, 1, mn[d]])
        mx[d] = pick(r, [mx[d], 8, 16, 64, 2**31 - 1])
        op[d] = min(max(op[d], mn[d]), mx[d])
    except Exception:  # noqa: BLE001 - an earlier mutation broke the entry
        return m_profile(r, p)
    ent["min"], ent["opt"], ent["max"] = mn, op, mx
    return f"profile {name} dim {d}: min {mn[d]} opt {op[d]} max {mx[d]}"


def m_rewire(r: R, p: PlanParts) -> str:
    steps = step_paths(p.header)
    if not steps:
        return m_leaf(r, p)
    s = get(p.header, pick(r, steps))
    which = pick(r, ["inputs", "inputs", "outputs", "captures"])
    lst = s.get(which)
    if not isinstance(lst, list):
        return m_leaf(r, p)
    names = value_names(p.header)
    new = pick(r, names + [None, "nope", ""])
    if lst and chance(r, 0.75):
        i = r.randint(0, len(lst) - 1)
        old = lst[i]
        lst[i] = new
        return f"step {s.get('name')!r} ({s.get('op')}) {which}[{i}]: {old!r} -> {new!r}"
    lst.append(new)
    return f"step {s.get('name')!r} ({s.get('op')}) {which} += {new!r}"


def m_steps(r: R, p: PlanParts) -> str:
    specs = [q for q in graph_specs(p.header) if isinstance(get(p.header, q).get("steps"), list)]
    if not specs:
        return m_leaf(r, p)
    q = pick(r, specs)
    steps = get(p.header, q)["steps"]
    if not steps:
        return m_leaf(r, p)
    i, j = r.randint(0, len(steps) - 1), r.randint(0, len(steps) - 1)
    k = r.randint(0, 2)
    if k == 0:
        steps[i], steps[j] = steps[j], steps[i]
        return f"steps {i} and {j} of header{fmt_path(q)} swapped"
    if k == 1:
        del steps[i]
        return f"step {i} of header{fmt_path(q)} dropped"
    steps.insert(j, copy.deepcopy(steps[i]))
    return f"step {i} of header{fmt_path(q)} duplicated at {j}"


def m_value(r: R, p: PlanParts) -> str:
    specs = [q for q in graph_specs(p.header) if isinstance(get(p.header, q).get("values"), dict)]
    if not specs:
        return m_leaf(r, p)
    vals = get(p.header, pick(r, specs))["values"]
    if not vals:
        return m_leaf(r, p)
    name = pick(r, sorted(vals))
    e = vals[name]
    if not isinstance(e, dict):
        return m_leaf(r, p)
    k = r.randint(0, 3)
    keys = sorted(p.tensors) or ["w0"]
    if k == 0:
        e["const"] = pick(r, keys + ["nope", 0, None])
        return f"value {name!r} const -> {short(e['const'])}"
    if k == 1 and "const" in e:
        del e["const"]
        return f"value {name!r} is no longer a constant"
    if k == 2:
        e["kind"] = pick(r, ["tensor", "sequence", "optional", "bogus", None, 1])
        return f"value {name!r} kind -> {e['kind']!r}"
    vals[pick(r, [name + "_2", "", PY, "A" * 1000])] = copy.deepcopy(e)
    return f"value {name!r} copied under another name"


MAX_FILL = 1 << 20  # no mutation makes a tensor's data larger than this (cases stay small)


def _fill(r: R, n: int) -> bytes:
    n = max(0, min(n, MAX_FILL))
    k = r.randint(0, 4)
    if k == 0:
        return bytes(n)
    if k == 1:
        return b"\xff" * n  # NaN for floats, -1 for ints, 0xff for bools (not 0/1)
    if k == 2:
        return (b"\x00\x00\xc0\x7f" * (n // 4 + 1))[:n]  # float32 NaN
    if k == 3:
        return (b"\x00\x00\x80\x7f" * (n // 4 + 1))[:n]  # float32 inf
    seed = r.randint(0, 2**32 - 1)
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def m_weight(r: R, p: PlanParts) -> str:
    if not p.tensors:
        return m_leaf(r, p)
    name = pick(r, sorted(p.tensors))
    t = p.tensors[name]
    k = r.randint(0, 9)
    numel = 1
    for d in t.shape:
        numel *= int(d)
    if k == 0:  # retype, consistent length (unless an earlier mutation made the shape huge)
        dt = pick(r, sorted(ST_DTYPES))
        t.dtype, t.data = dt, _fill(r, min(max(numel, 0) * ST_DTYPES[dt], MAX_FILL))
        return f"weight {name} retyped to {dt} {t.shape}"
    if k == 1:  # reshape, consistent length
        shape = [pick(r, [1, 2, 3, 4, 8, 0]) for _ in range(r.randint(0, 4))]
        n = 1
        for d in shape:
            n *= d
        t.shape, t.data = shape, _fill(r, n * ST_DTYPES.get(t.dtype, 4))
        return f"weight {name} reshaped to {shape}"
    if k == 2:
        t.shape, t.data = [0] * max(1, len(t.shape)), b""
        return f"weight {name} emptied to shape {t.shape}"
    if k == 3:
        del p.tensors[name]
        return f"weight {name} dropped"
    if k == 4:  # inconsistent length
        cut = r.randint(0, max(0, len(t.data) - 1))
        t.data = t.data[:cut] if chance(r, 0.6) else t.data + bytes(r.randint(1, 64))
        return f"weight {name} data length -> {len(t.data)} (shape {t.shape} unchanged)"
    if k == 5:
        t.data = _fill(r, len(t.data))
        return f"weight {name} contents overwritten (NaN/inf/0xff/random)"
    if k == 6:
        t.offsets = [pick(r, [0, -1, 2**63, 4, 1, 2**64 + 1]), pick(r, [0, 4, 2**32, -8, len(t.data) + 4])]
        return f"weight {name} data_offsets -> {t.offsets}"
    if k == 7:
        other = pick(r, sorted(p.tensors))
        p.tensors[name], p.tensors[other] = p.tensors[other], p.tensors[name]
        return f"weights {name} and {other} swapped"
    if k == 8:
        t.shape = [pick(r, [2**31, 2**40, -1, 2**63 - 1, 3])] + t.shape[1:]
        return f"weight {name} shape -> {t.shape} (data unchanged)"
    p.st_meta = {"format": pick(r, ["pt", "np", "tf", PY]), pick(r, ["x", "__x"]): json_value(r, p.header)}
    return f"safetensors __metadata__ = {short(p.st_meta)}"


def m_fields(r: R, p: PlanParts) -> str:
    k = r.randint(0, 3)
    if k == 0:
        p.version = pick(r, [0, 2, 2**32 - 1, 1])
        return f"format version -> {p.version}"
    if k == 1:
        p.flags = pick(r, [1, 2, 2**31, 2**32 - 1])
        return f"flags -> {p.flags}"
    if k == 2:
        p.hlen_override = pick(r, [0, 1, 2**63, 2**64 - 1, 2**32])
        return f"header length field -> {p.hlen_override}"
    p.wlen_override = pick(r, [0, 1, 2**63, 2**64 - 1, 2**32])
    return f"weights length field -> {p.wlen_override}"


def m_weights_raw(r: R, p: PlanParts) -> str:
    w = bytearray(encode_safetensors(p.tensors, p.st_meta))
    if len(w) < 9:
        return m_weight(r, p)
    k = r.randint(0, 2)
    if k == 0:
        for _ in range(r.randint(1, 4)):
            i = r.randint(0, len(w) - 1)
            w[i] ^= 1 << r.randint(0, 7)
        p.raw_weights = bytes(w)
        return "safetensors blob: bits flipped"
    if k == 1:
        n = pick(r, [0, 1, 7, 2**32, 2**63, 2**64 - 1, len(w)])
        w[:8] = struct.pack("<Q", n)
        p.raw_weights = bytes(w)
        return f"safetensors header length -> {n}"
    (n,) = struct.unpack_from("<Q", w, 0)
    head = bytes(w[8:8 + n])
    deep = b"[" * pick(r, [100, 10000, 200000])
    p.raw_weights = struct.pack("<Q", n + len(deep)) + head[:1] + b'"x":' + deep + head[1:] + bytes(w[8 + n:])
    return "safetensors header: deeply nested JSON inserted"


PLAN_MUTATORS: list[tuple[Callable[[R, PlanParts], str], int]] = [
    (m_leaf, 6), (m_drop, 2), (m_dup, 1), (m_splice, 2), (m_dtype, 4), (m_shape, 6), (m_tactic, 8),
    (m_layer_attrs, 5), (m_profile_range, 3),
    (m_config, 3), (m_profile, 3), (m_pointwise, 5), (m_attr, 6), (m_rewire, 3), (m_steps, 2), (m_value, 2),
    (m_weight, 5), (m_fields, 1), (m_weights_raw, 1),
]
_PLAN_TABLE = [m for m, w in PLAN_MUTATORS for _ in range(w)]


def raw_mutation(r: R, data: bytes, trailer: bool = True) -> tuple[bytes, str]:
    """Byte-level damage; a plan's sha256 trailer is recomputed for 80 % of them."""
    fix = trailer and chance(r, 0.8)
    body = bytearray(data[:-32]) if fix else bytearray(data)
    if not body:
        body = bytearray(b"\x00")
    k = r.randint(0, 4)
    if k == 0:
        n = r.randint(1, 8)
        for _ in range(n):
            i = r.randint(0, len(body) - 1)
            body[i] ^= 1 << r.randint(0, 7)
        what = f"{n} bit(s) flipped"
    elif k == 1:
        cut = r.randint(0, len(body))
        del body[cut:]
        what = f"truncated to {cut} bytes"
    elif k == 2:
        body += bytes(r.randint(1, 64))
        what = "extended"
    elif k == 3:
        i = r.randint(0, len(body))
        body[i:i] = pick(r, [b"\x00", b"{", b"\"", b"\xff\xfe", b"NaN", b"9" * 400])
        what = f"bytes inserted at {i}"
    else:
        i = r.randint(0, max(0, len(body) - 8))
        body[i:i + 8] = struct.pack("<Q", pick(r, [0, 2**63, 2**64 - 1, 2**32, 1]))
        what = f"u64 overwritten at {i}"
    out = bytes(body) + hashlib.sha256(bytes(body)).digest() if fix else bytes(body)
    return out, f"raw: {what}" + ("" if not trailer else " (sha256 recomputed)" if fix else " (sha256 left stale)")


def _rng(draw: Draw, salt: Iterator[int] | None) -> random.Random:
    """The case's random choices: seeded by hypothesis (so a hypothesis seed reproduces a campaign) and, when
    given, a counter (hypothesis repeats small and boundary integers often; the counter keeps cases apart)."""
    n = draw(st.integers(0, 2**64 - 1))
    return random.Random(n * 1_000_003 + (next(salt) if salt is not None else 0))


@st.composite
def plan_cases(draw: Draw, seeds: dict[str, bytes], salt: Iterator[int] | None = None) -> Case:
    """A seed plan with 1-4 structural mutations (sha256 fixed), sometimes followed by raw byte damage."""
    return mutate_plan(_rng(draw, salt), seeds)


def mutate_plan(r: R, seeds: dict[str, bytes]) -> Case:
    name = pick(r, sorted(seeds))
    parts = split_plan(seeds[name])
    desc = []
    for _ in range(pick(r, [1, 1, 1, 2, 2, 3, 4])):
        m = pick(r, _PLAN_TABLE)
        try:
            desc.append(m(r, parts))
        except Exception as e:  # noqa: BLE001
            desc.append(f"{m.__name__}: skipped ({type(e).__name__})")  # an earlier mutation broke the shape it needs
    data = join_plan(parts)
    if chance(r, 0.08):
        data, what = raw_mutation(r, data)
        desc.append(what)
    return Case("plan", data, desc, name, input_seed=r.randint(0, 2**31 - 1))


# ---- model mutators ----------------------------------------------------------------------------------

@dataclass
class ModelCtx:
    model: onnx.ModelProto
    files: dict[str, dict[str, str]] = field(default_factory=dict)


def _graphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = [g]
    for n in g.node:
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                out += _graphs(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for sg in a.graphs:
                    out += _graphs(sg)
    return out


def _nodes(m: onnx.ModelProto) -> list[tuple[onnx.GraphProto, onnx.NodeProto]]:
    return [(g, n) for g in _graphs(m.graph) for n in g.node]


def _names(m: onnx.ModelProto) -> list[str]:
    out: set[str] = set()
    for g in _graphs(m.graph):
        out.update(i.name for i in g.input)
        out.update(i.name for i in g.initializer)
        for n in g.node:
            out.update(n.output)
    return sorted(out)


def _set_attr_value(r: R, a: AttributeProto, ctx: ModelCtx) -> str:
    t = a.type
    if t == AttributeProto.INT:
        a.i = pick(r, [x for x in INTS if -2**63 <= x < 2**63] + SMALL_INTS * 3)
        return f"{a.i}"
    if t == AttributeProto.FLOAT:
        a.f = pick(r, FLOATS)
        return f"{a.f}"
    if t == AttributeProto.STRING:
        a.s = pick(r, [s.encode("utf-8", "surrogatepass") for s in STRINGS[:20] + PAYLOADS[:2]] + [b"\xff\xfe"])
        return short(a.s.decode("utf-8", "replace"))
    if t == AttributeProto.INTS:
        vals = list(a.ints)
        k = r.randint(0, 3)
        if k == 0 and vals:
            vals[r.randint(0, len(vals) - 1)] = pick(r, [x for x in INTS if -2**63 <= x < 2**63] + SMALL_INTS * 3)
        elif k == 1:
            vals.append(pick(r, SMALL_INTS))
        elif k == 2:
            vals = vals[:-1]
        else:
            vals = [pick(r, SMALL_INTS) for _ in range(r.randint(0, 8))]
        del a.ints[:]
        a.ints.extend(vals)
        return f"{vals}"
    if t == AttributeProto.FLOATS:
        vals = [pick(r, FLOATS) for _ in range(r.randint(0, 4))]
        del a.floats[:]
        a.floats.extend(vals)
        return f"{vals}"
    if t == AttributeProto.TENSOR:
        return "tensor: " + _mutate_tensor(r, a.t, ctx)
    if t == AttributeProto.GRAPH:
        return "graph: " + _mutate_subgraph(r, a.g, ctx)
    a.ClearField("strings")
    a.type = AttributeProto.INT
    a.i = 1
    return "-> INT 1"


def _retype_attr(r: R, a: AttributeProto, ctx: ModelCtx) -> str:
    name = a.name
    k = r.randint(0, 7)
    new = {0: helper.make_attribute(name, pick(r, SMALL_INTS)),
           1: helper.make_attribute(name, pick(r, [0.5, math.nan, -1.0])),
           2: helper.make_attribute(name, pick(r, ["x", "", PY])),
           3: helper.make_attribute(name, [pick(r, SMALL_INTS) for _ in range(r.randint(1, 5))]),
           4: helper.make_attribute(name, [1.5, 2.5]),
           5: helper.make_attribute(name, helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0])),
           6: helper.make_attribute(name, helper.make_graph([], "empty", [], [])),
           7: helper.make_attribute(name, ["a", "b"])}[k]
    a.CopyFrom(new)
    return f"retyped to {AttributeProto.AttributeType.Name(a.type)}"


def mm_attr(r: R, ctx: ModelCtx) -> str:
    nodes = [(g, n) for g, n in _nodes(ctx.model)]
    g, n = pick(r, nodes)
    k = r.randint(0, 9)
    if n.attribute and k <= 5:
        a = pick(r, list(n.attribute))
        return f"node {n.name!r} ({n.op_type}) attr {a.name} = {_set_attr_value(r, a, ctx)}"
    if n.attribute and k <= 7:
        a = pick(r, list(n.attribute))
        return f"node {n.name!r} ({n.op_type}) attr {a.name} {_retype_attr(r, a, ctx)}"
    if n.attribute and k == 8:
        i = r.randint(0, len(n.attribute) - 1)
        name = n.attribute[i].name
        del n.attribute[i]
        return f"node {n.name!r} ({n.op_type}) attr {name} removed"
    name = pick(r, ATTR_NAMES)
    a = n.attribute.add()
    a.CopyFrom(helper.make_attribute(name, 1))
    what = _retype_attr(r, a, ctx) if chance(r, 0.5) else "= 1"
    return f"node {n.name!r} ({n.op_type}) attr {name} added {what}"


def mm_op(r: R, ctx: ModelCtx) -> str:
    g, n = pick(r, _nodes(ctx.model))
    old = n.op_type
    k = r.randint(0, 5)
    if k <= 2:
        n.op_type = pick(r, onnx_ops())
    elif k == 3:
        n.op_type = pick(r, ["FusedConv", "FusedGemm", "Pointwise"])
        n.domain = "kiln"
    elif k == 4:
        n.domain = pick(r, ["com.microsoft", "ai.onnx.ml", "kiln", "ai.onnx", "bogus", ""])
    else:
        n.op_type = pick(r, ["NotAnOp", "", "relu", PY])
    return f"node {n.name!r} op {old} -> {n.domain + '.' if n.domain else ''}{n.op_type}"


def mm_opset(r: R, ctx: ModelCtx) -> str:
    m = ctx.model
    k = r.randint(0, 3)
    if k <= 1:
        v = pick(r, [1, 6, 7, 9, 10, 11, 12, 13, 14, 17, 18, 20, 21, 22, 28, 29, 0, -1, 10**6])
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = v
        return f"default opset -> {v}"
    if k == 2:
        o = m.opset_import.add()
        o.domain, o.version = pick(r, [("", 7), ("kiln", 1), ("ai.onnx", 99), ("com.microsoft", 1)])
        return f"opset_import += ({o.domain!r}, {o.version})"
    m.ir_version = pick(r, [0, 1, 3, 4, 11, 99, -1])
    return f"ir_version -> {m.ir_version}"


def _mutate_tensor(r: R, t: onnx.TensorProto, ctx: ModelCtx) -> str:
    k = r.randint(0, 7)
    if k == 0:
        dims = list(t.dims)
        if dims and chance(r, 0.7):
            dims[r.randint(0, len(dims) - 1)] = pick(r, [0, -1, 1, 3, 2**31, 2**40, 2**62])
        else:
            dims.append(pick(r, [1, 2, 0]))
        del t.dims[:]
        t.dims.extend(dims)
        return f"dims -> {dims}"
    if k == 1:
        t.data_type = pick(r, [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 21, 22, 23, 999])
        return f"data_type -> {t.data_type}"
    if k == 2:
        raw = t.raw_data
        t.raw_data = raw[:r.randint(0, max(0, len(raw) - 1))] if raw and chance(r, 0.6) else raw + bytes(
            r.randint(1, 16))
        return f"raw_data length {len(raw)} -> {len(t.raw_data)}"
    if k == 3:
        t.float_data.extend([1.0, 2.0])
        return "float_data added next to raw_data"
    if k == 4:
        t.ClearField("raw_data")
        return "raw_data cleared (no data)"
    if k == 5:
        t.raw_data = _fill(r, len(t.raw_data))
        return "raw_data overwritten (NaN/inf/0xff/random)"
    if k == 6:
        del t.dims[:]
        return "dims cleared (scalar)"
    return "external: " + _make_external(r, t, ctx)


def _make_external(r: R, t: onnx.TensorProto, ctx: ModelCtx) -> str:
    n = len(t.raw_data) or 64
    loc = pick(r, ["../outside/SECRET", "/etc/passwd", "link.bin", "w.bin", "sub/../../outside/SECRET",
                      "", ".", "/dev/zero", "nope.bin", "dirlink/SECRET", "/proc/self/environ", "w.bin\x00x"])
    if loc == "link.bin":
        ctx.files["link.bin"] = {"symlink": pick(r, ["../outside/SECRET", "/etc/passwd", "w.bin"])}
        ctx.files.setdefault("w.bin", {"b64": base64.b64encode(bytes(n)).decode()})
    if loc == "dirlink/SECRET":
        ctx.files["dirlink"] = {"symlink": "../outside"}
    if loc == "w.bin":
        ctx.files["w.bin"] = {"b64": base64.b64encode(_fill(r, n)).decode()}
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    entries = {"location": loc}
    if chance(r, 0.5):
        entries["offset"] = str(pick(r, [0, 1, -1, 2**40, 4096]))
    if chance(r, 0.5):
        entries["length"] = str(pick(r, [n, 0, -1, 2**40, 1]))
    if chance(r, 0.1):
        entries["checksum"] = "x"
    for k, v in entries.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    link = f" ({ctx.files['link.bin']['symlink']!r})" if loc == "link.bin" else ""
    return f"location {loc!r}{link} {dict((k, v) for k, v in entries.items() if k != 'location')}"


def mm_initializer(r: R, ctx: ModelCtx) -> str:
    inits = [(g, t) for g in _graphs(ctx.model.graph) for t in g.initializer]
    if not inits:
        return mm_attr(r, ctx)
    _, t = pick(r, inits)
    return f"initializer {t.name!r}: {_mutate_tensor(r, t, ctx)}"


def mm_external(r: R, ctx: ModelCtx) -> str:
    inits = [t for g in _graphs(ctx.model.graph) for t in g.initializer]
    if not inits:
        return mm_attr(r, ctx)
    t = pick(r, inits)
    return f"initializer {t.name!r} external data {_make_external(r, t, ctx)}"


def mm_input(r: R, ctx: ModelCtx) -> str:
    vis = [(g, v) for g in _graphs(ctx.model.graph) for v in list(g.input) + list(g.output) + list(g.value_info)]
    if not vis:
        return mm_attr(r, ctx)
    _, v = pick(r, vis)
    tt = v.type.tensor_type
    k = r.randint(0, 6)
    if k <= 2 and tt.shape.dim:
        d = pick(r, list(tt.shape.dim))
        val = pick(r, [-1, 0, 0, 1, 2, 7, 2**31, 2**40, 2**62, "N", "", "M"])
        if isinstance(val, int):
            d.dim_value = val
        else:
            d.dim_param = val
        return f"value_info {v.name!r} dim -> {val!r}"
    if k == 3:
        tt.ClearField("shape")
        return f"value_info {v.name!r} shape removed"
    if k == 4:
        tt.elem_type = pick(r, [0, 2, 6, 7, 8, 9, 10, 11, 14, 16, 21, 999])
        return f"value_info {v.name!r} elem_type -> {tt.elem_type}"
    if k == 5:
        tt.shape.dim.add().dim_value = pick(r, [1, 0, 3])
        return f"value_info {v.name!r} rank + 1"
    v.type.CopyFrom(helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, None))
                    if chance(r, 0.5) else helper.make_optional_type_proto(
                        helper.make_tensor_type_proto(TensorProto.FLOAT, [2])))
    return f"value_info {v.name!r} -> {v.type.WhichOneof('value')}"


def mm_rename(r: R, ctx: ModelCtx) -> str:
    g, n = pick(r, _nodes(ctx.model))
    names = _names(ctx.model) + ["", "nope"]
    if n.input and chance(r, 0.6):
        i = r.randint(0, len(n.input) - 1)
        old = n.input[i]
        n.input[i] = pick(r, names + list(n.output))
        return f"node {n.name!r} ({n.op_type}) input[{i}] {old!r} -> {n.input[i]!r}"
    if n.output and chance(r, 0.6):
        i = r.randint(0, len(n.output) - 1)
        old = n.output[i]
        n.output[i] = pick(r, names)
        return f"node {n.name!r} ({n.op_type}) output[{i}] {old!r} -> {n.output[i]!r}"
    if chance(r, 0.5):
        n.input.append(pick(r, names))
        return f"node {n.name!r} ({n.op_type}) input += {n.input[-1]!r}"
    n.output.append(pick(r, names + ["extra"]))
    return f"node {n.name!r} ({n.op_type}) output += {n.output[-1]!r}"


def mm_nodes(r: R, ctx: ModelCtx) -> str:
    gs = [g for g in _graphs(ctx.model.graph) if g.node]
    g = pick(r, gs)
    i, j = r.randint(0, len(g.node) - 1), r.randint(0, len(g.node) - 1)
    k = r.randint(0, 2)
    if k == 0:
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
        return f"graph {g.name!r}: nodes {i} and {j} swapped"
    if k == 1:
        name = g.node[i].name
        del g.node[i]
        return f"graph {g.name!r}: node {name!r} removed"
    g.node.add().CopyFrom(g.node[i])
    return f"graph {g.name!r}: node {g.node[i].name!r} duplicated"


def _mutate_subgraph(r: R, sg: onnx.GraphProto, ctx: ModelCtx) -> str:
    k = r.randint(0, 5)
    if k == 0 and sg.output:
        del sg.output[r.randint(0, len(sg.output) - 1)]
        return f"body {sg.name!r} output removed"
    if k == 1 and sg.input:
        del sg.input[r.randint(0, len(sg.input) - 1)]
        return f"body {sg.name!r} input removed"
    if k == 2:
        sg.input.add().CopyFrom(helper.make_tensor_value_info("extra_in", TensorProto.FLOAT, [1]))
        return f"body {sg.name!r} input added"
    if k == 3:
        sg.output.add().CopyFrom(helper.make_tensor_value_info(pick(r, _names(ctx.model)), TensorProto.FLOAT, None))
        return f"body {sg.name!r} output added (an outer or inner name)"
    if k == 4:
        depth = pick(r, [3, 10, 30])
        inner = onnx.GraphProto()
        inner.CopyFrom(sg)
        cur = sg
        outs = [o.name for o in cur.output]
        other = helper.make_graph([helper.make_node("Identity", [o], [o + "_e"]) for o in outs[:0]], "else", [],
                                  list(cur.output))  # an else branch that produces nothing (never taken)
        for _ in range(depth):  # If(true) { If(true) { ... body ... } }
            wrapper = helper.make_graph(
                [helper.make_node("Constant", [], ["nest_c"], value=helper.make_tensor("v", TensorProto.BOOL, [], [True])),
                 helper.make_node("If", ["nest_c"], outs, then_branch=inner, else_branch=other)],
                "nest", [], list(cur.output))
            inner = wrapper
        in_ = list(sg.input)
        sg.CopyFrom(inner)
        del sg.input[:]
        sg.input.extend(in_)
        return f"body nested {depth} Ifs deep"
    other = [g for g in _graphs(ctx.model.graph) if g is not sg]
    src = pick(r, other)
    tmp = onnx.GraphProto()
    tmp.CopyFrom(src)  # src may contain sg: copy it out first
    sg.CopyFrom(tmp)
    return f"body replaced by a copy of graph {src.name!r}"


def mm_subgraph(r: R, ctx: ModelCtx) -> str:
    subs = [(n, a) for _, n in _nodes(ctx.model) for a in n.attribute if a.type == AttributeProto.GRAPH]
    if not subs:
        return mm_attr(r, ctx)
    n, a = pick(r, subs)
    return f"node {n.name!r} ({n.op_type}) {a.name}: {_mutate_subgraph(r, a.g, ctx)}"


def mm_outputs(r: R, ctx: ModelCtx) -> str:
    g = ctx.model.graph
    k = r.randint(0, 2)
    if k == 0 and len(g.output) > 0:
        name = g.output[0].name
        del g.output[r.randint(0, len(g.output) - 1)]
        return f"graph output removed (was {name!r}...)"
    name = pick(r, _names(ctx.model) + ["nope"])
    g.output.add().CopyFrom(helper.make_tensor_value_info(name, pick(r, [TensorProto.FLOAT, 0, 7]), None))
    return f"graph output {name!r} added"


def mm_value_info(r: R, ctx: ModelCtx) -> str:
    g = ctx.model.graph
    name = pick(r, _names(ctx.model))
    rank = r.randint(0, 4)
    shape = [pick(r, [1, 2, 3, 0, -1, "N", 2**31]) for _ in range(rank)] if chance(r, 0.8) else None
    et = pick(r, [TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT16, 8, 0])
    g.value_info.add().CopyFrom(helper.make_tensor_value_info(name, et, shape))
    return f"value_info {name!r}: elem {et} shape {shape}"


def mm_sparse(r: R, ctx: ModelCtx) -> str:
    g = ctx.model.graph
    n_vals = r.randint(0, 4)
    vals = helper.make_tensor("sp_v", TensorProto.FLOAT, [n_vals], [1.0] * n_vals)
    idx_vals = [pick(r, [0, 1, 3, 5, -1, 2**40, 100]) for _ in range(pick(r, [n_vals, n_vals, n_vals + 1, 0]))]
    idx_2d = chance(r, 0.3)
    idx = helper.make_tensor("sp_i", TensorProto.INT64, [len(idx_vals) // 2, 2] if idx_2d and len(idx_vals) % 2 == 0
                             else [len(idx_vals)], idx_vals)
    dims = [pick(r, [2, 3, 0, -1, 2**40])] + ([pick(r, [2, 3])] if chance(r, 0.5) else [])
    sp = helper.make_sparse_tensor(vals, idx, dims)
    if chance(r, 0.5):
        g.sparse_initializer.add().CopyFrom(sp)
        # use it so the importer cannot skip it
        g.node.add().CopyFrom(helper.make_node("Identity", ["sp_v"], ["sp_out"], name="sp_use"))
        g.output.add().CopyFrom(helper.make_tensor_value_info("sp_out", TensorProto.FLOAT, None))
        return f"sparse initializer dims {dims} indices {idx_vals}"
    g.node.insert(0, helper.make_node("Constant", [], ["sp_out"], sparse_value=sp, name="sp_const"))
    g.output.add().CopyFrom(helper.make_tensor_value_info("sp_out", TensorProto.FLOAT, None))
    return f"Constant(sparse_value) dims {dims} indices {idx_vals}"


def mm_constant(r: R, ctx: ModelCtx) -> str:
    g = ctx.model.graph
    dt = pick(r, [TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT16,
                     TensorProto.BFLOAT16, TensorProto.STRING, TensorProto.COMPLEX64, TensorProto.UINT64,
                     TensorProto.FLOAT8E4M3FN, 22, 23])
    dims = [pick(r, [0, 1, 2, 3, 2**20, 2**40]) for _ in range(r.randint(0, 3))]
    t = onnx.TensorProto(data_type=dt, dims=dims, name="k")
    t.raw_data = bytes(pick(r, [0, 1, 4, 8, 16]))
    if dt == TensorProto.STRING:
        t.ClearField("raw_data")
        t.string_data.extend([b"a", PY.encode()])
    op = pick(r, ["Constant", "ConstantOfShape"])
    if op == "Constant":
        g.node.insert(0, helper.make_node("Constant", [], ["k_out"], value=t, name="k_const"))
    else:
        shape = helper.make_tensor("s", TensorProto.INT64, [len(dims)], [min(d, 2**40) for d in dims])
        g.node.insert(0, helper.make_node("Constant", [], ["k_shape"], value=shape, name="k_shape"))
        g.node.insert(1, helper.make_node("ConstantOfShape", ["k_shape"], ["k_out"], name="k_cos"))
    g.output.add().CopyFrom(helper.make_tensor_value_info("k_out", 0, None))
    return f"{op} output of dtype {dt} dims {dims} ({len(t.raw_data)} raw bytes)"


MODEL_MUTATORS: list[tuple[Callable[[R, ModelCtx], str], int]] = [
    (mm_attr, 8), (mm_op, 3), (mm_opset, 2), (mm_initializer, 5), (mm_external, 3), (mm_input, 5),
    (mm_rename, 4), (mm_nodes, 2), (mm_subgraph, 3), (mm_outputs, 2), (mm_value_info, 2), (mm_sparse, 1),
    (mm_constant, 1),
]
_MODEL_TABLE = [m for m, w in MODEL_MUTATORS for _ in range(w)]


@st.composite
def model_cases(draw: Draw, seeds: dict[str, bytes], salt: Iterator[int] | None = None) -> Case:
    """A seed model with 1-3 ModelProto mutations, sometimes followed by raw byte damage of the protobuf."""
    return mutate_model(_rng(draw, salt), seeds)


def mutate_model(r: R, seeds: dict[str, bytes]) -> Case:
    name = pick(r, sorted(seeds))
    m = onnx.ModelProto()
    m.ParseFromString(seeds[name])
    ctx = ModelCtx(m)
    desc = []
    for _ in range(pick(r, [1, 1, 1, 2, 2, 3])):
        mut = pick(r, _MODEL_TABLE)
        try:
            desc.append(mut(r, ctx))
        except Exception as e:  # noqa: BLE001
            desc.append(f"{mut.__name__}: skipped ({type(e).__name__})")
    try:
        data = m.SerializeToString()
    except Exception as e:  # e.g. a string field holding bytes protobuf refuses
        desc.append(f"serialize failed ({type(e).__name__}); seed used")
        data = seeds[name]
    if chance(r, 0.05):
        data, what = raw_mutation(r, data, trailer=False)
        desc.append(what)
    return Case("model", data, desc, name, files=dict(ctx.files), input_seed=r.randint(0, 2**31 - 1))
