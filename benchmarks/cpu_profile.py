"""Per-layer CPU profile: Kiln (runtime step hook) next to ONNX Runtime (its node profiler).

    python benchmarks/cpu_profile.py [resnet50|yolov4_tiny|ZOO_MODEL] [--threads 2] [--runs 20] [--opt-level 3]
                                     [--layers] [--bf16] [--cache DIR] [--batch N] [--dim NAME=N]

A ZOO_MODEL (benchmarks/zoo_models.py) is built with its optimization profile and run at batch 1 at the
profile's opt point, from the zoo's ONNX cache.

Prints wall time per inference for both, the sum of Kiln's per-layer medians (the rest of the wall time
is the interpreter and input handling), time per op type for both, and with --layers every Kiln layer
next to the ORT node of the same name (ORT names its NCHWc convs "<name>_nchwc").
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # see cpu_bench.py: must precede the torch import

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kiln.backends.cpu.runtime import configure  # noqa: E402
from kiln.builder import Builder, BuilderConfig  # noqa: E402
from kiln.ir.graph import Node  # noqa: E402
from kiln.logger import Logger, Severity  # noqa: E402
from kiln.runtime.engine import Engine  # noqa: E402


def _base(name: str) -> str:
    """ORT's node name as Kiln's layer name: ORT names a node it rewrote (NCHWc convs) after its output,
    "<name>_output_0_nchwc"; names keep their "/" scopes (a torch export's '/net/.../Conv')."""
    return name.removesuffix("_nchwc").removesuffix("_output_0")


def kiln_profile(model, feeds: dict[str, np.ndarray], runs: int, level: int,
                 profile=None, bf16: bool = False) -> tuple[list[float], dict[str, tuple[str, float]]]:
    """(wall ms per run, layer name -> (op type, median ms)) for a Kiln engine."""
    config = BuilderConfig(optimization_level=level, profiles=[] if profile is None else [profile], bf16=bf16)
    engine = Engine(Builder(Logger(Severity.WARNING)).build(model, config))
    TACTICS.update({s["name"]: s["tactic"] for s in engine.plan.graph["steps"] if "name" in s})
    ctx = engine.create_execution_context()
    feeds_t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    per: dict[str, list[float]] = collections.defaultdict(list)
    ops: dict[str, str] = {}

    def hook(node: Node, seconds: float, _result: Any = None) -> None:
        per[node.name].append(seconds * 1e3)
        ops[node.name] = node.op_type
    walls = []
    with torch.inference_mode():
        for i in range(2 * runs + 3):
            ctx.profiler = hook if i % 2 and i > 2 else None
            t0 = time.perf_counter()
            ctx.execute(feeds_t)
            if i > 2 and not i % 2:
                walls.append((time.perf_counter() - t0) * 1e3)
    return walls, {n: (ops[n], statistics.median(v)) for n, v in per.items()}


def ort_profile(model, feeds: dict[str, np.ndarray], runs: int, threads: int) -> tuple[list[float], dict[str, tuple[str, float]]]:
    """(wall ms per run, node name -> (op type, median ms)) for an ORT session (default optimizations)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="kiln-ort-profile-") as tmp:  # ORT's trace file, read then gone
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, feeds)
        walls = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            walls.append((time.perf_counter() - t0) * 1e3)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per: dict[str, list[float]] = collections.defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            per[name].append(e["dur"] / 1e3)
            ops[name] = e["args"].get("op_name", "?")
    return walls, {n: (ops[n], statistics.median(v[-runs:])) for n, v in per.items()}


TACTICS: dict[str, str] = {}


def by_op(layers: dict[str, tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for op, ms in layers.values():
        out[op] += ms
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="resnet50", help="resnet50, yolov4_tiny or a zoo model name")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "kiln-zoo"),
                    help="the zoo's ONNX cache (zoo models)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--opt-level", type=int, default=3, help="3 (the builder's default and the zoo's): every candidate timed; 0: heuristic tactics")
    ap.add_argument("--layers", action="store_true", help="print every layer")
    ap.add_argument("--bf16", action="store_true", help="Kiln in BF16 (ORT stays FP32)")
    ap.add_argument("--batch", type=int, default=None, help="a zoo model's opt batch (as zoo.py's --batch)")
    ap.add_argument("--dim", action="append", metavar="NAME=N", help="a zoo model's opt point for NAME (as zoo.py's --dim)")
    args = ap.parse_args(argv)
    configure(threads=args.threads)
    profile = None
    if args.model in ("resnet50", "yolov4_tiny"):
        from examples.zoo import resnet50, yolov4_tiny
        mod = {"resnet50": resnet50, "yolov4_tiny": yolov4_tiny}[args.model]
        model = mod.onnx_model(0, 1)
        feeds = {"input": np.random.default_rng(0).standard_normal((1, *mod.INPUT_SHAPE)).astype(np.float32)}
    else:
        import onnx
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import zoo
        m = {z.name: z for z in zoo.zoo_models.registry()}.get(args.model) or zoo.zoo_models.adhoc(args.model)
        if m is None:
            ap.error(f"unknown model {args.model!r}")
        m = zoo.at_opt(m, zoo.opt_points(args))
        model = onnx.load(m.ensure(args.cache))
        profile = zoo.profile_for(m)
        feeds = m.feeds(m.point("opt"), seed=1)
    k_wall, k_layers = kiln_profile(model, feeds, args.runs, args.opt_level, profile, args.bf16)
    o_wall, o_layers = ort_profile(model, feeds, args.runs, args.threads)
    k_sum, o_sum = sum(ms for _, ms in k_layers.values()), sum(ms for _, ms in o_layers.values())
    print(f"{args.model}: Kiln wall {statistics.median(k_wall):.2f} ms (layers {k_sum:.2f} ms), "
          f"ORT wall {statistics.median(o_wall):.2f} ms (nodes {o_sum:.2f} ms)")
    print("Kiln by op:", ", ".join(f"{op} {ms:.2f}" for op, ms in by_op(k_layers).items()))
    print("ORT  by op:", ", ".join(f"{op} {ms:.2f}" for op, ms in by_op(o_layers).items()))
    if args.layers:
        ort_by_base = {_base(n): ms for n, (_, ms) in o_layers.items()}
        print(f"{'layer':44s} {'op':10s} {'tactic':18s} {'Kiln ms':>8s} {'ORT ms':>8s}")
        for name, (op, ms) in k_layers.items():
            o = ort_by_base.get(_base(name))
            print(f"{name[-44:]:44s} {op[:10]:10s} {TACTICS.get(name, '?')[:18]:18s} {ms:8.3f} "
                  f"{'' if o is None else f'{o:8.3f}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
