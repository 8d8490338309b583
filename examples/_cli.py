"""Helpers shared by the example CLI scripts: input loading, Kiln build + run, torch check."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # let `python examples/<script>.py` find the examples package
    sys.path.insert(0, str(ROOT))


def common_args(description: str, model: str) -> argparse.ArgumentParser:
    """Argument parser with the options every example shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--image", help=".npy float32 array [3,H,W] or [N,3,H,W] (default: a random image)")
    p.add_argument("--onnx", default=os.path.join(tempfile.gettempdir(), "kiln-examples", f"{model}.onnx"),
                   help="where to save the ONNX model (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="Kiln target device, cpu or cuda (default: %(default)s)")
    p.add_argument("--fp16", action="store_true", help="let Kiln use float16")
    p.add_argument("--check", action="store_true", help="compare Kiln's outputs with torch eager")
    return p


def load_input(path: str | None, chw: tuple[int, int, int], seed: int) -> np.ndarray:
    """The image batch [N,C,H,W] float32: from a .npy file or random normal."""
    if path is None:
        return np.random.default_rng(seed + 1000).standard_normal((1, *chw)).astype(np.float32)
    arr = np.load(path).astype(np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.shape[1:] != chw:
        raise SystemExit(f"{path}: expected an array [N,{','.join(map(str, chw))}], got {list(arr.shape)}")
    return np.ascontiguousarray(arr)


def run_with_kiln(onnx_path: str, x: np.ndarray, device: str, fp16: bool) -> dict[str, np.ndarray]:
    """Build the ONNX model with Kiln and run it once on ``x``; prints build and run times."""
    from kiln.builder import Builder, BuilderConfig
    from kiln.runtime import Engine

    t0 = time.perf_counter()
    plan = Builder().build(onnx_path, BuilderConfig(device=device, fp16=fp16))
    t1 = time.perf_counter()
    ctx = Engine(plan).create_execution_context()
    ctx.execute({"input": x})  # warm-up
    t2 = time.perf_counter()
    outs = ctx.execute({"input": x})
    t3 = time.perf_counter()
    print(f"kiln: build {t1 - t0:.2f} s, engine load + first run {t2 - t1:.2f} s, run {1e3 * (t3 - t2):.1f} ms")
    return outs


def check_against_torch(net: object, x: np.ndarray, outs: dict[str, np.ndarray], names: list[str]) -> None:
    """Print the max relative difference of each Kiln output against torch eager."""
    import torch

    with torch.no_grad():
        ref = net(torch.from_numpy(x))  # type: ignore[operator]
    ref = ref if isinstance(ref, tuple) else (ref,)
    for name, r in zip(names, ref):
        r = r.numpy()
        err = float(np.abs(outs[name].astype(np.float64) - r).max() / np.abs(r).max())
        print(f"check {name}: max |kiln - torch| / max |torch| = {err:.2e}")
