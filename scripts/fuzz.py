#!/usr/bin/env python3
"""Fuzz Kiln's plan loader and ONNX importer (see docs/FUZZING.md).

    .venv/bin/python scripts/fuzz.py --minutes 5 --target both [--seed S] [--corpus DIR] [--jobs J]

Prints progress every ~30 s and a summary table at the end; saves one case per new failure signature
into the corpus folder (tests/fuzz/corpus by default: plans/<sig>.kiln, models/<sig>.onnx, each with a
.json sidecar) and writes nothing anywhere else (the workers' scratch folders are temporary). Exits 1
when any case failed, 0 otherwise. Run it niced on a shared machine: ``nice -n 10 .venv/bin/python ...``.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="campaign length (default 5)")
    ap.add_argument("--target", choices=["plans", "models", "both"], default="both")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    ap.add_argument("--corpus", default=os.path.join(ROOT, "tests", "fuzz", "corpus"),
                    help="folder failing cases are saved into (default tests/fuzz/corpus)")
    ap.add_argument("--no-save", action="store_true", help="save nothing")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--timeout", type=float, default=20.0, help="per-case timeout in seconds (default 20)")
    ap.add_argument("--rlimit-gb", type=float, default=6.0, help="RLIMIT_AS of a worker in GiB (default 6)")
    ap.add_argument("--rss-limit-mb", type=int, default=4096, help="peak RSS that counts as a failure (default 4096)")
    ap.add_argument("--top-refusals", type=int, default=8, help="most common KilnError refusals listed in the summary")
    ap.add_argument("--no-verify", action="store_true", help="do not re-run a new failure to check it reproduces")
    args = ap.parse_args(argv)

    from tests.fuzz.campaign import Campaign
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    targets = ["plans", "models"] if args.target == "both" else [args.target]
    print(f"[fuzz] target {args.target}, {args.minutes:g} min, seed {seed}, jobs {args.jobs}, "
          f"corpus {'(not saved)' if args.no_save else os.path.relpath(args.corpus)}", flush=True)
    camp = Campaign(None if args.no_save else args.corpus, jobs=args.jobs, timeout=args.timeout,
                    rlimit_gb=args.rlimit_gb, rss_limit_mb=args.rss_limit_mb, verify=not args.no_verify,
                    log=lambda s: print(s, flush=True), top_refusals=args.top_refusals)
    try:
        camp.run(targets, minutes=args.minutes, seed=seed)
    except KeyboardInterrupt:
        print("[fuzz] interrupted", flush=True)
        camp.stop()
    print(camp.summary(), flush=True)
    print(f"[fuzz] rerun with --seed {seed}", flush=True)
    return 1 if camp.failed else 0


if __name__ == "__main__":
    sys.exit(main())
