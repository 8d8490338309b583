"""Per-layer GPU profile of a zoo model: where Kiln's time goes on CUDA, next to torch.compile's kernels.

    python benchmarks/gpu_profile.py MODEL[,MODEL...] [--batch 1] [--top 20] [--cache DIR] [--peer]

Builds each zoo model (benchmarks/zoo_models.py) for CUDA in FP16 with its optimization profile (opt batch
--batch), then:
1. latency with CUDA graphs (median of 50, CUDA events from an idle GPU, as benchmarks/zoo.py);
2. per layer: a CUDA event recorded after each step's launch (the runtime's step hook, no graph), so a
   layer's span is the GPU time between the previous step's end and its own (its kernels plus any idle
   gap the host left); printed by op type, by tactic, and the --top slowest layers;
3. the kernels torch.profiler sees in one Kiln run (top --top by total CUDA time), and with --peer the
   same for the torch module under torch.compile (mode "max-autotune-no-cudagraphs" is not used: the
   peer is compiled as in zoo.py, "reduce-overhead").
Writes nothing.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import zoo  # noqa: E402


def kernel_table(fn: Any, top: int, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = rows[e.name[:90]]
            r[0] += e.device_time_total / 1e3
            r[1] += 1
    total = sum(r[0] for r in rows.values())
    print(f"\n{label}: {sum(r[1] for r in rows.values())} kernels, {total:.3f} ms of kernel time")
    for name, (ms, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ms:8.3f} ms {n:4d}x  {name}")


def step_spans(ctx: Any, run: Callable[[], Any], runs: int) -> tuple[dict[str, float], dict[str, str]]:
    """Per-step GPU spans of `ctx` (no CUDA graph) over `runs` calls of `run` (one inference on ctx): a CUDA event
    recorded after each step's launch (the runtime's step hook), a step's span the GPU time between the previous
    step's event and its own. Returns ({step name: median ms}, {step name: op type}), in execution order."""
    spans: dict[str, list[float]] = collections.defaultdict(list)
    ops: dict[str, str] = {}
    for _ in range(runs):
        marks: list[tuple[str, Any]] = []

        def hook(node: Any, _s: float, _result: Any = None) -> None:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            marks.append((node.name, e))
            ops[node.name] = node.op_type
        start = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        ctx.profiler = hook
        run()
        ctx.profiler = None
        torch.cuda.synchronize()
        prev = start
        for name, e in marks:
            spans[name].append(prev.elapsed_time(e))
            prev = e
    return {n: statistics.median(v) for n, v in spans.items()}, ops


def grouped(med: dict[str, float], key: Callable[[str], str]) -> list[tuple[str, float, int]]:
    """(group, total ms, steps) of the steps' spans grouped by key(step name), the largest total first."""
    agg: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for n, v in med.items():
        a = agg[key(n)]
        a[0] += v
        a[1] += 1
    return [(k, v[0], int(v[1])) for k, v in sorted(agg.items(), key=lambda kv: -kv[1][0])]


def profile_model(m: Any, args: argparse.Namespace) -> None:
    from kiln.builder import Builder, BuilderConfig
    from kiln.logger import Logger, Severity
    from kiln.runtime.engine import Engine
    path = m.ensure(args.cache)
    plan = Builder(Logger(Severity.ERROR)).build(path, BuilderConfig(device="cuda", fp16=True,
                                                                     profiles=[zoo.profile_for(m)],
                                                                     timing_cache=args.timing_cache))
    tactic = {s["name"]: s["tactic"] for s in plan.graph["steps"] if "name" in s}
    ctx = Engine(plan).create_execution_context()
    feeds = {k: torch.from_numpy(v).cuda() for k, v in m.feeds(m.point("opt"), seed=1).items()}
    ctx.execute_async(feeds)
    torch.cuda.synchronize()
    ms = zoo.cuda_bench(lambda: ctx.execute_async(feeds))
    print(f"\n=== {m.name} batch {m.point('opt').get('batch', '-')}: Kiln {ms:.3f} ms with CUDA graphs "
          f"({'graph' if ctx.last_graph is not None else 'no graph'}), {len(tactic)} steps")
    med, ops = step_spans(ctx, lambda: ctx.execute_async(feeds), args.runs)
    print(f"step spans (no graph): {sum(med.values()):.3f} ms")
    for key, label in ((lambda n: ops[n], "op"), (lambda n: tactic.get(n, "?"), "tactic")):
        print(f"by {label}: " + ", ".join(f"{k} {ms:.3f} ({n})" for k, ms, n in grouped(med, key)))
    print(f"slowest {args.top} steps:")
    for n, v in sorted(med.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {v:7.3f} ms  {ops[n][:18]:18s} {tactic.get(n, '?')[:24]:24s} {n[-60:]}")
    kernel_table(lambda: ctx.execute_async(feeds), args.top, "Kiln kernels (one run, no graph)")
    if args.peer and m.torch_module is not None:
        net = m.torch_module().cuda().half().eval()
        xs = tuple(v.half() if v.is_floating_point() else v for v in feeds.values())
        cnet = torch.compile(net, dynamic=False)
        with torch.inference_mode():
            kernel_table(lambda: cnet(*xs), args.top, "torch.compile kernels (one run)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", help="comma-separated zoo model names")
    ap.add_argument("--batch", type=int, default=None, help="opt batch (default: the model's)")
    ap.add_argument("--dim", action="append", metavar="NAME=N", help="opt point of a named dim, e.g. seq=128")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--peer", action="store_true", help="also list torch.compile's kernels")
    ap.add_argument("--cache", default=os.environ.get("KILN_ZOO_CACHE", zoo.DEFAULT_CACHE))
    ap.add_argument("--timing-cache", metavar="FILE", help="Kiln's timing cache, read before and written after each "
                    "build")
    args = ap.parse_args(argv)
    for m in zoo.select(zoo.zoo_models.registry(), args.models, zoo.opt_points(args)):
        profile_model(m, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
