"""The fixed cost per layer of Kiln's CPU execution path, from the outside in.

    python benchmarks/layer_overhead.py [--layers 64] [--channels 16] [--size 4] [--threads 1] [--runs 300]
                                        [--opt-level 3] [--kiln DIR]

Builds a chain of N tiny depthwise 3x3 convolutions (cpu.conv_dnnl: a oneDNN primitive per layer) and a
chain of N tiny layers that run torch ops (Tanh and Softmax in turn, on the `ref` tactic: one torch call each),
and prints, per layer, in microseconds (median over interleaved repetitions):

- execute:  ExecutionContext.execute / N (input checks, the step loop, the kernels);
- function: the engine's GraphFunction called directly / N (the step loop and the kernels);
- kernels:  every step's kernel called in a Python loop over prebuilt arguments / N (no interpreter);
- prim.run, ctypes: (convs) the oneDNN primitives' `run` on their own / N, and their bare ctypes
            dnnl_primitive_execute / N (prebuilt arguments): the floor a Python caller pays.

The difference between rows is the cost of each stage. The layers do almost no arithmetic (a 4x4 image),
so the numbers are the overhead a layer pays whatever its size.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # see cpu_bench.py: must precede the torch import

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_tree = next((sys.argv[k + 1] for k, a in enumerate(sys.argv[:-1]) if a == "--kiln"), ROOT)  # before kiln loads
sys.path.insert(0, os.path.abspath(_tree))

from kiln.backends.cpu.runtime import configure  # noqa: E402
from kiln.builder import Builder, BuilderConfig  # noqa: E402
from kiln.logger import Logger, Severity  # noqa: E402
from kiln.runtime.engine import Engine  # noqa: E402


def conv_chain(n: int, c: int, size: int) -> onnx.ModelProto:
    """N depthwise 3x3 convs (pads 1) on [1, c, size, size], each with its own weights."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i in range(n):
        w = helper.make_tensor(f"w{i}", TensorProto.FLOAT, [c, 1, 3, 3],
                               (rng.standard_normal((c, 1, 3, 3)) * 0.3).astype(np.float32).ravel())
        inits.append(w)
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"y{i}"], group=c, pads=[1, 1, 1, 1], name=f"conv{i}"))
        x = f"y{i}"
    g = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def torch_chain(n: int, c: int, size: int) -> onnx.ModelProto:
    """N/2 (Tanh, Softmax) pairs on [1, c, size, size]: N layers that no fusion merges, each one torch call."""
    nodes = []
    x = "x"
    for i in range(n // 2):
        nodes.append(helper.make_node("Tanh", [x], [f"t{i}"], name=f"tanh{i}"))
        nodes.append(helper.make_node("Softmax", [f"t{i}"], [f"s{i}"], axis=1, name=f"softmax{i}"))
        x = f"s{i}"
    g = helper.make_graph(nodes, "torch_ops",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _timer(fn: Callable[[], Any], reps: int) -> Callable[[], float]:
    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    return once


def measure(name: str, model: onnx.ModelProto, runs: int, level: int, reps: int = 20) -> None:
    engine = Engine(Builder(Logger(Severity.WARNING)).build(model, BuilderConfig(optimization_level=level)))
    steps = engine.function.steps
    tactics = sorted({s["tactic"] for s in engine.plan.graph["steps"]})
    ctx = engine.create_execution_context()
    shape = model.graph.input[0].type.tensor_type.shape
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(
        [d.dim_value for d in shape.dim]).astype(np.float32))
    feeds = {"x": x}
    with torch.inference_mode():
        ctx.execute(feeds)
        # prebuilt arguments for a loop over the kernels: each step's inputs as the interpreter passes them
        env: dict[int, Any] = {s: t for s, t in zip(engine.function.input_slots, [x])}
        env.update({i: t for i, t in enumerate(engine.function.template) if t is not None})
        fn_ = engine.function
        placed = fn_.arena.views({}, fn_.device)[0] if fn_.arena is not None else {}
        calls: list[tuple[Callable[..., Any], list[Any], dict[str, Any]]] = []
        for st in steps:
            args = [env.get(i) if i >= 0 else None for i in st.ins]
            kw = {"out": placed[st.place]} if st.place >= 0 else {}  # the arena slot the interpreter passes
            r = st.fn(*args, **kw)
            env[st.outs[0]] = r[0] if isinstance(r, tuple) else r
            calls.append((st.fn, args, kw))

        def kernels() -> None:
            for fn, args, kw in calls:
                fn(*args, **kw)
        timers = {"execute": _timer(lambda: ctx.execute(feeds), reps),
                  "function": _timer(lambda: engine.function([x]), reps),
                  "kernels": _timer(kernels, reps)}
        timers.update(_native_timers(calls, reps))
        samples: dict[str, list[float]] = {k: [] for k in timers}
        for _ in range(3):
            for t in timers.values():
                t()
        for _ in range(runs):
            for k, t in timers.items():  # interleaved: drifts of the shared machine hit every row alike
                samples[k].append(t())
    print(f"{name}: {len(steps)} layers ({', '.join(tactics)}), us per layer, median of {runs} x {reps} runs")
    for k, v in samples.items():
        print(f"  {k:9s} {statistics.median(v) * 1e6 / len(steps):7.2f}")


def _native_timers(calls: list[tuple[Callable[..., Any], list[Any], dict[str, Any]]], reps: int
                   ) -> dict[str, Callable[[], float]]:
    """Timers of the oneDNN primitives the kernels ran (each primitive's `run` on the tensors its kernel handed it)
    and of the bare ctypes execute of the same primitives (prebuilt arguments, no argument conversion: the floor
    for a Python caller); {} where the kernels ran no primitive."""
    import ctypes as C

    from kiln.backends.cpu.dnnl_primitive import Primitive
    seen: list[tuple[Any, tuple[torch.Tensor, ...]]] = []
    run = Primitive.run

    def record(self: Any, *ts: torch.Tensor) -> None:
        seen.append((self, ts))
        return run(self, *ts)
    Primitive.run = record  # type: ignore[method-assign]
    try:
        for fn, args, kw in calls:
            fn(*args, **kw)
    finally:
        Primitive.run = run  # type: ignore[method-assign]
    if not seen:
        return {}
    execute = seen[0][0].dll["dnnl_primitive_execute"]  # a fresh function object: no argtypes to convert
    execute.restype = C.c_int
    raw = [(p.prim, p.stream, p.free[-1].nargs, C.c_void_p(C.addressof(p.free[-1].args))) for p, _ in seen]

    def runs() -> None:
        for p, ts in seen:
            p.run(*ts)

    def bare() -> None:
        for prim, stream, nargs, address in raw:
            execute(prim, stream, nargs, address)
    return {"prim.run": _timer(runs, reps), "ctypes": _timer(bare, reps)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--opt-level", type=int, default=3, help="Kiln builder optimization level (3: the zoo's)")
    ap.add_argument("--kiln", metavar="DIR", default=ROOT, help="import Kiln from this source tree (a before/after "
                    "comparison)")
    args = ap.parse_args(argv)
    configure(threads=args.threads)
    import kiln
    print(f"kiln from {os.path.dirname(os.path.dirname(kiln.__file__))}; load average {os.getloadavg()[0]:.2f} "
          f"{os.getloadavg()[1]:.2f}; threads {args.threads}")
    measure("conv chain", conv_chain(args.layers, args.channels, args.size), args.runs, args.opt_level)
    measure("torch-op chain", torch_chain(args.layers, args.channels, args.size), args.runs, args.opt_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
