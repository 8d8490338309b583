"""`kiln serve MODEL.kiln [MORE.kiln ...]`: serve plans over HTTP (KServe v2 / Triton protocol) on Ray Serve."""
from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from kiln.errors import KilnError


def add_serve_parser(sub: Any) -> None:
    """Register `kiln serve` on the CLI's subparsers."""
    p = sub.add_parser("serve", help="serve plans over HTTP (KServe v2 / Triton protocol) on Ray Serve, "
                                     "with dynamic batching")
    p.add_argument("plans", nargs="+", metavar="MODEL.kiln", help="plans to serve, one model each")
    p.add_argument("--name", action="append", default=[], metavar="N",
                   help="model name, once per plan in order (default: the plan file's stem)")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas per model (default 1)")
    p.add_argument("--contexts", type=int, default=1,
                   help="execution contexts per replica: batches it runs at once (default 1)")
    p.add_argument("--max-batch", type=int, action="append", default=[], metavar="B",
                   help="rows per dynamic batch, once for all plans or once per plan (default: the plan's "
                        "largest profile batch; 1: no batching)")
    p.add_argument("--batch-timeout-ms", type=float, default=2.0, metavar="T",
                   help="how long the oldest request waits for others to join its batch (default 2 ms)")
    p.add_argument("--exact-batches", action="store_true",
                   help="run each batch at its own size instead of padding it to the next power of two "
                        "(less compute per batch, a kernel set-up per new size)")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="S",
                   help="a request without a result after S seconds gets 504 (default 60)")
    p.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1; 0.0.0.0 to be reachable)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--address", default=None,
                   help="join a running Ray cluster ('auto' or HEAD:PORT, see `ray start`) instead of starting one")
    p.add_argument("--num-cpus", type=float, default=1.0, metavar="F",
                   help="Ray CPUs per replica, also its threads (default 1)")
    p.add_argument("--num-gpus", type=float, default=None, metavar="F",
                   help="GPU (fraction) per replica of a CUDA plan (default 1)")
    p.add_argument("--max-ongoing-requests", type=int, default=256,
                   help="requests one replica holds at once (default 256)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate the plans (one line and exit 2 on a bad one, before Ray starts), serve until Ctrl-C/SIGTERM."""
    from kiln.serve.config import ServeConfig
    from kiln.serve.plans import prepare
    cfg = ServeConfig(plans=args.plans, names=args.name, replicas=args.replicas, contexts=args.contexts,
                      max_batch=args.max_batch or None, batch_timeout_ms=args.batch_timeout_ms,
                      buckets=not args.exact_batches,
                      request_timeout_s=args.request_timeout,
                      host=args.host if args.host is not None else "127.0.0.1",
                      port=args.port if args.port is not None else 8000, address=args.address,
                      num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_ongoing_requests=args.max_ongoing_requests)
    models = prepare(cfg)
    for m in models:
        for note in m.notes:
            print(f"kiln serve: {note}", flush=True)

    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise KilnError("kiln serve needs Ray Serve, which is not installed: pip install 'kiln[serve]' "
                        "(or pip install 'ray[serve,data]')") from None
    from kiln.serve.launch import start
    stop = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    server = None
    try:
        server = start(cfg, models, port_given=args.host is not None or args.port is not None,
                       log=lambda line: print(f"kiln serve: {line}", flush=True))
        signal.signal(signal.SIGTERM, on_term)  # again: Ray installs its own handler when it starts
        print(f"kiln serve: {server.url}/v2 (KServe v2 / Triton HTTP protocol)", flush=True)
        for m in models:
            rows = f"max batch {m.max_batch}, batch timeout {cfg.batch_timeout_ms:g} ms" if m.sig.batched \
                else "not batched"
            print(f"  model '{m.name}': {server.url}/v2/models/{m.name}  ({m.path}, {m.device}, "
                  f"{cfg.replicas} replica(s) x {cfg.contexts} context(s), {rows})", flush=True)
        for url in server.metrics_urls:
            print(f"  metrics: {url}", flush=True)
        print(f"  ray: {server.ray_address} ({'local instance' if server.local else 'cluster'}); Ctrl-C stops",
              flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if server is not None:
            print("kiln serve: stopping", flush=True)
            server.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0
