"""Post-training calibration: run the optimized float graph on calibration data, observe the tensors that the
INT8 layers would read and write (kiln.passes.quantize.calibration_targets), and return one range per tensor.

Data: any iterable of input dicts (name -> array or tensor, a batch each), or `folder_reader(DIR)` over .npz
files (one array per input name) and .npy files (single-input models). The graph runs on the reference kernels
on the CPU (calibration needs every tensor's values, not speed); ranges are keyed by the optimized graph's
tensor names, the same names InsertQuantization looks up and the calibration cache stores.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from kiln.errors import BuildError
from kiln.ir.graph import Graph, Value
from kiln.ir.printer import format_graph
from kiln.logger import Logger, Progress
from kiln.passes.quantize import calibration_targets
from kiln.quant.calibrators import Calibrator
from kiln.quant.images import Preprocess, image_files, image_reader

MAX_FILES = 100_000


def folder_reader(path: str | os.PathLike, input_names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Input dicts from a folder's .npz files (arrays named after the inputs) and .npy files (one array: a
    single-input model), in file-name order. A sample without the batch axis gets one."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise BuildError(f"calibration data: not a folder: {root}")
    files = sorted(f for f in os.listdir(root) if f.endswith((".npy", ".npz")))[:MAX_FILES]
    if not files:
        raise BuildError(f"calibration data: no .npy or .npz files in {root}")
    for f in files:
        full = os.path.join(root, f)
        try:
            if f.endswith(".npz"):
                with np.load(full, allow_pickle=False) as z:
                    feed = {k: z[k] for k in z.files}
            else:
                if len(input_names) != 1:
                    raise BuildError(f"calibration data: {f} is one .npy array, but the model has "
                                     f"{len(input_names)} inputs ({', '.join(input_names)}): use .npz files")
                feed = {input_names[0]: np.load(full, allow_pickle=False)}
        except BuildError:
            raise
        except Exception as e:
            raise BuildError(f"calibration data: cannot read {full} ({type(e).__name__})") from None
        yield feed


class CalibrationFolder:
    """A folder of calibration data read anew at every use, once the model's inputs are known: .npy/.npz files
    (`folder_reader`), or images with a stated preprocessing (kiln.quant.images, `preprocess` SPEC)."""

    def __init__(self, path: str | os.PathLike, preprocess: str | None = None) -> None:
        if not os.path.isdir(path):
            raise BuildError(f"calibration data: not a folder: {os.fspath(path)}")
        self.path = os.fspath(path)
        self.preprocess = None if preprocess is None else Preprocess.parse(preprocess)

    def reader(self, inputs: list[Value]) -> Iterator[dict[str, np.ndarray]]:
        images = image_files(self.path)
        arrays = [f for f in os.listdir(self.path) if f.endswith((".npy", ".npz"))]
        if images and not arrays:
            if self.preprocess is None:
                raise BuildError(f"calibration data: {self.path} holds images: state their preprocessing "
                                 "(--calib-preprocess, e.g. 'resize=256;crop=224;mean=0.485,0.456,0.406;"
                                 "std=0.229,0.224,0.225')")
            return image_reader(self.path, images[:MAX_FILES], self.preprocess, inputs)
        return folder_reader(self.path, [v.name for v in inputs])


MAX_RANGES_BYTES = 64 << 20


def read_ranges_file(path: str | os.PathLike) -> dict[str, Any]:
    """Dynamic ranges from a JSON file: {"tensor": amax or [lo, hi], "*": default} (or a calibration cache's
    "ranges" object). Untrusted input: one BuildError line for anything else."""
    import json
    p = os.fspath(path)
    try:
        if os.path.getsize(p) > MAX_RANGES_BYTES:
            raise BuildError(f"dynamic ranges file {p} is over {MAX_RANGES_BYTES >> 20} MiB")
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except BuildError:
        raise
    except (OSError, ValueError, RecursionError) as e:
        raise BuildError(f"cannot read dynamic ranges from {p} ({type(e).__name__})") from None
    if isinstance(data, dict) and isinstance(data.get("ranges"), dict):
        data = data["ranges"]
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise BuildError(f"dynamic ranges file {p} must hold a JSON object of tensor name -> amax or [lo, hi]")
    for k, v in data.items():
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
            isinstance(v, list) and len(v) == 2 and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                                        for e in v))
        if not ok:
            raise BuildError(f"dynamic ranges file {p}: '{k[:100]}' must be a number or [lo, hi], got {str(v)[:60]}")
    return data


def graph_digest(g: Graph) -> str:
    """A digest of the optimized graph's structure and names (what a calibration cache's ranges refer to)."""
    return hashlib.sha256(format_graph(g).encode()).hexdigest()[:32]


def input_batch(g: Graph, feed: Mapping[str, Any], index: int) -> list[torch.Tensor]:
    """One calibration batch as the graph's input tensors, checked against its inputs (one BuildError line)."""
    if not isinstance(feed, Mapping):
        raise BuildError(f"calibration batch {index} is a {type(feed).__name__}, not a dict of input arrays")
    unknown = sorted(set(feed) - {v.name for v in g.inputs})
    if unknown:
        raise BuildError(f"calibration batch {index} names unknown input(s) {', '.join(map(str, unknown))}; "
                         f"the model's inputs are {', '.join(v.name for v in g.inputs)}")
    out = []
    for v in g.inputs:
        if v.name not in feed:
            raise BuildError(f"calibration batch {index} has no array for input '{v.name}'")
        x = torch.as_tensor(np.asarray(feed[v.name])) if not isinstance(feed[v.name], torch.Tensor) else feed[v.name]
        want = v.type.dtype.torch if v.type.dtype is not None else x.dtype
        if v.type.rank is not None and x.dim() == v.type.rank - 1:
            x = x.unsqueeze(0)
        if v.type.rank is not None and x.dim() != v.type.rank:
            raise BuildError(f"calibration batch {index}: input '{v.name}' has shape {list(x.shape)}, the model "
                             f"takes rank {v.type.rank}")
        out.append(x.to(want).cpu())
    return out


def _batches_known(data: Any, max_batches: int | None) -> int | None:
    """How many batches calibration will read, where that is known before reading them (a sized collection, a
    folder's data files, or --calib-batches), else None."""
    n: int | None = None
    if isinstance(data, CalibrationFolder):
        try:
            n = len([f for f in os.listdir(data.path) if f.endswith((".npy", ".npz"))]) or len(image_files(data.path))
        except OSError:
            n = None
    elif hasattr(data, "__len__"):
        n = len(data)
    if max_batches is not None:
        n = max_batches if n is None else min(n, max_batches)
    return n


def calibrate(g: Graph, data: Iterable[Mapping[str, Any]], calibrator: Calibrator, logger: Logger,
              exclude: set[str] | frozenset[str] = frozenset(), max_batches: int | None = None) -> dict[str, float]:
    """Ranges (tensor name -> amax) of the calibration targets of g, from `calibrator` over `data`."""
    from kiln.runtime.interpreter import GraphFunction
    total = _batches_known(data, max_batches)
    if isinstance(data, CalibrationFolder):
        data = data.reader(list(g.inputs))
    targets = calibration_targets(g, exclude)
    if not targets:
        return {}
    saved = list(g.outputs)
    extra = [v for v in targets if all(v is not o for o in saved)]
    g.outputs = saved + extra
    try:
        fn = GraphFunction(g, "cpu")
        watched = {id(v) for v in targets}
        n = 0
        progress = Progress(logger, total, "Calibration") if total else None  # counts on the build's display
        with torch.inference_mode():
            for i, feed in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                outs = fn(input_batch(g, feed, i))
                for v, t in zip(g.outputs, outs):
                    if id(v) in watched and isinstance(t, torch.Tensor):
                        calibrator.observe(v.name, t)
                n += 1
                if progress is not None:
                    progress.step()
                elif n % 8 == 0:
                    logger.info(f"Calibration: {n} batches")
    finally:
        g.outputs = saved
    if n == 0:
        raise BuildError("calibration data is empty: give at least one batch")
    ranges = calibrator.amax()
    logger.info(f"Calibrated {len(ranges)} tensors over {n} batch(es) with the {calibrator.name} calibrator")
    return ranges
