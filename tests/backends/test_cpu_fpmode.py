"""Denormal flushing on the CPU (kiln.backends.cpu.fpmode, BuilderConfig.flush_denormals).

A plan built with the default runs with float32 denormals flushed to zero in the calling thread and every
OpenMP thread its kernels use, and leaves the process's mode as it found it; built with flush_denormals=False
it keeps IEEE gradual underflow and matches onnxruntime (which does not flush) in the denormal range."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.cpu import fpmode
from kiln.builder import Builder, BuilderConfig
from kiln.logger import Logger
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle

pytestmark = pytest.mark.skipif(not fpmode.available(), reason="no C compiler here, or a CPU without a flush mode")

TINY = float(np.finfo(np.float32).tiny)  # 2**-126, the smallest normal float32


def _denormal_product(threads: int) -> torch.Tensor:
    """x * 1 over a million denormals, on `threads` OpenMP threads (torch splits it between them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.from_numpy(np.random.default_rng().uniform(0.1, 0.9, 1 << 20).astype(np.float32) * TINY)
        return x * torch.ones_like(x)
    finally:
        torch.set_num_threads(before)


def test_flushed_in_every_team_thread_and_restored_after() -> None:
    ieee = _denormal_product(2)
    assert (ieee > 0).all()  # IEEE: the products stay denormal
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with fpmode.flushed_denormals():
            x = torch.from_numpy(np.random.default_rng().uniform(0.1, 0.9, 1 << 20).astype(np.float32) * TINY)
            flushed = x * torch.ones_like(x)
    finally:
        torch.set_num_threads(before)
    assert not flushed.any(), f"{int((flushed != 0).sum())} of {flushed.numel()} products not flushed"
    assert (_denormal_product(2) > 0).all(), "the mode was not restored after the block"


def test_nested_blocks_keep_the_outer_mode() -> None:
    with fpmode.flushed_denormals():
        with fpmode.flushed_denormals():
            pass
        x = torch.full((8,), TINY / 4)
        assert not (x * 1.0).any(), "the inner block's exit cleared the outer block's flushing"
    assert ((torch.full((8,), TINY / 4) * 1.0) > 0).all()


def _conv_model(rng: np.random.Generator) -> object:
    """A 3x3 conv whose weights are denormal: on normal inputs its outputs are denormal too."""
    w = (rng.uniform(0.2, 1.0, (16, 8, 3, 3)) * rng.choice([-1, 1], (16, 8, 3, 3)) * TINY / 256).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "denormal_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 48, 48])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("flush", [True, False])
def test_plan_runs_as_built(flush: bool) -> None:
    rng = np.random.default_rng()
    model = _conv_model(rng)
    x = rng.uniform(0.5, 1.0, (1, 8, 48, 48)).astype(np.float32)
    plan = Builder(Logger()).build(model, BuilderConfig(device="cpu", flush_denormals=flush))
    assert plan.build["flush_denormals"] is flush
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    finally:
        torch.set_num_threads(before)
    want = run_oracle(model, {"x": x})[0]  # onnxruntime keeps denormals
    assert np.count_nonzero(want) > want.size // 2
    if flush:
        assert not got.any(), f"{np.count_nonzero(got)} of {got.size} outputs not flushed"
        assert (_denormal_product(2) > 0).all(), "execute left the process flushing denormals"
    else:
        err = np.abs(got.astype(np.float64) - want).max()
        assert err <= 1e-3 * np.abs(want).max(), err  # denormals hold fewer bits: relative to the largest
