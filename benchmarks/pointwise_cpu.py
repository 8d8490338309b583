"""CPU Pointwise programs: cpu.pointwise (one torch call per instruction) vs cpu.pointwise_c (one compiled C loop).

    python benchmarks/pointwise_cpu.py [--threads 2] [--runs 30] [--blocks 5] [--shape 1x64x112x112]

Each program is a kiln Pointwise node of 8 instructions over per-channel / residual / scalar operands, run
through both tactics' kernels on the same inputs (contiguous NCHW, then channels-last as inside a CPU
network). Timing alternates blocks of `--runs` calls between the two kernels and reports each one's median
per call (cpu.pointwise_c also into a given destination, as the runtime's arena calls it: writes_out); the
results are checked against each other first. Nothing is asserted (timing asserts do not
belong in tests); the numbers are printed.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # as benchmarks/cpu_bench.py: before torch is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kiln.backends.tactic import TacticContext, get_tactic  # noqa: E402
from kiln.ir.dtype import DType  # noqa: E402
from kiln.ir.graph import Node, Value  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402


def _i(op: str, *args: str, **attrs: Any) -> dict[str, Any]:
    return {"op": op, "args": list(args), "attrs": attrs}


# name -> (program, consts, input kinds: "full" / "chan" per-channel [1,C,1,1])
PROGRAMS: dict[str, tuple[list[dict[str, Any]], list[float], list[str]]] = {
    "bn+res+silu+clip+affine": (
        [_i("Mul", "i0", "i1"), _i("Add", "t0", "i2"), _i("Add", "t1", "i3"), _i("Sigmoid", "t2"),
         _i("Mul", "t2", "t3"), _i("Clip", "t4", "c0", "c1"), _i("Mul", "t5", "c2"), _i("Add", "t6", "c3")],
        [-3.0, 3.0, 0.5, 0.1], ["full", "chan", "chan", "full"]),
    "bn+hardswish+se+res+relu6": (
        [_i("Mul", "i0", "i1"), _i("Add", "t0", "i2"), _i("HardSwish", "t1"), _i("Mul", "t2", "i3"),
         _i("Add", "t3", "i4"), _i("Relu", "t4"), _i("Min", "t5", "c0"), _i("Mul", "t6", "c1")],
        [6.0, 0.5], ["full", "chan", "chan", "chan", "full"]),
    "gelu+tanh+where": (
        [_i("Add", "i0", "i1"), _i("Gelu", "t0"), _i("Tanh", "t1"), _i("Greater", "t0", "c0"),
         _i("Mul", "t2", "c1"), _i("Where", "t3", "t4", "t1"), _i("Sub", "t5", "i0"), _i("Abs", "t6")],
        [0.0, 2.0], ["full", "chan"]),
}


def make_node(program: list[dict[str, Any]], consts: list[float], kinds: list[str], shape: tuple[int, ...]) -> Node:
    chan = (1, shape[1]) + (1,) * (len(shape) - 2)
    ins = [Value(f"x{k}", TensorType(DType.FLOAT32, shape if kd == "full" else chan)) for k, kd in enumerate(kinds)]
    return Node("Pointwise", ins, [Value("y", TensorType(DType.FLOAT32, shape))],
                {"program": program, "consts": consts}, name="pw", domain="kiln")


def median_ms(fns: dict[str, Callable[[], Any]], runs: int, blocks: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(blocks):
        for name, fn in fns.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--shape", default="1x64x112x112")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(d) for d in args.shape.split("x"))
    from kiln.backends.cpu import pointwise_c
    cpu = TacticContext(torch.device("cpu"))
    old_t, new_t = get_tactic("cpu.pointwise"), get_tactic("cpu.pointwise_c")
    assert old_t is not None and new_t is not None
    flags = " ".join(pointwise_c.isa_flags()) or "-"
    print(f"shape {list(shape)}, threads {torch.get_num_threads()}, C flags {flags}, math {pointwise_c.math_mode()}, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    print(f"{'program (8 instructions)':28s} {'layout':14s} {'cpu.pointwise':>14s} {'cpu.pointwise_c':>16s} "
          f"{'speedup':>8s} {'_c into out=':>13s}")
    gen = torch.Generator().manual_seed(0)
    for name, (program, consts, kinds) in PROGRAMS.items():
        node = make_node(program, consts, kinds, shape)
        if not new_t.supports(node, cpu):
            print(f"{name:28s} cpu.pointwise_c declines it here ({pointwise_c.error() or 'unsupported'})")
            continue
        old = old_t.make(node, {}, torch.device("cpu"))
        new = new_t.make(node, {}, torch.device("cpu"))
        base = [torch.randn(v.type.shape, generator=gen) for v in node.inputs]  # type: ignore[arg-type]
        for layout in ("contiguous", "channels_last"):
            xs = [x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" and x.dim() == 4
                  and x.shape == shape else x for x in base]
            torch.testing.assert_close(new(*xs), old(*xs), rtol=1e-5, atol=1e-5)
            dst = torch.empty_like(xs[0])  # a destination, as the runtime's arena hands it (same layout)
            ms = median_ms({"old": lambda: old(*xs), "new": lambda: new(*xs), "out": lambda: new(*xs, out=dst)},
                           args.runs, args.blocks)
            print(f"{name:28s} {layout:14s} {ms['old']:11.3f} ms {ms['new']:13.3f} ms {ms['old'] / ms['new']:7.1f}x"
                  f" {ms['out']:10.3f} ms")


if __name__ == "__main__":
    main()
