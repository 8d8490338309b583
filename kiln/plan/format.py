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
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kiln.errors import PlanFormatError

MAGIC = b"KILNPLAN"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sIIQ")
_U64 = struct.Struct("<Q")


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
    """Write atomically: a temp file in the same folder, fsync, then rename over the target."""
    data = plan_to_bytes(plan)
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".kiln-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plan_from_bytes(data: bytes, where: str = "plan") -> Plan:
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        hint = " (it looks like an ONNX model; build it first with `kiln build`)" if data[:2] == b"\x08\x07" or b"onnx" in data[:64].lower() else ""
        raise PlanFormatError(f"{where}: not a Kiln plan file (bad magic){hint}")
    if len(data) < _HEAD.size:
        raise PlanFormatError(f"{where}: truncated plan file ({len(data)} bytes)")
    _, version, _flags, hlen = _HEAD.unpack_from(data, 0)
    if version != FORMAT_VERSION:
        raise PlanFormatError(f"{where}: plan format version {version}, this Kiln reads version {FORMAT_VERSION}; rebuild the plan")
    if len(data) < _HEAD.size + hlen + _U64.size + 32:
        raise PlanFormatError(f"{where}: truncated plan file ({len(data)} bytes)")
    (wlen,) = _U64.unpack_from(data, _HEAD.size + hlen)
    end = _HEAD.size + hlen + _U64.size + wlen
    if len(data) != end + 32:
        raise PlanFormatError(f"{where}: truncated or padded plan file ({len(data)} bytes, expected {end + 32})")
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise PlanFormatError(f"{where}: checksum mismatch, the plan file is corrupted")
    try:
        header = json.loads(data[_HEAD.size:_HEAD.size + hlen].decode())
        weights = st_load(bytes(data[_HEAD.size + hlen + _U64.size:end])) if wlen else {}
        return Plan(target=header["target"], inputs=header["inputs"], outputs=header["outputs"],
                    profiles=header["profiles"], graph=header["graph"], memory=header.get("memory", {}),
                    build=header.get("build", {}), kiln_version=header.get("kiln_version", ""),
                    format_version=version, weights=weights)
    except PlanFormatError:
        raise
    except Exception as e:
        raise PlanFormatError(f"{where}: malformed plan contents ({type(e).__name__})") from None


def load_plan(path: str | os.PathLike) -> Plan:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PlanFormatError(f"plan file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    return plan_from_bytes(data, path)
