"""KServe v2 protocol (kiln.serve.protocol) without Ray: requests made by tritonclient's own encoder decode to the
arrays it was given, responses Kiln encodes parse back through tritonclient's own decoder, and malformed requests
are one-line 400s naming the input, the shape or the datatype."""
from __future__ import annotations

import gzip
import json
import zlib

import ml_dtypes
import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.serve import protocol
from kiln.serve.model import BadRequest, ModelSignature

tc = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extra")

# one input per element type the protocol carries, all batched along N
TYPES = {"f32": ("float32", "FP32"), "f16": ("float16", "FP16"), "bf16": ("bfloat16", "BF16"),
         "f64": ("float64", "FP64"), "i64": ("int64", "INT64"), "i32": ("int32", "INT32"), "i8": ("int8", "INT8"),
         "u8": ("uint8", "UINT8"), "u16": ("uint16", "UINT16"), "b": ("bool", "BOOL")}


def _sig(profile_max: int = 8) -> ModelSignature:
    inputs = [{"name": n, "dtype": t, "shape": ["N", 3, 2], "kind": "tensor"} for n, (t, _) in TYPES.items()]
    outputs = [{"name": "o_" + n, "dtype": t, "shape": ["N", 3, 2], "kind": "tensor"} for n, (t, _) in TYPES.items()]
    prof = {n: {"min": [1, 3, 2], "opt": [2, 3, 2], "max": [profile_max, 3, 2]} for n in TYPES}
    return ModelSignature.from_header(inputs, outputs, [prof])


def _arrays(rng: np.random.Generator, rows: int = 2) -> dict[str, np.ndarray]:
    shape = (rows, 3, 2)
    out = {}
    for n, (t, _) in TYPES.items():
        if t == "bool":
            out[n] = rng.random(shape) > 0.5
        elif t.startswith("float") or t == "bfloat16":
            dt = ml_dtypes.bfloat16 if t == "bfloat16" else np.dtype(t)
            out[n] = (rng.standard_normal(shape) * 10).astype(dt)
        else:
            info = np.iinfo(t)
            out[n] = rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(t)
    return out


def _triton_request(arrays: dict[str, np.ndarray], binary: dict[str, bool], outputs=None):
    inputs = []
    for n, a in arrays.items():
        i = tc.InferInput(n, list(a.shape), TYPES[n][1])
        i.set_data_from_numpy(a, binary_data=binary[n])
        inputs.append(i)
    return tc.InferenceServerClient.generate_request_body(inputs, outputs=outputs)


def test_binary_and_json_inputs_round_trip_tritonclient_encoder():
    rng = np.random.default_rng()
    sig = _sig()
    arrays = _arrays(rng, rows=3)
    names = list(arrays)
    binary = {n: i % 2 == 0 for i, n in enumerate(names)}  # half JSON, half binary in one request
    body, json_size = _triton_request(arrays, binary)
    req = protocol.decode_request(body, str(json_size), sig)
    assert set(req.inputs) == set(arrays)
    for n, a in arrays.items():
        got = req.inputs[n]
        assert got.dtype == a.dtype and got.shape == a.shape, n
        assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(a).view(np.uint8)), n
        assert got.flags.writeable and got.flags.aligned
    assert req.outputs is None and req.binary_output is True  # tritonclient asks binary when no outputs named


def test_all_json_request_has_no_header_length():
    rng = np.random.default_rng()
    arrays = _arrays(rng, rows=1)
    del arrays["bf16"]  # tritonclient sends BF16 only as binary data
    body, json_size = _triton_request(arrays, {n: False for n in arrays},
                                      outputs=[tc.InferRequestedOutput("o_f32", binary_data=False)])
    assert json_size is None
    with pytest.raises(BadRequest, match="missing input 'bf16'"):
        _sig().check(protocol.decode_request(body, None, _sig()).inputs)
    req = protocol.decode_request(body, None, _sig())
    for n, a in arrays.items():
        np.testing.assert_array_equal(req.inputs[n].astype(np.float64), a.astype(np.float64))
    assert [(o.name, o.binary) for o in req.outputs] == [("o_f32", False)]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request_body(encoding):
    rng = np.random.default_rng()
    arrays = _arrays(rng)
    body, json_size = _triton_request(arrays, {n: True for n in arrays})
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    req = protocol.decode_request(packed, str(json_size), _sig(), encoding)
    for n, a in arrays.items():
        assert np.array_equal(req.inputs[n].view(np.uint8), a.view(np.uint8))


@pytest.mark.parametrize("accept", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_response_parses_with_tritonclient(binary, accept):
    rng = np.random.default_rng()
    sig = _sig()
    outs = {"o_" + n: a for n, a in _arrays(rng, rows=2).items()}
    want = [protocol.RequestedOutput(n, binary) for n in outs]
    body, headers = protocol.encode_response("m", "1", "req-7", outs, sig, want, binary, accept)
    size = headers.get(protocol.HEADER_LENGTH)
    assert (size is not None) == binary
    assert headers.get("Content-Encoding") == accept
    res = tc.InferenceServerClient.parse_response_body(body, header_length=int(size) if size else None,
                                                      content_encoding=accept)
    head = res.get_response()
    assert head["model_name"] == "m" and head["model_version"] == "1" and head["id"] == "req-7"
    for n, a in outs.items():
        got = res.as_numpy(n)
        assert got.shape == a.shape, n
        if a.dtype == ml_dtypes.bfloat16 and not binary:  # JSON carries BF16 as float32 numbers
            np.testing.assert_array_equal(got.astype(np.float32), a.astype(np.float32))
        else:
            np.testing.assert_array_equal(got.astype(np.float64), a.astype(np.float64))


def test_response_outputs_default_to_all_in_plan_order():
    sig = _sig()
    rng = np.random.default_rng()
    outs = {"o_" + n: a for n, a in _arrays(rng).items()}
    body, headers = protocol.encode_response("m", "1", None, outs, sig, None, False)
    head = json.loads(body)
    assert [t["name"] for t in head["outputs"]] == sig.output_names and "id" not in head


def _bad(body: bytes | dict, header_length: str | None = None, sig: ModelSignature | None = None) -> str:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    with pytest.raises(BadRequest) as e:
        protocol.decode_request(raw, header_length, sig or _sig())
    msg = str(e.value)
    assert "\n" not in msg and e.value.status == 400
    return msg


def _one(name="f32", datatype="FP32", shape=(1, 3, 2), data=None, **extra) -> dict:
    t = {"name": name, "datatype": datatype, "shape": list(shape)}
    t["data"] = data if data is not None else [0.5] * int(np.prod(shape))
    t.update(extra)
    return t


def _full(**override) -> dict:
    """A valid JSON request feeding every input of _sig(); `override` replaces inputs by name."""
    rng = np.random.default_rng()
    tensors = []
    for n, a in _arrays(rng, rows=1).items():
        tensors.append(override.get(n) or {"name": n, "datatype": TYPES[n][1], "shape": list(a.shape),
                                           "data": a.astype(np.float32 if n == "bf16" else a.dtype).ravel().tolist()})
    return {"inputs": tensors}


def test_valid_full_request_decodes():
    req = protocol.decode_request(json.dumps(_full()).encode(), None, _sig())
    assert len(req.inputs) == len(TYPES)


@pytest.mark.parametrize("body, words", [
    (b"{not json", ["not valid JSON"]),
    (b"[1, 2]", ["JSON object"]),
    ({"inputs": []}, ["no 'inputs'"]),
    ({"inputs": [_one(name="zz")]}, ["unknown input 'zz'", "f32"]),
    ({"inputs": [_one(datatype="FP64")]}, ["input 'f32'", "FP64", "expected FP32"]),
    ({"inputs": [_one(datatype="STRING")]}, ["input 'f32'", "unsupported datatype"]),
    ({"inputs": [_one(shape=(1, 3, -2))]}, ["input 'f32'", "shape"]),
    ({"inputs": [_one(data=[1.0] * 5)]}, ["input 'f32'", "5 elements", "[1,3,2]"]),
    ({"inputs": [_one(data=[[1.0, 2.0], [3.0]])]}, ["input 'f32'", "regular array"]),
    ({"inputs": [_one(name="i64", datatype="INT64", data=[1.5] * 6)]}, ["input 'i64'", "floating-point", "INT64"]),
    ({"inputs": [_one(name="u8", datatype="UINT8", data=[300] * 6)]}, ["input 'u8'", "does not fit UINT8"]),
    ({"inputs": [_one(name="b", datatype="BOOL", data=[1] * 6)]}, ["input 'b'", "integer", "BOOL"]),
    ({"inputs": [_one(name="f16", datatype="FP16", data=[1e6] * 6)]}, ["input 'f16'", "does not fit FP16"]),
    ({"inputs": [_one(), _one()]}, ["input 'f32' is given twice"]),
    ({"inputs": [{"name": "f32", "datatype": "FP32", "shape": [1, 3, 2]}]}, ["input 'f32'", "neither"]),
    ({"inputs": [_one()], "parameters": {"sequence_id": 4}}, ["sequence_id", "not supported"]),
    ({"inputs": [_one()], "parameters": {"timeout": -1}}, ["timeout"]),
    ({"inputs": [_one()], "outputs": [{"name": "nope"}]}, ["unknown output 'nope'"]),
    ({"inputs": [_one()], "outputs": [{"name": "o_f32", "parameters": {"classification": 3}}]}, ["classification"]),
])
def test_malformed_requests_are_one_line_400s(body, words):
    msg = _bad(body)
    for w in words:
        assert w in msg, (w, msg)


def test_binary_sizes_checked():
    blob = np.random.default_rng().standard_normal((1, 3, 2)).astype(np.float32).tobytes()

    def req(size: int, extra: bytes = b"") -> tuple[bytes, str]:
        head = json.dumps({"inputs": [{"name": "f32", "datatype": "FP32", "shape": [1, 3, 2],
                                       "parameters": {"binary_data_size": size}}]}).encode()
        return head + blob + extra, str(len(head))
    assert "binary_data_size 20 does not match shape [1,3,2] of FP32 (24 bytes)" in _bad(*req(20))
    assert "after the last binary input" in _bad(*req(24, b"xx"))
    body, n = req(24)
    assert "not valid JSON" in _bad(body, None)  # binary bytes after JSON that no header length delimits
    assert "has binary data but the request has no Inference-Header-Content-Length" in _bad(body[:int(n)], None)
    assert "runs past the end" in _bad(body[:-4], n)
    assert "outside the body" in _bad(body, str(len(body) + 1))
    assert "not an integer" in _bad(body, "12abc")
    good = protocol.decode_request(body, n, _sig())
    np.testing.assert_array_equal(good.inputs["f32"].ravel(), np.frombuffer(blob, np.float32))


def test_bad_content_encoding():
    with pytest.raises(BadRequest, match="not valid gzip"):
        protocol.decode_request(b"plain", None, _sig(), "gzip")
    with pytest.raises(BadRequest, match="unsupported Content-Encoding 'br'"):
        protocol.decode_request(b"{}", None, _sig(), "br")


def test_signature_check_names_shape_and_profile_range():
    sig = ModelSignature.from_header(
        [{"name": "x", "dtype": "float32", "shape": ["N", 3, "H", "W"]}],
        [{"name": "y", "dtype": "float32", "shape": ["N", 10]}],
        [{"x": {"min": [1, 3, 16, 16], "opt": [4, 3, 32, 32], "max": [8, 3, 64, 64]}}])
    assert sig.batched and sig.max_rows() == 8
    x = np.random.default_rng().standard_normal
    with pytest.raises(BadRequest) as e:
        sig.check({"x": x((2, 3, 8, 16)).astype(np.float32)})
    assert str(e.value) == "input 'x' has shape [2,3,8,16], outside the profile range [1,3,16,16]..[8,3,64,64]"
    with pytest.raises(BadRequest, match=r"input 'x' has shape \[2,4,16,16\], expected \[N,3,H,W\]"):
        sig.check({"x": x((2, 4, 16, 16)).astype(np.float32)})
    with pytest.raises(BadRequest, match="input 'x' has 9 rows, more than the max batch 8"):
        sig.check({"x": x((9, 3, 16, 16)).astype(np.float32)}, max_rows=8)
    with pytest.raises(BadRequest, match="element type float64, expected float32"):
        sig.check({"x": x((1, 3, 16, 16))})
    p = sig.check({"x": x((20, 3, 16, 16)).astype(np.float32)})  # rows beyond the profile are split, not refused
    assert p.rows == 20


def test_inputs_must_agree_on_batch():
    sig = ModelSignature.from_header([{"name": "a", "dtype": "float32", "shape": ["N", 2]},
                                      {"name": "b", "dtype": "int64", "shape": ["N", 1]}],
                                     [{"name": "y", "dtype": "float32", "shape": ["N", 2]}], [])
    with pytest.raises(BadRequest, match="'a' has 2 rows, 'b' has 3"):
        sig.check({"a": np.ones((2, 2), np.float32), "b": np.ones((3, 1), np.int64)})


def test_what_cannot_be_served_or_batched():
    with pytest.raises(KilnError, match="input 's' is a sequence"):
        ModelSignature.from_header([{"name": "s", "kind": "sequence"}], [], [])
    with pytest.raises(KilnError, match="output 'q' has element type float8_e4m3fn"):
        ModelSignature.from_header([{"name": "x", "dtype": "float32", "shape": [2]}],
                                   [{"name": "q", "dtype": "float8_e4m3fn", "shape": [2]}], [])
    reduced = ModelSignature.from_header([{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
                                         [{"name": "y", "dtype": "float32", "shape": [4]}], [])
    assert not reduced.batched and reduced.max_rows() == 1
    fixed = ModelSignature.from_header([{"name": "x", "dtype": "float32", "shape": [4, 3]}],
                                       [{"name": "y", "dtype": "float32", "shape": [4, 2]}], [])
    assert fixed.batched and fixed.batch_range(0) == (4, 4) and fixed.batch_sizes(0, 16) == [4]


def test_batch_sizes_are_powers_of_two_in_profile():
    sig = ModelSignature.from_header([{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
                                     [{"name": "y", "dtype": "float32", "shape": ["N", 4]}],
                                     [{"x": {"min": [3, 4], "opt": [4, 4], "max": [24, 4]}}])
    assert sig.batch_sizes(0, 64) == [3, 4, 8, 16, 24]
    assert sig.batch_sizes(0, 10) == [3, 4, 8, 10]


def test_metadata_and_config():
    sig = _sig()
    md = protocol.model_metadata("m", "1", sig)
    assert md["inputs"][0] == {"name": "f32", "datatype": "FP32", "shape": [-1, 3, 2]}
    cfg = protocol.model_config("m", sig, 8, 2.5, 2)
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == [3, 2]
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 2500
    assert protocol.model_config("m", sig, 1, 2.5, 1)["max_batch_size"] == 0


def test_compressed_body_may_not_inflate_past_the_limit() -> None:
    """A decompression bomb (a small body inflating to far more than any request) is one BadRequest, decided
    without inflating it whole; a body within the limit round-trips for both encodings; truncated data is refused."""
    import gzip as _gzip
    import zlib as _zlib

    from kiln.serve.model import BadRequest
    from kiln.serve.protocol import decompress
    rng = np.random.default_rng(7)
    payload = rng.integers(0, 256, size=5000, dtype=np.uint8).tobytes()
    for enc, packed in (("gzip", _gzip.compress(payload)), ("deflate", _zlib.compress(payload))):
        assert decompress(packed, enc, limit=5000) == payload
        with pytest.raises(BadRequest, match="limit of 4999 bytes"):
            decompress(packed, enc, limit=4999)
        with pytest.raises(BadRequest, match="not valid"):
            decompress(packed[: len(packed) // 2], enc, limit=10_000)
    bomb = _gzip.compress(bytes(64 << 20))  # 64 MiB of zeros in ~64 KB
    assert len(bomb) < 1 << 17
    with pytest.raises(BadRequest, match="inflates past the limit"):
        decompress(bomb, "gzip", limit=1 << 20)
    with pytest.raises(BadRequest, match="exceeds the limit"):
        decompress(payload, None, limit=100)
