"""Model zoo benchmark: Kiln on real models from several sources and exporters, against ONNX Runtime and
OpenVINO on the CPU (or PyTorch eager, CUDA graphs and torch.compile on a GPU). See docs/ZOO.md.

    python benchmarks/zoo.py [--models a,b,c] [--list] [--threads 2] [--iters N] [--blocks 5]
                             [--cache DIR] [--out FILE.md] [--skip-latency] [--device cpu|cuda]
                             [--opt-level 3] [--timeout 900] [--in-process] [--batch N]

For each model (benchmarks/zoo_models.py), in one process (a child per model unless --in-process, so a
crash or a hang is one row, not the end of the run):
1. the Kiln build for the target with an optimization profile over the model's dynamic dims (min/opt/max);
   a KilnError is reported as its one line and the run goes on with the next model;
2. ONNX nodes (Constant nodes not counted) -> layers in the plan, and how many layers run on the
   reference tactic `ref` (with their ops);
3. accuracy against ONNX Runtime (CPUExecutionProvider, FP32) at two shapes inside the profile, fresh
   seeded inputs: normwise relative error ||kiln - ort|| / ||ort|| per output, the worst output shown;
   pass <= 1e-4 (FP32 CPU) or <= 1e-2 (FP16 CUDA);
4. CPU: batch-1 latency at the profile's opt point, Kiln vs ONNX Runtime (intra-op threads = --threads,
   inter-op 1, ORT_ENABLE_ALL) vs OpenVINO (CPU, INFERENCE_NUM_THREADS = --threads,
   INFERENCE_PRECISION_HINT f32, PERFORMANCE_HINT LATENCY), all three fed the same ONNX file: medians over
   blocks of runs, engines rotating per block, each block settled first (benchmarks/rotation.py);
   CUDA: Kiln FP16 vs the torch module in FP16: eager, eager + CUDA graph, torch.compile (torch models only;
   the shipped ONNX models have no torch peer and get the accuracy check only).
The results are printed; with --out they are also written as markdown (with the machine named).
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # see benchmarks/cpu_bench.py: set before torch loads
os.environ.setdefault("TORCHVISION_WARN_WHEN_EXTENSION_LOADING_FAILS", "")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import fnmatch  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _kiln_tree(argv: list[str]) -> str:
    """--kiln DIR: the Kiln source tree to import (default: this checkout); read before kiln is imported."""
    for k, a in enumerate(argv):
        if a == "--kiln" and k + 1 < len(argv):
            return os.path.abspath(argv[k + 1])
        if a.startswith("--kiln="):
            return os.path.abspath(a.split("=", 1)[1])
    return ROOT


KILN_TREE = _kiln_tree(sys.argv[1:])
for p in (HERE, KILN_TREE):
    if p in sys.path:
        sys.path.remove(p)
    sys.path.insert(0, p)

import zoo_models  # noqa: E402
from machine_load import LoadMeter  # noqa: E402
from rotation import rotating_blocks  # noqa: E402
from zoo_models import ZooModel  # noqa: E402

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "kiln-zoo")
TOL = {"cpu": 1e-4, "cuda": 1e-2}
BF16_TOL = 3e-2  # --bf16 on the CPU: 8-bit mantissas
T0 = float(os.environ.setdefault("KILN_ZOO_T0", str(time.time())))  # children log on the parent's clock


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def one_line(e: BaseException) -> str:
    """The error's first informative line (OpenVINO's messages open with "Exception from <file>" lines)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    summary = [ln for ln in lines if ln.startswith("-- Conversion is failed for")]
    body = [ln for ln in lines if not ln.startswith("Exception from")]
    line = (summary or body or lines or [""])[0]
    return f"{type(e).__name__}: {line[:300]}"


# ---------------------------------------------------------------- machine


def machine(device: str) -> dict[str, str]:
    info: dict[str, str] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "python": platform.python_version()}
    cpu = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.strip().startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("flags"):
                    flags = set(ln.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    want = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
    info["cpu"] = cpu
    info["isa"] = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in want)
    info["cores"] = f"{os.cpu_count()} logical"
    try:
        from kiln.backends.cpu.runtime import physical_cores
        info["cores"] = f"{physical_cores()} physical / {os.cpu_count()} logical"
    except Exception:
        pass
    import torch
    info["torch"] = torch.__version__
    for mod, key in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"), ("onnx", "onnx"),
                     ("torchvision", "torchvision"), ("timm", "timm"), ("transformers", "transformers")):
        try:
            if mod == "torchvision":
                info[key] = zoo_models.import_torchvision().__version__
            else:
                info[key] = __import__(mod).__version__
        except Exception:
            info[key] = "absent"
    import kiln
    tree = os.path.dirname(os.path.dirname(os.path.abspath(kiln.__file__)))
    try:
        top = subprocess.run(["git", "-C", tree, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if os.path.realpath(top or "/nonexistent") != os.path.realpath(tree):
            raise OSError("not a git work tree")
        rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "kiln"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        info["kiln"] = (rev or "?") + (" + uncommitted changes in kiln/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["kiln"] = f"from {tree} (not a git work tree)"
    if tree != ROOT:
        info["kiln"] += f" [--kiln {tree}]"
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}, " \
                      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
    return info


# ---------------------------------------------------------------- pieces


def rel_errs(got: dict[str, Any], want: list[np.ndarray], names: list[str]) -> dict[str, float | str]:
    """Normwise relative error per output: ||got - want|| / ||want|| (float64), or why it can't be had."""
    out: dict[str, float | str] = {}
    for name, w in zip(names, want):
        g = got.get(name)
        if g is None:
            out[name] = "missing"
            continue
        if hasattr(g, "detach"):
            g = g.detach().float().cpu().numpy() if g.is_floating_point() else g.detach().cpu().numpy()
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g.shape != w.shape:
            out[name] = f"shape {list(g.shape)} vs {list(w.shape)}"
            continue
        den = float(np.linalg.norm(w.ravel()))
        num = float(np.linalg.norm((g - w).ravel()))
        if not np.isfinite(num):
            out[name] = "non-finite"
        else:
            out[name] = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    return out


def match_detections(got: dict[str, Any], want: list[np.ndarray], names: list[str],
                     tol: float = 1e-4) -> dict[str, Any]:
    """A detector's rows (outputs sharing the `scores` output's length) in ORT's order: detections whose scores
    tie to the precision's rounding come out of top-k / NMS in either order, which says nothing about either
    engine. Each ORT row takes the unused Kiln row of the same label (if any) with the closest score within `tol`
    (relative to the largest: 1e-4 in FP32, the FP16 tolerance in FP16), then the closest other outputs; rows
    left without a partner (a different detection set) take the unused Kiln rows in order and count as errors."""
    if "scores" not in names:
        return got
    k = names.index("scores")
    ws, gs = np.asarray(want[k], np.float64), np.asarray(_numpy(got.get("scores")), np.float64)
    if ws.ndim != 1 or gs.shape != ws.shape or not ws.size:
        return got
    rows = [n for n, w in zip(names, want) if np.ndim(w) >= 1 and np.shape(w)[0] == ws.shape[0]]
    g = {n: np.asarray(_numpy(got[n]), np.float64).reshape(ws.shape[0], -1) for n in rows}
    w = {n: np.asarray(want[names.index(n)], np.float64).reshape(ws.shape[0], -1) for n in rows}
    tol = tol * max(1.0, float(np.abs(ws).max()))
    free, order = set(range(ws.shape[0])), [-1] * ws.shape[0]
    for i in range(ws.shape[0]):
        cand = [j for j in free if abs(gs[j] - ws[i]) <= tol
                and ("labels" not in g or np.array_equal(g["labels"][j], w["labels"][i]))]
        if cand:
            j = min(cand, key=lambda j: sum(float(np.abs(g[n][j] - w[n][i]).sum()) for n in rows))
            free.discard(j)
            order[i] = j
    rest = iter(sorted(free))
    order = [j if j >= 0 else next(rest) for j in order]
    return {**got, **{n: _numpy(got[n])[order] for n in rows}}


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def worst(errs: dict[str, float | str]) -> float | str:
    bad = [v for v in errs.values() if isinstance(v, str)]
    if bad:
        return bad[0]
    return max(errs.values()) if errs else float("nan")  # type: ignore[type-var]


def profile_for(m: ZooModel) -> Any:
    from kiln.builder import OptimizationProfile
    p = OptimizationProfile()
    for i in m.inputs:
        if not i.shape:
            continue
        p.set_shape(i.name, i.concrete(m.point("min")), i.concrete(m.point("opt")), i.concrete(m.point("max")))
    return p


def onnx_nodes(path: str) -> tuple[int, int]:
    """(nodes without Constant, all nodes) of the main graph."""
    import onnx
    g = onnx.load(path, load_external_data=False).graph
    return sum(n.op_type != "Constant" for n in g.node), len(g.node)


def plan_stats(plan: Any) -> dict[str, Any]:
    """Layer counts of a plan; "on ref" leaves out the shape layers the runtime computes on the host once per input
    shape (kiln.runtime.prologue), which run no kernel per inference ("host")."""
    from kiln.backends.tactic import is_layer
    from kiln.runtime.engine import check_plan
    from kiln.runtime.prologue import shape_prologue
    graph = check_plan(plan, "plan")[0]
    host = {graph.nodes[i].name for i in shape_prologue(graph, graph.input_symbols())}
    steps = plan.graph["steps"]
    layers = [s for s in steps if is_layer(s["tactic"])]
    ref = Counter(s["op"] for s in layers if s["tactic"] == "ref" and s["name"] not in host)
    return {"layers": len(layers), "views": plan.build.get("views", 0), "elided": plan.build.get("elided", 0),
            "ref": sum(ref.values()), "ref_ops": dict(ref.most_common()), "host": len(host),
            "tactics": dict(Counter(s["tactic"] for s in layers).most_common())}


def ort_session(path: str, threads: int, optimize: bool = True) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ov_runner(path: str, threads: int, feeds: dict[str, np.ndarray], precision: str = "f32") -> Callable[[], Any]:
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
                                                "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    req = compiled.create_infer_request()
    names = [p.get_any_name() for p in compiled.inputs]
    data = {n: feeds[n] for n in names}

    def run() -> Any:
        return req.infer(data)
    return run


def measure(runners: dict[str, Callable[[], Any]], blocks: int, iters: int | None, warmup: int,
            block_s: float = 0.3) -> dict[str, list[float]]:
    """ms per run, in blocks settled first, engines rotating per block (benchmarks/rotation.py).
    iters None: per engine, as many runs as fill about block_s seconds (3 to 20)."""
    per: dict[str, int] = {}
    for n, run in runners.items():
        ts = []
        for _ in range(max(warmup, 1)):
            t = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t)
        per[n] = iters or max(3, min(20, round(block_s / max(min(ts), 1e-6))))
    return rotating_blocks(runners, blocks, per.__getitem__, 0)


class Capture:
    """Kiln's logger output and Python warnings during a build or a run: counted and the first kept."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.warnings: list[str] = []

    def logger(self) -> Any:
        from kiln.logger import Logger, Severity
        return Logger(Severity.WARNING, self.stream)

    def __enter__(self) -> "Capture":
        self._cm = warnings.catch_warnings(record=True)
        self._rec = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)
        noise = (ResourceWarning, DeprecationWarning, PendingDeprecationWarning, FutureWarning)
        self.warnings += [str(w.message) for w in self._rec if not issubclass(w.category, noise)
                          and ("kiln" in str(w.message).lower() or "kiln" in (w.filename or ""))]

    def lines(self) -> list[str]:
        return [ln for ln in self.stream.getvalue().splitlines() if ln.strip()] + self.warnings


# ---------------------------------------------------------------- one model


def run_model(m: ZooModel, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"model": m.name, "source": m.source, "exporter": m.exporter, "family": m.family,
                           "profile": {d: list(r) for d, r in m.dims.items()}, "checks": list(m.checks)}
    miss = m.missing() if not os.path.exists(m.path(args.cache)) else []  # a cached file needs no package
    if miss:
        row["skipped"] = f"not installed: {', '.join(miss)}"
        return row
    try:
        t = time.perf_counter()
        path = m.ensure(args.cache)
        row["export_s"] = round(time.perf_counter() - t, 1)
    except Exception as e:
        row["skipped"] = f"export failed: {one_line(e)}"
        traceback.print_exc()
        return row
    row["onnx"] = path
    row["onnx_mb"] = round(os.path.getsize(path) / 2**20, 1)
    row["nodes"], row["nodes_all"] = onnx_nodes(path)
    if args.device == "cuda":
        return run_cuda(m, path, row, args)
    return run_cpu(m, path, row, args)


def build(m: ZooModel, path: str, row: dict[str, Any], args: argparse.Namespace, device: str, fp16: bool) -> Any:
    """The plan, or None with row['build'] holding the one-line failure."""
    from kiln.builder import Builder, BuilderConfig
    from kiln.errors import KilnError
    cap = Capture()
    t = time.perf_counter()
    try:
        with cap:
            bf16 = bool(getattr(args, "bf16", False)) and device == "cpu"
            plan = Builder(cap.logger()).build(path, BuilderConfig(device=device, fp16=fp16, bf16=bf16,
                                                                   profiles=[profile_for(m)],
                                                                   optimization_level=args.opt_level,
                                                                   timing_cache=args.timing_cache))
    except KilnError as e:
        row["build"] = f"FAIL {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        row["build_s"] = round(time.perf_counter() - t, 1)
        row["build_log"] = cap.lines()[:5]
        return None
    row["build"] = "ok"
    row["build_s"] = round(time.perf_counter() - t, 1)
    row.update(plan_stats(plan))
    lines = cap.lines()
    if lines:
        row["build_warnings"] = len(lines)
        row["build_log"] = lines[:3]
    return plan


def accuracy(m: ZooModel, ctx: Any, sess: Any, row: dict[str, Any], device: str, path: str,
             tol: float | None = None) -> None:
    """Kiln vs ORT at the two check points; also ORT unoptimized vs ORT optimized (the 'floor': how far
    two correct FP32 evaluation orders of this model already disagree at that input)."""
    from kiln.errors import KilnError
    names = [o.name for o in sess.get_outputs()]
    plain = ort_session(path, sess.get_session_options().intra_op_num_threads, optimize=False)
    row["acc"] = []
    for k, dims in enumerate(m.checks):
        feeds = m.feeds(dims, seed=100 + k)
        entry: dict[str, Any] = {"dims": dims}
        try:
            want = sess.run(None, feeds)
            floor = dict(zip(names, plain.run(None, feeds)))
            if m.family == "detection":
                floor = match_detections(floor, want, names)
            entry["floor"] = worst(rel_errs(floor, want, names))
            other = sess.run(None, m.feeds(dims, seed=200 + k))
            floats = [(n, a, b) for n, a, b in zip(names, want, other) if np.issubdtype(a.dtype, np.floating)]
            if floats and all(a.shape == b.shape and np.array_equal(a, b) for _, a, b in floats):
                entry["vacuous"] = [n for n, _, _ in floats]  # the same outputs for other inputs: proves nothing
        except Exception as e:
            entry["err"] = f"ORT failed: {one_line(e)}"
            row["acc"].append(entry)
            continue
        cap = Capture()
        try:
            with cap:
                if device == "cuda":
                    import torch
                    got = ctx.execute({n: torch.from_numpy(v).cuda() for n, v in feeds.items()})
                    torch.cuda.synchronize()
                else:
                    got = ctx.execute(feeds)
        except KilnError as e:
            entry["err"] = "run failed"
            entry["why"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:400]}"
            row["acc"].append(entry)
            continue
        if m.family == "detection":
            got = match_detections(got, want, names, TOL[device] if tol is None else tol)
        errs = rel_errs(got, want, names)
        entry["per_output"] = errs
        entry["err"] = worst(errs)
        if cap.lines():
            entry["warnings"] = cap.lines()[:3]
        row["acc"].append(entry)
    tol = TOL[device] if tol is None else tol
    vals = [a["err"] for a in row["acc"]]
    row["acc_pass"] = all(isinstance(v, float) and v <= tol for v in vals) and not any(
        a.get("vacuous") for a in row["acc"])


def run_cpu(m: ZooModel, path: str, row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    sess = ort_session(path, args.threads)
    plan = build(m, path, row, args, "cpu", False)
    log(f"{m.name}: build {row['build']} ({row['build_s']} s)")
    if plan is None:
        return row
    from kiln.errors import KilnError
    from kiln.runtime.engine import Engine
    try:
        engine = Engine(plan)
        ctx = engine.create_execution_context()
    except KilnError as e:
        row["build"] = f"FAIL load {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        return row
    accuracy(m, ctx, sess, row, "cpu", path, BF16_TOL if args.bf16 else None)
    log(f"{m.name}: accuracy " + ", ".join(_fmt_err(a["err"]) for a in row["acc"]))
    if args.skip_latency:
        return row
    feeds = m.feeds(m.point("opt"), seed=1)
    feeds_t = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def kiln() -> Any:
        with torch.inference_mode():
            return ctx.execute(feeds_t)
    runners: dict[str, Callable[[], Any]] = {}
    try:
        kiln()
        runners["kiln"] = kiln
    except KilnError as e:
        row["latency_note"] = f"Kiln run failed: {one_line(e)}"
    runners["ort"] = lambda: sess.run(None, feeds)
    try:
        ov = ov_runner(path, args.threads, feeds, "bf16" if args.bf16 else "f32")
        res = ov()
        want = sess.run(None, feeds)
        ov_out = [np.asarray(res[i]) for i in range(len(want))]
        e = worst(rel_errs(dict(zip(range(len(want)), ov_out)), want, list(range(len(want)))))  # type: ignore[arg-type]
        row["ov_vs_ort"] = e
        runners["ov"] = ov
    except Exception as e:
        row["ov_note"] = f"OpenVINO failed: {one_line(e)}"
    times = measure(runners, args.blocks, args.iters, args.warmup)
    for n, ts in times.items():
        row[f"{n}_ms"] = statistics.median(ts)
        row[f"{n}_runs"] = len(ts)
    log(f"{m.name}: " + ", ".join(f"{n} {statistics.median(ts):.2f} ms" for n, ts in times.items()))
    return row


def run_cuda(m: ZooModel, path: str, row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    if not torch.cuda.is_available():
        row["skipped"] = "no CUDA GPU"
        return row
    sess = ort_session(path, os.cpu_count() or 1)
    plan = build(m, path, row, args, "cuda", True)
    log(f"{m.name}: build {row['build']} ({row['build_s']} s)")
    if plan is None:
        return row
    from kiln.errors import KilnError
    from kiln.runtime.engine import Engine
    try:
        engine = Engine(plan)
        ctx = engine.create_execution_context()
    except KilnError as e:
        row["build"] = f"FAIL load {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        return row
    accuracy(m, ctx, sess, row, "cuda", path)
    log(f"{m.name}: accuracy " + ", ".join(_fmt_err(a["err"]) for a in row["acc"]))
    if args.skip_latency:
        return row
    feeds = m.feeds(m.point("opt"), seed=1)
    feeds_t = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
    try:
        ctx.execute_async(feeds_t)
        torch.cuda.synchronize()
        row["kiln_ms"] = cuda_bench(lambda: ctx.execute_async(feeds_t))
        row["kiln_graph"] = ctx.last_graph is not None
    except Exception as e:
        row["latency_note"] = f"Kiln run failed: {one_line(e)}"
    if m.torch_module is None:
        row["peer_note"] = "shipped ONNX model: no torch peer"
        return row
    try:
        net = m.torch_module().cuda().half().eval()
        xs = tuple(v.half() if v.is_floating_point() else v for v in feeds_t.values())
        try:
            row["torch_fp16_err"] = torch_fp16_error(m, net, sess)
        except Exception as e:
            row["torch_fp16_err"] = f"failed: {one_line(e)}"
        row.update(torch_peers(net, xs, compile_ok=not args.no_compile))
    except Exception as e:
        row["peer_note"] = f"torch peer failed: {one_line(e)}"
    log(f"{m.name}: " + ", ".join(f"{k} {row[k]:.3f} ms" for k in ("kiln_ms", "eager_ms", "graph_ms", "compile_ms")
                                  if isinstance(row.get(k), float)))
    return row


def torch_fp16_error(m: ZooModel, net: Any, sess: Any) -> float | str:
    """The torch module's own FP16 error against ORT FP32 at the first check point (the accuracy row's shape A):
    what FP16 costs in PyTorch eager, beside Kiln's FP16 error."""
    import torch
    names = [o.name for o in sess.get_outputs()]
    feeds = m.feeds(m.checks[0], seed=100)
    want = sess.run(None, feeds)
    xs = tuple(torch.from_numpy(v).cuda() for v in feeds.values())
    with torch.inference_mode():
        out = net(*(x.half() if x.is_floating_point() else x for x in xs))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    got = {n: o.float().cpu().numpy() for n, o in zip(names, outs)}
    if m.family == "detection":  # the metric Kiln's FP16 error is read with
        got = match_detections(got, want, names, TOL["cuda"])
    return worst(rel_errs(got, want, names))


def cuda_bench(fn: Callable[[], Any], runs: int = 50, warmup: int = 10) -> float:
    """Median ms of fn over runs, each from an idle GPU, timed with CUDA events (scripts/gpu_check.py)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def torch_peers(net: Any, xs: tuple[Any, ...], compile_ok: bool) -> dict[str, Any]:
    """Eager, eager + CUDA graph and torch.compile latencies (ms) of a torch module; each guarded."""
    import torch
    res: dict[str, Any] = {}
    notes = []
    with torch.inference_mode():
        res["eager_ms"] = cuda_bench(lambda: net(*xs))
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    net(*xs)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                net(*xs)
            res["graph_ms"] = cuda_bench(g.replay)
        except Exception as e:
            notes.append(f"CUDA graph capture failed: {one_line(e)}")
            torch.cuda.synchronize()
    if compile_ok:
        try:
            t = time.perf_counter()
            cnet = torch.compile(net, mode="reduce-overhead", dynamic=False)
            with torch.inference_mode():
                for _ in range(3):
                    cnet(*xs)
                torch.cuda.synchronize()
                res["compile_s"] = round(time.perf_counter() - t, 1)
                res["compile_ms"] = cuda_bench(lambda: cnet(*xs))
        except Exception as e:
            notes.append(f"torch.compile failed: {one_line(e)}")
    if notes:
        res["peer_note"] = "; ".join(notes)
    return res


# ---------------------------------------------------------------- tables


def _fmt_err(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1e}"
    return str(v)


def _ms(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else "-"


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def _dims(d: dict[str, int]) -> str:
    return ",".join(f"{k}{v}" for k, v in d.items())


def render(rows: list[dict[str, Any]], mach: dict[str, str], args: argparse.Namespace, cmd: str) -> str:
    dev = args.device
    tol = BF16_TOL if dev == "cpu" and args.bf16 else TOL[dev]
    out = [f"# Kiln model zoo ({dev}{', FP16' if dev == 'cuda' else (', BF16' if args.bf16 else ', FP32')})", "",
           f"Command: `{cmd}`", "",
           f"Date: {mach['date']}. Machine: {mach['cpu']} ({mach['cores']} cores; {mach['isa']})"
           + (f"; GPU {mach['gpu']}" if "gpu" in mach else "") + ".",
           f"Versions: kiln {mach['kiln']}, torch {mach['torch']}, onnxruntime {mach['onnxruntime']}, "
           f"OpenVINO {mach['openvino']}, onnx {mach['onnx']}, timm {mach['timm']}, transformers {mach['transformers']}, "
           f"torchvision {mach['torchvision']}, Python {mach['python']}.",
           (f"Settings: {args.threads} threads per engine, Kiln optimization level {args.opt_level}, "
            + ("Kiln and OpenVINO in BF16 (ORT FP32), " if args.bf16 else "") +
            f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; {mach['load']}." if dev == "cpu" else
            f"Settings: Kiln optimization level {args.opt_level}, FP16; the ORT reference uses every core; "
            f"{mach['load']}."), ""]
    dims_note = "".join(", " + d for d in args.dim or [])
    if dev == "cpu":
        out += [f"Accuracy: normwise relative error ||Kiln - ORT|| / ||ORT|| (worst output) at two shapes; pass <= {tol:g}. "
                "ORT floor: ORT with graph optimizations off vs on, the spread of two correct FP32 evaluations. "
                f"Latency: batch {args.batch or 1}{dims_note} at the profile's opt point, median ms; Kiln/ORT and Kiln/OV < 1: Kiln faster.", "",
                "| model | source | exporter | build | nodes -> layers | on ref | acc shape A | acc shape B | pass "
                "| Kiln ms | ORT ms | OV ms | Kiln/ORT | Kiln/OV | build s |",
                "|---|---|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    else:
        out += [f"Accuracy: Kiln FP16 vs ONNX Runtime FP32, normwise relative error (worst output); pass <= {tol:g}. "
                f"Latency: batch {args.batch or 1}{dims_note} at the profile's opt point, median ms (CUDA events); torch peers in "
                "FP16.", "",
                "| model | source | exporter | build | nodes -> layers | on ref | acc shape A | acc shape B | pass "
                "| Kiln ms | eager ms | eager+graph ms | compile ms | Kiln/graph | Kiln/compile | build s |",
                "|---|---|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    failures, notes = [], []
    for r in rows:
        head = f"| {r['model']} | {r['source']} | {r['exporter']} "
        if "skipped" in r:
            out.append(head + f"| skipped | | | | | | " + "| " * (6 if dev == "cpu" else 7) + "|")
            failures.append(f"- {r['model']}: skipped: {r['skipped']}")
            continue
        ok = r.get("build") == "ok"
        build = "ok" if ok else "**FAIL**"
        if not ok:
            failures.append(f"- {r['model']}: {r.get('build')}")
        acc = r.get("acc", [])
        accs = [f"{_fmt_err(a['err'])} ({_dims(a['dims'])}"
                + (f"; ORT floor {_fmt_err(a['floor'])}" if isinstance(a.get("floor"), float) else "") + ")"
                for a in acc] + ["-"] * (2 - len(acc))
        passed = "-" if not acc else ("yes" if r.get("acc_pass") else "**no**")
        layers = f"{r['nodes']} -> {r['layers']}" if ok else f"{r['nodes']} -> -"
        ref = str(r.get("ref", "-"))
        if dev == "cpu":
            k, o, v = r.get("kiln_ms"), r.get("ort_ms"), r.get("ov_ms")
            ro, rv = _ratio(k, o), _ratio(k, v)
            out.append(head + f"| {build} | {layers} | {ref} | {accs[0]} | {accs[1]} | {passed} | {_ms(k)} | {_ms(o)} "
                       f"| {_ms(v)} | {f'{ro:.2f}' if ro else '-'} | {f'{rv:.2f}' if rv else '-'} | {r.get('build_s', '-')} |")
        else:
            k = r.get("kiln_ms")
            rg, rc = _ratio(k, r.get("graph_ms")), _ratio(k, r.get("compile_ms"))
            out.append(head + f"| {build} | {layers} | {ref} | {accs[0]} | {accs[1]} | {passed} | {_ms(k)} "
                       f"| {_ms(r.get('eager_ms'))} | {_ms(r.get('graph_ms'))} | {_ms(r.get('compile_ms'))} "
                       f"| {f'{rg:.2f}' if rg else '-'} | {f'{rc:.2f}' if rc else '-'} | {r.get('build_s', '-')} |")
        if r.get("ref_ops"):
            notes.append(f"- {r['model']}: on ref: " + ", ".join(f"{op} {n}" for op, n in r["ref_ops"].items())
                         + (f" (and {r['host']} shape layers on the host, once per input shape)" if r.get("host")
                            else ""))
        for a in acc:
            if isinstance(a.get("err"), str) or (isinstance(a.get("err"), float) and a["err"] > tol):
                per = a.get("per_output") or {}
                detail = ", ".join(f"{n} {_fmt_err(e)}" for n, e in per.items()) if len(per) > 1 else ""
                floor = a.get("floor")
                within = (isinstance(floor, float) and isinstance(a.get("err"), float) and a["err"] <= 2 * floor)
                notes.append(f"- {r['model']}: accuracy at {_dims(a['dims'])}: {_fmt_err(a['err'])}"
                             + (f": {a['why']}" if a.get("why") else "")
                             + (f" (per output: {detail})" if detail else "")
                             + (f"; within 2x of ORT's own optimized-vs-unoptimized spread ({_fmt_err(floor)}):"
                                " the model is ill-conditioned at this input" if within else ""))
            if a.get("vacuous"):
                notes.append(f"- {r['model']}: at {_dims(a['dims'])} ORT gives the same {', '.join(a['vacuous'])} for "
                             "other inputs (degenerate random weights): the accuracy check proves nothing")
            for w in a.get("warnings", []):
                notes.append(f"- {r['model']}: run at {_dims(a['dims'])} warned: {w[:300]}")
        run_failed = any(a.get("err") == "run failed" for a in acc)
        for key in ("latency_note", "ov_note", "peer_note"):
            if key == "latency_note" and run_failed:
                continue  # the same failure as the accuracy runs, already noted
            if r.get(key):
                notes.append(f"- {r['model']}: {r[key]}")
        if r.get("torch_fp16_err") is not None and acc:
            notes.append(f"- {r['model']}: FP16 error vs ORT FP32 at {_dims(acc[0]['dims'])}: Kiln "
                         f"{_fmt_err(acc[0].get('err'))}, PyTorch FP16 eager {_fmt_err(r['torch_fp16_err'])}")
        if isinstance(r.get("ov_vs_ort"), float) and (r["ov_vs_ort"] > 1e-3 or args.bf16) or \
                isinstance(r.get("ov_vs_ort"), str):
            notes.append(f"- {r['model']}: OpenVINO output vs ORT: {_fmt_err(r['ov_vs_ort'])}")
        if r.get("build_warnings"):
            notes.append(f"- {r['model']}: build logged {r['build_warnings']} warnings, first: {r['build_log'][0][:300]}")
    out.append("")
    if dev == "cpu":
        out += summary(rows, ("kiln_ms", "ort_ms"), "Kiln/ORT") + summary(rows, ("kiln_ms", "ov_ms"), "Kiln/OV")
    else:
        out += summary(rows, ("kiln_ms", "graph_ms"), "Kiln/eager+graph") + \
            summary(rows, ("kiln_ms", "compile_ms"), "Kiln/torch.compile")
    n_ok = sum(r.get("build") == "ok" for r in rows)
    n_acc = sum(bool(r.get("acc_pass")) for r in rows)
    out += ["", f"Built {n_ok} of {len(rows)} models; {n_acc} pass the accuracy check at both shapes.", ""]
    if failures:
        out += ["Failures:", ""] + failures + [""]
    if notes:
        out += ["Notes:", ""] + notes + [""]
    out += ["Models (profile min/opt/max per dim; accuracy shapes A and B; cached ONNX file):", ""]
    for r in rows:
        prof = ", ".join(f"{d} {'/'.join(map(str, v))}" for d, v in r.get("profile", {}).items())
        chk = " and ".join(_dims(c) for c in r.get("checks", []))
        out.append(f"- {r['model']}: {prof}; checks {chk}; `{r.get('onnx', '-')}`"
                   + (f" ({r['onnx_mb']} MB, {r['nodes_all']} nodes with Constants)" if "onnx_mb" in r else ""))
    return "\n".join(out) + "\n"


def summary(rows: list[dict[str, Any]], keys: tuple[str, str], label: str) -> list[str]:
    out = []
    groups = {"conv + detection models": [r for r in rows if r.get("family") in ("conv", "detection")],
              "all models": rows}
    for gname, rs in groups.items():
        vals = [(r["model"], _ratio(r.get(keys[0]), r.get(keys[1]))) for r in rs]
        vals = [(n, v) for n, v in vals if v is not None]
        if not vals:
            continue
        mx = max(vals, key=lambda t: t[1])
        out.append(f"- {label} over {gname} ({len(vals)}): median {statistics.median(v for _, v in vals):.2f}x, "
                   f"max {mx[1]:.2f}x ({mx[0]})")
    return out


def print_row(r: dict[str, Any]) -> None:
    if "skipped" in r:
        log(f"{r['model']}: skipped: {r['skipped']}")
        return
    parts = [f"build {r.get('build')}", f"{r.get('nodes')} nodes -> {r.get('layers', '-')} layers",
             f"{r.get('ref', '-')} on ref"]
    if r.get("ref_ops"):
        parts.append("ref ops " + ", ".join(f"{k} {v}" for k, v in r["ref_ops"].items()))
    for a in r.get("acc", []):
        parts.append(f"acc {_dims(a['dims'])} {_fmt_err(a['err'])}")
    for k in ("kiln_ms", "ort_ms", "ov_ms", "eager_ms", "graph_ms", "compile_ms"):
        if isinstance(r.get(k), float):
            parts.append(f"{k[:-3]} {r[k]:.2f} ms")
    log(f"== {r['model']}: " + "; ".join(parts))


# ---------------------------------------------------------------- driver


def at_opt(m: ZooModel, opts: dict[str, int]) -> ZooModel:
    """m with each named dim's profile opt point set (the tuning and latency point; min and max widen to fit)."""
    dims = dict(m.dims)
    for name, val in opts.items():
        if val and name in dims:
            lo, _, hi = dims[name]
            dims[name] = zoo_models.around(val) if hi == 0 else (min(lo, val), val, max(hi, val))
    unset = [d for d, r in dims.items() if r[2] == 0]
    if unset:
        raise SystemExit(f"{m.name}: give the profile of dim(s) {', '.join(unset)} (@DIM=MIN/OPT/MAX or --dim)")
    if m.source == "file":  # its checks follow the profile
        return dataclasses.replace(m, dims=dims, checks=zoo_models.file_checks(dims))
    return dataclasses.replace(m, dims=dims)


def opt_points(args: argparse.Namespace) -> dict[str, int]:
    """--batch and every --dim NAME=N as {dim: opt}."""
    out = {"batch": args.batch} if args.batch else {}
    for spec in args.dim or []:
        name, _, val = spec.partition("=")
        if not name or not val.isdigit() or int(val) < 1:
            raise SystemExit(f"--dim takes NAME=N with N >= 1, got '{spec}'")
        out[name] = int(val)
    return out


def select(models: list[ZooModel], spec: str | None, opts: dict[str, int] | None = None) -> list[ZooModel]:
    models = [at_opt(m, opts or {}) for m in models]
    if not spec:
        return models
    pats = [s.strip() for s in spec.split(",") if s.strip()]
    chosen = [m for m in models if any(fnmatch.fnmatch(m.name, p) for p in pats)]
    for p in pats:
        extra = zoo_models.adhoc(p) if not any(m.name == p for m in models) else None
        if extra is not None:
            chosen.append(at_opt(extra, opts or {}))
    unknown = [p for p in pats if not any(fnmatch.fnmatch(m.name, p) for m in chosen)]
    if unknown:
        raise SystemExit(f"unknown model(s): {', '.join(unknown)} (--list shows them)")
    return chosen


def worker(args: argparse.Namespace) -> int:
    """Run one model in this process and write its row as JSON to --result."""
    limit_memory(args.mem_limit if args.device == "cpu" else 0)  # CUDA reserves far more address space
    configure(args)
    m = select(zoo_models.registry(), args.models, opt_points(args))[0]
    try:
        row = run_model(m, args)
    except Exception as e:
        traceback.print_exc()
        row = {"model": m.name, "source": m.source, "exporter": m.exporter, "family": m.family,
               "build": f"FAIL (benchmark error) {one_line(e)}", "nodes": "?"}
    with open(args.result, "w") as f:
        json.dump(row, f, default=str)
    return 0


def limit_memory(gb: float) -> None:
    """Cap this process's address space, so that a runaway build fails with MemoryError here instead of
    waking the kernel's OOM killer on a shared machine."""
    if gb <= 0:
        return
    try:
        import resource
        lim = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    except (ImportError, ValueError, OSError):
        pass


def configure(args: argparse.Namespace) -> None:
    import torch
    if args.device == "cpu":
        from kiln.backends.cpu.runtime import configure as kiln_configure
        kiln_configure(threads=args.threads)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def child(m: ZooModel, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """One model in a child process (a crash or hang is one row); its output goes straight to ours."""
    fd, res = tempfile.mkstemp(suffix=".json", prefix=f"zoo_{m.name.replace(os.sep, '_')}_")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), *strip(argv), "--models", m.name, "--worker", "--result", res]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, timeout=args.timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        rc = None
    try:
        with open(res) as f:
            text = f.read()
        if text:
            return json.loads(text)
    finally:
        os.unlink(res)
    why = f"timed out after {args.timeout} s" if rc is None else f"process died (exit code {rc})"
    return {"model": m.name, "source": m.source, "exporter": m.exporter, "family": m.family,
            "build": f"FAIL (crash) {why} after {time.perf_counter() - t:.0f} s", "nodes": "?",
            "profile": {d: list(r) for d, r in m.dims.items()}, "checks": list(m.checks)}


def strip(argv: list[str]) -> list[str]:
    """argv less --models/--out (the child gets one model and writes nothing)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--models", "--out"):
            skip = True
            continue
        if a.startswith(("--models=", "--out=")):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names or globs (default: all; --list shows them), or "
                    "models named ad hoc: timm:ARCH, timm-dynamo:ARCH, tv:NAME")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    ap.add_argument("--threads", type=int, default=2, help="threads per engine (CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed runs per block (default: ~0.3 s worth, 3-20)")
    ap.add_argument("--blocks", type=int, default=5, help="blocks per engine, engines rotating per block")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cache", default=os.environ.get("KILN_ZOO_CACHE", DEFAULT_CACHE),
                    help=f"folder of the exported/copied ONNX files (default {DEFAULT_CACHE})")
    ap.add_argument("--out", help="also write the results as markdown to this file")
    ap.add_argument("--timing-cache", metavar="FILE", help="Kiln's timing cache: read before each build and "
                    "written after it (a later run reuses the measurements instead of timing every tactic again)")
    ap.add_argument("--skip-latency", action="store_true", help="build and accuracy only")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch of the profile's opt point (tuning and latency; default 1); models without a "
                         "batch dim keep theirs")
    ap.add_argument("--dim", action="append", metavar="NAME=N",
                    help="opt point of a named dim, e.g. seq=128 (repeatable; min/max widen to fit)")
    ap.add_argument("--opt-level", type=int, default=3, help="Kiln builder optimization level")
    ap.add_argument("--bf16", action="store_true", help="CPU: Kiln --bf16 and OpenVINO's bf16 inference precision "
                    "(ORT stays FP32, the reference); accuracy pass <= 3e-2")
    ap.add_argument("--no-compile", action="store_true", help="CUDA: skip the torch.compile peer")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model (child process)")
    ap.add_argument("--in-process", action="store_true", help="run every model in this process (debugging)")
    ap.add_argument("--kiln", metavar="DIR", help="import Kiln from this source tree instead of this checkout "
                    "(e.g. an export of a commit: git archive HEAD | tar -x -C DIR)")
    ap.add_argument("--mem-limit", type=float, default=12,
                    help="GiB of address space per model process (RLIMIT_AS; 0: none). CPU only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.cache = os.path.abspath(os.path.expanduser(args.cache))
    if args.worker:
        return worker(args)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        ap.error(f"--out {args.out}: folder {os.path.dirname(os.path.abspath(args.out))} does not exist")
    models = select(zoo_models.registry(), args.models, opt_points(args))
    if args.list:
        for m in models:
            miss = m.missing()
            print(f"{m.name:32s} {m.source:26s} {m.exporter:38s} {m.family:12s} {m.path(args.cache)}"
                  + (f"  [missing: {', '.join(miss)}]" if miss else ""))
            print(f"{'':32s} {m.what}")
        return 0
    mach = machine(args.device)
    load = LoadMeter("the models' runs")
    load.sample_before()
    log(f"{mach['cpu']} ({mach['isa']}); torch {mach['torch']}, onnxruntime {mach['onnxruntime']}, "
        f"OpenVINO {mach['openvino']}; {len(models)} models; cache {args.cache}")
    if args.in_process:
        limit_memory(args.mem_limit if args.device == "cpu" else 0)
        configure(args)
    rows = []
    for m in models:
        log(f"--- {m.name} ({m.source}, {m.exporter})")
        with load.measure():  # the model's child process is ours: waited for, so not counted as load
            row = one_model(m, args, argv)
        print_row(row)
        rows.append(row)
    mach["load"] = load.describe()
    cmd = "python benchmarks/zoo.py " + " ".join(argv)
    text = render(rows, mach, args, cmd.strip())
    print()
    print(text)
    if args.out:
        write_out(args.out, text)
        print(f"wrote {args.out}")
    return 0


def one_model(m: ZooModel, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """One model's row: in this process (--in-process) or in a child."""
    if not args.in_process:
        return child(m, args, argv)
    try:
        return run_model(m, args)
    except Exception as e:
        traceback.print_exc()
        return {"model": m.name, "source": m.source, "exporter": m.exporter, "family": m.family,
                "build": f"FAIL (benchmark error) {one_line(e)}", "nodes": "?"}


def write_out(path: str, text: str) -> None:
    """The results file, atomically (a temp file beside it, renamed over it). Not kiln.fileio: --kiln may
    import an older Kiln tree."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".zoo-", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


if __name__ == "__main__":
    raise SystemExit(main())
