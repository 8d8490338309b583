"""`kiln bench`: a trtexec-style benchmark of an ONNX model or a Darknet .cfg (built in memory) or a .kiln plan.

Throughput, latency min/mean/median/max and percentiles, enqueue time, H2D / compute / D2H times and
host wall time over a warmed-up run of N iterations or S seconds; optionally a per-layer profile from
extra iterations run after the timed ones (kiln.runtime.profiler.LayerProfiler).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.cli.options import add_build_options, add_detect_options, builder_config, build_model, parse_shapes
from kiln.errors import KilnError

MAX_STREAMS = 64
HOST_BOUND = 0.9  # enqueue time at or above this share of the GPU compute time: the GPU waits for the host


def add_bench_parser(sub: Any) -> None:
    """The `kiln bench` subcommand on the CLI's subparsers."""
    b = sub.add_parser("bench", help="benchmark a model or plan: throughput, latency percentiles, per-layer profile",
                       description="Benchmark MODEL.onnx or a Darknet MODEL.cfg with --weights (built in memory with "
                       "the build flags), or MODEL.kiln.")
    b.add_argument("model", help="MODEL.onnx, MODEL.cfg (with --weights) or MODEL.kiln")
    b.add_argument("--weights", metavar="FILE", help="the Darknet .weights of a .cfg model")
    add_build_options(b)
    add_detect_options(b)
    b.add_argument("--input", action="append", metavar="NAME=FILE",
                   help="name=file.npy|file.pb (default: random data from --seed; --shapes sets dynamic dims)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    b.add_argument("--warmup", type=float, default=200.0, metavar="MS",
                   help="warm-up time in ms (default 200; each context runs at least once)")
    b.add_argument("--iterations", type=int, metavar="N", help="run exactly N timed iterations")
    b.add_argument("--duration", type=float, metavar="S", help="run timed iterations for S seconds (default 3)")
    b.add_argument("--min-iterations", type=int, default=10, metavar="N",
                   help="with --duration: at least N iterations (default 10)")
    b.add_argument("--percentiles", default="90,95,99", metavar="P,P", help="latency percentiles (default 90,95,99)")
    b.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA: replay CUDA graphs (default on)")
    b.add_argument("--streams", type=int, default=1, metavar="N",
                   help="N contexts: on CUDA on N streams, enqueued round-robin; on the CPU from N threads")
    b.add_argument("--no-transfers", action="store_true",
                   help="CUDA: inputs staged on the device once, outputs left there (no H2D/D2H per iteration)")
    b.add_argument("--export-times", metavar="FILE", help="write every timed iteration's times (JSON list)")
    b.add_argument("--export-json", metavar="FILE", help="write the summary (JSON)")
    b.add_argument("--dump-profile", action="store_true",
                   help="profile each layer over extra iterations after the timed ones and print the table")
    b.add_argument("--profile-iterations", type=int, default=20, metavar="N",
                   help="iterations of the per-layer profile (default 20)")
    b.add_argument("--export-profile", metavar="FILE", help="run the per-layer profile and write it (JSON)")
    b.add_argument("--verbose", "-v", action="store_true", help="the builder's log")
    b.set_defaults(func=cmd_bench)


# ---- flags -----------------------------------------------------------------------------------------------

def _percentiles(spec: str) -> list[float]:
    out: set[float] = set()
    for part in spec.split(","):
        try:
            p = float(part)
        except ValueError:
            raise KilnError(f"--percentiles: '{part.strip()}' is not a number (expected e.g. 90,95,99)") from None
        if not (math.isfinite(p) and 0 <= p <= 100):
            raise KilnError(f"--percentiles: {part.strip()} is outside [0, 100]")
        out.add(p)
    return sorted(out)


def _validate(args: argparse.Namespace) -> list[float]:
    """Every bench flag, before any build work; returns the percentiles."""
    from kiln.cli.main import _same_file
    from kiln.fileio import check_writable
    if args.iterations is not None and args.duration is not None:
        raise KilnError("give --iterations or --duration, not both")
    if args.iterations is not None and args.iterations < 1:
        raise KilnError(f"--iterations must be >= 1, got {args.iterations}")
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        raise KilnError(f"--duration must be a positive number of seconds, got {args.duration}")
    if not (math.isfinite(args.warmup) and args.warmup >= 0):
        raise KilnError(f"--warmup must be >= 0 ms, got {args.warmup}")
    if args.min_iterations < 1:
        raise KilnError(f"--min-iterations must be >= 1, got {args.min_iterations}")
    if not 1 <= args.streams <= MAX_STREAMS:
        raise KilnError(f"--streams must be in 1..{MAX_STREAMS}, got {args.streams}")
    if args.profile_iterations < 1:
        raise KilnError(f"--profile-iterations must be >= 1, got {args.profile_iterations}")
    if args.seed < 0:
        raise KilnError(f"--seed must be >= 0, got {args.seed}")
    percentiles = _percentiles(args.percentiles)
    if not os.path.isfile(args.model):
        raise KilnError(f"model file not found: {args.model}")
    exports = [(f, p) for f, p in (("--export-json", args.export_json), ("--export-times", args.export_times),
                                   ("--export-profile", args.export_profile)) if p]
    for i, (flag, path) in enumerate(exports):
        if _same_file(path, args.model):
            raise KilnError(f"{flag} {path} is the model {args.model}; choose another file")
        if args.weights and _same_file(path, args.weights):
            raise KilnError(f"{flag} {path} is the --weights file {args.weights}; choose another file")
        for other, p2 in exports[:i]:
            if _same_file(path, p2):
                raise KilnError(f"{flag} and {other} name the same file {path}")
        check_writable(path, f"{flag} file")
    return percentiles


def _build_flag_given(args: argparse.Namespace) -> str | None:
    """The first build flag (or --weights / detection flag) given on the command line (--shapes aside), as the
    user would type it."""
    scratch = argparse.ArgumentParser(add_help=False)
    scratch.add_argument("--weights")
    add_build_options(scratch)
    add_detect_options(scratch)
    for dest, default in vars(scratch.parse_args([])).items():
        if dest != "shapes" and getattr(args, dest) != default:
            if dest in ("tf32", "flush_denormals"):
                return "--no-" + dest.replace("_", "-")
            return "--" + dest.replace("_", "-")
    return None


def _input_files(items: list[str] | None) -> list[tuple[str | None, str]]:
    out = []
    for item in items or []:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (None, item)
        if not os.path.isfile(path):
            raise KilnError(f"--input {item}: file not found: {path}")
        out.append((name, path))
    return out


def _name_files(files: list[tuple[str | None, str]], names: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, path in files:
        if name is None:
            if len(names) != 1:
                raise KilnError(f"--input {path}: name the input (name=file); inputs are {', '.join(names)}")
            name = names[0]
        if name not in names:
            raise KilnError(f"--input: unknown input '{name}'; inputs are: {', '.join(names)}")
        out[name] = path
    return out


# ---- inputs ----------------------------------------------------------------------------------------------

def _tuned_at(build: dict[str, Any], name: str) -> list[Any]:
    """The shape a build without profiles tuned an input at (plan.build["tuned_at"], "1x128"); [] if none."""
    shape = (build.get("tuned_at") or {}).get(name) if isinstance(build.get("tuned_at"), dict) else None
    try:
        return [int(d) for d in shape.split("x")] if isinstance(shape, str) else []
    except ValueError:
        return []


def _shape_of(spec: dict[str, Any], profiles: list[dict[str, Any]], given: tuple[int, ...] | None,
              tuned: list[Any]) -> tuple[list[int], str | None]:
    """An input's run shape: --shapes, else static dims and dynamic ones at the first profile's opt, else at
    the shape the build tuned at (`tuned`), else 1. Returns (shape, where its dynamic dims came from when
    no profile gave them)."""
    name, decl = spec["name"], spec.get("shape")
    if given is not None:
        if decl is not None and (len(decl) != len(given) or any(
                isinstance(d, int) and d >= 0 and d != g for d, g in zip(decl, given))):
            want = "x".join(str(d) if isinstance(d, int) and d >= 0 else "?" for d in decl) or "scalar"
            raise KilnError(f"--shapes: input '{name}' is {want}, got {'x'.join(map(str, given)) or 'scalar'}")
        return list(given), False
    if decl is None:
        raise KilnError(f"input '{name}' has no declared shape; give --shapes {name}:DxD or --input {name}=FILE")
    opt: list[Any] = next((list(p[name]["opt"]) for p in profiles if name in p), [])
    source = None
    if not opt and len(tuned) == len(decl):
        opt, source = tuned, "the shape the build tuned at"
    dims = []
    for i, d in enumerate(decl):
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        elif i < len(opt) and isinstance(opt[i], int) and opt[i] >= 0:
            dims.append(opt[i])
        else:
            dims.append(1)
            source = "1"
    return dims, source


def _random_input(name: str, dtype_name: str | None, shape: list[int], rng: np.random.Generator) -> Any:
    """Seeded random data: floats standard normal, integers in [0, 4), booleans either way."""
    import torch

    from kiln.ir.dtype import DType
    from kiln.settings import settings
    try:
        dtype = DType(dtype_name) if dtype_name else DType.FLOAT32
    except ValueError:
        raise KilnError(f"input '{name}': no random data for element type {dtype_name!r}; "
                        f"give --input {name}=FILE") from None
    nbytes, limit = math.prod(shape) * dtype.itemsize, settings().max_activation_bytes
    if nbytes > limit:
        raise KilnError(f"input '{name}' of shape {shape} needs {nbytes} bytes, over the {limit}-byte limit "
                        f"(KILN_MAX_ACTIVATION_BYTES); give smaller --shapes")
    if dtype.torch.is_complex:
        re, im = rng.standard_normal((2, *shape), dtype=np.float32)
        return torch.complex(torch.from_numpy(re), torch.from_numpy(im)).to(dtype.torch)
    if dtype.is_float:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(dtype.torch)
    if dtype == DType.BOOL:
        return torch.from_numpy(rng.integers(0, 2, shape).astype(np.bool_))
    return torch.from_numpy(rng.integers(0, 4, shape, dtype=np.int64)).to(dtype.torch)


@dataclass
class _Inputs:
    feeds: dict[str, Any]
    rows: list[dict[str, Any]]  # name, dtype, shape, source (for the report)
    notes: list[str] = field(default_factory=list)


def _make_inputs(engine: Any, files: dict[str, str], shapes: dict[str, tuple[int, ...]], seed: int) -> _Inputs:
    from kiln.cli.main import _read_tensor
    names = engine.input_names
    for name in shapes:
        if name not in names:
            raise KilnError(f"--shapes: unknown input '{name}'; inputs are: {', '.join(names)}")
    rng = np.random.default_rng(seed)
    out = _Inputs({}, [])
    for spec in engine.plan.inputs:
        name = spec["name"]
        if name in files:
            x = _read_tensor(files[name], f"input '{name}'")
            if name in shapes and tuple(x.shape) != tuple(shapes[name]):
                raise KilnError(f"input '{name}': {files[name]} has shape {list(x.shape)}, --shapes says "
                                f"{list(shapes[name])}")
            out.feeds[name] = x
            out.rows.append({"name": name, "dtype": str(spec.get("dtype")), "shape": list(x.shape),
                             "source": files[name]})
            continue
        if spec.get("kind", "tensor") != "tensor":
            raise KilnError(f"input '{name}' is a {spec.get('kind')}: no random data for it; give --input {name}=FILE")
        shape, source = _shape_of(spec, engine.plan.profiles, shapes.get(name), _tuned_at(engine.plan.build, name))
        if source:
            out.notes.append(f"input '{name}': no profile, dynamic dims set to {source} "
                             f"({'x'.join(map(str, shape))}); give --shapes {name}:DxD to choose them")
        out.feeds[name] = _random_input(name, spec.get("dtype"), shape, rng)
        out.rows.append({"name": name, "dtype": spec.get("dtype") or "float32", "shape": shape,
                         "source": "random"})
    return out


def _batch(tensors: list[Any]) -> int | None:
    """The batch: the leading dim that every input (each of rank >= 2) shares; else unknown."""
    import torch
    dims = {int(t.shape[0]) for t in tensors if isinstance(t, torch.Tensor) and t.dim() >= 2}
    ok = tensors and all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in tensors) and len(dims) == 1
    return dims.pop() if ok else None


# ---- timing ----------------------------------------------------------------------------------------------

class _Schedule:
    """Hands out iteration numbers: `iterations` of them, or until `seconds` have passed and `minimum` ran."""

    def __init__(self, iterations: int | None, seconds: float, minimum: int) -> None:
        self.iterations, self.seconds, self.minimum = iterations, seconds, minimum
        self.count, self.t0, self.deadline = 0, 0.0, 0.0
        self._lock = threading.Lock()

    def start(self) -> float:
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + self.seconds
        return self.t0

    def take(self) -> int | None:
        with self._lock:
            if self.iterations is not None:
                done = self.count >= self.iterations
            else:
                done = self.count >= self.minimum and time.perf_counter() >= self.deadline
            if done:
                return None
            self.count += 1
            return self.count - 1


@dataclass
class _Run:
    records: list[dict[str, Any]]  # one per timed iteration, times in ms
    wall_s: float
    warmup_iterations: int
    warmup_s: float
    graphs: bool | None = None  # CUDA: whether the contexts replayed CUDA graphs


def _record(i: int, k: int, start: float, end: float, latency: float, enqueue: float, h2d: float, compute: float,
            d2h: float) -> dict[str, Any]:
    return {"iteration": i, "context": k, "start_ms": start, "end_ms": end, "latency_ms": latency,
            "enqueue_ms": enqueue, "h2d_ms": h2d, "compute_ms": compute, "d2h_ms": d2h}


def _bench_cpu(contexts: list[Any], feeds: list[Any], warm: _Schedule, timed: _Schedule) -> _Run:
    """N contexts from N threads (the main thread when N == 1); each call runs synchronously."""
    records: list[dict[str, Any]] = []
    warm_counts = [0] * len(contexts)

    def phase(k: int, sched: _Schedule, timing: bool) -> None:
        ctx = contexts[k]
        while (i := sched.take()) is not None:
            t0 = time.perf_counter()
            ctx.execute(feeds)
            t1 = time.perf_counter()
            if timing:
                ms = (t1 - t0) * 1e3
                records.append(_record(i, k, (t0 - sched.t0) * 1e3, (t1 - sched.t0) * 1e3, ms, ms, 0.0, ms, 0.0))
            else:
                warm_counts[k] += 1

    def warm_up(k: int) -> None:
        contexts[k].execute(feeds)  # every context (and thread) runs once, whatever --warmup says
        warm_counts[k] += 1
        phase(k, warm, False)

    w0 = warm.start()
    if len(contexts) == 1:
        warm_up(0)
        warm_s = time.perf_counter() - w0
        t0 = timed.start()
        phase(0, timed, True)
        wall = time.perf_counter() - t0
    else:
        barrier = threading.Barrier(len(contexts) + 1)
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                warm_up(k)
                barrier.wait()  # all warm
                barrier.wait()  # the clock started
                phase(k, timed, True)
            except threading.BrokenBarrierError:
                pass
            except BaseException as e:  # handed to the main thread, which raises it
                errors.append(e)
                barrier.abort()
        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(len(contexts))]
        for th in threads:
            th.start()
        t0 = warm_s = 0.0
        try:
            barrier.wait()
            warm_s = time.perf_counter() - w0
            t0 = timed.start()
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        if errors:
            raise errors[0]
    records.sort(key=lambda r: r["iteration"])
    return _Run(records, wall, sum(warm_counts), warm_s)


def _bench_cuda(contexts: list[Any], args_dev: list[Any], transfers: bool, warm: _Schedule,
                timed: _Schedule) -> tuple[_Run, list[Any], Any]:
    """N contexts on N streams, iterations enqueued round-robin, at most two in flight per context.

    CUDA events around the copy-in, the run and the copy-out give H2D / compute / D2H per iteration;
    enqueue is the host time of execute_async. Returns the run, each context's device inputs and the streams."""
    import torch
    n = len(contexts)
    device = contexts[0].engine.device
    streams = [torch.cuda.Stream(device) for _ in range(n)]
    host_in = [a.cpu().pin_memory() for a in args_dev] if transfers else []
    dev_in = [[a.clone() for a in args_dev] for _ in range(n)]
    torch.cuda.synchronize(device)  # the clones (current stream) are done before other streams write them
    host_out: list[list[Any]] = [[] for _ in range(n)]
    inflight: list[collections.deque] = [collections.deque() for _ in range(n)]
    records: list[dict[str, Any]] = []
    base = torch.cuda.Event(enable_timing=True)

    def finish(item: tuple[int, int, float, list[Any], bool]) -> None:
        i, k, enq, ev, timing = item
        ev[3].synchronize()
        if timing:
            h2d = ev[0].elapsed_time(ev[1]) if transfers else 0.0
            d2h = ev[2].elapsed_time(ev[3]) if transfers else 0.0
            start, end = base.elapsed_time(ev[0]), base.elapsed_time(ev[3])
            records.append(_record(i, k, start, end, ev[0].elapsed_time(ev[3]), enq * 1e3, h2d,
                                   ev[1].elapsed_time(ev[2]), d2h))

    def submit(i: int, k: int, timing: bool) -> None:
        ctx, s, q = contexts[k], streams[k], inflight[k]
        if len(q) >= 2:
            finish(q.popleft())
        e0, e2 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True) if transfers else e0
        e3 = torch.cuda.Event(enable_timing=True) if transfers else e2
        with torch.cuda.stream(s):
            e0.record(s)
            if transfers:
                for d, h in zip(dev_in[k], host_in):
                    d.copy_(h, non_blocking=True)
                e1.record(s)
            t0 = time.perf_counter()
            outs = ctx.execute_async(dev_in[k], s)
            enq = time.perf_counter() - t0
            e2.record(s)
            if transfers:
                tensors = [o for o in outs.values() if isinstance(o, torch.Tensor)]
                if [tuple(h.shape) for h in host_out[k]] != [tuple(o.shape) for o in tensors]:
                    host_out[k] = [torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in tensors]
                for h, o in zip(host_out[k], tensors):
                    h.copy_(o, non_blocking=True)
                e3.record(s)
        q.append((i, k, enq, [e0, e1, e2, e3], timing))

    def drain() -> None:
        for q in inflight:
            while q:
                finish(q.popleft())

    def phase(sched: _Schedule, timing: bool) -> int:
        count = 0
        while (i := sched.take()) is not None:
            submit(i, i % n, timing)
            count += 1
        drain()
        return count

    w0 = warm.start()
    for k, ctx in enumerate(contexts):  # the first run captures the CUDA graph
        submit(-1, k, False)
        drain()
        if ctx.last_graph is not None:  # write straight into the graph's static inputs: no copy inside
            staged = [ctx.input_buffers()[name] for name in ctx.engine.input_names]
            with torch.cuda.stream(streams[k]):
                for b, d in zip(staged, dev_in[k]):
                    b.copy_(d)
            dev_in[k] = staged
    warm_n = n + phase(warm, False)
    torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - w0
    base.record(streams[0])
    base.synchronize()  # complete before any stream's events are measured against it
    t0 = timed.start()
    phase(timed, True)
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    records.sort(key=lambda r: r["iteration"])
    graphs = all(c.last_graph is not None for c in contexts)
    return _Run(records, wall, warm_n, warm_s, graphs), dev_in, streams


# ---- report ----------------------------------------------------------------------------------------------

def _stats(v: np.ndarray) -> dict[str, float]:
    lo, hi = float(v.min()), float(v.max())
    clamp = lambda x: min(max(float(x), lo), hi)  # noqa: E731  (rounding must not leave [min, max])
    return {"min": lo, "mean": clamp(v.mean()), "median": clamp(np.median(v)), "max": hi}


def _fmt_stats(d: dict[str, float]) -> str:
    return f"min {d['min']:.4f}, mean {d['mean']:.4f}, median {d['median']:.4f}, max {d['max']:.4f}"


def _pkey(p: float) -> str:
    return f"{p:g}"


def summarize(run: _Run, percentiles: list[float], batch: int | None) -> dict[str, Any]:
    """The numbers of a run: throughput, latency statistics and percentiles, enqueue/H2D/compute/D2H."""
    col = {k: np.array([r[k] for r in run.records], dtype=np.float64)
           for k in ("latency_ms", "enqueue_ms", "h2d_ms", "compute_ms", "d2h_ms")}
    lat = _stats(col["latency_ms"])
    pct = np.percentile(col["latency_ms"], percentiles, method="linear") if percentiles else []
    lat["percentiles"] = {_pkey(p): min(max(float(x), lat["min"]), lat["max"]) for p, x in zip(percentiles, pct)}
    n = len(run.records)
    ips = n / run.wall_s if run.wall_s > 0 else 0.0
    return {"iterations": n, "wall_time_s": run.wall_s,
            "throughput": {"inferences_per_s": ips, "items_per_s": ips * batch if batch else None},
            "latency_ms": lat, "enqueue_ms": _stats(col["enqueue_ms"]), "h2d_ms": _stats(col["h2d_ms"]),
            "compute_ms": _stats(col["compute_ms"]), "d2h_ms": _stats(col["d2h_ms"])}


def format_summary(s: dict[str, Any]) -> list[str]:
    """The summary's lines as printed (every number is in the summary's JSON)."""
    cpu = s["device"] == "cpu"
    t = s["throughput"]
    items = f", {t['items_per_s']:.2f} items/s (batch {s['batch']})" if t["items_per_s"] is not None else ""
    lat = s["latency_ms"]
    pct = "".join(f", p{k} {v:.4f}" for k, v in lat["percentiles"].items())
    none = "0 (no transfers on the CPU)" if cpu else "0 (--no-transfers)"
    lines = ["=== Performance summary ===",
             f"Throughput: {t['inferences_per_s']:.2f} inferences/s{items}",
             f"Latency (ms): {_fmt_stats(lat)}{pct}",
             f"Enqueue (ms): {_fmt_stats(s['enqueue_ms'])}"
             + (" (the CPU runs synchronously: enqueue is the whole call)" if cpu else ""),
             f"H2D (ms): {none if not s['config']['transfers'] else _fmt_stats(s['h2d_ms'])}",
             f"{'Compute' if cpu else 'GPU compute'} (ms): {_fmt_stats(s['compute_ms'])}",
             f"D2H (ms): {none if not s['config']['transfers'] else _fmt_stats(s['d2h_ms'])}",
             f"Host wall time: {s['wall_time_s']:.4f} s for {_n(s['iterations'], 'iteration')}"]
    return lines


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _write_json(path: str, data: Any, what: str) -> None:
    from kiln.fileio import atomic_write
    if isinstance(data, list):  # the times: one record a line
        text = "[\n" + ",\n".join(json.dumps(r, allow_nan=False) for r in data) + "\n]\n"
    else:
        text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    atomic_write(path, text.encode(), what)


# ---- the command -----------------------------------------------------------------------------------------

def _engine(args: argparse.Namespace, files: list[tuple[str | None, str]]) -> tuple[Any, dict[str, str], str]:
    """Build (ONNX, or a Darknet .cfg with --weights, as `kiln build` reads them) or load (.kiln) the engine;
    --input names checked before a build. Returns the engine, input files by name and a line saying where it
    came from."""
    from kiln.logger import Logger, Severity
    from kiln.runtime.engine import Engine
    if args.model.endswith(".kiln"):
        flag = _build_flag_given(args)
        if flag:
            raise KilnError(f"{flag} is a build flag, and {args.model} is a built plan (build flags go with an ONNX "
                            f"model or a Darknet .cfg; --shapes picks a plan's dynamic input shapes)")
        t0 = time.perf_counter()
        engine = Engine.load(args.model)
        return engine, _name_files(files, engine.input_names), \
            f"plan {args.model}: {engine.plan.target.get('device')}, loaded in {time.perf_counter() - t0:.2f} s"
    from kiln.builder import Builder
    from kiln.frontend.onnx import load_onnx
    cfg = builder_config(args)
    logger = Logger(Severity.VERBOSE if args.verbose else Severity.WARNING)
    model = build_model(args, logger)  # the ONNX path, or the Darknet network as a Graph
    graph = load_onnx(model, logger) if isinstance(model, str) else model
    named = _name_files(files, [v.name for v in graph.inputs])
    plan = Builder(logger).build(graph, cfg)
    engine = Engine(plan, args.model)
    return engine, named, (f"model {args.model}: built for {plan.target.get('device')} in "
                           f"{plan.build.get('build_seconds', 0.0):.2f} s ({plan.build.get('layers')} layers)")


def cmd_bench(args: argparse.Namespace) -> int:
    """`kiln bench`: flags checked, model built or loaded, inputs made, warm-up, timed run, report, exports."""
    percentiles = _validate(args)
    shapes = parse_shapes(args.shapes, "--shapes")
    engine, named, origin = _engine(args, _input_files(args.input))
    inputs = _make_inputs(engine, named, shapes, args.seed)
    contexts = [engine.create_execution_context(cuda_graph=args.cuda_graph) for _ in range(args.streams)]
    feeds = contexts[0].execute_inputs(inputs.feeds)  # checked against the plan: dtypes, shapes, profiles
    run, setup, (profile_feeds, stream) = _timed_run(args, engine, contexts, feeds, inputs.notes)
    s = _summary(args, engine, origin, inputs, run, setup, percentiles, _batch(feeds))
    profiler = None
    if args.dump_profile or args.export_profile:
        profiler = _profile(engine, contexts[0], args.profile_iterations, profile_feeds, stream)
        d = profiler.to_dict()
        s["profile"] = {"iterations": d["iterations"], "layers": len(d["layers"]),
                        "ms_per_iteration": d["ms_per_iteration"]}
    print("\n".join(format_report(s)))
    if profiler is not None and args.dump_profile:
        print()
        print(profiler.table())
    if args.export_times:
        _write_json(args.export_times, run.records, "--export-times file")
    if profiler is not None and args.export_profile:
        _write_json(args.export_profile, profiler.to_dict(), "--export-profile file")
    if args.export_json:
        _write_json(args.export_json, s, "--export-json file")
    return 0


def _timed_run(args: argparse.Namespace, engine: Any, contexts: list[Any], feeds: list[Any], notes: list[str]
               ) -> tuple[_Run, str, tuple[list[Any], Any]]:
    """Warm-up and timed iterations on the engine's device. Returns the run, the setup in words, and the
    feeds and stream (CUDA) a profile of context 0 runs with; notes about the flags go to `notes`."""
    import torch
    warm = _Schedule(None, args.warmup / 1e3, 0)
    timed = _Schedule(args.iterations, 3.0 if args.duration is None else args.duration, args.min_iterations)
    if engine.device.type == "cuda":
        run, dev_in, streams = _bench_cuda(contexts, feeds, not args.no_transfers, warm, timed)
        if args.cuda_graph is not False and not run.graphs:
            notes.append(f"CUDA graphs not used: {engine.graph_reason or 'capture failed'}")
        setup = (f"{_n(args.streams, 'context')} on {_n(args.streams, 'CUDA stream')} "
                 f"({torch.cuda.get_device_name(engine.device)}), CUDA graphs {'on' if run.graphs else 'off'}, "
                 f"{'no transfers (inputs staged on the device)' if args.no_transfers else 'H2D/D2H each iteration'}")
        return run, setup, (dev_in[0], streams[0])
    run = _bench_cpu(contexts, feeds, warm, timed)
    setup = (f"{_n(args.streams, 'context')} {'in one thread' if args.streams == 1 else f'from {args.streams} threads'}"
             f", synchronous calls on the CPU ({torch.get_num_threads()} torch threads)")
    if args.cuda_graph is not None:
        notes.append("--cuda-graph/--no-cuda-graph: not applicable on the CPU")
    if args.no_transfers:
        notes.append("--no-transfers: the CPU target has no transfers anyway")
    return run, setup, (feeds, None)


def _summary(args: argparse.Namespace, engine: Any, origin: str, inputs: _Inputs, run: _Run, setup: str,
             percentiles: list[float], batch: int | None) -> dict[str, Any]:
    """Everything `kiln bench` prints, as JSON-able data (--export-json)."""
    cuda = engine.device.type == "cuda"
    s: dict[str, Any] = {
        "model": args.model, "device": engine.device.type, "origin": origin, "inputs": inputs.rows, "batch": batch,
        "setup": setup,
        "config": {"warmup_ms": args.warmup, "iterations": args.iterations,
                   "duration_s": None if args.iterations is not None else (args.duration or 3.0),
                   "min_iterations": args.min_iterations, "streams": args.streams,
                   "cuda_graph": run.graphs if cuda else None, "transfers": cuda and not args.no_transfers,
                   "seed": args.seed, "percentiles": percentiles},
        "warmup": {"iterations": run.warmup_iterations, "seconds": run.warmup_s}}
    s.update(summarize(run, percentiles, batch))
    warnings: list[str] = []
    host_bound = None
    if cuda:
        host_bound = s["enqueue_ms"]["mean"] >= HOST_BOUND * s["compute_ms"]["mean"]
        if host_bound:
            warnings.append(f"host-bound: the GPU waits for Python (enqueue {s['enqueue_ms']['mean']:.4f} ms >= "
                            f"{HOST_BOUND:.0%} of GPU compute {s['compute_ms']['mean']:.4f} ms); "
                            "use --cuda-graph (default) or more --streams")
    s.update(host_bound=host_bound, warnings=warnings, notes=inputs.notes)
    return s


def format_report(s: dict[str, Any]) -> list[str]:
    """The printed report: where the engine came from, inputs, notes, setup, warm-up, the summary, warnings."""
    lines = [s["origin"]]
    for row in s["inputs"]:
        src = f"random (seed {s['config']['seed']})" if row["source"] == "random" else f"from {row['source']}"
        lines.append(f"input {row['name']}: {row['dtype']}[{'x'.join(map(str, row['shape']))}], {src}")
    lines += [f"note: {n}" for n in s["notes"]]
    lines += [f"setup: {s['setup']}",
              f"warm-up: {_n(s['warmup']['iterations'], 'iteration')} in {s['warmup']['seconds']:.4f} s"]
    lines += format_summary(s)
    lines += [f"warning: {w}" for w in s["warnings"]]
    return lines


def _profile(engine: Any, ctx: Any, iterations: int, feeds: list[Any], stream: Any) -> Any:
    """Per-layer times over extra iterations (no CUDA graph), after the timed ones."""
    from kiln.runtime.profiler import LayerProfiler
    profiler = LayerProfiler(engine)
    ctx.profiler = profiler
    try:
        for _ in range(iterations):
            if stream is not None:
                ctx.execute_async(feeds, stream)
            else:
                ctx.execute(feeds)
    finally:
        ctx.profiler = None
    profiler.report()  # resolves the CUDA events now (one sync)
    return profiler
