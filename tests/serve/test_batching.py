"""Kiln's dynamic batcher (kiln.serve.batching) without Ray, on real engines: batches form under concurrency and
answer each request with its own rows (oracles: onnxruntime, float64 numpy), batches are padded and split to the
profile, shapes no profile allows are 400s carrying its range, and every future is resolved when the model fails,
a request times out, a caller goes away or the batcher closes."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.serve.batching import DynamicBatcher
from kiln.serve.model import BadRequest, ModelFailure, ModelSignature, RequestTimeout, Unavailable

from .conftest import build, two_inputs


def _engine(path: str):
    from kiln.runtime.engine import Engine
    return Engine.load(path)


def _sig(engine) -> ModelSignature:
    p = engine.plan
    return ModelSignature.from_header(p.inputs, p.outputs, p.profiles)


class Recording:
    """An execution context's execute that records the batch size of every call and can be made to fail or
    to be slow."""

    def __init__(self, engine, delay: float = 0.0) -> None:
        self.ctx = engine.create_execution_context()
        self.sizes: list[int] = []
        self.fail: str | None = None
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, feed):
        with self.lock:  # one thread at a time, as the batcher promises
            self.sizes.append(int(next(iter(feed.values())).shape[0]))
            if self.delay:
                time.sleep(self.delay)
            if self.fail:
                raise RuntimeError(self.fail)
            return self.ctx.execute(feed)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """(engine, W) of two_inputs() built with batch 4..8: batches of 1-3 rows are padded, of 9+ split."""
    model = two_inputs(seed=3)
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w")).astype(np.float64)
    path = build(model, str(tmp_path_factory.mktemp("two") / "two.kiln"),
                 {"a": ((4, 6), (4, 6), (8, 6)), "b": ((4, 1), (4, 1), (8, 1))})
    return _engine(path), w


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    """tanh(x) * 3 over x[N, L], L dynamic: profile [1,2]..[8,8]."""
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    g = helper.make_graph([helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Mul", ["t", "three"], ["y"])],
                          "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L"])], [three])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = build(model, str(tmp_path_factory.mktemp("seq") / "seq.kiln"), {"x": ((1, 2), (4, 4), (8, 8))})
    return _engine(path)


def _two_oracle(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a64 = a.astype(np.float64)
    return np.tanh(a64 @ w) * b.astype(np.float64), a64.sum(1, keepdims=True)


def _two_request(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {"a": rng.standard_normal((rows, 6)).astype(np.float32),
            "b": rng.integers(-3, 4, (rows, 1)).astype(np.int64)}


def test_batches_form_under_concurrency(small_plan):
    import onnxruntime as ort
    path, model = small_plan
    engine = _engine(path)
    ctx = Recording(engine)
    batcher = DynamicBatcher(_sig(engine), [ctx], max_batch=16, batch_timeout_ms=50)
    rng = np.random.default_rng()
    xs = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(40)]

    async def main():
        return await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
    outs = asyncio.run(main())
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": np.concatenate(xs)})[0]
    got = np.concatenate([o["y"] for o in outs])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert len(ctx.sizes) < len(xs) and max(ctx.sizes) == 16, ctx.sizes
    assert set(ctx.sizes) <= {1, 2, 4, 8, 16}  # padded to the power-of-two buckets
    assert batcher.stats.success == 40 and batcher.stats.fail == 0 and batcher.stats.inferences == 40


@pytest.mark.parametrize("buckets", [True, False])
def test_padding_and_splitting_to_the_profile(two, buckets):
    engine, w = two
    ctx = Recording(engine)
    batcher = DynamicBatcher(_sig(engine), [ctx], max_batch=16, batch_timeout_ms=100, buckets=buckets)
    rng = np.random.default_rng()
    reqs = [_two_request(rng, n) for n in (1, 3, 2, 11)]  # 17 rows: over max_batch 16, the 11 waits its turn

    async def main():
        return await asyncio.gather(*(batcher.infer(r) for r in reqs))
    outs = asyncio.run(main())
    for r, o in zip(reqs, outs):
        y, s = _two_oracle(w, r["a"], r["b"])
        assert o["y"].shape == y.shape and o["s"].shape == s.shape
        np.testing.assert_allclose(o["y"], y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(o["s"], s, rtol=1e-5, atol=1e-5)
    assert all(4 <= n <= 8 for n in ctx.sizes), ctx.sizes  # never outside the profile's 4..8
    if buckets:
        assert set(ctx.sizes) <= {4, 8}
    # first batch: 1+3+2 = 6 rows (the 11 would pass 16); second: the 11 rows split 8 + 3
    assert batcher.stats.batches.get(6, [0])[0] == 1 and batcher.stats.batches.get(8, [0])[0] == 1


def test_request_larger_than_max_batch_is_400_and_batch_sizes_are_per_shape(seq):
    batcher = DynamicBatcher(_sig(seq), [Recording(seq)], max_batch=8, batch_timeout_ms=20)
    rng = np.random.default_rng()

    async def main():
        with pytest.raises(BadRequest) as e:
            await batcher.infer({"x": rng.standard_normal((2, 9)).astype(np.float32)})
        assert str(e.value) == "input 'x' has shape [2,9], outside the profile range [1,2]..[8,8]"
        assert e.value.status == 400
        with pytest.raises(BadRequest, match="input 'x' has 9 rows, more than the max batch 8"):
            await batcher.infer({"x": rng.standard_normal((9, 4)).astype(np.float32)})
        xs = [rng.standard_normal((1 + k % 3, 3 + k % 2)).astype(np.float32) for k in range(12)]
        outs = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
        for x, o in zip(xs, outs):  # rows of L=3 and L=4 requests are never stacked together
            np.testing.assert_allclose(o["y"], np.tanh(x.astype(np.float64)) * 3, rtol=1e-5, atol=1e-6)
    asyncio.run(main())


def test_model_error_resolves_every_future_and_batcher_recovers(two):
    engine, w = two
    ctx = Recording(engine)
    batcher = DynamicBatcher(_sig(engine), [ctx], max_batch=8, batch_timeout_ms=30)
    rng = np.random.default_rng()

    async def main():
        ctx.fail = "kernel exploded\nsecond line"
        res = await asyncio.wait_for(asyncio.gather(*(batcher.infer(_two_request(rng, 1)) for _ in range(5)),
                                                    return_exceptions=True), 10)
        assert all(isinstance(r, ModelFailure) and r.status == 500 for r in res), res
        assert all(str(r) == "model error: RuntimeError: kernel exploded" for r in res)
        ctx.fail = None
        r = _two_request(rng, 3)
        out = await asyncio.wait_for(batcher.infer(r), 10)
        np.testing.assert_allclose(out["y"], _two_oracle(w, r["a"], r["b"])[0], rtol=1e-5, atol=1e-5)
    asyncio.run(main())
    assert batcher.stats.fail == 5 and batcher.stats.success == 1


def test_timeouts_and_abandoned_requests(two):
    engine, w = two
    ctx = Recording(engine, delay=0.4)
    batcher = DynamicBatcher(_sig(engine), [ctx], max_batch=4, batch_timeout_ms=0, timeout_s=5)
    rng = np.random.default_rng()

    async def main():
        slow = asyncio.ensure_future(batcher.infer(_two_request(rng, 4)))  # occupies the only context
        await asyncio.sleep(0.05)
        with pytest.raises(RequestTimeout) as e:  # queued behind it, gives up after 0.1 s
            await batcher.infer(_two_request(rng, 1), timeout_s=0.1)
        assert e.value.status == 504
        gone = asyncio.ensure_future(batcher.infer(_two_request(rng, 2)))
        await asyncio.sleep(0.05)
        gone.cancel()  # the caller goes away (client disconnect)
        last = _two_request(rng, 2)
        out = await asyncio.wait_for(batcher.infer(last), 10)
        np.testing.assert_allclose(out["s"], _two_oracle(w, last["a"], last["b"])[1], rtol=1e-5, atol=1e-5)
        await slow
    asyncio.run(main())
    assert ctx.sizes == [4, 4]  # the timed-out and the cancelled requests never ran


def test_close_fails_waiting_requests_and_finishes_running_ones(two):
    engine, w = two
    ctx = Recording(engine, delay=0.3)
    batcher = DynamicBatcher(_sig(engine), [ctx], max_batch=4, batch_timeout_ms=0)
    rng = np.random.default_rng()

    async def main():
        tasks = [asyncio.ensure_future(batcher.infer(_two_request(rng, 3))) for _ in range(4)]
        await asyncio.sleep(0.1)  # the first runs, three wait
        await asyncio.wait_for(batcher.close(), 10)
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending
        res = [t.exception() or t.result() for t in tasks]
        assert isinstance(res[0], dict)
        assert all(isinstance(r, Unavailable) and r.status == 503 for r in res[1:]), res
        with pytest.raises(Unavailable):
            await batcher.infer(_two_request(rng, 1))
    asyncio.run(main())


def test_not_batched_plan_runs_requests_one_by_one(tmp_path):
    """An output without the batch dim (a sum over rows) makes a plan unbatchable: each request runs alone."""
    g = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], "total",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    engine = _engine(build(model, str(tmp_path / "total.kiln"), {"x": ((1, 4), (2, 4), (8, 4))}))
    sig = _sig(engine)
    assert not sig.batched
    ctx = Recording(engine)
    batcher = DynamicBatcher(sig, [ctx], max_batch=16, batch_timeout_ms=50)
    rng = np.random.default_rng()
    xs = [rng.standard_normal((1 + k % 3, 4)).astype(np.float32) for k in range(6)]

    async def main():
        return await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
    for x, o in zip(xs, asyncio.run(main())):
        np.testing.assert_allclose(o["y"], x.astype(np.float64).sum(), rtol=1e-5)
    assert len(ctx.sizes) == 6 and batcher.max_batch == 1


def test_warm_up_runs_each_bucket(two):
    engine, _ = two
    ctx = Recording(engine)
    batcher = DynamicBatcher(_sig(engine), [ctx], max_batch=16, batch_timeout_ms=1)
    assert batcher.warm_up() == [] and ctx.sizes == [4, 8]
    bad = Recording(engine)
    bad.fail = "no"
    assert DynamicBatcher(_sig(engine), [bad], max_batch=4, batch_timeout_ms=1).warm_up() == \
        ["warm-up at batch 4 failed: RuntimeError: no"]
