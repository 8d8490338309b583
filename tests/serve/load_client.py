"""Load generator for the serve tests, run as its own process: N concurrent tritonclient (aio) clients send
binary-tensor infer requests drawn from a .npz of inputs and expected outputs, bounded in count and time.

    python load_client.py URL MODEL CASES.npz --clients 32 --requests 640 --seconds 30 --timeout 20 \
        [--after-fault 10 [--fault-mark FILE]]

--after-fault S stops issuing S seconds after the fault (the first failed request, or the moment FILE appears: the
test creates it once it has injected the fault; a server that hides the fault fails no request), and not before a
request issued after the fault has an outcome (a server may hold requests while it replaces a replica). A load that
outlasts a fault, then ends (or --seconds runs out); "ok_after_fault" counts right answers to requests issued after
it.

Prints one JSON line: ok, wrong (answered with wrong numbers), failed (by HTTP status), timeouts, elapsed, rps.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time

import numpy as np


async def _main(args: argparse.Namespace) -> dict:
    import tritonclient.http.aio as tc
    from tritonclient.utils import InferenceServerException
    cases = np.load(args.cases)
    xs, ys = cases["x"], cases["y"]
    counts: collections.Counter = collections.Counter()
    messages: dict[str, str] = {}
    latencies: list[float] = []
    fault: list[float] = []  # when the fault was seen: first failure or the mark file
    ok_after_fault = 0
    done_after_fault = 0  # requests issued after the fault that have an outcome (a server may hold them a while)
    issued = 0
    stop_at = time.monotonic() + args.seconds
    start = time.monotonic()

    async def client(k: int, c: "tc.InferenceServerClient") -> None:
        nonlocal issued, ok_after_fault, done_after_fault
        while issued < args.requests and time.monotonic() < stop_at and not (
                fault and args.after_fault is not None and time.monotonic() > fault[0] + args.after_fault
                and done_after_fault > 0):
            i = issued % len(xs)
            issued += 1
            inp = tc.InferInput(args.input, list(xs[i].shape), "FP32")
            inp.set_data_from_numpy(xs[i], binary_data=True)
            t0 = time.monotonic()
            after = bool(fault) and t0 > fault[0]
            try:
                r = await asyncio.wait_for(c.infer(args.model, [inp]), args.timeout)
                got = r.as_numpy(args.output)
                ok = got is not None and got.shape == ys[i].shape and np.allclose(got, ys[i], rtol=1e-4, atol=1e-5)
                counts["ok" if ok else "wrong"] += 1
                latencies.append(time.monotonic() - t0)
                if ok and after:
                    ok_after_fault += 1
                done_after_fault += after
                continue
            except asyncio.TimeoutError:
                counts["timeout"] += 1
                done_after_fault += after
            except InferenceServerException as e:
                done_after_fault += after
                counts[f"status_{e.status()}"] += 1
                messages.setdefault(str(e.status()), str(e.message())[:200])
            except Exception as e:  # connection reset and the like
                done_after_fault += after
                counts[f"error_{type(e).__name__}"] += 1
            fault.append(time.monotonic())
            fault.sort()

    async def watch_mark() -> None:
        while time.monotonic() < stop_at and not fault:
            if os.path.exists(args.fault_mark):
                fault.append(time.monotonic())
                return
            await asyncio.sleep(0.05)

    async with tc.InferenceServerClient(args.url, conn_limit=args.clients, conn_timeout=args.timeout) as c:
        watcher = asyncio.ensure_future(watch_mark()) if args.fault_mark else None
        await asyncio.gather(*(client(k, c) for k in range(args.clients)))
        if watcher is not None:
            watcher.cancel()
    elapsed = time.monotonic() - start
    lat = sorted(latencies)
    return {"sent": issued, "ok": counts.pop("ok", 0), "wrong": counts.pop("wrong", 0),
            "timeouts": counts.pop("timeout", 0), "failed": dict(counts), "messages": messages,
            "ok_after_fault": ok_after_fault, "elapsed_s": round(elapsed, 3),
            "rps": round(len(lat) / elapsed, 2) if elapsed else 0.0,
            "p50_ms": round(lat[len(lat) // 2] * 1e3, 2) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 2) if lat else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("cases")
    ap.add_argument("--input", default="x")
    ap.add_argument("--output", default="y")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=640)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--after-fault", type=float, default=None)
    ap.add_argument("--fault-mark", default=None)
    args = ap.parse_args(argv)
    print(json.dumps(asyncio.run(_main(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
