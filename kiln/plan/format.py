"""The .kiln plan file: versioned, checksummed, JSON metadata + safetensors weights, written atomically.

Layout (little endian):
    b"KILNPLAN" | u32 format version | u32 flags | u64 header length | header JSON (utf-8)
    | u64 weights length | safetensors bytes | sha256 of everything before (32 bytes)
Loading parses JSON and safetensors only: it never unpickles and never imports code named in the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kiln.errors import KilnError, PlanFormatError
from kiln.plan.header import FORMAT_VERSION, MAGIC, parse_header, read_plan_file, split_plan
from kiln.plan.header import HEAD as _HEAD
from kiln.plan.header import U64 as _U64


@dataclass
class Plan:
    """Everything a runtime needs: target, I/O with profiles, graph steps with tactics, memory plan, weights."""

    target: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    profiles: list[dict[str, dict[str, list[int]]]]
    graph: dict[str, Any]
    memory: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    kiln_version: str = ""
    format_version: int = FORMAT_VERSION
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def header(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("weights")
        return d


def plan_to_bytes(plan: Plan) -> bytes:
    header = json.dumps(plan.header(), separators=(",", ":")).encode()
    weights = st_save(plan.weights) if plan.weights else b""
    body = _HEAD.pack(MAGIC, FORMAT_VERSION, 0, len(header)) + header + _U64.pack(len(weights)) + weights
    return body + hashlib.sha256(body).digest()


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write atomically (kiln.fileio.atomic_write): a temp file in the same folder, fsync, then rename."""
    from kiln.fileio import atomic_write
    atomic_write(path, plan_to_bytes(plan), "plan")


def plan_from_bytes(data: bytes, where: str = "plan") -> Plan:
    """Parse a plan file's bytes. The file is untrusted input: the layout, the sizes, the header's JSON
    depth and schema (kiln.plan.schema), the weights and the graph's structure (GraphReader) are all
    checked; every failure is a PlanFormatError of one line (never another exception)."""
    try:
        return _plan_from_bytes(data, where)
    except KilnError:
        raise
    except RecursionError:
        raise PlanFormatError(f"{where}: malformed plan contents (nested too deeply)") from None
    except MemoryError:
        raise PlanFormatError(f"{where}: plan too large to load (out of memory)") from None
    except Exception as e:
        raise PlanFormatError(f"{where}: malformed plan contents ({type(e).__name__}: {_line(e)})") from None


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _plan_from_bytes(data: bytes, where: str) -> Plan:
    from kiln.plan.schema import check_io, check_weights, validate_header
    from kiln.plan.serialize import GraphReader
    parts = split_plan(data, where)  # magic, size limit, version, lengths, checksum (kiln.plan.header)
    header = parse_header(parts.header, where)
    validate_header(header, where)
    weights = _load_weights(bytes(parts.weights), where) if len(parts.weights) else {}
    check_weights(weights, where)
    graph = GraphReader(weights, where).graph(header["graph"])  # the graph's structure (the Engine rebuilds it)
    check_io(header, graph, where)
    return Plan(target=header["target"], inputs=header["inputs"], outputs=header["outputs"],
                profiles=header["profiles"], graph=header["graph"], memory=header.get("memory", {}),
                build=header.get("build", {}), kiln_version=header.get("kiln_version", ""),
                format_version=parts.version, weights=weights)


def _check_safetensors_header(blob: bytes, where: str) -> None:
    """The safetensors header, read before its native parser sees it: a JSON object whose entries have
    element types Kiln holds (the message names the weight)."""
    from kiln.plan.schema import check_json_depth, prefix, show
    if len(blob) < 8:
        raise PlanFormatError(f"{where}: malformed plan weights (truncated safetensors header)")
    (n,) = _U64.unpack_from(blob, 0)
    if n > len(blob) - 8:
        raise PlanFormatError(f"{where}: malformed plan weights (safetensors header of {n} bytes in {len(blob)})")
    raw = blob[8:8 + n]
    check_json_depth(raw, where, limit=8, what="plan weights: safetensors header")
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PlanFormatError(f"{where}: malformed plan weights (the safetensors header is not valid JSON)") from None
    if not isinstance(table, dict):
        raise PlanFormatError(f"{where}: malformed plan weights (the safetensors header is not a JSON object)")
    names = _safetensors_dtypes()
    for k, e in table.items():
        if k == "__metadata__":
            continue
        dt = e.get("dtype") if isinstance(e, dict) else None
        if names is not None and dt not in names:
            raise PlanFormatError(f"{prefix(where)}plan weights: {show(k)} has element type {show(dt)}, which Kiln "
                                  f"does not support")


def _safetensors_dtypes() -> frozenset[str] | None:
    """safetensors' element type names whose torch type Kiln holds (None: this safetensors does not say)."""
    from safetensors import torch as st
    from kiln.ir.dtype import DType
    table = getattr(st, "_TYPES", None)
    if not isinstance(table, dict):
        return None
    held = {d.torch for d in DType}
    return frozenset(k for k, t in table.items() if t in held)


def _load_weights(blob: bytes, where: str) -> dict[str, torch.Tensor]:
    """The safetensors table. Its parser is native code: besides its errors it may raise PanicException,
    a BaseException; everything but an interrupt becomes a PlanFormatError."""
    _check_safetensors_header(blob, where)
    try:
        weights = st_load(blob)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except MemoryError:
        raise PlanFormatError(f"{where}: plan weights too large to load (out of memory)") from None
    except BaseException as e:  # noqa: B036  (safetensors' PanicException derives from BaseException)
        raise PlanFormatError(f"{where}: malformed plan weights ({type(e).__name__}: {_line(e)})") from None
    return weights


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and parse a plan file (PlanFormatError for anything but a readable, valid plan)."""
    where, data = read_plan_file(path)
    return plan_from_bytes(data, where)
