"""The KServe v2 inference protocol (the one Triton Inference Server speaks over HTTP), without Ray.

JSON tensors (`data` as a flat or nested row-major list) and the binary-tensor extension: a request or
response whose first `Inference-Header-Content-Length` bytes are the JSON header, followed by the raw
little-endian bytes of each tensor that says `"parameters": {"binary_data_size": n}`, in order. Request
bodies may be gzip/deflate compressed (`Content-Encoding`); responses are when the client asks
(`Accept-Encoding`). Every malformed request is a BadRequest of one line naming the input, shape or type.
"""
from __future__ import annotations

import gzip
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from kiln.serve.model import BadRequest, ModelSignature, TensorSpec, numpy_dtype, show_shape

HEADER_LENGTH = "Inference-Header-Content-Length"

# KServe v2 datatype <-> Kiln element type name (BYTES is not carried: no Kiln plan takes strings)
TO_KILN = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
           "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
           "FP32": "float32", "FP64": "float64", "BF16": "bfloat16"}
TO_KSERVE = {v: k for k, v in TO_KILN.items()}

# request parameters of the protocol and its Triton extensions that Kiln does not implement
_UNSUPPORTED = ("sequence_id", "sequence_start", "sequence_end", "priority")


def kserve_type(kiln_dtype: str) -> str:
    """The KServe datatype of a Kiln element type name."""
    return TO_KSERVE[kiln_dtype]


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as binary data."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: its id, input arrays, requested outputs (None: all) and queue timeout."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None
    binary_output: bool
    timeout_s: float | None


def _json(raw: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(raw))
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"{what} is not valid JSON ({str(e).splitlines()[0][:80]})") from None


MAX_BODY_BYTES = 1 << 30
"""The largest request body accepted, after decompression: a small compressed body may not inflate without
bound (a decompression bomb), and every request body is held in memory whole."""


def decompress(body: bytes, content_encoding: str | None, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body with its Content-Encoding (gzip, deflate, identity) undone, inflated at most to
    `limit` bytes (BadRequest beyond)."""
    enc = (content_encoding or "identity").strip().lower()
    if enc not in ("gzip", "deflate", "identity"):
        raise BadRequest(f"unsupported Content-Encoding '{content_encoding}'; use gzip, deflate or none")
    if enc == "identity":
        if len(body) > limit:
            raise BadRequest(f"request body of {len(body)} bytes exceeds the limit of {limit} bytes")
        return body
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise BadRequest(f"request body is not valid {enc} data ({type(e).__name__})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise BadRequest(f"request body inflates past the limit of {limit} bytes ({enc})")
    if not d.eof:
        raise BadRequest(f"request body is not valid {enc} data (truncated)")
    return out


def _header_length(value: str | None, size: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} '{value[:40]}' is not an integer") from None
    if not 0 < n <= size:
        raise BadRequest(f"{HEADER_LENGTH} {n} is outside the body's {size} bytes")
    return n


def _shape(t: Mapping[str, Any], name: str) -> tuple[int, ...]:
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                             for d in shape):
        raise BadRequest(f"input '{name}': 'shape' must be a list of non-negative integers, got {str(shape)[:60]}")
    return tuple(shape)


def _params(d: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    p = d.get("parameters", {})
    if not isinstance(p, Mapping):
        raise BadRequest(f"{what}: 'parameters' must be an object")
    return p


def _from_json_data(data: Any, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = numpy_dtype(TO_KILN[datatype])
    try:
        raw = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(f"input '{name}': 'data' is not a regular array of numbers") from None
    want = math.prod(shape)
    if raw.size != want:
        raise BadRequest(f"input '{name}': 'data' has {raw.size} elements, shape {show_shape(shape)} needs {want}")
    if raw.size:
        ok = {"b": "b", "u": "iu", "i": "iu", "f": "iuf", "V": "iuf"}[dtype.kind]  # V: bfloat16
        if raw.dtype.kind not in ok:
            kinds = {"b": "boolean", "i": "integer", "u": "integer", "f": "floating-point"}
            kind = kinds.get(raw.dtype.kind, "non-numeric")
            raise BadRequest(f"input '{name}': 'data' holds {kind} values, not {datatype}")
    try:
        with np.errstate(over="raise", invalid="raise"):
            arr = raw.astype(dtype) if raw.dtype.kind not in "iu" or dtype.kind not in "iu" else \
                np.array(raw.tolist(), dtype=dtype)
    except (OverflowError, FloatingPointError, ValueError):
        raise BadRequest(f"input '{name}': a value does not fit {datatype}") from None
    return arr.reshape(shape)


def decode_request(body: bytes, header_length: str | None, sig: ModelSignature,
                   content_encoding: str | None = None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON + binary tensors) and check it against the model's signature:
    input names, datatypes, shapes and data sizes. Raises BadRequest naming what is wrong."""
    body = decompress(body, content_encoding)
    n = _header_length(header_length, len(body))
    head = _json(memoryview(body)[:n] if n is not None else body, "request header")
    if not isinstance(head, dict):
        raise BadRequest("request header must be a JSON object")
    rid = head.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("request 'id' must be a string")
    params = _params(head, "request")
    for p in _UNSUPPORTED:
        if params.get(p) not in (None, 0, "", False):
            raise BadRequest(f"request parameter '{p}' is not supported by Kiln")
    timeout_s = None
    if params.get("timeout") is not None:
        t = params["timeout"]
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise BadRequest("request parameter 'timeout' must be a non-negative integer (microseconds)")
        timeout_s = t / 1e6 if t else None
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequest("request parameter 'binary_data_output' must be true or false")
    tensors = head.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise BadRequest("request has no 'inputs' list")
    offset = n if n is not None else len(body)
    inputs: dict[str, np.ndarray] = {}
    for t in tensors:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise BadRequest("every input needs a string 'name'")
        name = t["name"]
        spec = sig.input(name)
        if spec is None:
            raise BadRequest(f"unknown input '{name[:60]}'; inputs are: {', '.join(sig.input_names)}")
        if name in inputs:
            raise BadRequest(f"input '{name}' is given twice")
        datatype = t.get("datatype")
        if datatype not in TO_KILN:
            raise BadRequest(f"input '{name}': unsupported datatype {str(datatype)[:20]!r}; "
                             f"use one of {', '.join(TO_KILN)}")
        if TO_KILN[datatype] != spec.dtype:
            raise BadRequest(f"input '{name}' has datatype {datatype}, expected {kserve_type(spec.dtype)}")
        shape = _shape(t, name)
        size = _params(t, f"input '{name}'").get("binary_data_size")
        if size is not None:
            if "data" in t:
                raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
            dtype = numpy_dtype(spec.dtype)
            want = math.prod(shape) * dtype.itemsize
            if size != want:
                raise BadRequest(f"input '{name}': binary_data_size {size} does not match shape "
                                 f"{show_shape(shape)} of {datatype} ({want} bytes)")
            if n is None:
                raise BadRequest(f"input '{name}' has binary data but the request has no {HEADER_LENGTH} header")
            if offset + size > len(body):
                raise BadRequest(f"input '{name}': binary data runs past the end of the body "
                                 f"({len(body) - offset} bytes left, {size} needed)")
            inputs[name] = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape).copy()
            offset += size
        elif "data" in t:
            inputs[name] = _from_json_data(t["data"], name, datatype, shape)
        else:
            raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
    if offset != len(body):
        raise BadRequest(f"request body has {len(body) - offset} bytes after the last binary input")
    outputs = None
    if head.get("outputs") is not None:
        if not isinstance(head["outputs"], list):
            raise BadRequest("request 'outputs' must be a list")
        outputs = []
        for o in head["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise BadRequest("every requested output needs a string 'name'")
            if o["name"] not in sig.output_names:
                raise BadRequest(f"unknown output '{o['name'][:60]}'; outputs are: {', '.join(sig.output_names)}")
            p = _params(o, f"output '{o['name']}'")
            if p.get("classification"):
                raise BadRequest(f"output '{o['name']}': the classification extension is not supported")
            b = p.get("binary_data", binary_output)
            if not isinstance(b, bool):
                raise BadRequest(f"output '{o['name']}': binary_data must be true or false")
            outputs.append(RequestedOutput(o["name"], b))
    return InferRequest(rid, inputs, outputs, binary_output, timeout_s)


def encode_response(model: str, version: str, request_id: str | None, outputs: Mapping[str, np.ndarray],
                    sig: ModelSignature, requested: Sequence[RequestedOutput] | None, binary_output: bool,
                    accept_encoding: str | None = None) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an infer response: JSON tensors, or the JSON header + binary tensors for outputs
    asked for in binary; compressed when Accept-Encoding names gzip or deflate."""
    wanted = requested if requested is not None else [RequestedOutput(n, binary_output) for n in sig.output_names]
    specs = {s.name: s for s in sig.outputs}
    tensors, blobs = [], []
    for r in wanted:
        a = np.asarray(outputs[r.name])
        spec = specs[r.name]
        a = a.astype(spec.np_dtype, copy=False)
        t: dict[str, Any] = {"name": r.name, "datatype": kserve_type(spec.dtype), "shape": list(a.shape)}
        if r.binary:
            blob = np.ascontiguousarray(a).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = (a.astype(np.float32) if spec.dtype == "bfloat16" else a).reshape(-1).tolist()
        tensors.append(t)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request_id is not None:
        head["id"] = request_id
    raw = json.dumps(head, separators=(",", ":"), allow_nan=True).encode()
    headers = {"Content-Type": "application/json"}
    body = raw
    if blobs:
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(raw))}
        body = b"".join([raw, *blobs])
    enc = _pick_encoding(accept_encoding)
    if enc == "gzip":
        body = gzip.compress(body, compresslevel=1)
    elif enc == "deflate":
        body = zlib.compress(body, 1)
    if enc:
        headers["Content-Encoding"] = enc
    return body, headers


def _pick_encoding(accept: str | None) -> str | None:
    names = [p.split(";")[0].strip().lower() for p in (accept or "").split(",")]
    return next((n for n in names if n in ("gzip", "deflate")), None)


def error_body(message: str) -> bytes:
    """The protocol's error object, {"error": message}."""
    return json.dumps({"error": message}).encode()


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    """name/datatype/shape entries of model metadata; dynamic dims are -1."""
    return [{"name": s.name, "datatype": kserve_type(s.dtype),
             "shape": [d if isinstance(d, int) else -1 for d in s.shape]} for s in specs]


def model_metadata(name: str, version: str, sig: ModelSignature) -> dict[str, Any]:
    """The model metadata response (GET /v2/models/{name})."""
    return {"name": name, "versions": [version], "platform": "kiln",
            "inputs": tensor_metadata(sig.inputs), "outputs": tensor_metadata(sig.outputs)}


def model_config(name: str, sig: ModelSignature, max_batch: int, batch_timeout_ms: float,
                 contexts: int) -> dict[str, Any]:
    """A Triton-style model configuration (GET /v2/models/{name}/config): with max_batch_size > 0 the dims
    leave out the batch dim, as in Triton."""
    batched = sig.batched and max_batch > 1
    skip = 1 if batched else 0

    def dims(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": s.name, "data_type": "TYPE_" + kserve_type(s.dtype),
                 "dims": [d if isinstance(d, int) else -1 for d in s.shape[skip:]]} for s in specs]
    cfg: dict[str, Any] = {"name": name, "platform": "kiln", "backend": "kiln",
                           "max_batch_size": max_batch if batched else 0,
                           "input": dims(sig.inputs), "output": dims(sig.outputs),
                           "instance_group": [{"count": contexts, "kind": "KIND_MODEL"}]}
    if batched:
        cfg["dynamic_batching"] = {"max_queue_delay_microseconds": int(batch_timeout_ms * 1000)}
    return cfg
