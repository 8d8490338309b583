"""CPU benchmark: Kiln vs ONNX Runtime (and PyTorch eager) on the sample models, in one process.

    python benchmarks/cpu_bench.py [--threads 2] [--blocks 8] [--iters 10]
                                   [--models resnet50,yolov4_tiny,light_resnet50] [--opt-levels 3,0] [--out FILE]

Every engine runs batch 1 on the same input with the same number of intra-op threads. Timing is done in
blocks: each block runs one engine for a settling time untimed, then `--iters` times timed, and blocks rotate
over the engines, so slow drifts of a shared machine hit all engines alike (benchmarks/rotation.py says why
blocks settle: each thread pool keeps spinning for a while after its engine's last run). The table gives the median and the 90th
percentile per engine and the Kiln/ORT ratio of medians. ORT uses its default graph optimizations
(ORT_ENABLE_ALL). Results are printed; with `--out FILE` the section is also written into FILE,
replacing the section of the same kind there (`--out benchmarks/RESULTS.md` updates the published
results); nothing is written without --out.

The machine's load is measured, not assumed (benchmarks/machine_load.py): the load average, and the
share of the CPUs other processes used in a 1 s sample before the run and during the timed blocks;
the section says "idle" or "busy" from those numbers.

OpenMP (torch's thread pool, used by Kiln's CPU kernels and by PyTorch eager) spins 300000 rounds by
default before a waiting thread sleeps; on a machine shared with other busy processes that spinning
starves the thread holding the work and a 2-thread run gets several times slower. GOMP_SPINCOUNT is
therefore set (unless given) to a value that covers the gaps between kernels but yields soon after;
it has to be set before torch is loaded, hence here, at the top of the entry point.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from kiln.backends.cpu.runtime import configure  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.fileio import atomic_write, check_writable  # noqa: E402
from kiln.builder import Builder, BuilderConfig  # noqa: E402
from kiln.logger import Logger, Severity  # noqa: E402
from kiln.runtime.engine import Engine  # noqa: E402
from machine_load import LoadMeter  # noqa: E402  (beside this script)
from rotation import rotating_blocks  # noqa: E402

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_resnet50.onnx")


@dataclass
class Case:
    """One model: its ONNX form, an input, and optionally a torch module for the eager peer."""

    name: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    torch_module: torch.nn.Module | None


def load_case(name: str, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    if name in ("resnet50", "yolov4_tiny"):
        from examples.zoo import resnet50, yolov4_tiny
        mod = {"resnet50": resnet50, "yolov4_tiny": yolov4_tiny}[name]
        x = rng.standard_normal((1, *mod.INPUT_SHAPE)).astype(np.float32)
        return Case(name, mod.onnx_model(seed, 1), {"input": x}, mod.build_torch(seed))
    if name == "light_resnet50":
        model = onnx.load(LIGHT)
        inp = model.graph.input[0]
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        return Case(name, model, {inp.name: rng.standard_normal(shape).astype(np.float32)}, None)
    raise SystemExit(f"unknown model '{name}' (resnet50, yolov4_tiny, light_resnet50)")


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from kiln.backends.cpu.runtime import physical_cores
    return {"cpu": cpu, "cores": f"{physical_cores()} physical / {os.cpu_count()} logical",
            "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()}


def kiln_runner(case: Case, opt_level: int, feeds_t: dict[str, torch.Tensor]) -> tuple[Callable[[], Any], str]:
    """One Kiln engine for the case at an optimization level, and a note on its build."""
    t0 = time.perf_counter()
    plan = Builder(Logger(Severity.WARNING)).build(case.model, BuilderConfig(device="cpu", optimization_level=opt_level))
    engine = Engine(plan)
    ctx = engine.create_execution_context()
    tactics = [s.get("tactic", "ref") for s in plan.graph["steps"]]
    note = (f"build {time.perf_counter() - t0:.1f} s, {plan.build['layers']} layers "
            f"(+{plan.build['views']} zero-copy views), {sum(t == 'ref' for t in tactics)} on the reference tactic")

    def run() -> Any:
        with torch.inference_mode():
            return ctx.execute(feeds_t)
    return run, note


def make_runners(case: Case, threads: int, opt_levels: list[int]) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """name -> zero-argument callable running one inference, plus build information."""
    info: dict[str, Any] = {"notes": {}}
    feeds_t = {k: torch.from_numpy(v) for k, v in case.feeds.items()}
    kilns = {}
    for level in opt_levels:
        name = f"Kiln O{level}" + (" (autotuned)" if level > 0 else " (heuristic)")
        kilns[name], info["notes"][name] = kiln_runner(case, level, feeds_t)

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(case.model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    runners: dict[str, Callable[[], Any]] = {**kilns, "ONNX Runtime": lambda: sess.run(None, case.feeds)}
    if case.torch_module is not None:
        module = case.torch_module.eval()
        x = feeds_t[next(iter(feeds_t))]

        def eager() -> Any:
            with torch.inference_mode():
                return module(x)
        runners["PyTorch eager"] = eager
    want = sess.run(None, case.feeds)
    for name, run in kilns.items():
        got = [o.numpy() for o in run().values()]
        err = max(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)) for g, w in zip(got, want))
        info["notes"][name] += f", max rel err vs ORT {err:.1e}"
    return runners, info


def measure(runners: dict[str, Callable[[], Any]], blocks: int, iters: int, warmup: int) -> dict[str, list[float]]:
    """Timings in ms, in blocks of `iters` runs per engine, each settled first, engines rotating (rotation.py)."""
    return rotating_blocks(runners, blocks, iters, warmup)


def p90(xs: list[float]) -> float:
    return float(np.percentile(xs, 90))


def table(results: list[tuple[str, dict[str, list[float]], dict[str, Any]]]) -> str:
    lines = ["| model | engine | median ms | p90 ms | vs ORT (median) | notes |", "|---|---|---:|---:|---:|---|"]
    for name, times, info in results:
        base = statistics.median(times["ONNX Runtime"])
        for eng, ts in times.items():
            med = statistics.median(ts)
            note = info["notes"].get(eng, "")
            lines.append(f"| {name} | {eng} | {med:.2f} | {p90(ts):.2f} | {med / base:.2f}x | {note} |")
    return "\n".join(lines)


def markers(busy: int) -> tuple[str, str]:
    """The comments around a section: one kind per --busy N (no added load: 'noload'). They name what was
    asked for; the measured load is in the section's text."""
    tag = f"busy{busy}" if busy else "noload"
    return f"<!-- cpu_bench:{tag}:begin -->", f"<!-- cpu_bench:{tag}:end -->"


LEGACY_MARKERS = {"noload": ("<!-- cpu_bench:idle:begin -->", "<!-- cpu_bench:idle:end -->")}  # before --out


class BusyLoad:
    """N child processes spinning on the CPU while the benchmark runs: a reproducible shared machine."""

    def __init__(self, n: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.n = n

    def __enter__(self) -> "BusyLoad":
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def write_results(path: str, section: str, busy: int) -> None:
    """The section into the file at `path` (atomically), in place of the section of the same kind."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Benchmark results\n"
    kinds = [markers(busy)] + ([LEGACY_MARKERS["noload"]] if not busy else [])
    for begin, end in kinds:
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + section + rest.split(end, 1)[1]
            break
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write(path, text.encode(), "results")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every engine (physical cores)")
    ap.add_argument("--blocks", type=int, default=8, help="blocks per engine (engines alternate per block)")
    ap.add_argument("--iters", type=int, default=10, help="timed runs per block")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--models", default="resnet50,yolov4_tiny,light_resnet50")
    ap.add_argument("--opt-levels", default="3,0",
                    help="Kiln builder optimization levels to run, one engine each (3: autotuned, 0: heuristic)")
    ap.add_argument("--busy", type=int, default=0,
                    help="run N busy-looping processes during the timing (a shared machine); own section in --out")
    ap.add_argument("--out", metavar="FILE", help="also write the section into FILE, replacing its section of the "
                    "same kind (e.g. benchmarks/RESULTS.md); default: print only")
    args = ap.parse_args(argv)
    if args.out:
        try:
            check_writable(args.out, "results")
        except KilnError as e:
            ap.error(str(e))
    configure(threads=args.threads)  # torch intra-op threads (Kiln and eager) + heap retention
    mach = machine()
    load = LoadMeter()
    load.sample_before()
    results = []
    for name in args.models.split(","):
        case = load_case(name.strip())
        runners, info = make_runners(case, args.threads, [int(v) for v in args.opt_levels.split(",")])
        with BusyLoad(args.busy), load.measure():  # the meter stops first: the busy children count as others
            times = measure(runners, args.blocks, args.iters, args.warmup)
        results.append((case.name, times, info))
        for eng, ts in times.items():
            print(f"{case.name:16s} {eng:24s} median {statistics.median(ts):8.2f} ms  p90 {p90(ts):8.2f} ms")
        onnxrt = statistics.median(times["ONNX Runtime"])
        for eng, note in info["notes"].items():
            print(f"{case.name:16s} {eng}/ORT {statistics.median(times[eng]) / onnxrt:.2f}x   ({note})")
    cmd = "python benchmarks/cpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    begin, end = markers(args.busy)
    title = (f"with {args.busy} busy processes beside it" if args.busy else "no load added") + \
        f"; measured: {load.label}"
    section = "\n".join([
        begin, f"## CPU benchmark (batch 1, {title})", "", f"Command: `{cmd.strip()}`", "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores; {args.threads} intra-op threads per engine; "
        f"torch {mach['torch']}, onnxruntime {mach['onnxruntime']}, Python {mach['python']}; "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; {load.describe()}; "
        f"{args.blocks} blocks x {args.iters} runs per engine, "
        f"{time.strftime('%Y-%m-%d %H:%M')}.", "", table(results), "", end])
    print()
    print(section)
    if args.out:
        write_results(args.out, section, args.busy)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
