"""Darknet importer: a .cfg network definition and its .weights file -> kiln.ir Graph.

    from kiln.builder import Builder, BuilderConfig
    from kiln.frontend.darknet import load_darknet
    plan = Builder().build(load_darknet("yolov4-tiny.cfg", "yolov4-tiny.weights"), BuilderConfig(device="cpu"))

The layer types of YOLOv4 and YOLOv4-tiny are supported: [convolutional] (batch norm or bias; linear, leaky,
mish, logistic, relu, relu6, swish, tanh), [route] (groups / group_id), [shortcut], [maxpool] (Darknet's
padding: `padding` in all, default size-1, padding//2 of it before and the rest after), [upsample] and [yolo].
The plan's input is `input` [batch, channels, height, width] (float32, RGB in [0, 1] as Darknet feeds it);
its outputs are the raw maps feeding each [yolo] layer (`yolo<index>`, before the yolo layer's logistic),
or the last layer's output when the network has no [yolo] layer. The yolo layers' parameters (mask,
anchors, classes, scale_x_y...) are `parse_darknet_cfg(path).heads`.

The .cfg is read as Darknet reads it: whitespace anywhere in a line is dropped, lines starting with '#'
or ';' are comments (and so is the rest of a line after '#' or ';'), and a key given twice in a section
takes its first value (with a warning). Everything is checked as untrusted input: a malformed or
unsupported section or key, an index out of range, or a weights file of the wrong length is one
ModelError line naming the layer (Darknet's index, its type and the line in the .cfg).
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import ModelError
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Value
from kiln.logger import Logger

__all__ = ["DarknetError", "DarknetNetwork", "DarknetLayer", "YoloHead", "load_darknet", "parse_darknet_cfg",
           "read_darknet_weights"]

MAX_CFG_BYTES = 16 << 20   # a Darknet .cfg is a few kB; anything this large is not one
MAX_DIM = 1 << 16          # largest width, height, channel count, kernel size, stride or padding accepted
MAX_LAYERS = 1 << 16
BN_EPSILON = 1e-5          # Darknet's normalize: (x - mean) / sqrt(var + .00001)
LEAKY_ALPHA = 0.1

_SECTION_ALIASES = {"net": "net", "network": "net", "convolutional": "convolutional", "conv": "convolutional",
                    "maxpool": "maxpool", "max": "maxpool", "route": "route", "shortcut": "shortcut",
                    "upsample": "upsample", "yolo": "yolo"}
# section types Darknet has that this importer does not translate
_DARKNET_ONLY = {"scale_channels", "sam", "crop", "cost", "detection", "region", "Gaussian_yolo", "local",
                 "activation", "crnn", "gru", "lstm", "conv_lstm", "history", "rnn", "conn", "connected",
                 "local_avg", "local_avgpool", "reorg3d", "reorg", "avg", "avgpool", "dropout", "lrn",
                 "normalization", "batchnorm", "soft", "softmax", "contrastive", "empty", "silence", "implicit"}
ACTIVATIONS = ("linear", "leaky", "mish", "logistic", "relu", "relu6", "swish", "tanh")

# keys read by Darknet for every layer that do not change inference
_TRAINING_KEYS = {"onlyforward", "dont_update", "burnin_update", "stopbackward", "train_only_bn", "learning_rate",
                  "stream", "wait_stream", "time_normalizer"}
# key -> the one value it may have here (any other changes what the layer computes or how its weights are read)
_NEUTRAL_COMMON = {"dontload": 0, "dontloadscales": 0, "clip": 0}
_KEYS: dict[str, tuple[set[str], dict[str, Any], set[str]]] = {  # type -> (read, must be neutral, ignored)
    "convolutional": ({"filters", "size", "stride", "stride_x", "stride_y", "pad", "padding", "groups",
                       "activation", "batch_normalize", "dilation"},
                      {"antialiasing": 0, "binary": 0, "xnor": 0, "bin_output": 0, "sway": 0, "rotate": 0,
                       "stretch": 0, "stretch_sway": 0, "cbn": 0, "flipped": 0, "coordconv": 0,
                       "assisted_excitation": 0, "reverse": 0, "share_index": None},
                      {"angle", "grad_centr", "dot"}),
    "maxpool": ({"size", "stride", "stride_x", "stride_y", "padding"},
                {"maxpool_depth": 0, "antialiasing": 0, "maxpool_zero_nonmax": 0}, {"out_channels"}),
    "route": ({"layers", "groups", "group_id"}, {}, set()),
    "shortcut": ({"from", "activation"}, {"weights_type": "none", "weights_normalization": "none"}, set()),
    "upsample": ({"stride", "scale"}, {}, set()),
    "yolo": ({"mask", "anchors", "classes", "num", "scale_x_y", "new_coords"}, {"embedding_layer": None},
             {"max", "show_details", "max_delta", "counters_per_class", "label_smooth_eps", "objectness_smooth",
              "iou_normalizer", "obj_normalizer", "cls_normalizer", "delta_normalizer", "iou_loss",
              "iou_thresh_kind", "beta_nms", "nms_kind", "jitter", "resize", "focal_loss", "ignore_thresh",
              "truth_thresh", "iou_thresh", "random", "track_history_size", "sim_thresh", "dets_for_track",
              "dets_for_show", "track_ciou_norm", "map"}),
}
_INT = re.compile(r"[+-]?[0-9]+")


class DarknetError(ModelError):
    """A Darknet .cfg or .weights file is malformed, unsupported, or the two do not match."""


@dataclass
class YoloHead:
    """One [yolo] layer's parameters (for decoding its raw map, the plan output `output`)."""

    layer: int
    output: str
    mask: list[int]
    anchors: list[tuple[float, float]]  # every anchor of the layer (w, h in input pixels); `mask` picks its own
    classes: int
    num: int
    scale_x_y: float
    new_coords: int
    stride: int  # input pixels per map cell (input height / map height)

    @property
    def own_anchors(self) -> list[tuple[float, float]]:
        """The anchors of this head's boxes, in the map's channel order."""
        return [self.anchors[m] for m in self.mask]


@dataclass
class DarknetLayer:
    """One layer of the .cfg after checking: its Darknet index, type, line and output shape (c, h, w)."""

    index: int
    type: str
    line: int
    shape: tuple[int, int, int]
    inputs: list[int] = field(default_factory=list)  # layers read (-1: the network input)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"layer {self.index} [{self.type}] (line {self.line})"

    def weight_count(self) -> int:
        """Floats this layer reads from the .weights file (0 for layers without weights)."""
        if self.type != "convolutional":
            return 0
        p = self.params
        n = p["filters"]
        return n * (4 if p["batch_normalize"] else 1) + n * (p["in_channels"] // p["groups"]) * p["size"] ** 2


@dataclass
class DarknetNetwork:
    """A checked .cfg: the input shape (c, h, w), the layers, the yolo heads."""

    name: str
    path: str
    input_shape: tuple[int, int, int]
    layers: list[DarknetLayer]
    heads: list[YoloHead]


@dataclass
class _Section:
    type: str
    line: int
    index: int  # Darknet's layer index (-1 for [net])
    items: dict[str, tuple[str, int]] = field(default_factory=dict)

    def label(self, line: int | None = None) -> str:
        name = "[net]" if self.index < 0 else f"layer {self.index} [{self.type}]"
        return f"{name} (line {line or self.line})"


class _Options:
    """The keys of one section, read as Darknet reads them (defaults where Darknet has them), checked."""

    def __init__(self, sec: _Section, path: str) -> None:
        self.sec, self.path = sec, path
        self.used: set[str] = set()

    def fail(self, msg: str, key: str | None = None) -> DarknetError:
        line = self.sec.items[key][1] if key in self.sec.items else None
        return DarknetError(f"{self.path}: {self.sec.label(line)}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.sec.items

    def raw(self, key: str) -> str | None:
        self.used.add(key)
        item = self.sec.items.get(key)
        return item[0] if item else None

    def int(self, key: str, default: int | None, lo: int = 1, hi: int = MAX_DIM) -> int:
        s = self.raw(key)
        if s is None:
            if default is None:
                raise self.fail(f"'{key}=' is missing")
            return default
        if not _INT.fullmatch(s):
            raise self.fail(f"'{key}={_clip(s)}' is not an integer", key)
        v = int(s)
        if not lo <= v <= hi:
            raise self.fail(f"'{key}={_clip(s)}' is out of range ({lo}..{hi})", key)
        return v

    def float(self, key: str, default: float) -> float:
        s = self.raw(key)
        if s is None:
            return default
        v = _to_float(s)
        if v is None:
            raise self.fail(f"'{key}={_clip(s)}' is not a finite number", key)
        return v

    def ints(self, key: str) -> list[int] | None:
        s = self.raw(key)
        if s is None:
            return None
        parts = s.split(",")
        if len(parts) > MAX_DIM or not all(_INT.fullmatch(p) for p in parts):
            raise self.fail(f"'{key}={_clip(s)}' is not a comma-separated list of integers", key)
        return [int(p) for p in parts]

    def floats(self, key: str) -> list[float] | None:
        s = self.raw(key)
        if s is None:
            return None
        vals = [_to_float(p) for p in s.split(",")[:MAX_DIM + 1]]
        if len(vals) > MAX_DIM or any(v is None for v in vals):
            raise self.fail(f"'{key}={_clip(s)}' is not a comma-separated list of numbers", key)
        return vals  # type: ignore[return-value]

    def check_rest(self, logger: Logger) -> None:
        """Keys nobody read: an error where they change what Darknet computes, else a warning (as Darknet's
        'Unused field')."""
        _, neutral, ignored = _KEYS.get(self.sec.type, (set(), {}, set()))
        neutral = {**_NEUTRAL_COMMON, **neutral}
        for key, (val, line) in self.sec.items.items():
            if key in self.used or key in ignored or key in _TRAINING_KEYS:
                continue
            if key in neutral:
                want = neutral[key]
                ok = want is not None and (val == want if isinstance(want, str) else _to_float(val) == want)
                if not ok:
                    raise DarknetError(f"{self.path}: {self.sec.label(line)}: '{key}={_clip(val)}' is not supported "
                                       "by Kiln's Darknet importer")
                continue
            if self.sec.type != "net":
                logger.warning(f"{self.path}: {self.sec.label(line)}: unknown key '{_clip(key)}' ignored "
                               "(as Darknet does)")


def _clip(s: str, n: int = 60) -> str:
    """A value from the file, cut for an error line."""
    return s if len(s) <= n else s[:n] + "..."


def _to_float(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if np.isfinite(v) else None


def _read_text(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise DarknetError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise DarknetError(f"{path}: not a regular file")
    size = os.path.getsize(path)
    if size > MAX_CFG_BYTES:
        raise DarknetError(f"{path}: {size} bytes, not a Darknet .cfg (the limit is {MAX_CFG_BYTES})")
    with open(path, "rb") as f:
        data = f.read(MAX_CFG_BYTES + 1)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise DarknetError(f"{path}: not a text file (is it the .weights?)")
    return text


def _sections(text: str, path: str, logger: Logger) -> list[_Section]:
    """Sections in file order; Darknet's line syntax (see the module docstring)."""
    out: list[_Section] = []
    layers = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        s = "".join(line.split())
        s = re.split(r"[#;]", s, maxsplit=1)[0]
        if not s:
            continue
        if s[0] == "[":
            if not s.endswith("]") or len(s) < 3:
                raise DarknetError(f"{path}: line {lineno}: malformed section header '{_clip(s)}'")
            name = s[1:-1]
            kind = _SECTION_ALIASES.get(name)
            if kind is None:
                what = "not supported by Kiln's Darknet importer" if name in _DARKNET_ONLY else "unknown"
                raise DarknetError(f"{path}: layer {layers} [{_clip(name)}] (line {lineno}): section type {what} "
                                   f"(supported: {', '.join(sorted(set(_SECTION_ALIASES.values()) - {'net'}))})")
            if kind == "net":
                if out:
                    raise DarknetError(f"{path}: line {lineno}: [{name}] must be the first section, and only one")
                out.append(_Section("net", lineno, -1))
                continue
            if not out:
                raise DarknetError(f"{path}: line {lineno}: the first section must be [net] or [network]")
            if layers >= MAX_LAYERS:
                raise DarknetError(f"{path}: line {lineno}: more than {MAX_LAYERS} layers")
            out.append(_Section(kind, lineno, layers))
            layers += 1
            continue
        key, eq, val = s.partition("=")
        if not eq or not key or not val:
            raise DarknetError(f"{path}: line {lineno}: expected key=value or [section], got '{_clip(s)}'")
        if not out:
            raise DarknetError(f"{path}: line {lineno}: '{_clip(key)}=' comes before the first section ([net])")
        sec = out[-1]
        if key in sec.items:
            logger.warning(f"{path}: {sec.label(lineno)}: '{_clip(key)}' given again (first at line {sec.items[key][1]}); "
                           "the first value is used, as Darknet does")
            continue
        sec.items[key] = (val, lineno)
    if not out:
        raise DarknetError(f"{path}: no sections: not a Darknet .cfg")
    if len(out) == 1:
        raise DarknetError(f"{path}: [net] is followed by no layers")
    return out


def parse_darknet_cfg(cfg_path: str | os.PathLike, logger: Logger | None = None) -> DarknetNetwork:
    """Read and check a Darknet .cfg: every layer's shape, inputs and parameters, and the yolo heads."""
    logger = logger or Logger()
    path = os.fspath(cfg_path)
    secs = _sections(_read_text(path, "Darknet .cfg"), path, logger)
    opts = _Options(secs[0], path)
    max_bytes = _max_activation_bytes()
    c, h, w = (opts.int(k, None) for k in ("channels", "height", "width"))
    opts.check_rest(logger)
    layers: list[DarknetLayer] = []
    heads: list[YoloHead] = []
    for sec in secs[1:]:
        opts = _Options(sec, path)
        prev = layers[-1].shape if layers else (c, h, w)
        if layers and layers[-1].type == "yolo" and sec.type != "route":  # a route names the layers it reads
            raise opts.fail("reads the output of the [yolo] layer before it, which is not supported")
        layer = _LAYER_PARSERS[sec.type](opts, sec, prev, layers)
        opts.check_rest(logger)
        nbytes = 4 * layer.shape[0] * layer.shape[1] * layer.shape[2]
        if nbytes > max_bytes:
            raise opts.fail(f"its output {'x'.join(map(str, layer.shape))} needs {nbytes} bytes, over the "
                            f"{max_bytes}-byte activation limit (KILN_MAX_ACTIVATION_BYTES)")
        layers.append(layer)
        if layer.type == "yolo":
            heads.append(_yolo_head(opts, layer, h))
    name = os.path.splitext(os.path.basename(path))[0] or "darknet"
    return DarknetNetwork(name, path, (c, h, w), layers, heads)


def _max_activation_bytes() -> int:
    from kiln.settings import settings
    return settings().max_activation_bytes


def _resolve(opts: _Options, key: str, idx: int, layers: list[DarknetLayer], index: int) -> int:
    j = index + idx if idx < 0 else idx
    if not 0 <= j < index:
        raise opts.fail(f"'{key}=' index {idx} is layer {j}, not a layer before this one (0..{index - 1})", key)
    if layers[j].type == "yolo":
        raise opts.fail(f"'{key}=' reads layer {j}, a [yolo] layer: not supported", key)
    return j


def _parse_conv(o: _Options, sec: _Section, prev: tuple[int, int, int], layers: list[DarknetLayer]) -> DarknetLayer:
    c, h, w = prev
    n = o.int("filters", None)
    size = o.int("size", 1)
    stride = o.int("stride", 1)
    sx, sy = o.int("stride_x", stride), o.int("stride_y", stride)
    groups = o.int("groups", 1)
    pad, padding = o.int("pad", 0, lo=0), o.int("padding", 0, lo=0)
    if pad:  # Darknet: pad=1 means "same" padding, whatever padding= says
        padding = size // 2
    if o.int("dilation", 1) != 1 and size != 1:
        raise o.fail("dilation other than 1 is not supported by Kiln's Darknet importer", "dilation")
    act = _activation(o, "logistic")
    bn = o.int("batch_normalize", 0, lo=0) != 0
    if c % groups or n % groups:
        raise o.fail(f"groups={groups} does not divide its {c} input channels and {n} filters", "groups")
    oh, ow = (h + 2 * padding - size) // sy + 1, (w + 2 * padding - size) // sx + 1
    if h + 2 * padding < size or w + 2 * padding < size:
        raise o.fail(f"size={size} is larger than its padded {h}x{w} input (padding {padding})", "size")
    return DarknetLayer(sec.index, sec.type, sec.line, (n, oh, ow), [sec.index - 1],
                        {"filters": n, "size": size, "strides": (sy, sx), "padding": padding, "groups": groups,
                         "activation": act, "batch_normalize": bn, "in_channels": c})


def _activation(o: _Options, default: str) -> str:
    act = o.raw("activation") or default
    if act not in ACTIVATIONS:
        raise o.fail(f"activation '{_clip(act)}' is not supported (supported: {', '.join(ACTIVATIONS)})", "activation")
    return act


def _parse_maxpool(o: _Options, sec: _Section, prev: tuple[int, int, int], layers: list[DarknetLayer]) -> DarknetLayer:
    c, h, w = prev
    stride = o.int("stride", 1)
    sx, sy = o.int("stride_x", stride), o.int("stride_y", stride)
    size = o.int("size", stride)
    padding = o.int("padding", size - 1, lo=0)
    before = padding // 2  # Darknet offsets windows by -padding/2; the output size uses all of it
    if padding - before >= size:
        raise o.fail(f"padding={padding} leaves windows of size {size} wholly outside the input: not supported",
                     "padding")
    if h + padding < size or w + padding < size:
        raise o.fail(f"size={size} is larger than its padded {h}x{w} input", "size")
    oh, ow = (h + padding - size) // sy + 1, (w + padding - size) // sx + 1
    return DarknetLayer(sec.index, sec.type, sec.line, (c, oh, ow), [sec.index - 1],
                        {"size": size, "strides": (sy, sx), "pads": (before, padding - before)})


def _parse_route(o: _Options, sec: _Section, prev: tuple[int, int, int], layers: list[DarknetLayer]) -> DarknetLayer:
    idx = o.ints("layers")
    if idx is None:
        raise o.fail("'layers=' is missing")
    srcs = [_resolve(o, "layers", i, layers, sec.index) for i in idx]
    groups = o.int("groups", 1)
    group_id = o.int("group_id", 0, lo=0, hi=groups - 1)
    first = layers[srcs[0]].shape
    channels = 0
    for j in srcs:
        cj, hj, wj = layers[j].shape
        if (hj, wj) != first[1:]:
            raise o.fail(f"layer {j} is {hj}x{wj}, layer {srcs[0]} is {first[1]}x{first[2]}: a route joins maps "
                         "of one size", "layers")
        if cj % groups:
            raise o.fail(f"groups={groups} does not divide the {cj} channels of layer {j}", "groups")
        channels += cj // groups
    return DarknetLayer(sec.index, sec.type, sec.line, (channels, first[1], first[2]), srcs,
                        {"groups": groups, "group_id": group_id})


def _parse_shortcut(o: _Options, sec: _Section, prev: tuple[int, int, int], layers: list[DarknetLayer]) -> DarknetLayer:
    idx = o.ints("from")
    if idx is None:
        raise o.fail("'from=' is missing")
    if sec.index == 0:
        raise o.fail("a shortcut cannot be the first layer")
    srcs = [_resolve(o, "from", i, layers, sec.index) for i in idx]
    for j in srcs:
        if layers[j].shape != prev:
            raise o.fail(f"adds layer {j} of shape {'x'.join(map(str, layers[j].shape))} to the previous layer's "
                         f"{'x'.join(map(str, prev))}: only equal shapes are supported", "from")
    act = _activation(o, "linear")
    return DarknetLayer(sec.index, sec.type, sec.line, prev, [sec.index - 1, *srcs], {"activation": act})


def _parse_upsample(o: _Options, sec: _Section, prev: tuple[int, int, int], layers: list[DarknetLayer]) -> DarknetLayer:
    c, h, w = prev
    if (o.raw("stride") or "").startswith("-"):
        raise o.fail("a negative stride (Darknet's downsampling) is not supported", "stride")
    stride = o.int("stride", 2)
    scale = o.float("scale", 1.0)
    return DarknetLayer(sec.index, sec.type, sec.line, (c, h * stride, w * stride), [sec.index - 1],
                        {"stride": stride, "scale": scale})


def _parse_yolo(o: _Options, sec: _Section, prev: tuple[int, int, int], layers: list[DarknetLayer]) -> DarknetLayer:
    c, h, w = prev
    if sec.index == 0:
        raise o.fail("a [yolo] layer cannot be the first layer")
    classes = o.int("classes", 20, lo=0)
    num = o.int("num", 1)
    mask = o.ints("mask")
    if mask is None:
        mask = list(range(num))
    bad = [m for m in mask if not 0 <= m < num]
    if bad:
        raise o.fail(f"mask value {bad[0]} is not an anchor index (num={num}: 0..{num - 1})", "mask")
    if c != len(mask) * (classes + 5):
        raise o.fail(f"the previous layer has {c} channels, but {len(mask)} masked anchors x ({classes} classes + 5) "
                     f"need {len(mask) * (classes + 5)}", "mask" if o.has("mask") else None)
    anchors = o.floats("anchors")
    if anchors is None:
        anchors = [0.5] * (2 * num)  # Darknet's default biases
    if len(anchors) < 2 * num:
        raise o.fail(f"{len(anchors)} anchor numbers for num={num} anchors (needs {2 * num})", "anchors")
    return DarknetLayer(sec.index, sec.type, sec.line, prev, [sec.index - 1],
                        {"mask": mask, "anchors": [(anchors[2 * i], anchors[2 * i + 1]) for i in range(num)],
                         "classes": classes, "num": num, "scale_x_y": o.float("scale_x_y", 1.0),
                         "new_coords": o.int("new_coords", 0, lo=0, hi=1)})


def _yolo_head(o: _Options, layer: DarknetLayer, net_h: int) -> YoloHead:
    p = layer.params
    return YoloHead(layer.index, f"yolo{layer.index}", p["mask"], p["anchors"], p["classes"], p["num"],
                    p["scale_x_y"], p["new_coords"], max(net_h // max(layer.shape[1], 1), 1))


_LAYER_PARSERS = {"convolutional": _parse_conv, "maxpool": _parse_maxpool, "route": _parse_route,
                  "shortcut": _parse_shortcut, "upsample": _parse_upsample, "yolo": _parse_yolo}


# ---- weights -------------------------------------------------------------------------------------------

@dataclass
class ConvWeights:
    """One convolutional layer's parameters as the .weights file holds them."""

    biases: np.ndarray                  # [filters]: the bias, or BN's beta
    weights: np.ndarray                 # [filters, c/groups, size, size]
    bn: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (scales, rolling mean, rolling variance)


def _header_size(major: int, minor: int) -> int:
    """12 bytes of version, then `seen`: a uint64 from version 0.2 on (and below 1000.x), else a uint32."""
    return 20 if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else 16


def read_darknet_weights(net: DarknetNetwork, weights_path: str | os.PathLike,
                         logger: Logger | None = None) -> tuple[tuple[int, int, int, int], dict[int, ConvWeights]]:
    """The header (major, minor, revision, seen) and each convolutional layer's parameters, by layer index.

    The file's length is checked against the .cfg before anything is read past the header."""
    logger = logger or Logger()
    path = os.fspath(weights_path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DarknetError(f"weights file not found: {path}") from None
    except OSError as e:
        raise DarknetError(f"{path}: cannot open ({e.strerror or type(e).__name__})") from None
    with f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise DarknetError(f"{path}: not a regular file")
        size = st.st_size
        head = f.read(16)
        if len(head) < 12:
            raise DarknetError(f"{path}: {size} bytes, too short for a Darknet weights header (16 or 20 bytes)")
        major, minor, revision = (int(x) for x in np.frombuffer(head[:12], "<i4"))
        hsize = _header_size(major, minor)
        if size < hsize:
            raise DarknetError(f"{path}: {size} bytes, too short for the header of version {major}.{minor} "
                               f"({hsize} bytes)")
        f.seek(12)
        seen = int(np.frombuffer(f.read(hsize - 12), "<u8" if hsize == 20 else "<u4")[0])
        convs = [lay for lay in net.layers if lay.weight_count()]
        need = hsize + 4 * sum(lay.weight_count() for lay in convs)
        if size != need:
            raise DarknetError(_length_error(path, net, convs, size, hsize, need))
        out: dict[int, ConvWeights] = {}
        for lay in convs:
            p = lay.params
            n, k = p["filters"], p["size"]
            biases = _read(f, n, path, lay)
            bn = (_read(f, n, path, lay), _read(f, n, path, lay), _read(f, n, path, lay)) if p["batch_normalize"] else None
            weights = _read(f, n * (p["in_channels"] // p["groups"]) * k * k, path, lay)
            out[lay.index] = ConvWeights(biases, weights.reshape(n, p["in_channels"] // p["groups"], k, k), bn)
            _check_values(out[lay.index], lay, path, logger)
    return (major, minor, revision, seen), out


def _length_error(path: str, net: DarknetNetwork, convs: list[DarknetLayer], size: int, hsize: int,
                  need: int) -> str:
    if size > need:
        last = f"the last weighted layer, {convs[-1].label}" if convs else "the header"
        extra = size - need
        return (f"{path}: {extra} byte{'s' if extra > 1 else ''} remain{'' if extra > 1 else 's'} after {last}: "
                f"these weights are not for {net.path} "
                f"(the file has {size} bytes, the .cfg needs {need})")
    offset = hsize
    for lay in convs:
        nbytes = 4 * lay.weight_count()
        if offset + nbytes > size:
            return (f"{path}: the weights end inside {lay.label}: it needs {nbytes} bytes from offset {offset}, "
                    f"{size - offset} remain (the file has {size} bytes, {net.path} needs {need})")
        offset += nbytes
    return f"{path}: {size} bytes, {net.path} needs {need}"  # not reached: size < need ends inside a layer


def _read(f: Any, count: int, path: str, lay: DarknetLayer) -> np.ndarray:
    buf = bytearray(4 * count)
    got = f.readinto(buf)
    if got != len(buf):  # the file shrank since its size was checked
        raise DarknetError(f"{path}: short read in {lay.label}")
    return np.frombuffer(buf, "<f4").astype(np.float32, copy=False)


def _check_values(cw: ConvWeights, lay: DarknetLayer, path: str, logger: Logger) -> None:
    arrays = [cw.biases, cw.weights, *(cw.bn or ())]
    if not all(np.isfinite(a).all() for a in arrays):
        logger.warning(f"{path}: {lay.label} has non-finite weights (NaN or infinity)")
    elif cw.bn is not None and (cw.bn[2] < -BN_EPSILON).any():
        logger.warning(f"{path}: {lay.label} has negative running variances: its outputs are NaN, as in Darknet")


# ---- graph ---------------------------------------------------------------------------------------------

def load_darknet(cfg_path: str | os.PathLike, weights_path: str | os.PathLike, logger: Logger | None = None, *,
                 batch: int | str = 1) -> Graph:
    """Import a Darknet .cfg and .weights into a Graph (input `input`, outputs the raw yolo head maps).

    batch: the input's batch dimension: a size, or a name (e.g. "N") for a dynamic batch."""
    import time
    t0 = time.perf_counter()
    logger = logger or Logger()
    if isinstance(batch, bool) or not (isinstance(batch, str) and batch or isinstance(batch, int) and batch >= 1):
        raise DarknetError(f"batch must be a positive size or a dimension name, got {batch!r}")
    net = parse_darknet_cfg(cfg_path, logger)
    header, weights = read_darknet_weights(net, weights_path, logger)
    g = _graph(net, weights, batch)  # typed as it is built (NetworkDefinition infers each layer)
    count = sum(lay.weight_count() for lay in net.layers)
    logger.info(f"Imported Darknet '{net.name}' ({len(net.layers)} layers, {count} weights, weights file version "
                f"{header[0]}.{header[1]}.{header[2]}) in {time.perf_counter() - t0:.2f} s")
    return g


def _graph(net: DarknetNetwork, weights: dict[int, ConvWeights], batch: int | str) -> Graph:
    from kiln.frontend.network import NetworkDefinition
    nd = NetworkDefinition(net.name, opset=21)
    x = nd.add_input("input", DType.FLOAT32, (batch, *net.input_shape))
    out: list[Value] = []
    for lay in net.layers:
        prev = out[-1] if out else x
        name, p = f"{'conv' if lay.type == 'convolutional' else lay.type}{lay.index}", lay.params
        if lay.type == "convolutional":
            cw = weights[lay.index]
            k, pd = p["size"], p["padding"]
            args: list[Value | None] = [prev, nd.add_constant(cw.weights, f"{name}.weight")]
            if cw.bn is None:
                args.append(nd.add_constant(cw.biases, f"{name}.bias"))
            y = nd.add_layer("Conv", args, name=name, kernel_shape=[k, k], strides=list(p["strides"]),
                             pads=[pd, pd, pd, pd], group=p["groups"], dilations=[1, 1])
            if cw.bn is not None:
                scales, mean, var = cw.bn
                y = nd.add_layer("BatchNormalization", [y, nd.add_constant(scales, f"{name}.bn.scale"),
                                                        nd.add_constant(cw.biases, f"{name}.bn.bias"),
                                                        nd.add_constant(mean, f"{name}.bn.mean"),
                                                        nd.add_constant(var, f"{name}.bn.var")],
                                 name=f"{name}_bn", epsilon=BN_EPSILON)
            y = _activate(nd, y, p["activation"], name)
        elif lay.type == "maxpool":
            before, after = p["pads"]
            y = nd.add_layer("MaxPool", [prev], name=name, kernel_shape=[p["size"]] * 2, strides=list(p["strides"]),
                             pads=[before, before, after, after])
        elif lay.type == "route":
            parts = [_group(nd, out[j], net.layers[j].shape[0], p["groups"], p["group_id"], f"{name}_part{k}")
                     for k, j in enumerate(lay.inputs)]
            y = parts[0] if len(parts) == 1 else nd.add_layer("Concat", parts, name=name, axis=1)
        elif lay.type == "shortcut":
            y = prev
            for k, j in enumerate(lay.inputs[1:]):
                y = nd.add_layer("Add", [y, out[j]], name=name if k == 0 else f"{name}_{k}")
            y = _activate(nd, y, p["activation"], name)
        elif lay.type == "upsample":
            s = float(p["stride"])
            y = prev
            if p["stride"] != 1:
                y = nd.add_layer("Resize", [prev, None, nd.add_constant(np.array([1, 1, s, s], np.float32),
                                                                        f"{name}.scales")],
                                 name=name, mode="nearest", coordinate_transformation_mode="asymmetric",
                                 nearest_mode="floor")
            if p["scale"] != 1.0:
                y = nd.add_layer("Mul", [y, nd.add_constant(np.array(p["scale"], np.float32), f"{name}.scale")],
                                 name=f"{name}_scale")
        else:  # yolo: the map feeding it is a plan output
            y = prev
        out.append(y)
    if net.heads:
        for head in net.heads:
            nd.mark_output(out[head.layer], head.output)
    else:
        nd.mark_output(out[-1], "output")
    return nd.graph


def _group(nd: Any, v: Value, channels: int, groups: int, group_id: int, name: str) -> Value:
    if groups == 1:
        return v
    part = channels // groups
    consts = [nd.add_constant(np.array([a], np.int64), f"{name}.{what}")
              for a, what in ((group_id * part, "starts"), ((group_id + 1) * part, "ends"), (1, "axes"))]
    return nd.add_layer("Slice", [v, *consts], name=name)


def _activate(nd: Any, y: Value, act: str, name: str) -> Value:
    if act == "linear":
        return y
    if act == "leaky":
        return nd.add_layer("LeakyRelu", [y], name=f"{name}_leaky", alpha=LEAKY_ALPHA)
    if act == "swish":
        return nd.add_layer("Mul", [y, nd.add_layer("Sigmoid", [y], name=f"{name}_sigmoid")], name=f"{name}_swish")
    if act == "relu6":
        lo, hi = (nd.add_constant(np.array(v, np.float32), f"{name}.{k}") for k, v in (("min", 0.0), ("max", 6.0)))
        return nd.add_layer("Clip", [y, lo, hi], name=f"{name}_relu6")
    op = {"mish": "Mish", "logistic": "Sigmoid", "relu": "Relu", "tanh": "Tanh"}[act]
    return nd.add_layer(op, [y], name=f"{name}_{act}")
