"""A Darknet .cfg network in plain PyTorch, written apart from Kiln (this module imports nothing from kiln).

It is the test oracle of Kiln's Darknet importer (tests/test_darknet.py, tests/test_yolo_sample.py) and the
PyTorch peer of benchmarks/yolo_bench.py. It has its own .cfg parser and shape bookkeeping, a .weights writer
and reader, random weights, and BN folding for the peer:

    layers = oracle_layers(oracle_cfg("yolov4-tiny.cfg"))
    params = random_params(layers, np.random.default_rng(0))      # or read_weights(path, layers)
    write_weights("w.weights", layers, params)
    heads = DarknetTorch(layers, params)(x)                         # the maps feeding each [yolo] layer

Darknet's semantics: convolution then batch norm ``(y - mean) / sqrt(var + .00001) * scales + biases`` (or a
bias), then the activation; max pools pad ``padding // 2`` before the input and the rest after; routes take
channel groups; shortcuts add and activate; upsampling is nearest.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BN_EPS", "DarknetTorch", "activate", "fold_batchnorm", "oracle_cfg", "oracle_layers",
           "random_params", "read_weights", "write_weights"]

BN_EPS = 1e-5  # Darknet's .00001


def oracle_cfg(path: str) -> list[dict[str, str]]:
    """Sections as dicts ('type' plus the keys; a repeated key keeps its first value, as in Darknet)."""
    sections: list[dict[str, str]] = []
    with open(path) as f:
        for raw in f:
            line = re.sub(r"\s", "", raw.split("#")[0])
            if not line or line.startswith(";"):
                continue
            if line.startswith("["):
                sections.append({"type": line.strip("[]")})
            else:
                key, val = line.split("=", 1)
                sections[-1].setdefault(key, val)
    return sections


def oracle_layers(sections: list[dict[str, str]]) -> list[dict]:
    """Per layer: its kind, parameters, the layers it reads and its channel count."""
    net, out = sections[0], []
    chans = [int(net["channels"])]  # chans[i + 1]: layer i's channels

    def ref(i: int, v: str) -> int:
        j = int(v)
        return i + j if j < 0 else j

    for i, s in enumerate(sections[1:]):
        kind = {"conv": "convolutional", "max": "maxpool"}.get(s["type"], s["type"])
        cin = chans[-1]
        d = {"kind": kind, "cin": cin}
        if kind == "convolutional":
            k = int(s.get("size", 1))
            d.update(filters=int(s["filters"]), size=k, stride=int(s.get("stride", 1)),
                     pad=k // 2 if int(s.get("pad", 0)) else int(s.get("padding", 0)), groups=int(s.get("groups", 1)),
                     bn=int(s.get("batch_normalize", 0)), act=s.get("activation", "logistic"))
            c = d["filters"]
        elif kind == "route":
            d.update(src=[ref(i, v) for v in s["layers"].split(",")], groups=int(s.get("groups", 1)),
                     gid=int(s.get("group_id", 0)))
            c = sum(chans[j + 1] for j in d["src"]) // d["groups"]
        elif kind == "shortcut":
            d.update(src=ref(i, s["from"]), act=s.get("activation", "linear"))
            c = cin
        elif kind == "maxpool":
            stride = int(s.get("stride", 1))
            size = int(s.get("size", stride))
            d.update(size=size, stride=stride, padding=int(s.get("padding", size - 1)))
            c = cin
        elif kind == "upsample":
            d.update(stride=int(s.get("stride", 2)))
            c = cin
        else:
            assert kind == "yolo", kind
            c = cin
        out.append(d)
        chans.append(c)
    return out


def random_params(layers: list[dict], rng: np.random.Generator) -> dict[int, dict[str, np.ndarray]]:
    """Random weights for every convolutional layer: variance-preserving kernels, BN stats with var > 0."""
    def normal(shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def uniform(lo, hi, n):
        return rng.random(n, dtype=np.float32) * np.float32(hi - lo) + np.float32(lo)

    params = {}
    for i, d in enumerate(layers):
        if d["kind"] != "convolutional":
            continue
        n, cg, k = d["filters"], d["cin"] // d["groups"], d["size"]
        p = {"biases": 0.2 * normal(n), "weights": normal((n, cg, k, k)) / np.float32(np.sqrt(cg * k * k))}
        if d["bn"]:
            p.update(scales=uniform(0.5, 1.0, n), mean=0.2 * normal(n), var=uniform(0.5, 1.5, n))
        params[i] = p
    return params


def _keys(layer: dict) -> tuple[str, ...]:
    """A conv layer's arrays in the order of the .weights file."""
    return ("biases", "scales", "mean", "var", "weights") if layer["bn"] else ("biases", "weights")


def _wide_seen(version: tuple[int, int, int]) -> bool:
    """Whether the header's `seen` count is 8 bytes (version 0.2 and later, as Darknet reads it)."""
    major, minor, _ = version
    return major * 10 + minor >= 2 and major < 1000 and minor < 1000


def write_weights(path: str, layers: list[dict], params: dict, version=(0, 2, 5), seen: int = 32013312) -> int:
    """Darknet's .weights: major, minor, revision (int32), seen (uint64 from version 0.2, else uint32), then
    per conv layer biases, [scales, rolling mean, rolling variance], weights. Returns the header's size."""
    wide = _wide_seen(version)
    with open(path, "wb") as f:
        f.write(np.array(version, "<i4").tobytes())
        f.write(np.array([seen], "<u8" if wide else "<u4").tobytes())
        for i in sorted(params):
            p = params[i]
            for key in _keys(layers[i]):
                f.write(np.ascontiguousarray(p[key], "<f4").data)
    return 20 if wide else 16


def read_weights(path: str, layers: list[dict]) -> dict[int, dict[str, np.ndarray]]:
    """The per-layer arrays of a .weights file written for `layers` (write_weights's inverse); ValueError when
    the file's length does not fit the layers."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 12:
        raise ValueError(f"{path}: {len(data)} bytes, too short for a Darknet weights header")
    version = tuple(int(v) for v in np.frombuffer(data[:12], "<i4"))
    off = 20 if _wide_seen(version) else 16  # type: ignore[arg-type]
    params: dict[int, dict[str, np.ndarray]] = {}
    for i, d in enumerate(layers):
        if d["kind"] != "convolutional":
            continue
        n, cg, k = d["filters"], d["cin"] // d["groups"], d["size"]
        p = {}
        for key in _keys(d):
            shape = (n, cg, k, k) if key == "weights" else (n,)
            count = int(np.prod(shape))
            if off + 4 * count > len(data):
                raise ValueError(f"{path}: the file ends inside layer {i}")
            p[key] = np.frombuffer(data, "<f4", count, off).reshape(shape).astype(np.float32)
            off += 4 * count
        params[i] = p
    if off != len(data):
        raise ValueError(f"{path}: {len(data) - off} bytes remain after the last convolutional layer")
    return params


def fold_batchnorm(layers: list[dict], params: dict) -> tuple[list[dict], dict[int, dict[str, np.ndarray]]]:
    """The same network with every batch norm folded into its convolution (weights scaled per output channel,
    a bias), computed in float64: what a deployment in PyTorch would run. New lists; the inputs are unchanged."""
    out_layers, out_params = [dict(d) for d in layers], {}
    for i, p in params.items():
        if not layers[i]["bn"]:
            out_params[i] = {k: v.copy() for k, v in p.items()}
            continue
        g = p["scales"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + BN_EPS)
        out_params[i] = {"weights": (p["weights"] * g[:, None, None, None]).astype(np.float32),
                         "biases": (p["biases"] - p["mean"] * g).astype(np.float32)}
        out_layers[i]["bn"] = 0
    return out_layers, out_params


def activate(x: torch.Tensor, act: str) -> torch.Tensor:
    """A Darknet activation with PyTorch's own operators."""
    if act == "leaky":
        return F.leaky_relu(x, 0.1)
    if act == "mish":
        return F.mish(x)
    if act == "logistic":
        return torch.sigmoid(x)
    if act == "swish":
        return F.silu(x)
    if act == "relu":
        return torch.relu(x)
    if act == "relu6":
        return torch.clamp(x, 0, 6)
    if act == "tanh":
        return torch.tanh(x)
    assert act == "linear", act
    return x


def _max_pool(x: torch.Tensor, size: int, stride: int, padding: int) -> torch.Tensor:
    """Darknet's max pool: windows start padding // 2 before the input, the rest of the padding after.
    PyTorch's own padding (implicitly -inf, the same on both sides) serves where it gives the same windows
    (not decided while torch.jit traces for an ONNX export: the sizes are not Python numbers there)."""
    lo, hi = padding // 2, padding - padding // 2
    same = lo <= size // 2 and not torch.jit.is_tracing() and all(
        (int(n) + 2 * lo - size) // stride == (int(n) + lo + hi - size) // stride for n in x.shape[-2:])
    if same:
        return F.max_pool2d(x, size, stride, lo)
    return F.max_pool2d(F.pad(x, (lo, hi, lo, hi), value=float("-inf")), size, stride)


class DarknetTorch(torch.nn.Module):
    """The network of a .cfg in torch, with Darknet's semantics; returns the maps feeding each [yolo]."""

    def __init__(self, layers: list[dict], params: dict, calibrate: np.random.Generator | None = None) -> None:
        """calibrate: a forward pass sets each BN layer's mean and variance (in `params` too) near the batch
        statistics of its input, as training would leave them (random ones drown the image in offsets)."""
        super().__init__()
        self.layers, self.params, self.calibrate = layers, params, calibrate
        self.p = torch.nn.ParameterDict({f"{i}_{k}": torch.nn.Parameter(torch.from_numpy(v), False)  # shared
                                         for i, p in params.items() for k, v in p.items()})
        last = [-1] * len(layers)  # the last layer reading each layer's output
        for i, d in enumerate(layers):
            reads = list(d["src"]) if d["kind"] == "route" else [i - 1] if i else []
            if d["kind"] == "shortcut":
                reads.append(d["src"])
            for j in reads:
                last[j] = max(last[j], i)
        self.free_after = {i: [j for j, end in enumerate(last) if end == i] for i in range(len(layers))}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs: list[torch.Tensor | None] = []
        heads = []
        for i, d in enumerate(self.layers):
            prev = outs[-1] if outs else x
            kind = d["kind"]
            if kind == "convolutional":
                bias = None if d["bn"] else self.p[f"{i}_biases"]
                y = F.conv2d(prev, self.p[f"{i}_weights"], bias, d["stride"], d["pad"], 1, d["groups"])
                if d["bn"] and self.calibrate is not None:
                    self._calibrate(i, y)
                if d["bn"]:  # Darknet: (y - mean) / sqrt(var + .00001) * scales + biases
                    y = F.batch_norm(y, self.p[f"{i}_mean"], self.p[f"{i}_var"], self.p[f"{i}_scales"],
                                     self.p[f"{i}_biases"], False, 0.0, BN_EPS)
                y = activate(y, d["act"])
            elif kind == "route":
                parts = []
                for j in d["src"]:
                    c = outs[j].shape[1] // d["groups"]
                    parts.append(outs[j][:, d["gid"] * c:(d["gid"] + 1) * c])
                y = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
            elif kind == "shortcut":
                y = activate(prev + outs[d["src"]], d["act"])
            elif kind == "maxpool":
                y = _max_pool(prev, d["size"], d["stride"], d["padding"])
            elif kind == "upsample":
                y = F.interpolate(prev, scale_factor=d["stride"], mode="nearest")
            else:
                heads.append(prev)
                y = prev
            outs.append(y)
            for j in self.free_after[i]:  # an output no later layer reads is let go (as in a module's forward)
                outs[j] = None
        return tuple(heads)

    def _calibrate(self, i: int, y: torch.Tensor) -> None:
        rng, n = self.calibrate, y.shape[1]
        mean, var = y.mean((0, 2, 3)).numpy(), y.var((0, 2, 3)).numpy()
        p = self.params[i]
        p["mean"][:] = mean + 0.1 * np.sqrt(var) * rng.standard_normal(n, dtype=np.float32)
        p["var"][:] = var * (0.8 + 0.45 * rng.random(n, dtype=np.float32))  # the module's tensors share these
