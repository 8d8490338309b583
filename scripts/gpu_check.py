#!/usr/bin/env python3
"""GPU check for the CUDA backend, run from the source tree on a CUDA machine:

    python3 scripts/gpu_check.py --out results.md

1. runs the GPU-only tests (tests/backends/test_cuda_backend.py);
2. builds ResNet-50 and YOLOv4-tiny in FP16 (full autotune; cold, then again with the warm timing
   cache), checks their outputs against onnxruntime FP32 (normwise max|a-b|/max|b| <= 1e-2);
3. benchmarks Kiln against PyTorch FP16 channels_last eager, eager + CUDA graph and
   torch.compile(mode="reduce-overhead") in this one process: latency is the median of 50 runs,
   each timed with CUDA events from an idle GPU (so launch overhead counts), throughput = batch/latency;
4. runs `kiln bench` on the same ResNet-50 plan files and batches in its own process (--no-transfers, its
   --export-json read back) and records its median beside this script's, flagging a disagreement over 10%;
5. prints and writes a markdown table (Kiln/peer ratios, build and load times, arena vs naive memory);
6. runs the transformers (--transformers: BERT-base seq 128 and ViT-B/16 at batch 1 and 32, GPT-2 seq 512 at
   batch 8) through benchmarks/zoo.py, one child process each, with their peers (eager, eager + CUDA graph,
   torch.compile) in the same run, and appends zoo.py's rows (layers, ref layers, FP16 error of Kiln and of
   PyTorch FP16 eager against onnxruntime FP32, Kiln/peer ratios).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS: list[dict[str, Any]] = []
NOTES: list[str] = []
TRANSFORMER_ROWS: list[str] = []
T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def bench(fn: Callable[[], Any], runs: int = 50, warmup: int = 10) -> float:
    """Median latency (ms) of fn over `runs` runs, each from an idle GPU, timed with CUDA events."""
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


GPU_TESTS = ["tests/backends/test_cuda_backend.py", "tests/backends/test_cuda_triton.py",
             "tests/backends/test_cuda_pool.py", "tests/backends/test_cuda_norm.py",
             "tests/test_control_flow_compiled.py", "tests/backends/test_cuda_se.py",
             "tests/backends/test_triton_attention.py", "tests/backends/test_triton_qconv.py",
             "tests/passes/test_quantize.py", "tests/models/test_int8_digits.py",
             "tests/backends/test_triton_qdq.py", "tests/test_detection_plugins.py", "tests/quant/test_speed.py",
             "tests/backends/test_triton_epilogue.py", "tests/backends/test_cuda_fp8_gemm.py",
             "tests/backends/test_cuda_gemm_paths.py", "tests/passes/test_residual_norm.py",
             "tests/backends/test_triton_dwconv.py", "tests/passes/test_cast_layers.py",
             "tests/backends/test_gather_tactics.py", "tests/backends/test_sdpa_tactic.py",
             "tests/passes/test_conv_norm.py"]


def run_tests(timeout: int) -> None:
    log("GPU tests: " + ", ".join(GPU_TESTS))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "--tb=short", "-p", "no:cacheprovider", "--durations=10",
           *GPU_TESTS]
    env = dict(os.environ)
    try:
        import xdist  # pytest-xdist: the tests in parallel, so that they fit one call
        workers = min(16, os.cpu_count() or 1)
        cmd += ["-n", str(workers)]
        if tuple(int(p) for p in xdist.__version__.split(".")[:2]) >= (3, 2):
            cmd += ["--dist", "worksteal"]  # idle workers take queued tests: the long ones do not end in one queue
        # one CPU thread per worker's torch: 16 workers x all cores each made the digits CNN's training take 199 s
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    except ImportError:
        pass
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        out = (r.stdout + r.stderr).strip().splitlines()
        fails = [ln for ln in out if ln.startswith(("FAILED", "ERROR"))]
        ends = [ln for ln in r.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
        summary = ends[-1].strip("= ") if ends else f"exit {r.returncode}, no summary line"
        for ln in fails[:20]:
            log("  " + ln[:300])
        if r.returncode != 0:
            for ln in out[-60:]:
                log("  " + ln[:300])
        slow = [ln for ln in out if re.match(r"\d+\.\d+s (call|setup|teardown) ", ln)][:5]  # --durations
        for ln in slow:
            log("  slow: " + ln[:200])
        log(f"  tests: {summary} ({time.perf_counter() - t0:.0f} s)")
        NOTES.append(f"GPU tests: {summary}")
    except subprocess.TimeoutExpired:
        log(f"  tests: timed out after {timeout} s")
        NOTES.append(f"GPU tests: timed out after {timeout} s")


class KilnRunner:
    """Build (cold, then warm), load, check against onnxruntime and time one model at one batch."""

    def __init__(self, name: str, mod: Any, out_dir: str, cache: str) -> None:
        self.name, self.mod, self.out_dir, self.cache = name, mod, out_dir, cache

    def build(self, batch: int, verbose_log: str | None = None) -> tuple[Any, float]:
        from kiln.builder import Builder, BuilderConfig
        from kiln.logger import Logger, Severity
        model = self.mod.onnx_model(0, batch)
        stream = open(verbose_log, "w") if verbose_log else None
        try:
            logger = Logger(Severity.VERBOSE if stream else Severity.WARNING, stream)
            t0 = time.perf_counter()
            plan = Builder(logger).build(model, BuilderConfig(device="cuda", fp16=True, timing_cache=self.cache))
            return plan, time.perf_counter() - t0
        finally:
            if stream:
                stream.close()


BENCH_ARGS = ["--no-transfers", "--warmup", "500", "--iterations", "300"]
BENCH_TOLERANCE = 0.10  # kiln bench's median against this script's, relative


def bench_check(row: dict[str, Any], path: str, batch: int) -> None:
    """`kiln bench PLAN --no-transfers --export-json` (kiln.cli.bench_json.run_bench: a fresh process, inputs staged
    on the device once, CUDA graphs on, as this script times Kiln) on the plan file just timed; its median, the
    ratio to this script's median and whether they agree within BENCH_TOLERANCE go into the row."""
    from kiln.cli.bench_json import agreement, run_bench
    try:
        res = run_bench(path, BENCH_ARGS, timeout=300)
        if res.batch != batch:
            raise RuntimeError(f"kiln bench ran batch {res.batch}, the plan was built for {batch}")
        ratio, ok = agreement(res.median_ms, row["kiln"], BENCH_TOLERANCE)
        row.update(bench=res.median_ms, bench_ratio=ratio, bench_agrees=ok, bench_graph=res.cuda_graph,
                   bench_iterations=res.iterations)
        log(f"{row['model']} b{batch}: kiln bench --no-transfers median {res.median_ms:.3f} ms over {res.iterations} "
            f"iterations vs {row['kiln']:.3f} ms here: ratio {ratio:.3f}"
            + ("" if ok else f" (DISAGREE by more than {BENCH_TOLERANCE:.0%})"))
    except Exception as e:
        log(f"{row['model']} b{batch}: kiln bench FAILED: {type(e).__name__}: {e}")
        NOTES.append(f"{row['model']} b{batch}: kiln bench failed: {type(e).__name__}: {str(e)[:200]}")


def peers_for(net: torch.nn.Module, x16: torch.Tensor, compile_ok: bool) -> dict[str, float]:
    """Latencies (ms) of the PyTorch peers on an FP16 channels_last input."""
    res: dict[str, float] = {}
    with torch.inference_mode():
        res["eager"] = bench(lambda: net(x16))
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                net(x16)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            net(x16)
        res["eager+graph"] = bench(g.replay)
    if compile_ok:
        t0 = time.perf_counter()
        cnet = torch.compile(net, mode="reduce-overhead", dynamic=False)
        with torch.inference_mode():
            for _ in range(3):
                cnet(x16)
            torch.cuda.synchronize()
            res["compile_s"] = time.perf_counter() - t0
            res["torch.compile"] = bench(lambda: cnet(x16))
    return res


TRANSFORMERS = "bert_base:1,32@seq=128;vit_base_patch16_224:1,32;gpt2:8@seq=512"


def run_transformers(spec: str, out_dir: str, deadline: float) -> list[str]:
    """benchmarks/zoo.py on the CUDA target for each model:batches[@dim=N,...] of `spec` (a child process per
    model and batch, so one failure or hang costs only its row); returns the markdown table rows."""
    rows: list[str] = []
    header: list[str] = []
    for part in filter(None, spec.split(";")):
        head, _, dims = part.partition("@")
        model, _, batches = head.partition(":")
        for b in filter(None, batches.split(",")):
            left = deadline - time.perf_counter()
            if left < 90:
                NOTES.append(f"{model} b{b}: not run (time budget)")
                continue
            md = os.path.join(out_dir, f"zoo_{model}_b{b}.md")
            cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "zoo.py"), "--device", "cuda", "--models", model,
                   "--batch", b, "--out", md, "--timeout", str(int(left) - 30)]
            for d in filter(None, dims.split(",")):
                cmd += ["--dim", d]
            log(f"transformers: {' '.join(cmd[1:])}")
            try:
                subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left - 10)
                lines = open(md).read().splitlines() if os.path.exists(md) else []
                table = [ln for ln in lines if ln.startswith("|")]
                if table and not header:
                    header = [table[0] + " run |", table[1] + "---|"]
                got = [f"{ln} b{b}{('@' + dims) if dims else ''} |" for ln in table[2:]]
                notes = [ln for ln in lines if ln.startswith("- ") and "error vs ORT" in ln]
                rows += got
                NOTES.extend(n[2:] for n in notes)
                for ln in got:
                    log("  " + ln[:400])
                if not got:
                    NOTES.append(f"{model} b{b}: zoo.py wrote no row")
            except subprocess.TimeoutExpired:
                NOTES.append(f"{model} b{b}: zoo.py timed out")
    return header + rows if rows else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.md", help="markdown table output path")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--test-timeout", type=int, default=300)
    ap.add_argument("--compile-batches", default="resnet50:1,32,256;yolov4_tiny:1,32",
                    help="which (model:batches) get a torch.compile peer (time-box); 'none' for none")
    ap.add_argument("--models", default="yolov4_tiny,resnet50", help="comma-separated subset to build and time")
    ap.add_argument("--batches", default="yolov4_tiny:1,32;resnet50:1,32,256",
                    help="the batches each model is built and timed at (model:batches;...)")
    ap.add_argument("--budget", type=float, default=540, help="seconds; torch.compile peers are skipped past 70%%")
    ap.add_argument("--transformers", default=TRANSFORMERS,
                    help="zoo models run through benchmarks/zoo.py after the CNNs: model:batches[@dim=N,...];... "
                         "('none' for none)")
    ap.add_argument("--bench-models", default="resnet50",
                    help="models whose plans `kiln bench` also times, against this script's median; 'none' for none")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU available", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.out)) or "."
    os.makedirs(out_dir, exist_ok=True)
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "absent"
    dev = torch.cuda.get_device_name()
    log(f"{dev}, capability {torch.cuda.get_device_capability()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}, Triton {tv}")
    if not args.skip_tests:
        run_tests(args.test_timeout)

    from examples.zoo import resnet50, yolov4_tiny
    from kiln.plan.format import save_plan
    from kiln.runtime.engine import Engine
    import onnxruntime as ort

    compile_plan: dict[str, set[int]] = {}
    if args.compile_batches != "none":
        for part in args.compile_batches.split(";"):
            m, _, bs = part.partition(":")
            compile_plan[m] = {int(b) for b in bs.split(",") if b}
    cache = os.path.join(out_dir, "timing_cache.json")
    if os.path.exists(cache):
        os.unlink(cache)
    batch_plan: dict[str, tuple[int, ...]] = {}
    for part in args.batches.split(";"):
        m, _, bs = part.partition(":")
        batch_plan[m] = tuple(int(b) for b in bs.split(",") if b)
    models = [(m, mod, batch_plan.get(m, ())) for m, mod in [("yolov4_tiny", yolov4_tiny), ("resnet50", resnet50)]
              if m in args.models.split(",")]
    for name, mod, batches in models:
        runner = KilnRunner(name, mod, out_dir, cache)
        net = mod.build_torch(0).eval().half().cuda().to(memory_format=torch.channels_last)
        for bi, batch in enumerate(batches):
            row: dict[str, Any] = {"model": name, "batch": batch}
            try:
                vlog = os.path.join(out_dir, f"build_{name}_b{batch}.log") if bi == 0 else None
                plan, cold_s = runner.build(batch, vlog)
                row["build_s"] = cold_s
                tuning = plan.build.get("tuning", {})
                log(f"{name} b{batch}: build {cold_s:.1f} s (tuning {tuning})")
                if bi == 0:
                    _, warm_s = runner.build(batch)
                    row["warm_build_s"] = warm_s
                    log(f"{name} b{batch}: warm rebuild {warm_s:.1f} s")
                path = os.path.join("/tmp", f"kiln_{name}_b{batch}.kiln")
                save_plan(plan, path)
                t0 = time.perf_counter()
                eng = Engine.load(path)
                row["load_s"] = time.perf_counter() - t0
                ctx = eng.create_execution_context()
                x = np.random.default_rng(batch).standard_normal((batch, *mod.INPUT_SHAPE)).astype(np.float32)
                xt = torch.from_numpy(x).cuda()
                t0 = time.perf_counter()
                outs = ctx.execute_async({"input": xt})
                torch.cuda.synchronize()
                row["first_run_s"] = time.perf_counter() - t0
                row["graph"] = ctx.last_graph is not None
                if batch <= 32:
                    sess = ort.InferenceSession(mod.onnx_model(0, batch).SerializeToString(),
                                                providers=["CPUExecutionProvider"])
                    want = sess.run(None, {"input": x})
                    errs = [rel_err(o.float().cpu().numpy(), w) for o, w in zip(outs.values(), want)]
                    row["rel_err"] = max(errs)
                    log(f"{name} b{batch}: rel err vs onnxruntime FP32 {row['rel_err']:.2e}")
                row["arena_mb"] = plan.memory.get("arena_bytes", 0) / 2**20
                row["naive_mb"] = plan.memory.get("naive_bytes", 0) / 2**20
                row["pool_mb"] = ctx.graph_pool_bytes / 2**20
                arena = eng.function.arena
                row["run_arena_mb"] = (arena.arena_bytes if arena is not None else 0) / 2**20
                from collections import Counter
                row["tactics"] = dict(Counter(s["tactic"] for s in plan.graph["steps"]))
                row["layers"] = {k: plan.build.get(k) for k in ("layers", "views", "elided")}
                log(f"{name} b{batch}: tactics {row['tactics']}, layers {row['layers']}")
                buf = ctx.input_buffers().get("input")
                if buf is not None:
                    buf.copy_(xt)
                    feed = {"input": buf}  # zero-copy: the input already sits in the graph's static buffer
                else:
                    feed = {"input": xt}
                row["kiln"] = bench(lambda: ctx.execute_async(feed))
                eager_ctx = eng.create_execution_context(cuda_graph=False)
                row["kiln_nograph"] = bench(lambda: eager_ctx.execute_async(feed), runs=20)
                log(f"{name} b{batch}: kiln {row['kiln']:.3f} ms (without CUDA graph {row['kiln_nograph']:.3f} ms)")
                ctx = eager_ctx = eng = None
                if name in args.bench_models.split(","):
                    torch.cuda.empty_cache()  # this process idles on the GPU while kiln bench runs
                    bench_check(row, path, batch)
            except Exception as e:
                log(f"{name} b{batch}: KILN FAILED: {type(e).__name__}: {e}")
                traceback.print_exc()
                NOTES.append(f"{name} b{batch}: Kiln failed: {type(e).__name__}: {str(e)[:200]}")
            try:
                x16 = torch.randn(batch, *mod.INPUT_SHAPE, device="cuda").half().contiguous(
                    memory_format=torch.channels_last)
                over = time.perf_counter() - T_START > 0.7 * args.budget
                want_compile = batch in compile_plan.get(name, set()) and not over
                if batch in compile_plan.get(name, set()) and over:
                    NOTES.append(f"{name} b{batch}: torch.compile skipped (time budget)")
                row.update(peers_for(net, x16, want_compile))
                log(f"{name} b{batch}: peers " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                           if k in ("eager", "eager+graph", "torch.compile", "compile_s")))
            except Exception as e:
                log(f"{name} b{batch}: PEER FAILED: {type(e).__name__}: {e}")
                traceback.print_exc()
                NOTES.append(f"{name} b{batch}: peer failed: {type(e).__name__}: {str(e)[:200]}")
            RESULTS.append(row)
            with open(args.out, "w") as f:  # after every row: a run cut short still leaves its table
                f.write(render(dev))
            torch.cuda.empty_cache()
        del net
    if args.transformers != "none":
        TRANSFORMER_ROWS.extend(run_transformers(args.transformers, out_dir, T_START + args.budget))
    table = render(dev)
    print(table)
    with open(args.out, "w") as f:
        f.write(table)
    return 0


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(dev: str) -> str:
    lines = [f"# Kiln GPU check ({dev}, torch {torch.__version__})", "",
             "Latency: median of 50 runs, CUDA events, idle GPU before each run. FP16. Kiln/peer < 1 = Kiln faster.", "",
             "| model | batch | Kiln ms | eager ms | eager+graph ms | compile ms | Kiln img/s | compile img/s "
             "| Kiln/eager | Kiln/graph | Kiln/compile | rel err | build s (warm) | load s | first run s "
             "| planned arena / naive / run-time arena / graph-pool peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in RESULTS:
        k = r.get("kiln")
        ratio = (lambda p: _f(k / r[p], "{:.2f}") if k and r.get(p) else "-")
        thr = (lambda v: _f(r["batch"] / v * 1e3, "{:.0f}") if v else "-")
        build = _f(r.get("build_s"), "{:.1f}") + (f" ({r['warm_build_s']:.1f})" if "warm_build_s" in r else "")
        mem = (f"{_f(r.get('arena_mb'), '{:.1f}')} / {_f(r.get('naive_mb'), '{:.1f}')} / "
               f"{_f(r.get('run_arena_mb'), '{:.1f}')} / {_f(r.get('pool_mb'), '{:.1f}')}")
        lines.append(f"| {r['model']} | {r['batch']} | {_f(k)} | {_f(r.get('eager'))} | {_f(r.get('eager+graph'))} "
                     f"| {_f(r.get('torch.compile'))} | {thr(k)} | {thr(r.get('torch.compile'))} | {ratio('eager')} "
                     f"| {ratio('eager+graph')} | {ratio('torch.compile')} | {_f(r.get('rel_err'), '{:.1e}')} | {build} "
                     f"| {_f(r.get('load_s'), '{:.2f}')} | {_f(r.get('first_run_s'), '{:.2f}')} | {mem} |")
    lines.append("")
    for r in RESULTS:
        if "compile_s" in r:
            lines.append(f"- torch.compile {r['model']} b{r['batch']}: compile + warm-up {r['compile_s']:.1f} s")
        if "kiln_nograph" in r:
            lines.append(f"- Kiln without CUDA graph {r['model']} b{r['batch']}: {r['kiln_nograph']:.3f} ms")
        if "tactics" in r:
            lines.append(f"- Kiln tactics {r['model']} b{r['batch']}: {r['tactics']}")
        if "layers" in r:
            lines.append(f"- Kiln layers {r['model']} b{r['batch']}: {r['layers']['layers']} launching kernels "
                         f"(+{r['layers']['views']} zero-copy views, {r['layers']['elided']} concats elided)")
        if "bench" in r:
            verdict = (f"agree within {BENCH_TOLERANCE:.0%}" if r["bench_agrees"]
                       else f"**DISAGREE by more than {BENCH_TOLERANCE:.0%}**")
            graphs = "" if r.get("bench_graph") else ", without CUDA graphs"
            lines.append(f"- `kiln bench --no-transfers` {r['model']} b{r['batch']} (same plan file, own process"
                         f"{graphs}): median {r['bench']:.3f} ms over {r['bench_iterations']} iterations vs "
                         f"{r['kiln']:.3f} ms here, ratio {r['bench_ratio']:.3f}: {verdict}")
    if TRANSFORMER_ROWS:
        lines += ["", "Transformers (benchmarks/zoo.py --device cuda, one child process per row; the row's batch and "
                  "dims after it):", ""] + TRANSFORMER_ROWS + [""]
    lines += [f"- {n}" for n in NOTES]
    lines.append(f"- total wall time {time.perf_counter() - T_START:.0f} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
