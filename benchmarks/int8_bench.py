"""INT8 against Kiln's float plans and ONNX Runtime, side by side in one process (issue 13).

    python benchmarks/int8_bench.py --device cuda --batch 256          # H200: FP16 vs INT8(+FP16) throughput
    python benchmarks/int8_bench.py --device cpu --batch 1 [--bf16]    # CPU: FP32 vs INT8 (vs BF16), ORT FP32, ORT on a
                                                                       # Q/DQ model (OpenVINO FP32 / BF16 with --bf16)

The model is the repository's ResNet-50 (examples.zoo.resnet50, seeded weights), with `--model yolov4_tiny` its
YOLOv4-tiny, or with `--model zoo:NAME` a model of benchmarks/zoo_models.py (a transformer such as
`zoo:bert_base`, built for one shape: `--batch` and `--seq`; the GEMM-heavy case of FP8). INT8 ranges come from
entropy calibration over `--calib-batches` batches of seeded random inputs (speed does not depend on the ranges; the
error columns say how far each plan is from the FP32 reference on fresh inputs). On the CPU, onnxruntime runs the
same network quantized by its own quantize_static (Q/DQ, per-channel int8 weights, int8 activations), and Kiln
builds that Q/DQ model too; on a CPU without VNNI also the one ORT advises there (reduce_range: 7-bit weights,
uint8 activations). Prints a markdown table; writes it only with --out.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timed(fn: Callable[[], Any], sync: Callable[[], None], runs: int, warmup: int = 5) -> float:
    """Median milliseconds of `runs` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def openvino_rows(path: str, x: dict[str, np.ndarray], ref: np.ndarray, batch: int, args: argparse.Namespace,
                  rows: list[dict[str, Any]]) -> None:
    """OpenVINO FP32 and BF16 (its inference precision hint) on the same model, when OpenVINO is installed."""
    try:
        import openvino as ov
    except ImportError:
        return
    core = ov.Core()
    for label, hint in (("OpenVINO FP32", "f32"), ("OpenVINO BF16", "bf16")):
        try:
            cm = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                  "INFERENCE_NUM_THREADS": args.threads})
        except Exception as e:  # a CPU without BF16: OpenVINO refuses the hint
            print(f"{label}: not run ({type(e).__name__})")
            continue
        req = cm.create_infer_request()
        ms = timed(lambda: req.infer(x), lambda: None, args.runs)
        y = np.asarray(req.infer(x)[cm.output(0)], dtype=np.float32)[:8]
        rows.append({"engine": label, "ms": ms, "img_s": batch / ms * 1e3, "err": rel(y, ref)})


class Model:
    """The network under test: its ONNX file, seeded input feeds of one shape, and the build profile."""

    def __init__(self, name: str, batch: int, seq: int, tmp: str) -> None:
        self.profiles: list[Any] = []
        if name.startswith("zoo:"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from zoo_models import registry
            from kiln.builder import OptimizationProfile
            found = [m for m in registry() if m.name == name[4:]]
            if not found:
                raise SystemExit(f"no zoo model '{name[4:]}' in benchmarks/zoo_models.py")
            m = found[0]
            self.path = m.ensure(os.path.join(tmp, "zoo"))
            self.dims = {d: (batch if d == "batch" else seq if d == "seq" else r[1]) for d, r in m.dims.items()}
            self._feeds = m.feeds
            prof = OptimizationProfile()
            for i in m.inputs:
                if i.shape:
                    shape = i.concrete(self.dims)
                    prof.set_shape(i.name, shape, shape, shape)
            self.profiles = [prof]
        else:
            import importlib
            net = importlib.import_module(f"examples.zoo.{name}")
            self.path = net.save_onnx(os.path.join(tmp, f"{name}.onnx"), 0, batch)
            self.dims = {}
            self._feeds = lambda _dims, seed: {"input": np.random.default_rng(seed).standard_normal(
                (batch, *net.INPUT_SHAPE)).astype(np.float32)}

    def feeds(self, seed: int) -> dict[str, np.ndarray]:
        return self._feeds(self.dims, seed)


def layer_spans(plan: Any, ctx: Any, xin: Any, label: str, runs: int = 5, top: int = 25) -> None:
    """Per-step GPU spans (benchmarks/gpu_profile.step_spans: an event after each step's launch, no CUDA graph)
    and the kernel table."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_profile import grouped, kernel_table, step_spans
    steps = {s["name"]: s for s in plan.graph["steps"]}
    med, _ = step_spans(ctx, lambda: ctx.execute_async(xin), runs)
    print(f"\n{label}: step spans (no graph) {sum(med.values()):.3f} ms over {len(med)} steps")
    for key, what in ((lambda n: steps.get(n, {}).get("op", "?"), "op"),
                      (lambda n: steps.get(n, {}).get("tactic", "?"), "tactic")):
        print(f"  by {what}: " + ", ".join(f"{k} {ms:.3f} ms/{n}" for k, ms, n in grouped(med, key)))
    for n, v in sorted(med.items(), key=lambda kv: -kv[1])[:top]:
        s = steps.get(n, {})
        shapes = [plan.graph["values"].get(o, {}).get("type", {}).get("shape") for o in s.get("outputs", [])]
        print(f"  {v:7.3f} ms  {s.get('op')} {n} {s.get('tactic')} {s.get('config')} -> {shapes}")
    kernel_table(lambda: ctx.execute_async(xin), top, f"{label} kernels")


def cpu_layer_times(plan: Any, ctx: Any, xin: Any, label: str, runs: int = 10, top: int = 15) -> None:
    """Per-layer CPU times (the runtime's step hook, median of `runs`): by op, by tactic, the slowest layers."""
    per: dict[str, list[float]] = {}
    ctx.profiler = lambda node, seconds, _result=None: per.setdefault(node.name, []).append(seconds * 1e3)
    for _ in range(runs):
        ctx.execute(xin)
    ctx.profiler = None
    med = {n: statistics.median(v) for n, v in per.items()}
    steps = {s["name"]: s for s in plan.graph["steps"] if "name" in s}
    print(f"\n{label}: layers {sum(med.values()):.3f} ms over {len(med)} layers")
    for what in ("op", "tactic"):
        tot: dict[str, float] = {}
        for n, ms in med.items():
            k = str(steps.get(n, {}).get(what, "?"))
            tot[k] = tot.get(k, 0.0) + ms
        print(f"  by {what}: " + ", ".join(f"{k} {ms:.3f}" for k, ms in sorted(tot.items(), key=lambda kv: -kv[1])))
    for n, ms in sorted(med.items(), key=lambda kv: -kv[1])[:top]:
        s = steps.get(n, {})
        print(f"  {ms:7.3f} ms  {s.get('op')} {n} {s.get('tactic')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="resnet50", help="resnet50 | yolov4_tiny (examples.zoo, seeded weights) | "
                    "zoo:NAME (benchmarks/zoo_models.py, e.g. zoo:bert_base)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=128, help="zoo transformers: the sequence length")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per engine")
    ap.add_argument("--opt-level", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="CPU: also Kiln BF16 and OpenVINO FP32 / BF16")
    ap.add_argument("--int8-layers", choices=["speed", "all"], default=None,
                    help="all: every layer with an integer kernel INT8; speed: only where measured faster (the "
                    "builder's default at optimization level >= 2)")
    ap.add_argument("--fp8", action="store_true", help="CUDA: also Kiln FP8 (e4m3 GEMM-shaped layers) + FP16")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--timing-cache", metavar="FILE", help="Kiln's timing cache: read before each build and written "
                    "after it (a later run reuses the measurements)")
    ap.add_argument("--profile", action="store_true", help="per-layer times of each Kiln plan (CUDA: spans by op, "
                    "by tactic, slowest layers with their configs and torch.profiler's kernels; CPU: the runtime's "
                    "step hook)")
    args = ap.parse_args()
    from kiln.builder import Builder, BuilderConfig
    from kiln.logger import Logger, Severity
    from kiln.runtime import Engine
    import onnxruntime as ort

    cuda = args.device == "cuda"
    by_speed = None if args.int8_layers is None else args.int8_layers == "speed"
    batch = args.batch or (256 if cuda else 1)
    torch.set_num_threads(args.threads if not cuda else torch.get_num_threads())
    tmp = tempfile.mkdtemp()
    model = Model(args.model, batch, args.seq, tmp)
    fpath = model.path
    calib = [model.feeds(1 + i) for i in range(args.calib_batches)]
    x = model.feeds(0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads if not cuda else 0
    ref = ort.InferenceSession(fpath, so, providers=["CPUExecutionProvider"]).run(None, x)[0][:8]
    logger = Logger(Severity.INFO)
    rows: list[dict[str, Any]] = []
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def kiln_row(label: str, path: str, **cfg: Any) -> None:
        t0 = time.perf_counter()
        plan = Builder(logger).build(path, BuilderConfig(device=args.device, optimization_level=args.opt_level,
                                                        timing_cache=args.timing_cache,
                                                        profiles=model.profiles, **cfg))
        build_s = time.perf_counter() - t0
        ops = [s["op"] for s in plan.graph["steps"]]
        ctx = Engine(plan).create_execution_context()
        xin = {k: torch.from_numpy(v).cuda() for k, v in x.items()} if cuda else x
        run = (lambda: ctx.execute_async(xin)) if cuda else (lambda: ctx.execute(xin))
        ms = timed(run, sync, args.runs)
        out = ctx.execute(x)
        y = np.asarray(list(out.values())[0], dtype=np.float32)[:8]
        rows.append({"engine": label, "ms": ms, "img_s": batch / ms * 1e3, "err": rel(y, ref), "build_s": build_s,
                     "int_layers": ops.count("QConv") + ops.count("QGemm"), "layers": plan.build.get("layers")})
        logger.info(f"{label}: {ms:.3f} ms")
        if args.profile:
            (layer_spans if cuda else cpu_layer_times)(plan, ctx, xin, label)

    if cuda:
        kiln_row("Kiln FP16", fpath, fp16=True)
        kiln_row("Kiln INT8 + FP16", fpath, fp16=True, int8=True, calibration_data=calib, int8_by_speed=by_speed)
        if args.fp8:
            kiln_row("Kiln FP8 + FP16", fpath, fp16=True, fp8=True, calibration_data=calib)
    else:
        kiln_row("Kiln FP32", fpath)
        kiln_row("Kiln INT8", fpath, int8=True, calibration_data=calib, int8_by_speed=by_speed)
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter([{k: v[:1] for k, v in c.items()} for c in calib])

            def get_next(self) -> Any:
                return next(self.it, None)
        from onnxruntime.quantization.shape_inference import quant_pre_process
        prepped = os.path.join(tmp, "prepped.onnx")  # BN folded into the convs, as ORT recommends
        here = os.getcwd()
        os.chdir(tmp)  # ORT's shape inference leaves its scratch files in the working directory
        try:
            quant_pre_process(fpath, prepped)
        except Exception:  # noqa: BLE001 - its symbolic inference gives up on some transformers: ONNX's alone then
            quant_pre_process(fpath, prepped, skip_symbolic_shape=True)
        finally:
            os.chdir(here)
        qpath = os.path.join(tmp, "qdq.onnx")
        quantize_static(prepped, qpath, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True)
        kiln_row("Kiln on ORT's Q/DQ model", qpath)
        ort_rows = [("ORT FP32", fpath), ("ORT on its Q/DQ model", qpath)]
        from kiln.backends.cpu.features import exact_int8
        if not exact_int8():  # ORT's advice for CPUs without VNNI: 7-bit weights, uint8 activations
            rpath = os.path.join(tmp, "qdq_reduce_range.onnx")
            quantize_static(prepped, rpath, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
            kiln_row("Kiln on ORT's reduce-range Q/DQ model", rpath)
            ort_rows.append(("ORT on its reduce-range Q/DQ model", rpath))
        for label, path in ort_rows:
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            ms = timed(lambda: sess.run(None, x), sync, args.runs)
            y = sess.run(None, x)[0][:8]
            rows.append({"engine": label, "ms": ms, "img_s": batch / ms * 1e3, "err": rel(y, ref)})
        if args.bf16:
            kiln_row("Kiln BF16", fpath, bf16=True)
            openvino_rows(fpath, x, ref, batch, args, rows)
    base = rows[0]["ms"]
    dev = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {args.threads} threads"
    lines = [f"Command: `python benchmarks/int8_bench.py {' '.join(sys.argv[1:])}`",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {dev}; torch {torch.__version__}, "
             f"onnxruntime {ort.__version__}. {args.model}, batch {batch}, median of {args.runs}.", "",
             "| engine | ms | img/s | speed vs first row | rel. error vs ORT FP32 | integer (or FP8) layers | build s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['ms']:.3f} | {r['img_s']:.0f} | {base / r['ms']:.2f}x | {r['err']:.2e} | "
                     f"{r.get('int_layers', '-')} | {r.get('build_s', 0):.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
