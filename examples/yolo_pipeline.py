"""YOLOv4 / YOLOv4-tiny object detection with Kiln, end to end (shared by examples/yolov4_tiny/detect.py and
examples/yolov4/detect.py).

    letterbox (host) -> upload -> Kiln plan: network + YoloDecode + BatchedNMS -> download -> boxes drawn (Pillow)

The plan is built from the Darknet .cfg and .weights with decode and NMS appended (`kiln build X.cfg --weights
W --detect`, kiln.frontend.detect): its inputs are the letterboxed image [1, 3, S, S] and `letterbox` [1, 4]
(scale_x, scale_y, pad_x, pad_y), its outputs num_detections, det_boxes (original-image pixels), det_scores,
det_classes. On CUDA the ExecutionContext replays the whole plan (network, decode and NMS) as one CUDA graph;
the sample uploads into the graph's static input buffers from pinned host memory.

Without --weights the sample writes random weights (seeded): BN statistics are set from one forward pass on
the image so that activations stay in range, and the yolo maps' weights make a few boxes pass the threshold
with one class per anchor. Such detections are meaningless; the sample runs the same with the real Darknet
weights (yolov4-tiny.weights, yolov4.weights, which fit these .cfg files).
"""
from __future__ import annotations

import argparse
import colorsys
import hashlib
import io
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from kiln.errors import KilnError

GRAY = 114
STAGES = ("preprocess", "upload", "inference", "download", "draw")
CACHE_DIR = os.path.join(tempfile.gettempdir(), "kiln-examples")
# random weights: the spread of a yolo map's tw, th logits (boxes near their anchors' sizes) and objectness
# logits (a steep tail: few boxes near the top), and the share of boxes whose objectness is above 0.5
_SIZE_SPREAD, _OBJ_SPREAD, _OBJ_SHARE = 0.3, 3.0, 0.001

COCO_NAMES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")


class SampleError(Exception):
    """A bad input or setting of the sample: one line on stderr, exit status 2."""


def require_pillow() -> Any:
    """The PIL package (Image, ImageDraw, ImageFont), or SampleError saying how to install it."""
    try:
        import PIL.Image
        import PIL.ImageDraw
        import PIL.ImageFont  # noqa: F401
    except ImportError:
        raise SampleError("this sample reads and draws images with Pillow, which is not installed: "
                          "pip install pillow") from None
    return PIL


# ---- images --------------------------------------------------------------------------------------------

def draw_test_image(width: int = 640, height: int = 480, seed: int = 0) -> Any:
    """A synthetic RGB test image: a gradient background with filled rectangles, ellipses and triangles."""
    PIL = require_pillow()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    bg = np.stack([60 + 80 * xx / width, 90 + 60 * yy / height, 140 + 0 * xx], -1).astype(np.uint8)
    img = PIL.Image.fromarray(bg, "RGB")
    d = PIL.ImageDraw.Draw(img)
    for k in range(7):
        w, h = (int(v) for v in rng.integers(width // 10, width // 3, 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = k % 3
        if kind == 0:
            d.rectangle([x, y, x + w, y + h], fill=color, outline=(0, 0, 0), width=2)
        elif kind == 1:
            d.ellipse([x, y, x + w, y + h], fill=color, outline=(255, 255, 255), width=2)
        else:
            d.polygon([(x + w // 2, y), (x, y + h), (x + w, y + h)], fill=color)
    return img


def load_image(path: str) -> Any:
    """An image file as an RGB PIL image (SampleError, one line, for a missing or unreadable file)."""
    PIL = require_pillow()
    if not os.path.isfile(path):
        raise SampleError(f"--image {path}: file not found")
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise SampleError(f"--image {path}: cannot read it as an image ({type(e).__name__})") from None


def letterbox(img: Any, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(canvas [height, width, 3] uint8, [scale_x, scale_y, pad_x, pad_y] float32): img resized keeping its
    aspect ratio (bilinear) to fit, centred on a GRAY canvas. A point x of img is at x * scale_x + pad_x."""
    PIL = require_pillow()
    w0, h0 = img.size
    r = min(width / w0, height / h0)
    nw, nh = min(width, max(1, round(w0 * r))), min(height, max(1, round(h0 * r)))
    px, py = (width - nw) // 2, (height - nh) // 2
    canvas = np.full((height, width, 3), GRAY, np.uint8)
    canvas[py:py + nh, px:px + nw] = np.asarray(img.resize((nw, nh), PIL.Image.BILINEAR))
    return canvas, np.array([nw / w0, nh / h0, px, py], np.float32)


def network_input(canvas: np.ndarray) -> np.ndarray:
    """A letterboxed canvas [H, W, 3] uint8 as the network takes it: [1, 3, H, W] float32 RGB in [0, 1]."""
    return canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255


def class_color(k: int) -> tuple[int, int, int]:
    """A bright colour per class (hues spread by the golden ratio)."""
    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(img: Any, dets: "Detections", names: Sequence[str]) -> tuple[Any, int]:
    """A copy of img with each detection's box (clipped to the image) and label; returns it and the number of
    boxes drawn (boxes wholly outside the image, or not finite, are skipped)."""
    PIL = require_pillow()
    out = img.copy()
    d = PIL.ImageDraw.Draw(out)
    w, h = out.size
    line = max(2, round(min(w, h) / 200))
    try:
        font = PIL.ImageFont.load_default(size=max(12, min(w, h) // 40))
    except TypeError:  # Pillow < 10.1
        font = PIL.ImageFont.load_default()
    drawn = 0
    for (x1, y1, x2, y2), score, cls in zip(dets.boxes, dets.scores, dets.classes):
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            continue
        bx1, by1, bx2, by2 = max(0.0, x1), max(0.0, y1), min(w - 1.0, x2), min(h - 1.0, y2)
        if bx2 <= bx1 or by2 <= by1:
            continue
        color = class_color(int(cls))
        d.rectangle([bx1, by1, bx2, by2], outline=color, width=line)
        label = f"{names[cls] if 0 <= cls < len(names) else f'class {cls}'} {score:.2f}"
        tx1, ty1, tx2, ty2 = d.textbbox((bx1, by1), label, font=font)
        ty = by1 - (ty2 - ty1) - 2 if by1 - (ty2 - ty1) - 2 >= 0 else by1  # above the box, else inside it
        lx = max(0.0, min(bx1, w - (tx2 - tx1) - 4))  # kept inside the image
        d.rectangle([lx, ty, lx + (tx2 - tx1) + 4, ty + (ty2 - ty1) + 2], fill=color)
        d.text((lx + 2, ty - (ty1 - by1)), label, fill=(0, 0, 0), font=font)
        drawn += 1
    return out, drawn


def save_png(img: Any, path: str) -> None:
    """Write img as PNG atomically (kiln.fileio.atomic_write: no half-written file)."""
    from kiln.fileio import atomic_write
    buf = io.BytesIO()
    img.save(buf, "PNG")
    atomic_write(path, buf.getvalue(), "image")


# ---- the network files ---------------------------------------------------------------------------------

def cfg_with_size(cfg: str, size: int | None, folder: str) -> str:
    """cfg itself, or (size given and not the cfg's own) a copy in `folder` with [net] width=height=size."""
    from kiln.frontend.darknet import parse_darknet_cfg
    from kiln.fileio import atomic_write
    net = parse_darknet_cfg(cfg, _quiet())
    if size is None or net.input_shape[1:] == (size, size):
        return cfg
    if size < 32 or size % 32:
        raise SampleError(f"--size must be a positive multiple of 32 (the network's total stride), got {size}")
    text = open(cfg, encoding="utf-8-sig").read()
    lines, in_net, done = text.split("\n"), False, set()
    for i, ln in enumerate(lines):
        s = "".join(ln.split())
        if s.startswith("["):
            in_net = s in ("[net]", "[network]")
            continue
        m = re.match(r"(width|height)=", s)
        if in_net and m and m.group(1) not in done:
            lines[i] = f"{m.group(1)}={size}"
            done.add(m.group(1))
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, f"{os.path.splitext(os.path.basename(cfg))[0]}-{size}.cfg")
    atomic_write(out, "\n".join(lines).encode(), "cfg")
    parse_darknet_cfg(out, _quiet())  # the copy reads back at the new size
    return out


def _quiet() -> Any:
    from kiln.logger import Logger, Severity
    return Logger(Severity.ERROR)


def _activate(y: Any, act: str) -> Any:
    import torch
    import torch.nn.functional as F
    if act == "leaky":
        return F.leaky_relu(y, 0.1)
    if act == "mish":
        return F.mish(y)
    if act == "logistic":
        return torch.sigmoid(y)
    if act == "relu":
        return F.relu(y)
    if act == "relu6":
        return F.relu6(y)
    if act == "swish":
        return F.silu(y)
    if act == "tanh":
        return torch.tanh(y)
    return y


def write_random_weights(cfg: str, path: str, seed: int, image: np.ndarray) -> None:
    """A Darknet .weights file for cfg with random weights (seeded), scaled by one forward pass in torch on
    `image` [N, 3, H, W] (float32 in [0, 1], H and W multiples of the network's stride): each BN layer's
    running mean and variance are the image's statistics (so every activation stays near unit scale however
    deep the network: statistics of other images would drift through YOLOv4's 110 layers), and each
    convolution without BN is scaled to unit output spread per channel; the maps feeding the yolo layers are
    set up by _head_weights."""
    import torch
    import torch.nn.functional as F
    from kiln.frontend.darknet import parse_darknet_cfg
    from kiln.fileio import atomic_write
    net = parse_darknet_cfg(cfg, _quiet())
    gen = torch.Generator().manual_seed(seed)
    heads = {h.layer - 1: h for h in net.heads}  # the layer whose output a yolo layer reads
    chunks = [np.array([0, 2, 5], "<i4").tobytes(), np.array([0], "<u8").tobytes()]
    outs: list[Any] = []
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))
    with torch.no_grad():
        for lay in net.layers:
            p, prev = lay.params, outs[-1] if outs else x
            if lay.type == "convolutional":
                n, cg, k = p["filters"], p["in_channels"] // p["groups"], p["size"]
                w = torch.randn((n, cg, k, k), generator=gen) / math.sqrt(cg * k * k)
                y = F.conv2d(prev, w, None, p["strides"], p["padding"], 1, p["groups"])
                if p["batch_normalize"]:
                    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False).clamp_min(1e-4)
                    ones = torch.ones(n)
                    chunks += [torch.zeros(n).numpy().tobytes(), ones.numpy().tobytes(),
                               mean.numpy().astype("<f4").tobytes(), var.numpy().astype("<f4").tobytes()]
                    y = (y - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)
                else:
                    w = w / y.std((0, 2, 3)).clamp_min(1e-6)[:, None, None, None]  # unit spread
                    bias = torch.zeros(n)
                    if lay.index in heads:
                        w, bias = _head_weights(w, y, len(heads[lay.index].mask), gen)
                    y = F.conv2d(prev, w, bias, p["strides"], p["padding"], 1, p["groups"])
                    chunks.append(bias.numpy().astype("<f4").tobytes())
                chunks.append(w.numpy().astype("<f4").tobytes())
                y = _activate(y, p["activation"])
            elif lay.type == "maxpool":
                before, after = p["pads"]
                y = F.max_pool2d(F.pad(prev, (before, after, before, after), value=float("-inf")), p["size"],
                                 p["strides"])
            elif lay.type == "route":
                parts = []
                for j in lay.inputs:
                    c = outs[j].shape[1] // p["groups"]
                    parts.append(outs[j][:, p["group_id"] * c:(p["group_id"] + 1) * c])
                y = torch.cat(parts, 1)
            elif lay.type == "shortcut":
                y = prev
                for j in lay.inputs[1:]:
                    y = y + outs[j]
                y = _activate(y, p["activation"])
            elif lay.type == "upsample":
                y = F.interpolate(prev, scale_factor=p["stride"], mode="nearest") * p["scale"]
            else:  # yolo
                y = prev
            outs.append(y)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, b"".join(chunks), "weights")


def _head_weights(w: Any, y: Any, anchors: int, gen: Any) -> tuple[Any, Any]:
    """Random weights of the convolution feeding a yolo layer (w: unit output spread per channel; y: its output
    on the calibration image before scaling): per anchor, tx and ty as they are, tw and th spread
    _SIZE_SPREAD, objectness spread _OBJ_SPREAD and biased so that a share _OBJ_SHARE of the image's boxes is
    above 0.5, and one class, drawn per anchor, clearly first everywhere (class weights zero): each box gets
    one label."""
    import torch
    n = int(w.shape[0])
    per = n // anchors  # tx, ty, tw, th, objectness, classes
    w = w.clone().view(anchors, per, *w.shape[1:])
    bias = torch.zeros(anchors, per)
    w[:, 2:4] *= _SIZE_SPREAD
    w[:, 4] *= _OBJ_SPREAD
    obj = (y / y.std((0, 2, 3)).clamp_min(1e-6)[None, :, None, None]).view(y.shape[0], anchors, per, -1)[:, :, 4]
    obj = obj * _OBJ_SPREAD
    bias[:, 4] = -float(torch.quantile(obj.reshape(-1), 1 - _OBJ_SHARE))
    w[:, 5:] = 0
    bias[:, 5:] = -4.0
    first = torch.randint(0, per - 5, (anchors,), generator=gen)
    bias[torch.arange(anchors), 5 + first] = 3.0
    return w.view(n, *w.shape[2:]), bias.view(n)


def random_weights_path(cfg: str, seed: int, image: np.ndarray, folder: str) -> str:
    """The cached random weights of cfg's layer layout, seed and BN-statistics image (written on first use)."""
    from kiln.frontend.darknet import parse_darknet_cfg
    net = parse_darknet_cfg(cfg, _quiet())
    layout = [(lay.type, lay.weight_count(), lay.params.get("activation"), lay.inputs) for lay in net.layers]
    h = hashlib.sha256(json.dumps([layout, _SIZE_SPREAD, _OBJ_SPREAD, _OBJ_SHARE]).encode())
    h.update(np.ascontiguousarray(image, np.float32).tobytes())
    path = os.path.join(folder, f"{net.name}-random-{h.hexdigest()[:16]}-seed{seed}.weights")
    need = 20 + 4 * sum(lay.weight_count() for lay in net.layers)
    if not (os.path.isfile(path) and os.path.getsize(path) == need):
        write_random_weights(cfg, path, seed, image)
    return path


# ---- the plan ------------------------------------------------------------------------------------------

@dataclass
class BuildSettings:
    """What a plan is built from and for; its key names a cached plan."""

    cfg: str
    weights: str
    device: str
    fp16: bool = False
    int8: bool = False
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 100
    opt_level: int = 3

    def key(self) -> dict[str, Any]:
        from kiln import __version__
        return {"cfg": _sha256(self.cfg), "weights": _sha256(self.weights), "device": self.device,
                "fp16": self.fp16, "int8": self.int8, "conf": self.conf, "iou": self.iou, "max_det": self.max_det,
                "opt_level": self.opt_level, "kiln": __version__}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_plan(s: BuildSettings, calibration: list[dict[str, np.ndarray]] | None = None) -> Any:
    """The detection plan: the .cfg + .weights imported, decode + NMS appended, built for s.device."""
    from kiln.builder import Builder, BuilderConfig
    from kiln.frontend.darknet import load_darknet, parse_darknet_cfg
    from kiln.frontend.detect import append_detection
    graph = load_darknet(s.cfg, s.weights, _quiet())
    append_detection(graph, parse_darknet_cfg(s.cfg, _quiet()).heads, conf=s.conf, iou=s.iou, max_det=s.max_det)
    cfg = BuilderConfig(device=s.device, fp16=s.fp16, int8=s.int8, optimization_level=s.opt_level,
                        calibration_data=calibration if s.int8 else None)
    return Builder(_quiet()).build(graph, cfg)


def load_or_build(s: BuildSettings, plan_path: str | None, calibration: list[dict[str, np.ndarray]] | None,
                  rebuild: bool = False) -> tuple[Any, str, str]:
    """(Engine, plan path, what happened). Default plan_path: a file in CACHE_DIR named by the settings' key.
    A plan this sample built has a sidecar `<plan>.json` with its settings: it is loaded when they are these,
    else rebuilt. A plan given without a sidecar (e.g. from `kiln build X.cfg --weights W --detect`) is used as
    it is, if it is a detection plan. --rebuild builds in any case."""
    from kiln.fileio import atomic_write
    from kiln.frontend.detect import DETECTION_OUTPUTS, LETTERBOX_INPUT
    from kiln.plan.format import save_plan
    from kiln.runtime.engine import Engine
    key = s.key()
    given = plan_path is not None
    if plan_path is None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = os.path.splitext(os.path.basename(s.cfg))[0]
        plan_path = os.path.join(CACHE_DIR, f"{name}-{s.device}-{digest}.kiln")
    side = plan_path + ".json"
    if not rebuild and os.path.isfile(plan_path):
        if not os.path.exists(side) and given:
            engine = Engine.load(plan_path)
            shape = engine.input_specs.get("input", {}).get("shape") or []
            if (engine.input_names != ["input", LETTERBOX_INPUT] or engine.output_names != list(DETECTION_OUTPUTS)
                    or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:])):
                raise SampleError(f"--plan {plan_path}: not a detection plan of this sample (inputs "
                                  f"{', '.join(engine.input_names)}; outputs {', '.join(engine.output_names)}): "
                                  "build one with `kiln build X.cfg --weights W --detect`, or pass --rebuild")
            return engine, plan_path, "loaded as given: its own build settings apply"
        try:
            with open(side) as f:
                same = json.load(f) == key
        except (OSError, ValueError):
            same = False
        if same:
            try:
                return Engine.load(plan_path), plan_path, "loaded the cached plan"
            except KilnError as e:
                print(f"note: rebuilding: the cached plan does not load ({e})")
    t0 = time.perf_counter()
    plan = build_plan(s, calibration)
    secs = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(plan_path)), exist_ok=True)
    if os.path.lexists(side):  # never a sidecar describing another plan than the one beside it
        os.remove(side)
    save_plan(plan, plan_path)
    atomic_write(side, json.dumps(key, sort_keys=True).encode(), "plan settings")
    return Engine(plan, plan_path), plan_path, f"built in {secs:.1f} s"


# ---- running -------------------------------------------------------------------------------------------

@dataclass
class Detections:
    """One image's detections: boxes [K, 4] (x1, y1, x2, y2, original-image pixels), scores [K], classes [K]."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @classmethod
    def of(cls, outs: dict[str, np.ndarray], i: int = 0) -> "Detections":
        k = int(outs["num_detections"][i, 0])
        return cls(outs["det_boxes"][i, :k].astype(np.float64), outs["det_scores"][i, :k].astype(np.float64),
                   outs["det_classes"][i, :k].astype(np.int64))


class Detector:
    """The four stages around an Engine: preprocess (letterbox), upload, inference, download.

    On CUDA, upload copies the host arrays through pinned memory into the CUDA graph's static input
    buffers (after the first run, which captures the graph), inference replays the graph (network, decode
    and NMS: no host work between), download copies the four small outputs back. On the CPU the engine
    reads the host arrays: upload and download do nothing."""

    def __init__(self, engine: Any) -> None:
        import torch
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.ctx = engine.create_execution_context()
        shape = engine.input_specs["input"]["shape"]
        self.height, self.width = int(shape[2]), int(shape[3])
        self._dev: dict[str, Any] = {}
        self._pinned: dict[str, Any] = {}
        if self.cuda:  # device buffers for the first (capturing) run; the graph's own ones after it
            self._dev = {"input": torch.empty((1, 3, self.height, self.width), device=engine.device),
                         "letterbox": torch.empty((1, 4), device=engine.device)}

    def preprocess(self, img: Any) -> tuple[np.ndarray, np.ndarray]:
        """(input [1, 3, H, W] float32 RGB in [0, 1], letterbox [1, 4] float32)."""
        canvas, lb = letterbox(img, self.height, self.width)
        return network_input(canvas), lb[None]

    def upload(self, x: np.ndarray, lb: np.ndarray) -> dict[str, Any]:
        """The inputs as the engine takes them (on CUDA: device tensors, copied in and synchronized)."""
        if not self.cuda:
            return {"input": x, "letterbox": lb}
        import torch
        bufs = self.ctx.input_buffers() or self._dev
        for name, host in (("input", x), ("letterbox", lb)):
            dst = bufs[name]
            pin = self._pinned.get(name)
            if pin is None or pin.stride() != dst.stride():  # same strides: the device copy is one memcpy
                pin = self._pinned[name] = torch.empty_strided(dst.shape, dst.stride(), dtype=dst.dtype,
                                                               pin_memory=True)
            pin.copy_(torch.from_numpy(host))
            dst.copy_(pin, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return bufs

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """One run of the plan (network + decode + NMS), finished when this returns."""
        if not self.cuda:
            return self.ctx.execute(feeds)
        import torch
        outs = self.ctx.execute_async(feeds)
        torch.cuda.current_stream().synchronize()
        return outs

    def download(self, outs: dict[str, Any]) -> dict[str, np.ndarray]:
        if not self.cuda:
            return outs
        return {k: v.cpu().numpy() for k, v in outs.items()}

    @property
    def graph_note(self) -> str:
        """Whether inference replays one CUDA graph (after a run), and why not."""
        if not self.cuda:
            return "CPU: no CUDA graph"
        if self.ctx.last_graph is not None:
            return "one CUDA graph per run: network + decode + NMS"
        return f"no CUDA graph ({self.engine.graph_reason or 'capture failed: see the warning'})"


@dataclass
class Result:
    """What a run of the sample produced."""

    detections: Detections
    image_size: tuple[int, int]
    out: str | None
    drawn: int
    plan: str
    stages_ms: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    letterbox: np.ndarray | None = None


def time_pipeline(det: Detector, img: Any, names: Sequence[str], runs: int
                  ) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray, Any, int]:
    """One warm-up run (CUDA: captures the graph), then `runs` timed ones: the median ms of each stage,
    the last run's outputs, letterbox, drawn image and number of boxes drawn."""
    def once(times: dict[str, list[float]] | None) -> tuple[dict[str, np.ndarray], np.ndarray, Any, int]:
        t = [time.perf_counter()]
        x, lb = det.preprocess(img)
        t.append(time.perf_counter())
        feeds = det.upload(x, lb)
        t.append(time.perf_counter())
        outs = det.infer(feeds)
        t.append(time.perf_counter())
        host = det.download(outs)
        t.append(time.perf_counter())
        drawn_img, drawn = draw_detections(img, Detections.of(host), names)
        t.append(time.perf_counter())
        if times is not None:
            for k, name in enumerate(STAGES):
                times[name].append((t[k + 1] - t[k]) * 1e3)
        return host, lb, drawn_img, drawn

    once(None)
    times: dict[str, list[float]] = {name: [] for name in STAGES}
    for _ in range(max(1, runs)):
        host, lb, drawn_img, drawn = once(times)
    med = {name: statistics.median(v) for name, v in times.items()}
    med["total"] = statistics.median([sum(v[i] for v in times.values()) for i in range(len(times["draw"]))])
    return med, {k: np.array(v) for k, v in host.items()}, lb, drawn_img, drawn


def parser(description: str, default_cfg: str, default_runs: int) -> argparse.ArgumentParser:
    """The sample's flags."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--cfg", default=default_cfg, help="Darknet .cfg (default: %(default)s)")
    p.add_argument("--weights", help="Darknet .weights for --cfg (default: random weights, seeded: the "
                   "detections are meaningless)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.add_argument("--image", help="image file (default: a drawn test image of shapes)")
    p.add_argument("--size", type=int, help="network input size, a multiple of 32 (default: the .cfg's)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                   help="Kiln target (default: cuda when a GPU is present)")
    p.add_argument("--fp16", action="store_true", help="float16 layers (CUDA; the CPU target builds float32)")
    p.add_argument("--int8", action="store_true", help="INT8 layers, calibrated on the input image and drawn "
                   "test images (for real use, calibrate on representative images)")
    p.add_argument("--opt-level", type=int, default=3, help="Kiln optimization level (default: %(default)s; "
                   "0: no tactic timing, fastest build)")
    p.add_argument("--conf", type=float, default=0.25, help="score threshold (default: %(default)s)")
    p.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (default: %(default)s)")
    p.add_argument("--max-det", type=int, default=100, help="most detections per image (default: %(default)s)")
    p.add_argument("--names", help="class names, one a line (default: COCO's for 80 classes)")
    p.add_argument("--plan", help="plan file to reuse or write (default: a file under %s named by the settings)"
                   % CACHE_DIR)
    p.add_argument("--rebuild", action="store_true", help="build the plan even when a cached one fits")
    p.add_argument("--out", default="boxes.png", help="PNG with the boxes drawn (default: %(default)s)")
    p.add_argument("--runs", type=int, default=default_runs, help="timed runs; the table shows medians "
                   "(default: %(default)s)")
    return p


def _device(choice: str) -> str:
    import torch
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    return choice


def _names(path: str | None, classes: int) -> list[str]:
    if path is None:
        return list(COCO_NAMES) if classes == len(COCO_NAMES) else [f"class {k}" for k in range(classes)]
    try:
        with open(path, encoding="utf-8") as f:
            names = [ln.strip() for ln in f if ln.strip()]
    except OSError as e:
        raise SampleError(f"--names {path}: {e.strerror or type(e).__name__}") from None
    if len(names) < classes:
        raise SampleError(f"--names {path}: {len(names)} names for {classes} classes")
    return names


def run(argv: Sequence[str] | None, title: str, default_cfg: str, default_runs: int = 10) -> Result:
    """The sample (see `parser`); prints what it does and the latency table. SampleError / KilnError on bad
    input."""
    from kiln.frontend.darknet import parse_darknet_cfg
    from kiln.frontend.detect import check_detect_options
    args = parser(title, default_cfg, default_runs).parse_args(argv)
    require_pillow()
    check_detect_options(args.conf, args.iou, args.max_det)
    if args.runs < 1:
        raise SampleError(f"--runs must be >= 1, got {args.runs}")
    if args.opt_level < 0:
        raise SampleError(f"--opt-level must be >= 0, got {args.opt_level}")
    from kiln.fileio import check_writable
    check_writable(args.out, "image")
    device = _device(args.device)
    img = load_image(args.image) if args.image else draw_test_image(seed=args.seed)
    cfg = cfg_with_size(args.cfg, args.size, CACHE_DIR)
    net = parse_darknet_cfg(cfg, _quiet())
    classes = net.heads[0].classes if net.heads else 0
    names = _names(args.names, classes)
    h, w = net.input_shape[1:]
    if args.weights:
        weights, what = args.weights, f"weights {args.weights}"
    else:
        weights = random_weights_path(cfg, args.seed, network_input(letterbox(img, h, w)[0]), CACHE_DIR)
        what = (f"RANDOM weights (seed {args.seed}, BN statistics from this image): the detections are "
                "meaningless; pass --weights for real ones")
    shown = os.path.relpath(args.cfg) if not os.path.relpath(args.cfg).startswith("..") else args.cfg
    print(f"{title}: {shown}, input {net.input_shape[2]}x{net.input_shape[1]}, {classes} classes, {what}")
    calibration = None
    if args.int8:
        shots = [img] + [draw_test_image(seed=args.seed + 1 + k) for k in range(7)]
        calibration = []
        for im in shots:
            canvas, lb = letterbox(im, h, w)
            calibration.append({"input": network_input(canvas), "letterbox": lb[None]})
    settings = BuildSettings(cfg, weights, device, args.fp16, args.int8, args.conf, args.iou, args.max_det,
                             args.opt_level)
    engine, plan_path, how = load_or_build(settings, args.plan, calibration, args.rebuild)
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    if args.fp16 and device == "cpu":
        precision = "fp32: the CPU target has no float16 kernels, --fp16 builds float32 there"
    print(f"plan: {plan_path} ({how}; {device}, {precision}, optimization level {args.opt_level})")
    det = Detector(engine)
    stages, outs, lb, drawn_img, drawn = time_pipeline(det, img, names, args.runs)
    save_png(drawn_img, args.out)
    dets = Detections.of(outs)
    src = args.image or f"a drawn test image (seed {args.seed})"
    print(f"image: {src}, {img.size[0]}x{img.size[1]}; letterbox scale {lb[0, 0]:.4f} x {lb[0, 1]:.4f}, "
          f"pad ({lb[0, 2]:g}, {lb[0, 3]:g})")
    print(f"{len(dets.scores)} detections (score > {args.conf:g}, NMS IoU {args.iou:g}, at most {args.max_det}):")
    for (x1, y1, x2, y2), s, c in list(zip(dets.boxes, dets.scores, dets.classes))[:20]:
        name = names[c] if 0 <= c < len(names) else str(c)
        print(f"  {name:>14s} {s:.3f}  ({x1:7.1f}, {y1:7.1f}) - ({x2:7.1f}, {y2:7.1f})")
    if len(dets.scores) > 20:
        print(f"  ... and {len(dets.scores) - 20} more")
    print(f"wrote {args.out} ({img.size[0]}x{img.size[1]}, {drawn} boxes drawn)")
    print(f"latency per image, median of {args.runs} runs ({det.graph_note}):")
    notes = {"preprocess": "letterbox to %dx%d (Pillow, host)" % (det.width, det.height),
             "upload": "host -> device (pinned)" if det.cuda else "none: the CPU engine reads host memory",
             "inference": "network + decode + NMS (the plan)",
             "download": "4 detection tensors" if det.cuda else "none",
             "draw": "boxes and labels (Pillow)", "total": ""}
    for name in (*STAGES, "total"):
        print(f"  {name:<11s}{stages[name]:9.2f} ms  {notes[name]}")
    return Result(dets, img.size, args.out, drawn, plan_path, stages, outs, lb)


def main(argv: Sequence[str] | None, title: str, default_cfg: str, default_runs: int = 10) -> int:
    """`run` with errors as one line on stderr (exit status 2)."""
    prog = os.path.basename(sys.argv[0]) if argv is None else "detect.py"
    try:
        run(argv, title, default_cfg, default_runs)
    except (SampleError, KilnError) as e:
        print(f"{prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the user named cannot be read or written
        print(f"{prog}: error: {e.filename or ''}: {e.strerror or type(e).__name__}", file=sys.stderr)
        return 2
    return 0
