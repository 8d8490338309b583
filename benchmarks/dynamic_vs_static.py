"""Dynamic-shape exports against static exports of the same model, at the profile's opt shape.

    python benchmarks/dynamic_vs_static.py [--device cuda|cpu] [--models bert_base,vit_base_patch16_224]
                                           [--batch 1] [--seq 128] [--cache DIR] [--out FILE]

For each zoo model (benchmarks/zoo_models.py) the script exports it twice from the same seeded torch
module: with its dynamic dims (the zoo's export, `dynamic_axes`) and with every dim fixed at the opt
point (no dynamic axes). Both are built by Kiln (FP16 on CUDA, FP32 on the CPU; the dynamic one with the
profile min/opt/max around the opt point), both run the same inputs at the opt point, and the script
prints layers, layers on `ref`, latency (CUDA events with CUDA graphs on the GPU; wall time on the CPU),
whether a CUDA graph was captured, the dynamic/static ratio and the normwise difference of the outputs.
Files are written only under --cache (the exported models) and --out (the results).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import zoo  # noqa: E402
import zoo_models  # noqa: E402
from zoo_models import In, ZooModel  # noqa: E402


def at_point(m: ZooModel, batch: int | None, seq: int | None) -> ZooModel:
    """m with its opt point moved to (batch, seq); the profile's range grows to hold it."""
    dims = dict(m.dims)
    for d, v in (("batch", batch), ("seq", seq)):
        if v and d in dims:
            lo, _, hi = dims[d]
            dims[d] = (min(lo, v), v, max(hi, v))
    return dataclasses.replace(m, dims=dims)


def static_twin(m: ZooModel) -> ZooModel:
    """The same model with every input dim fixed at m's opt point, exported without dynamic axes."""
    opt = m.point("opt")
    ins = [dataclasses.replace(i, shape=i.concrete(opt)) for i in m.inputs]
    tag = "_".join(f"{d}{v}" for d, v in sorted(opt.items()))
    twin = dataclasses.replace(m, name=f"{m.name}_static_{tag}", inputs=ins, dims={}, make_onnx=lambda p: None)

    def make(path: str) -> None:
        import torch
        args = tuple(torch.from_numpy(v) for v in m.feeds(opt, seed=0).values())
        zoo_models.export_torch(m.torch_module(), args, path, ins, m.output_names, dynamo=False)
    twin.make_onnx = make
    return twin


def plan_of(path: str, profile: Any, device: str) -> Any:
    from kiln.builder import Builder, BuilderConfig
    from kiln.logger import Logger, Severity
    cfg = BuilderConfig(device=device, fp16=device == "cuda", profiles=[profile] if profile is not None else [])
    return Builder(Logger(Severity.ERROR)).build(path, cfg)


def latency(ctx: Any, feeds: dict[str, Any], device: str) -> float:
    if device == "cuda":
        ctx.execute_async(feeds)
        return zoo.cuda_bench(lambda: ctx.execute_async(feeds))
    for _ in range(3):
        ctx.execute(feeds)
    ts = []
    for _ in range(15):
        t = time.perf_counter()
        ctx.execute(feeds)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def run(m: ZooModel, cache: str, device: str) -> dict[str, Any]:
    import torch
    from kiln.runtime.engine import Engine
    twin = static_twin(m)
    feeds = m.feeds(m.point("opt"), seed=1)
    feeds_t = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
    row: dict[str, Any] = {"model": m.name, "opt": zoo._dims(m.point("opt"))}
    outs = {}
    for kind, mm, prof in (("dynamic", m, zoo.profile_for(m)), ("static", twin, None)):
        path = mm.ensure(cache)
        t = time.perf_counter()
        plan = plan_of(path, prof, device)
        row[f"{kind}_build_s"] = round(time.perf_counter() - t, 1)
        st = zoo.plan_stats(plan)
        row[f"{kind}_layers"], row[f"{kind}_ref"] = st["layers"], st["ref"]
        ctx = Engine(plan).create_execution_context()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row[f"{kind}_ms"] = latency(ctx, feeds_t, device)
        if caught:
            row[f"{kind}_note"] = str(caught[0].message)
            zoo.log(f"{m.name} {kind}: {caught[0].message}")
        row[f"{kind}_graph"] = getattr(ctx, "last_graph", None) is not None
        got = ctx.execute(feeds_t)
        outs[kind] = [got[n].float().cpu().numpy() for n in m.output_names]
        zoo.log(f"{m.name} {kind}: {row[f'{kind}_layers']} layers ({row[f'{kind}_ref']} on ref), "
                f"{row[f'{kind}_ms']:.3f} ms, CUDA graph {row[f'{kind}_graph']}")
    row["ratio"] = row["dynamic_ms"] / row["static_ms"]
    row["diff"] = max(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
                      for a, b in zip(outs["dynamic"], outs["static"]))
    return row


def render(rows: list[dict[str, Any]], device: str, cmd: str) -> str:
    mach = zoo.machine(device)
    lines = [f"## Dynamic vs static exports ({device}, {'FP16' if device == 'cuda' else 'FP32'})", "",
             f"Command: `{cmd}`", "", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             f"Machine: {mach.get('cpu', '?')}; GPU {mach.get('gpu', '-')}.", "",
             "| model | opt point | dynamic layers (ref) | static layers (ref) | dynamic ms | static ms | "
             "dynamic/static | CUDA graph dyn/static | outputs differ (normwise) |",
             "|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('opt', '')} | FAIL: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['opt']} | {r['dynamic_layers']} ({r['dynamic_ref']}) | "
                     f"{r['static_layers']} ({r['static_ref']}) | {r['dynamic_ms']:.3f} | {r['static_ms']:.3f} | "
                     f"{r['ratio']:.2f} | {r['dynamic_graph']}/{r['static_graph']} | {r['diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert_base,vit_base_patch16_224")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--batch", type=int, default=1, help="the opt batch (the profile's range grows to hold it)")
    ap.add_argument("--seq", type=int, default=128, help="the opt sequence length for text models")
    ap.add_argument("--cache", default=os.environ.get("KILN_ZOO_CACHE", zoo.DEFAULT_CACHE))
    ap.add_argument("--out", help="also write the results as markdown to this file")
    args = ap.parse_args(argv)
    if args.out:
        from kiln.errors import KilnError
        from kiln.fileio import check_writable
        try:
            check_writable(args.out, "results")
        except KilnError as e:
            ap.error(str(e))
    if args.device == "cpu":
        from kiln.backends.cpu.runtime import configure
        configure(threads=2)
    rows = []
    for m in zoo.select(zoo_models.registry(), args.models):
        m = at_point(m, args.batch, args.seq)
        try:
            rows.append(run(m, args.cache, args.device))
        except Exception as e:  # one model's failure is a row, not the end of the run
            rows.append({"model": m.name, "opt": zoo._dims(m.point("opt")), "error": zoo.one_line(e)})
    text = render(rows, args.device, "python benchmarks/dynamic_vs_static.py " + " ".join(argv or sys.argv[1:]))
    print(text)
    if args.out:
        from kiln.fileio import atomic_write
        atomic_write(args.out, text.encode(), "results")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
