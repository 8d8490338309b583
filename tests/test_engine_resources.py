"""Engines on the CPU's native tactics (issue 10): loading and dropping an engine frees every oneDNN object
and buffer its kernels made, and one engine run by many threads at once gives bitwise the results of
single-threaded runs.

The plan uses each native tactic: cpu.conv_winograd (3x3), cpu.conv_matmul (1x1), cpu.conv_dnnl (3x3 stride
2), cpu.pool_dnnl (MaxPool and the global mean) and cpu.linear_dnnl (the classifier).
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.cpu.conv_winograd import _kernels
from kiln.backends.cpu.dnnl import library
from kiln.builder import Builder, BuilderConfig
from kiln.plan.format import plan_from_bytes, plan_to_bytes
from kiln.runtime.engine import Engine

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(library() is None or _kernels() is None,
                                 reason="needs the oneDNN library (pip install onednn-cpu-gomp) and a C compiler")]

C, HW = 8, 12
WANT = {"wino": "cpu.conv_winograd", "mm": "cpu.conv_matmul", "direct": "cpu.conv_dnnl", "pool": "cpu.pool_dnnl",
        "gap": "cpu.pool_dnnl", "fc": "cpu.linear_dnnl"}


def _model() -> Any:
    rng = np.random.default_rng(0)
    inits = []

    def w(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name))
        return name
    nodes = [
        helper.make_node("Conv", ["x", w("w1", C, C, 3, 3), w("b1", C)], ["a"], pads=[1, 1, 1, 1], name="wino"),
        helper.make_node("Relu", ["a"], ["a2"]),
        helper.make_node("Conv", ["a2", w("w2", C, C, 1, 1), w("b2", C)], ["m"], name="mm"),
        helper.make_node("Conv", ["m", w("w3", 2 * C, C, 3, 3), w("b3", 2 * C)], ["d"], pads=[1, 1, 1, 1],
                         strides=[2, 2], name="direct"),
        helper.make_node("MaxPool", ["d"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", w("wl", 10, 2 * C), w("bl", 10)], ["y"], transB=1, name="fc"),
    ]
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, HW, HW])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def plan_bytes() -> bytes:
    """The plan with one layer per native tactic (the 1x1 conv assigned to cpu.conv_matmul, which the
    heuristic ranks below cpu.conv_dnnl; the engine re-checks that it takes the layer)."""
    plan = Builder().build(_model(), BuilderConfig(device="cpu", optimization_level=0))
    for st in plan.graph["steps"]:
        if st["name"] == "mm":
            st["tactic"], st["config"] = "cpu.conv_matmul", {}
    used = {st["tactic"] for st in plan.graph["steps"]}
    assert set(WANT.values()) <= used, used
    return plan_to_bytes(plan)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch's (and so oneDNN's) OpenMP pool at one thread: on a small shared machine, spinning pools make
    timings of thousands of tiny inferences erratic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _rss_mb() -> float:
    """Resident memory after glibc returns its free heap pages (malloc_trim, where there is one): what is held,
    not what the allocator keeps after other tests in the same worker fragmented it (CI once read 2.7 MB of
    such growth over 500 loads of a plan that leaks nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def test_load_and_drop_frees_native_resources(plan_bytes: bytes, one_thread: None) -> None:
    plan = plan_from_bytes(plan_bytes)
    x = np.random.default_rng(1).standard_normal((1, C, HW, HW)).astype(np.float32)
    want = Engine(plan).create_execution_context().execute({"x": x})["y"]

    def once(i: int) -> None:
        engine = Engine(plan)
        out = engine.create_execution_context().execute({"x": x})["y"]
        assert np.array_equal(out, want)
        if i % 2:
            engine.close()  # every other round: closed explicitly; the others are only dropped
    for i in range(50):  # warm-up: allocator pools, oneDNN's primitive cache, the Winograd scratch
        once(i)
    rss = []
    for half in range(2):  # a leak grows in both halves; the allocator's one-off growth (pools, arenas) in the first
        gc.collect()
        rss.append(_rss_mb())
        for i in range(500):
            once(i)
    gc.collect()
    rss.append(_rss_mb())
    growth = rss[2] - rss[1]
    assert growth < 2.5, f"RSS grew by {growth:.1f} MB over the second 500 engine loads ({rss[1] - rss[0]:.1f} over the first)"
    assert rss[2] - rss[0] < 10.0, f"RSS grew by {rss[2] - rss[0]:.1f} MB over 1,000 engine loads"


def test_closed_engine_refuses_to_run(plan_bytes: bytes) -> None:
    engine = Engine(plan_from_bytes(plan_bytes))
    ctx = engine.create_execution_context()
    x = np.zeros((1, C, HW, HW), np.float32)
    ctx.execute({"x": x})
    engine.close()
    engine.close()
    with pytest.raises(Exception, match="released"):
        ctx.execute({"x": x})


def test_threads_share_an_engine_bitwise(plan_bytes: bytes, one_thread: None) -> None:
    """8 threads x 2,000 inferences on one engine, each thread with its own context, on fresh random inputs:
    bitwise the outputs of single-threaded runs. The engine is cold when the threads start, so its kernels
    make their primitives on whichever thread comes first, while the others run."""
    engine = Engine(plan_from_bytes(plan_bytes))
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((1, C, HW, HW)).astype(np.float32) for _ in range(16)]
    single = Engine(plan_from_bytes(plan_bytes)).create_execution_context()
    want = [single.execute({"x": x})["y"] for x in xs]  # single-threaded, on an engine of its own
    errors: list[str] = []
    start = threading.Barrier(8)

    def work(k: int) -> None:
        ctx = engine.create_execution_context()
        start.wait()
        for i in range(2000):
            j = (i * 7 + k) % len(xs)
            got = ctx.execute({"x": xs[j]})["y"]
            if not np.array_equal(got, want[j]):
                errors.append(f"thread {k}, run {i}: max difference {np.abs(got - want[j]).max()}")
                return
    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    ctx = engine.create_execution_context()
    for x, w in zip(xs, want):  # and the shared engine, back on one thread
        assert np.array_equal(ctx.execute({"x": x})["y"], w)
