"""The calibration cache: the ranges a calibrator found, kept so a rebuild skips calibration.

File format (UTF-8 JSON, keys sorted, indented, written atomically by kiln.fileio.atomic_write):

    {
      "calibrator": "entropy",
      "format": "kiln-calibration-cache",
      "model_digest": "<digest of the model the ranges belong to>",
      "ranges": {"<tensor name>": <amax: finite float >= 0>, ...},
      "version": 1
    }

A cache file is untrusted input: `read_cache` refuses files over MAX_BYTES, anything but a JSON object
of exactly these keys, an unknown format or version, NaN/Infinity, duplicate keys, an unknown
calibrator, tensor names that are empty or longer than MAX_NAME characters, values that are not finite
numbers >= 0, more than MAX_ENTRIES ranges, and (when the caller gives its model's digest) a cache made
for another model. Every refusal is one CalibrationError line naming the file.
"""
from __future__ import annotations

import json
import math
import os
import stat
from typing import Any

from kiln.errors import CalibrationError, KilnError
from kiln.fileio import atomic_write
from kiln.quant.calibrators import CALIBRATORS

__all__ = ["FORMAT", "MAX_BYTES", "MAX_ENTRIES", "MAX_NAME", "VERSION", "read_cache", "write_cache"]

FORMAT = "kiln-calibration-cache"
VERSION = 1
MAX_BYTES = 64 << 20
MAX_ENTRIES = 1_000_000
MAX_NAME = 4096
_KEYS = frozenset({"calibrator", "format", "model_digest", "ranges", "version"})


class _Refused(ValueError):
    """A JSON feature the cache does not allow (NaN/Infinity, a duplicate key)."""


def _short(s: Any) -> str:
    """A value for an error line: repr, cut to 60 characters."""
    r = repr(s)
    return r if len(r) <= 60 else r[:57] + "..."


def _check_ranges(ranges: Any, where: str) -> dict[str, float]:
    """The ranges as {name: float}, sorted by name; CalibrationError on anything else."""
    if not isinstance(ranges, dict):
        raise CalibrationError(f"{where}: ranges must be an object of tensor name -> amax")
    if len(ranges) > MAX_ENTRIES:
        raise CalibrationError(f"{where}: {len(ranges)} ranges, more than the limit of {MAX_ENTRIES}")
    out: dict[str, float] = {}
    for name in sorted(ranges, key=lambda n: (not isinstance(n, str), str(n))):
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise CalibrationError(f"{where}: tensor name {_short(name)} is not a string of 1 to {MAX_NAME} characters")
        out[name] = _amax(ranges[name], name, where)
    return out


def _amax(v: Any, name: str, where: str) -> float:
    """One range value as a finite float >= 0."""
    bad = isinstance(v, bool) or not isinstance(v, (int, float))
    if not bad:
        try:
            f = float(v)
        except OverflowError:
            bad = True
        else:
            bad = not (math.isfinite(f) and f >= 0.0)
    if bad:
        raise CalibrationError(f"{where}: range of {_short(name)} is {_short(v)}, not a finite number >= 0")
    return f + 0.0  # -0.0 -> 0.0


def _check_text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise CalibrationError(f"{where}: {what} {_short(value)} is not a string of at most {MAX_NAME} characters")
    return value


def write_cache(path: str | os.PathLike, ranges: dict[str, float], calibrator: str, model_digest: str) -> None:
    """Write `ranges` found by `calibrator` for the model `model_digest` to `path`, atomically.

    Nothing is written unless every value passes the checks `read_cache` applies; an unwritable path
    leaves no file behind. Errors: CalibrationError, one line.
    """
    path = os.fspath(path)
    where = f"calibration cache {path}"
    if calibrator not in CALIBRATORS:
        raise CalibrationError(f"{where}: unknown calibrator {_short(calibrator)}; one of {', '.join(CALIBRATORS)}")
    doc = {"format": FORMAT, "version": VERSION, "calibrator": calibrator,
           "model_digest": _check_text(model_digest, "model digest", where),
           "ranges": _check_ranges(ranges, where)}
    data = (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    if len(data) > MAX_BYTES:
        raise CalibrationError(f"{where}: {len(data)} bytes, more than the limit of {MAX_BYTES}")
    try:
        atomic_write(path, data, "calibration cache")
    except CalibrationError:
        raise
    except KilnError as e:
        raise CalibrationError(str(e)) from None


def _read_bytes(path: str, where: str) -> bytes:
    """The file's bytes, refusing non-regular files and files over MAX_BYTES (without reading them)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except FileNotFoundError:
        raise CalibrationError(f"{where} does not exist") from None
    except OSError as e:
        raise CalibrationError(f"{where}: cannot open ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CalibrationError(f"{where} is not a regular file")
        if st.st_size > MAX_BYTES:
            raise CalibrationError(f"{where}: {st.st_size} bytes, more than the limit of {MAX_BYTES}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise CalibrationError(f"{where}: cannot read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:  # the file grew after fstat
        raise CalibrationError(f"{where}: more than the limit of {MAX_BYTES} bytes")
    return data


def _refuse_constant(token: str) -> Any:
    raise _Refused(f"holds {token}, which is not a finite number")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"has the key {_short(key)} twice")
        out[key] = value
    return out


def _parse(data: bytes, where: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{where} is not UTF-8 text") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_object)
    except _Refused as e:
        raise CalibrationError(f"{where} {e}") from None
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer beyond Python's digit limit, nesting too deep
        raise CalibrationError(f"{where} is not a readable JSON document ({type(e).__name__})") from None


def read_cache(path: str | os.PathLike, model_digest: str | None = None) -> tuple[dict[str, float], str]:
    """(ranges sorted by tensor name, calibrator name) from the cache file at `path`.

    model_digest: when given, a cache written for another digest is refused. Errors: CalibrationError,
    one line naming the file.
    """
    path = os.fspath(path)
    where = f"calibration cache {path}"
    doc = _parse(_read_bytes(path, where), where)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CalibrationError(f"{where} is not a Kiln calibration cache")
    version = doc.get("version")
    if isinstance(version, bool) or version != VERSION:
        raise CalibrationError(f"{where} has format version {_short(version)}; this Kiln reads version {VERSION}")
    if set(doc) != _KEYS:
        extra, missing = sorted(set(doc) - _KEYS), sorted(_KEYS - set(doc))
        raise CalibrationError(f"{where}: unexpected keys {_short(extra)}, missing keys {_short(missing)}")
    calibrator = doc["calibrator"]
    if calibrator not in CALIBRATORS:
        raise CalibrationError(f"{where}: unknown calibrator {_short(calibrator)}")
    digest = _check_text(doc["model_digest"], "model digest", where)
    if model_digest is not None and digest != model_digest:
        raise CalibrationError(f"{where} is for another model (digest {_short(digest)}, "
                               f"this model's is {_short(model_digest)})")
    return _check_ranges(doc["ranges"], where), calibrator
