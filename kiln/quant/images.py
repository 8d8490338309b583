"""Images as calibration data, with a stated preprocessing (`--calib DIR --calib-preprocess SPEC`).

SPEC is `key=value` pairs separated by ';' (lists by ','), every key optional:

    resize=256          shorter side to 256 (aspect kept); resize=224,224: exactly H,W; default: the crop size
    crop=224            centre crop (H or H,W); default: the model input's static H, W
    scale=0.00392157    multiply the 0..255 pixels first (default 1/255)
    mean=0.485,0.456,0.406;std=0.229,0.224,0.225   per channel, after scale (defaults 0 and 1)
    order=rgb|bgr       channel order (default rgb)
    layout=nchw|nhwc    default: NCHW when the input's dim 1 is 1 or 3, else NHWC

Each image is one batch of one; grayscale models (1 channel) read the image's luminance. Decoding uses Pillow
(an optional dependency: a clear error without it); files are untrusted input (Pillow's decompression-bomb
limit applies, a file it cannot decode is one BuildError line naming it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from kiln.errors import BuildError
from kiln.ir.graph import Value

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
_KEYS = ("resize", "crop", "scale", "mean", "std", "order", "layout")


def _floats(key: str, text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BuildError(f"--calib-preprocess {key}={text!r}: expected numbers") from None
    if not vals or not all(np.isfinite(vals)):
        raise BuildError(f"--calib-preprocess {key}={text!r}: expected finite numbers")
    return vals


def _sizes(key: str, text: str) -> tuple[int, ...]:
    vals = _floats(key, text)
    if len(vals) not in (1, 2) or any(v < 1 or v > 16384 or v != int(v) for v in vals):
        raise BuildError(f"--calib-preprocess {key}={text!r}: expected one or two sizes in 1..16384")
    return tuple(int(v) for v in vals)


@dataclass
class Preprocess:
    """A parsed preprocessing SPEC (see the module doc)."""

    resize: tuple[int, ...] = ()
    crop: tuple[int, ...] = ()
    scale: float = 1.0 / 255.0
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    order: str = "rgb"
    layout: str = ""

    @classmethod
    def parse(cls, spec: str) -> "Preprocess":
        p = cls()
        for part in (spec or "").split(";"):
            if not part.strip():
                continue
            key, sep, val = part.partition("=")
            key, val = key.strip(), val.strip()
            if not sep or key not in _KEYS:
                raise BuildError(f"--calib-preprocess: '{part.strip()[:60]}' is not one of {', '.join(_KEYS)} = value")
            if key in ("resize", "crop"):
                setattr(p, key, _sizes(key, val))
            elif key == "scale":
                p.scale = _floats(key, val)[0]
            elif key in ("mean", "std"):
                setattr(p, key, _floats(key, val))
            elif key == "order" and val in ("rgb", "bgr"):
                p.order = val
            elif key == "layout" and val in ("nchw", "nhwc"):
                p.layout = val
            else:
                raise BuildError(f"--calib-preprocess {key}={val!r}: not a choice")
        if any(s == 0 for s in p.std):
            raise BuildError("--calib-preprocess std must not be 0")
        return p

    def geometry(self, inp: Value) -> tuple[str, int, int, int]:
        """(layout, channels, H, W) of the model input this preprocessing feeds."""
        shape = inp.type.shape
        if shape is None or len(shape) != 4:
            raise BuildError(f"calibration images feed a rank-4 image input; '{inp.name}' has shape {shape}")
        layout = self.layout or ("nchw" if shape[1] in (1, 3) else "nhwc")
        c, h, w = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
        crop = self.crop or tuple(d for d in (h, w) if isinstance(d, int))
        if len(crop) == 1:
            crop = (crop[0], crop[0])
        if len(crop) != 2:
            raise BuildError(f"input '{inp.name}' has dynamic spatial dims: give --calib-preprocess crop=H,W")
        if c not in (1, 3):
            raise BuildError(f"calibration images give 1 or 3 channels; input '{inp.name}' takes {c}")
        return layout, int(c), crop[0], crop[1]

    def apply(self, img: "object", inp: Value) -> np.ndarray:
        """One decoded Pillow image -> a [1, ...] float32 batch in the input's layout."""
        from PIL import Image
        layout, c, h, w = self.geometry(inp)
        img = img.convert("L" if c == 1 else "RGB")  # type: ignore[attr-defined]
        resize = self.resize or (h, w)
        if len(resize) == 1:
            short = resize[0]
            iw, ih = img.size  # type: ignore[attr-defined]
            k = short / min(iw, ih)
            resize = (max(1, round(ih * k)), max(1, round(iw * k)))
        img = img.resize((resize[1], resize[0]), Image.BILINEAR)  # type: ignore[attr-defined]
        if resize[0] < h or resize[1] < w:
            raise BuildError(f"--calib-preprocess: resize {resize} is smaller than the crop {h}x{w}")
        top, left = (resize[0] - h) // 2, (resize[1] - w) // 2
        a = np.asarray(img, dtype=np.float32)[top:top + h, left:left + w]
        a = a.reshape(h, w, c)
        if c == 3 and self.order == "bgr":
            a = a[..., ::-1]
        a = a * self.scale
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        if mean.size not in (1, c) or std.size not in (1, c):
            raise BuildError(f"--calib-preprocess mean/std need 1 or {c} values")
        a = (a - mean) / std
        a = a.transpose(2, 0, 1) if layout == "nchw" else a
        return np.ascontiguousarray(a[None], dtype=np.float32)


def image_files(root: str) -> list[str]:
    return sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTS))


def image_reader(root: str, files: list[str], pre: Preprocess, inputs: list[Value]) -> Iterator[dict[str, np.ndarray]]:
    """Input dicts, one image each, for a single-input model."""
    if len(inputs) != 1:
        raise BuildError(f"calibration images feed a single-input model; this one has {len(inputs)} inputs: use "
                         ".npz files")
    try:
        from PIL import Image
    except ImportError:
        raise BuildError("calibration images need Pillow (pip install pillow), or give .npy/.npz files") from None
    pre.geometry(inputs[0])  # a bad spec or input fails before any file is read
    for f in files:
        full = os.path.join(root, f)
        try:
            with Image.open(full) as img:
                img.load()
                batch = pre.apply(img, inputs[0])
        except BuildError:
            raise
        except Exception as e:  # Pillow's errors for corrupt, truncated or oversized files
            raise BuildError(f"calibration data: cannot decode image {full} ({type(e).__name__})") from None
        yield {inputs[0].name: batch}
