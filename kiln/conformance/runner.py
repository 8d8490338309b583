"""Runs the ONNX backend test suite (shipped inside the onnx package) against Kiln on the CPU.

`python -m kiln.conformance [-k REGEX] [-v] [-j N]` prints passed/failed/skipped per category
and in total. Excluded cases (each with its reason) live in tests/conformance/excluded.txt.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import sys
import time
import unittest
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass

from kiln.errors import KilnError

CATEGORIES = {"NodeModel": "node", "RealModel": "light models", "SimpleModel": "simple",
              "PyTorchConvertedModel": "pytorch-converted", "PyTorchOperatorModel": "pytorch-operator"}
EXCLUDE_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "conformance", "excluded.txt")


@dataclass
class Outcome:
    name: str
    category: str
    status: str  # passed, failed, skipped, excluded
    detail: str = ""


def load_exclusions(path: str = EXCLUDE_FILE) -> dict[str, tuple[str, str]]:
    """pattern -> (section, reason). Sections: 'exclude' (not a failure) and 'xfail' (a known failure)."""
    out: dict[str, tuple[str, str]] = {}
    section = "exclude"
    if not os.path.exists(path):
        return out
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        pat, _, reason = line.partition(" ")
        reason = reason.strip().lstrip("#").strip()
        if not reason:
            raise ValueError(f"{path}: exclusion '{pat}' has no reason")
        out[pat] = (section, reason)
    return out


def _match(name: str, excl: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    for pat, v in excl.items():
        if re.fullmatch(pat, name):
            return v
    return None


def collect() -> dict[str, dict[str, object]]:
    """{category: {case name: test function}} for the CPU device."""
    from kiln.settings import set_private_onnx_home
    set_private_onnx_home()  # before onnx.backend.test reads it
    import onnx.backend.test

    from kiln.conformance import backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import numpy as np
        with np.errstate(all="ignore"):
            bt = onnx.backend.test.BackendTest(backend, __name__)
    items: dict[str, dict[str, object]] = {}
    for cat, tests in bt._test_items.items():
        for name, item in tests.items():
            if name.endswith("_cpu"):
                items.setdefault(cat, {})[name[:-4]] = item.func
    return items


_ITEMS: dict[str, dict[str, object]] | None = None


def _run_one(arg: tuple[str, str]) -> Outcome:
    global _ITEMS
    cat, name = arg
    if _ITEMS is None:
        _ITEMS = collect()
    func = _ITEMS[cat][name]
    tc = unittest.TestCase()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            func(tc)  # type: ignore[operator]
            return Outcome(name, cat, "passed")
        except unittest.SkipTest as e:
            return Outcome(name, cat, "skipped", str(e))
        except BaseException as e:  # noqa: BLE001 - every failure is recorded, none stops the run
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return Outcome(name, cat, "failed", f"{type(e).__name__}: {msg[:300]}")


def run_suite(pattern: str | None = None, jobs: int = 1, verbose: bool = False,
              categories: list[str] | None = None) -> list[Outcome]:
    items = collect()
    excl = load_exclusions()
    todo: list[tuple[str, str]] = []
    outcomes: list[Outcome] = []
    for cat in CATEGORIES:
        if categories and CATEGORIES[cat] not in categories and cat not in categories:
            continue
        for name in sorted(items.get(cat, {})):
            if pattern and not re.search(pattern, name):
                continue
            ex = _match(name, excl)
            if ex and ex[0] == "exclude":
                outcomes.append(Outcome(name, cat, "excluded", ex[1]))
            else:
                todo.append((cat, name))
    if jobs > 1 and len(todo) > 1:
        with mp.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_run_one, todo, chunksize=4)
    else:
        results = [_run_one(t) for t in todo]
    for r in results:
        ex = _match(r.name, excl)
        if ex and r.status == "failed":
            r.detail = f"[known: {ex[1]}] {r.detail}"
        outcomes.append(r)
        if verbose and r.status != "passed":
            print(f"{r.status.upper():8s} {r.name}: {r.detail}")
        elif verbose:
            print(f"PASSED   {r.name}")
    return outcomes


def summarize(outcomes: list[Outcome]) -> str:
    by: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        by[o.category][o.status] += 1
    lines = [f"{'category':20s} {'passed':>7s} {'failed':>7s} {'skipped':>8s} {'excluded':>9s} {'total':>6s}"]
    tot: Counter = Counter()
    for cat in CATEGORIES:
        c = by.get(cat)
        if not c:
            continue
        tot.update(c)
        lines.append(f"{CATEGORIES[cat]:20s} {c['passed']:7d} {c['failed']:7d} {c['skipped']:8d} {c['excluded']:9d} "
                     f"{sum(c.values()):6d}")
    lines.append(f"{'total':20s} {tot['passed']:7d} {tot['failed']:7d} {tot['skipped']:8d} {tot['excluded']:9d} "
                 f"{sum(tot.values()):6d}")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The runner's flags, on its own parser and on `kiln conformance`'s."""
    ap.description = __doc__.splitlines()[0]
    ap.add_argument("-k", dest="pattern", metavar="REGEX", help="only cases whose name matches this regex")
    ap.add_argument("-j", "--jobs", type=_jobs, default=os.cpu_count() or 1,
                    help="worker processes (default: one per CPU)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case's outcome")
    ap.add_argument("--category", action="append", metavar="NAME",
                    help=f"only this category (repeatable): {', '.join(CATEGORIES.values())}")
    ap.add_argument("--failures", action="store_true", help="list failed cases with their error")


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 1, got '{text}'")
    return n


def run(args: argparse.Namespace) -> int:
    """Runs the suite as `args` (from add_arguments) asks; prints the outcomes and the summary table."""
    if args.pattern:
        try:
            re.compile(args.pattern)
        except re.error as e:
            raise KilnError(f"-k: bad regular expression '{args.pattern}': {e}") from None
    for cat in args.category or []:
        if cat not in CATEGORIES.values() and cat not in CATEGORIES:
            raise KilnError(f"--category: unknown category '{cat}' (one of: {', '.join(CATEGORIES.values())})")
    t0 = time.perf_counter()
    outcomes = run_suite(args.pattern, args.jobs, args.verbose, args.category)
    if args.failures and not args.verbose:
        for o in outcomes:
            if o.status == "failed":
                print(f"FAILED {o.name}: {o.detail}")
    print(summarize(outcomes))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kiln.conformance")
    add_arguments(ap)
    try:
        return run(ap.parse_args(argv))
    except KilnError as e:  # a bad -k or --category: one line, as the kiln command prints it
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
