"""Kiln's dynamic batcher (Triton-style), without Ray: one asyncio queue per model.

Requests wait in arrival order. When an execution context is free, the oldest request starts a batch; the
batch takes the waiting requests of the same shape (beyond dim 0) and profile, in order, until it holds
`max_batch` rows or `batch_timeout_ms` have passed since that oldest request arrived. The batch is stacked
along dim 0, padded or split to the plan's profile (`kiln.serve.model.run_rows`), run by one execute in a
worker thread, and its outputs are split back per request.

Every request's future is resolved on every path: a result, BadRequest (before queueing), ModelFailure
(the model raised), RequestTimeout (no result within the timeout) or Unavailable (the batcher closed).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kiln.errors import InputError, KilnError
from kiln.serve.model import BadRequest, ModelFailure, ModelSignature, RequestTimeout, ServeError, Unavailable, run_rows

Execute = Callable[[dict[str, np.ndarray]], Mapping[str, Any]]


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass
class BatchStats:
    """Counts and times since start (Triton's statistics extension reads them): requests that succeeded or
    failed, executes by batch size (rows), time in queue and in execute."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inferences: int = 0
    executions: int = 0
    last_inference_ms: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)  # rows -> [count, ns]


@dataclass(eq=False)
class _Item:
    inputs: dict[str, np.ndarray]
    profile: int
    rows: int
    key: Any
    future: asyncio.Future
    arrived: float
    abandoned: bool = False  # the caller stopped waiting (timeout, disconnect): skipped when batching


class DynamicBatcher:
    """Gathers requests for one model into batches and runs them on a pool of execution contexts.

    `contexts`: one `execute(inputs) -> outputs` callable per execution context (each used by one thread at a
    time; len(contexts) batches run concurrently). `max_batch`: rows a batch gathers from several requests (a
    plan that is not batched runs one request per execute); one request may hold up to the larger of max_batch
    and the profile's max rows. `batch_timeout_ms`: how long the oldest waiting request may wait for others.
    `buckets`: pad each execute up to the next of the profile's batch sizes (ModelSignature.batch_sizes: min,
    powers of two, cap), so an engine meets a few shapes; False pads only up to the profile's min.
    `on_batch(rows)` / `on_queue(ms)`: observers for metrics, called per execute and per request.
    """

    def __init__(self, sig: ModelSignature, contexts: Sequence[Execute], *, max_batch: int,
                 batch_timeout_ms: float, timeout_s: float | None = None, buckets: bool = True,
                 on_batch: Callable[[int], None] | None = None,
                 on_queue: Callable[[float], None] | None = None) -> None:
        if not contexts:
            raise ValueError("DynamicBatcher needs at least one execution context")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.sig = sig
        self.max_batch = max_batch if sig.batched else 1
        # one request may hold more rows than a gathered batch (it then runs alone, split at the profile's max)
        largest = sig.max_rows()
        self.max_request_rows = max(self.max_batch, largest or self.max_batch) if sig.batched else None
        self.batch_timeout_s = max(batch_timeout_ms, 0.0) / 1e3
        self.timeout_s = timeout_s
        self.stats = BatchStats()
        self._on_batch, self._on_queue = on_batch, on_queue
        self._free = list(contexts)
        profiles = range(max(len(sig.ranges), 1))
        self.sizes = {p: sig.batch_sizes(p, self.max_batch) if buckets and sig.batched else None for p in profiles}
        self._pool = concurrent.futures.ThreadPoolExecutor(len(contexts), thread_name_prefix="kiln-batch")
        self._pending: collections.deque[_Item] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._former: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._closed = False

    # -- the caller's side -------------------------------------------------------------------------------------
    async def infer(self, inputs: Mapping[str, np.ndarray], timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """The outputs of one request; raises a ServeError (BadRequest, ModelFailure, RequestTimeout,
        Unavailable). `timeout_s` (default: the batcher's) bounds the wait from arrival to result."""
        place = self.sig.check(inputs, self.max_request_rows)
        if self._closed:
            raise Unavailable("the model is shutting down")
        self._start()
        assert self._loop is not None and self._wake is not None
        item = _Item(dict(inputs), place.profile, place.rows, place.key, self._loop.create_future(), time.monotonic())
        self._pending.append(item)
        self._wake.set()
        limit = timeout_s if timeout_s is not None else self.timeout_s
        try:
            if limit is None:
                return await asyncio.shield(item.future)
            return await asyncio.wait_for(asyncio.shield(item.future), limit)
        except asyncio.TimeoutError:
            item.abandoned = True
            self._count_fail(item)
            raise RequestTimeout(f"no result within {limit:g} s") from None
        except asyncio.CancelledError:
            item.abandoned = True
            raise

    def warm_up(self) -> list[str]:
        """Run every execution context once at each batch size it will see (zeros at the profiles' opt shapes
        beyond dim 0), so the first requests do not pay for kernel set-up. Returns warnings, one line each."""
        warnings = []
        for p, sizes in self.sizes.items():
            for rows in sizes or [self.sig.batch_range(p)[0]]:
                feed = self.sig.example(p, rows)
                for ctx in self._free:
                    try:
                        ctx(feed)
                    except Exception as e:
                        warnings.append(f"warm-up at batch {rows} failed: {type(e).__name__}: {_line(e)}")
                        break
        return warnings

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop taking requests: waiting ones fail with Unavailable, running batches get `grace_s` to finish."""
        self._closed = True
        if self._former is not None:
            self._former.cancel()
            try:
                await self._former
            except (asyncio.CancelledError, Exception):
                pass
        while self._pending:
            self._resolve(self._pending.popleft(), Unavailable("the model is shutting down"))
        if self._running:
            await asyncio.wait(list(self._running), timeout=grace_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the batching loop -------------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._former is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(len(self._free))
        self._former = self._loop.create_task(self._form_loop(), name="kiln-batcher")

    async def _form_loop(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _drop_abandoned(self) -> None:
        if any(it.abandoned for it in self._pending):
            for it in self._pending:
                if it.abandoned and not it.future.done():
                    it.future.cancel()
            self._pending = collections.deque(it for it in self._pending if not it.abandoned)

    async def _next_batch(self) -> list[_Item]:
        assert self._wake is not None
        while True:
            self._drop_abandoned()
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._pending[0]
            deadline = head.arrived + self.batch_timeout_s
            while self.max_batch > 1 and self._rows(head.key) < self.max_batch and not head.abandoned:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            if head.abandoned:
                continue
            return self._take(head)

    def _rows(self, key: Any) -> int:
        return sum(it.rows for it in self._pending if it.key == key and not it.abandoned)

    def _take(self, head: _Item) -> list[_Item]:
        batch, rows, keep = [], 0, collections.deque()
        for it in self._pending:
            if not it.abandoned and it.key == head.key and (not batch or rows + it.rows <= self.max_batch):
                batch.append(it)
                rows += it.rows
            elif not it.abandoned:
                keep.append(it)
            elif not it.future.done():
                it.future.cancel()
        self._pending = keep
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        assert self._slots is not None
        ctx = self._free.pop()
        start = time.monotonic()
        for it in batch:
            self.stats.queue_ns += int((start - it.arrived) * 1e9)
            if self._on_queue is not None:
                self._on_queue((start - it.arrived) * 1e3)
        try:
            names = self.sig.input_names
            feed = batch[0].inputs if len(batch) == 1 else \
                {n: np.concatenate([it.inputs[n] for it in batch]) for n in names}
            p = batch[0].profile
            outs = await asyncio.get_running_loop().run_in_executor(
                self._pool, run_rows, ctx, self.sig, p, feed, self._executed, self.sizes[p])
            self.stats.compute_ns += int((time.monotonic() - start) * 1e9)
            at = 0
            for it in batch:
                if self.sig.batched:
                    self._resolve(it, {n: np.ascontiguousarray(o[at:at + it.rows]) for n, o in outs.items()})
                else:
                    self._resolve(it, outs)
                at += it.rows
        except BaseException as e:  # every future is answered, whatever went wrong
            if isinstance(e, ServeError):
                err: ServeError = e
            elif isinstance(e, InputError):
                err = BadRequest(_line(e))
            elif isinstance(e, KilnError):
                err = ModelFailure(_line(e))
            elif isinstance(e, asyncio.CancelledError):
                err = Unavailable("the model is shutting down")
            else:
                err = ModelFailure(f"model error: {type(e).__name__}: {_line(e)}")
            for it in batch:
                self._resolve(it, err)
            if not isinstance(e, Exception):
                raise
        finally:
            self._free.append(ctx)
            self._slots.release()

    def _executed(self, rows: int, seconds: float) -> None:  # in the worker thread (metrics are thread-safe)
        s = self.stats.batches.setdefault(rows, [0, 0])
        s[0] += 1
        s[1] += int(seconds * 1e9)
        self.stats.executions += 1
        self.stats.inferences += rows
        if self._on_batch is not None:
            self._on_batch(rows)

    def _resolve(self, item: _Item, result: dict[str, np.ndarray] | ServeError) -> None:
        now = time.monotonic()
        if item.future.done():
            return
        if isinstance(result, ServeError):
            item.future.set_exception(result)
            item.future.exception()  # retrieved: no "never retrieved" warning for an abandoned request
            if not item.abandoned:
                self._count_fail(item, now)
        else:
            item.future.set_result(result)
            if not item.abandoned:
                self.stats.success += 1
                self.stats.success_ns += int((now - item.arrived) * 1e9)
                self.stats.last_inference_ms = int(time.time() * 1e3)

    def _count_fail(self, item: _Item, now: float | None = None) -> None:
        self.stats.fail += 1
        self.stats.fail_ns += int(((now or time.monotonic()) - item.arrived) * 1e9)
