"""Timing several engines in one process: blocks of runs, engines rotating per block, each block settled first.

Blocks rather than single runs alternate so that slow drifts of a shared machine hit all engines alike. Each
block starts with untimed runs for `settle_s` seconds (at least one): every engine's thread pool keeps spinning
for a while after its last run, and an engine timed right after another competes with those threads. Measured
on a 2-core AMD EPYC (shufflenet_v2_x1_0, 2 threads each): Kiln's first eight runs after ONNX Runtime's took
8.7-11 ms against 3.5 ms in steady state (ORT's workers spin for ~70 ms), ORT's first four after Kiln's
4.0-5.0 ms against 3.4; a block that dropped only its first run counted most of that.
"""
from __future__ import annotations

import time
from typing import Any, Callable

SETTLE_S = 0.2


def rotating_blocks(runners: dict[str, Callable[[], Any]], blocks: int, iters: Callable[[str], int] | int,
                    warmup: int, settle_s: float = SETTLE_S) -> dict[str, list[float]]:
    """ms per timed run for each engine: `warmup` runs each, then `blocks` rounds in which every engine, in an
    order rotating by round, settles (untimed runs for settle_s, at least one) and is timed `iters` runs."""
    names = list(runners)
    for n in names:
        for _ in range(warmup):
            runners[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for b in range(blocks):
        for k in range(len(names)):
            n = names[(b + k) % len(names)]
            run = runners[n]
            end = time.perf_counter() + settle_s
            run()
            while time.perf_counter() < end:
                run()
            for _ in range(iters(n) if callable(iters) else iters):
                t0 = time.perf_counter()
                run()
                times[n].append((time.perf_counter() - t0) * 1e3)
    return times
