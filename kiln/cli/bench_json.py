"""`kiln bench` run from other tools (scripts/gpu_check.py, tests): one run in a fresh process, its
`--export-json` read back as a BenchResult, and the agreement of its median with another measurement."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from kiln.errors import KilnError


@dataclass(frozen=True)
class BenchResult:
    """What one `kiln bench --export-json` run measured, read back from its JSON (times in ms).

    median_ms/mean_ms/min_ms/max_ms: the latency of a timed iteration (with --no-transfers on CUDA: the GPU
    time of one replay); summary: the whole JSON document."""

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    iterations: int
    batch: int | None
    device: str
    cuda_graph: bool | None
    transfers: bool
    summary: dict[str, Any]


def parse_bench_json(data: Any, where: str = "kiln bench JSON") -> BenchResult:
    """A `kiln bench --export-json` document as a BenchResult; KilnError naming the field that is missing or
    malformed."""
    def get(obj: Any, *path: str) -> Any:
        for k in path:
            if not isinstance(obj, dict) or k not in obj:
                raise KilnError(f"{where}: no {'.'.join(path)}")
            obj = obj[k]
        return obj

    def ms(*path: str) -> float:
        v = get(data, *path)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise KilnError(f"{where}: {'.'.join(path)} must be a time in ms, got {v!r:.40}")
        return float(v)
    lat = [ms("latency_ms", k) for k in ("min", "median", "mean", "max")]
    if not lat[0] <= lat[1] <= lat[3] or not lat[0] <= lat[2] <= lat[3]:
        raise KilnError(f"{where}: latency_ms is not ordered min <= median, mean <= max: {lat}")
    n, batch, device = get(data, "iterations"), get(data, "batch"), get(data, "device")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise KilnError(f"{where}: iterations must be an int >= 1, got {n!r:.40}")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise KilnError(f"{where}: batch must be an int >= 1 or null, got {batch!r:.40}")
    if not isinstance(device, str):
        raise KilnError(f"{where}: device must be a string, got {device!r:.40}")
    graph, transfers = get(data, "config", "cuda_graph"), get(data, "config", "transfers")
    return BenchResult(lat[1], lat[2], lat[0], lat[3], n, batch, device,
                       graph if isinstance(graph, bool) else None, transfers is True, data)


def run_bench(model: str, args: list[str] | tuple[str, ...] = (), timeout: float = 600.0) -> BenchResult:
    """`kiln bench MODEL ARGS --export-json TMP` in a fresh Python process (the kiln package this process
    imported, the same interpreter), as a user runs it; its JSON read back. KilnError (one line, from the
    command's own error when it has one) when it fails, times out or writes no valid JSON."""
    import subprocess
    import sys
    import tempfile

    import kiln
    from kiln.settings import child_process_env
    root = os.path.dirname(os.path.dirname(os.path.abspath(kiln.__file__)))
    env = child_process_env([root], keep_pythonpath=True)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "kiln", "bench", model, *args, "--export-json", out]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise KilnError(f"kiln bench {model}: no result after {timeout:g} s") from None
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if "error" in ln), lines[-1] if lines else "no output")
            raise KilnError(f"kiln bench {model} exited with {r.returncode}: {why.strip()}")
        try:
            with open(out, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise KilnError(f"kiln bench {model}: no readable --export-json file ({type(e).__name__})") from None
    return parse_bench_json(data, f"kiln bench {model}")


def agreement(bench_ms: float, other_ms: float, tolerance: float = 0.10) -> tuple[float, bool]:
    """(bench_ms / other_ms, whether they agree within `tolerance`, relative to other_ms)."""
    if not (other_ms > 0 and math.isfinite(other_ms) and math.isfinite(bench_ms)):
        raise KilnError(f"cannot compare {bench_ms} ms with {other_ms} ms")
    ratio = bench_ms / other_ms
    return ratio, abs(ratio - 1.0) <= tolerance
