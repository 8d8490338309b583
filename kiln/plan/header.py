"""A plan file's layout and header, read without torch: what `kiln inspect` needs, and the first half of loading.

Layout (kiln.plan.format): b"KILNPLAN" | u32 format version | u32 flags | u64 header length | header JSON
| u64 weights length | safetensors bytes | sha256 of everything before (32 bytes).

`split_plan` is the loader's own check of that layout (magic, size limit, version, lengths, checksum) and
`parse_header` its JSON step (nesting scanned before json.loads recurses); kiln.plan.format.plan_from_bytes
runs both before it checks the header's schema and rebuilds the graph. `read_header` stops after them and
reads the safetensors table of contents (names, element types, shapes, byte ranges) instead of the tensors.
Every failure is a PlanFormatError of one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import PlanFormatError

MAGIC = b"KILNPLAN"
FORMAT_VERSION = 1
HEAD = struct.Struct("<8sIIQ")
U64 = struct.Struct("<Q")
MAX_HEADER_BYTES = 1 << 30  # JSON header (kiln.plan.schema uses these)
MAX_JSON_DEPTH = 512        # nesting of the header JSON (a subgraph level costs 5-6)
MAX_WEIGHTS_JSON_DEPTH = 8  # a safetensors table is two levels deep


def _prefix(where: str) -> str:
    return "" if where == "plan" else f"{where}: "


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def max_plan_bytes() -> int:
    """The largest plan file Kiln reads (KILN_MAX_PLAN_BYTES, kiln.settings)."""
    from kiln.settings import settings
    return int(settings().max_plan_bytes)


@dataclass(frozen=True)
class PlanParts:
    """The checked pieces of a plan file: format version, header JSON bytes, safetensors bytes."""

    version: int
    header: memoryview
    weights: memoryview


def split_plan(data: bytes | bytearray | memoryview, where: str = "plan") -> PlanParts:
    """Check a plan file's layout, size and checksum; return its pieces (the header is not parsed)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PlanFormatError(f"{where}: expected the plan's bytes, got {type(data).__name__}")
    data = memoryview(data).cast("B")
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        head = bytes(data[:64])
        hint = ""
        if (len(head) > 1 and head[0] == 0x08 and 1 <= head[1] <= 20) or b"onnx" in head.lower():  # ir_version first
            hint = " (it looks like an ONNX model; build it first with `kiln build`)"
        elif re.search(rb"^\s*\[(net|network)\]", bytes(data[:4096]), re.M):
            hint = " (it looks like a Darknet .cfg; build it first with `kiln build X.cfg --weights X.weights`)"
        raise PlanFormatError(f"{where}: not a Kiln plan file (bad magic){hint}")
    if len(data) < HEAD.size:
        raise PlanFormatError(f"{where}: truncated plan file ({len(data)} bytes)")
    limit = max_plan_bytes()
    if len(data) > limit:
        raise PlanFormatError(f"{where}: plan file of {len(data)} bytes is above the limit of {limit} "
                              f"(KILN_MAX_PLAN_BYTES)")
    _, version, _flags, hlen = HEAD.unpack_from(data, 0)
    if version != FORMAT_VERSION:
        raise PlanFormatError(f"{where}: plan format version {version}, this Kiln reads version {FORMAT_VERSION}; "
                              "rebuild the plan")
    if len(data) < HEAD.size + hlen + U64.size + 32:
        raise PlanFormatError(f"{where}: truncated plan file ({len(data)} bytes)")
    if hlen > MAX_HEADER_BYTES:
        raise PlanFormatError(f"{where}: plan header of {hlen} bytes is above the limit of {MAX_HEADER_BYTES}")
    (wlen,) = U64.unpack_from(data, HEAD.size + hlen)
    end = HEAD.size + hlen + U64.size + wlen
    if len(data) != end + 32:
        raise PlanFormatError(f"{where}: truncated or padded plan file ({len(data)} bytes, expected {end + 32})")
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise PlanFormatError(f"{where}: checksum mismatch, the plan file is corrupted")
    return PlanParts(version, data[HEAD.size:HEAD.size + hlen], data[HEAD.size + hlen + U64.size:end])


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def check_json_depth(raw: bytes, where: str = "plan", limit: int = MAX_JSON_DEPTH, what: str = "plan header") -> None:
    """Refuse JSON nested deeper than `limit` before json.loads (which recurses per level) sees it."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return
    import numpy as np
    text = _STRINGS.sub(b'""', raw)
    depth, chunk = 0, 1 << 24
    for lo in range(0, len(text), chunk):
        a = np.frombuffer(text, dtype=np.uint8, count=min(chunk, len(text) - lo), offset=lo)
        step = (a == 0x5B).astype(np.int32) + (a == 0x7B) - (a == 0x5D) - (a == 0x7D)
        run = np.cumsum(step, dtype=np.int64) + depth
        if run.size and int(run.max()) > limit:
            raise PlanFormatError(f"{_prefix(where)}{what}: JSON nested deeper than {limit} levels")
        depth = int(run[-1]) if run.size else depth


def parse_header(raw: bytes | memoryview, where: str = "plan") -> Any:
    """The header's JSON value (its nesting checked first); its schema is the caller's to check."""
    raw = bytes(raw)
    check_json_depth(raw, where)
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise PlanFormatError(f"{where}: plan header: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise PlanFormatError(f"{where}: plan header is not valid JSON ({type(e).__name__}: {_line(e)})") from None


@dataclass(frozen=True)
class WeightEntry:
    """One tensor of the safetensors table: its element type name (safetensors'), shape and byte count."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def weights_table(blob: bytes | memoryview, where: str = "plan") -> dict[str, WeightEntry]:
    """The safetensors table of contents, checked: a JSON object of {dtype, shape, data_offsets} entries whose
    byte ranges lie inside the data that follows it (the tensors themselves are not read)."""
    def bad(msg: str) -> PlanFormatError:
        return PlanFormatError(f"{where}: malformed plan weights ({msg})")
    blob = memoryview(blob).cast("B")
    if not len(blob):
        return {}
    if len(blob) < U64.size:
        raise bad("truncated safetensors header")
    (n,) = U64.unpack_from(blob, 0)
    if n > len(blob) - U64.size:
        raise bad(f"safetensors header of {n} bytes in {len(blob)}")
    raw = bytes(blob[U64.size:U64.size + n])
    check_json_depth(raw, where, limit=MAX_WEIGHTS_JSON_DEPTH, what="plan weights: safetensors header")
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("the safetensors header is not valid JSON") from None
    if not isinstance(table, dict):
        raise bad("the safetensors header is not a JSON object")
    data = len(blob) - U64.size - n
    out: dict[str, WeightEntry] = {}
    for name, e in table.items():
        if name == "__metadata__":
            continue
        dtype, shape, span = (e.get("dtype"), e.get("shape"), e.get("data_offsets")) if isinstance(e, dict) else (None,) * 3
        if not (isinstance(dtype, str) and isinstance(shape, list) and all(_count(d) for d in shape)
                and isinstance(span, list) and len(span) == 2 and all(_count(x) for x in span)
                and span[0] <= span[1] <= data):
            raise bad(f"entry {json.dumps(name)[:60]} is not {{dtype, shape, data_offsets}} inside the data")
        out[name] = WeightEntry(dtype, tuple(shape), span[1] - span[0])
    return out


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_plan_file(path: str | os.PathLike) -> tuple[str, bytes]:
    """(path as a string, the file's bytes): a readable regular file within KILN_MAX_PLAN_BYTES."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise PlanFormatError(f"plan path must be a string or path, got {type(path).__name__}") from None
    if not os.path.isfile(path):
        raise PlanFormatError(f"plan file not found: {path}")
    limit = max_plan_bytes()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise PlanFormatError(f"{path}: plan file of {size} bytes is above the limit of {limit} "
                                      f"(KILN_MAX_PLAN_BYTES)")
            data = f.read(size + 1)  # +1: a file that grew since fstat is seen as longer than its header says
    except OSError as e:
        raise PlanFormatError(f"{path}: cannot read the plan file ({e.strerror or type(e).__name__})") from None
    return path, data


@dataclass
class PlanHeader:
    """A plan file as `kiln inspect` sees it: checked layout, parsed header JSON (its fields not yet checked:
    kiln.plan.inspect reads them as untrusted) and the weights' table of contents."""

    path: str
    file_bytes: int
    format_version: int
    header: Any
    weights: dict[str, WeightEntry] = field(default_factory=dict)


def header_from_bytes(data: bytes | bytearray | memoryview, where: str = "plan") -> PlanHeader:
    """`read_header` for bytes already in memory."""
    try:
        parts = split_plan(data, where)
        header = parse_header(parts.header, where)
        return PlanHeader(where, len(data), parts.version, header, weights_table(parts.weights, where))
    except PlanFormatError:
        raise
    except MemoryError:
        raise PlanFormatError(f"{where}: plan too large to read (out of memory)") from None


def read_header(path: str | os.PathLike) -> PlanHeader:
    """Read a plan file's header and weights table without importing torch (PlanFormatError, one line)."""
    where, data = read_plan_file(path)
    return header_from_bytes(data, where)
