"""A fuzzing campaign: hypothesis generates mutated cases, crash-isolated workers run them, failures are
grouped by signature and the first (smallest) case of each new signature goes into the corpus.

Used by scripts/fuzz.py (timed campaigns) and tests/fuzz/test_corpus.py (a short fixed-seed smoke run).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import queue
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st

from tests.fuzz import seeds as seedmod
from tests.fuzz.harness import Case, Result, Worker, save_corpus_case, signature
from tests.fuzz.mutate import model_cases, plan_cases

TARGETS = ("plans", "models")
KIND = {"plans": "plan", "models": "model"}
CHUNK = {"plans": 24, "models": 12}
MAX_CASE_BYTES = 8 << 20  # cases per hypothesis run; the deadline is checked between cases


@dataclass
class SigInfo:
    sig: str
    kind: str
    result: Result
    case: Case
    count: int = 0
    path: str = ""
    reproduced: str = "?"


@dataclass
class Stats:
    cases: Counter = field(default_factory=Counter)  # target -> cases run
    outcomes: dict[str, Counter] = field(default_factory=lambda: {t: Counter() for t in TARGETS})
    executed: Counter = field(default_factory=Counter)  # target -> cases that reached execute twice
    duplicates: int = 0
    harness_errors: int = 0
    sigs: dict[str, SigInfo] = field(default_factory=dict)
    refusals: dict[str, Counter] = field(default_factory=lambda: {t: Counter() for t in TARGETS})  # KilnError kinds
    wrapped: dict[str, tuple[int, Case, Result]] = field(default_factory=dict)  # KilnErrors converted from others


class Campaign:
    def __init__(self, corpus: str | None = None, jobs: int = 1, timeout: float = 20.0, rlimit_gb: float = 6.0,
                 rss_limit_mb: int = 4096, verify: bool = True, log: Callable[[str], None] = print,
                 progress_every: float = 30.0, top_refusals: int = 8) -> None:
        self.top_refusals = top_refusals
        self.corpus, self.jobs, self.verify, self.log = corpus, max(1, jobs), verify, log
        self.worker_args = dict(timeout=timeout, rlimit_gb=rlimit_gb, rss_limit_mb=rss_limit_mb)
        self.stats = Stats()
        self.lock = threading.Lock()
        self.seen: set[str] = set()
        self.progress_every = progress_every
        self.t0 = time.monotonic()
        self._last_progress = self.t0
        self.deadline = float("inf")
        self.q: queue.Queue[tuple[str, Case] | None] = queue.Queue(maxsize=self.jobs)
        self.workers: list[Worker] = []
        self.threads: list[threading.Thread] = []

    # -- worker pool --
    def start(self) -> None:
        for i in range(self.jobs):
            w = Worker(**self.worker_args)  # type: ignore[arg-type]
            w.start()
            self.workers.append(w)
            t = threading.Thread(target=self._loop, args=(w,), daemon=True, name=f"fuzz-{i}")
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()
        for w in self.workers:
            w.close()
        self.threads, self.workers = [], []

    def _loop(self, w: Worker) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                target, case = item
                r = w.run(case)
                self._record(w, target, case, r)
            except Exception as e:  # a harness bug must not stall the campaign
                self.log(f"[fuzz] harness error: {type(e).__name__}: {e}")
            finally:
                self.q.task_done()

    def _record(self, w: Worker, target: str, case: Case, r: Result) -> None:
        new: SigInfo | None = None
        with self.lock:
            s = self.stats
            s.cases[target] += 1
            s.outcomes[target][r.outcome] += 1
            if r.detail.get("executed"):
                s.executed[target] += 1
            if r.outcome == "harness_error":
                s.harness_errors += 1
                if s.harness_errors <= 5:
                    self.log(f"[fuzz] HARNESS ERROR (a fuzzer bug): {r.etype} at {r.where}: {r.msg}\n"
                             f"        {''.join(r.detail.get('trace', []))[-800:]}")
            if r.outcome == "kiln_error":
                s.refusals[target][_refusal_kind(r)] += 1
                w_ = r.detail.get("wrapped")
                if w_:
                    key = f"{case.kind} | {w_.get('etype')} | {w_.get('where') or w_.get('inner')}"
                    if key not in s.wrapped:
                        s.wrapped[key] = (0, case, r)
                    n, c0, r0 = s.wrapped[key]
                    s.wrapped[key] = (n + 1, c0, r0)
            if r.failed:
                sig = signature(case.kind, r)
                info = s.sigs.get(sig)
                if info is None:
                    info = s.sigs[sig] = SigInfo(sig, case.kind, r, case)
                    new = info
                elif len(case.data) < len(info.case.data):
                    info.case, info.result = case, r
                    if info.path and self.corpus:
                        info.path = save_corpus_case(self.corpus, case, r, sig, {"reproduced": info.reproduced})
                info.count += 1
        if new is not None:
            if self.verify and r.outcome != "hang":
                again = w.run(case)
                new.reproduced = "yes" if signature(case.kind, again) == new.sig else f"no ({again.outcome})"
            self.log(f"[fuzz] NEW {new.sig}\n        {r.msg[:200]}\n        case: {case.describe()[:300]}"
                     f"\n        reproduced: {new.reproduced}")
            if self.corpus:
                with self.lock:
                    new.path = save_corpus_case(self.corpus, case, r, new.sig, {"reproduced": new.reproduced})
        self._progress()

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            if not force and now - self._last_progress < self.progress_every:
                return
            self._last_progress = now
            s = self.stats
            parts = []
            for t in TARGETS:
                if s.cases[t]:
                    oc = ", ".join(f"{k} {v}" for k, v in sorted(s.outcomes[t].items()))
                    parts.append(f"{t}: {s.cases[t]} ({oc})")
        self.log(f"[fuzz] {now - self.t0:6.0f} s  {'; '.join(parts)}; {len(s.sigs)} failure signature(s)")

    # -- generation --
    def submit(self, target: str, case: Case) -> None:
        if len(case.data) > MAX_CASE_BYTES:  # a mutator bug, not a Kiln one: keep cases (and the corpus) small
            self.log(f"[fuzz] oversize case skipped ({len(case.data)} bytes): {case.describe()[:200]}")
            return
        key = hashlib.sha256(case.data + repr(sorted(case.files.items())).encode()).hexdigest()
        if key in self.seen:
            with self.lock:
                self.stats.duplicates += 1
            return
        self.seen.add(key)
        self.q.put((target, case))

    def run_hypothesis(self, target: str, strategy: st.SearchStrategy[Case], n: int, seed: int) -> None:
        """n cases from `strategy` under a fixed hypothesis seed, each submitted to the pool."""

        @hseed(seed)
        @settings(max_examples=n, deadline=None, database=None, derandomize=False, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
        @given(strategy)
        def body(case: Case) -> None:
            if time.monotonic() > self.deadline:
                return
            self.submit(target, case)

        body()

    def run(self, targets: list[str], minutes: float | None = None, seed: int = 0,
            cases: dict[str, int] | None = None) -> Stats:
        """Fuzz `targets` until `minutes` pass (or, with `cases`, until that many cases per target ran)."""
        strategies = {}
        if "plans" in targets:
            plans = seedmod.seed_plans()
            if seedmod.seed_errors():
                self.log(f"[fuzz] seeds that failed to build: {seedmod.seed_errors()}")
            strategies["plans"] = plan_cases(plans, itertools.count())
        if "models" in targets:
            strategies["models"] = model_cases(seedmod.seed_model_bytes(), itertools.count())
        self.t0 = self._last_progress = time.monotonic()
        self.deadline = self.t0 + minutes * 60 if minutes else float("inf")
        self.start()
        try:
            chunk = 0
            budget = dict(cases or {})
            while time.monotonic() < self.deadline:
                active = [t for t in strategies if not cases or budget.get(t, 0) > 0]
                if not active:
                    break
                for t in active:
                    n = CHUNK[t] if not cases else min(CHUNK[t], budget[t])
                    self.run_hypothesis(t, strategies[t], n, seed * 1_000_003 + chunk)
                    if cases:
                        budget[t] -= n
                    chunk += 1
                    if time.monotonic() > self.deadline:
                        break
            self.q.join()
        finally:
            self.stop()
        self._progress(force=True)
        return self.stats

    # -- report --
    def summary(self) -> str:
        s = self.stats
        lines = ["", "=" * 100, f"Kiln fuzz campaign: {time.monotonic() - self.t0:.0f} s, "
                 f"{sum(s.cases.values())} cases ({s.duplicates} duplicate cases skipped, "
                 f"{s.harness_errors} harness errors)", ""]
        classes = ["ok", "kiln_error", "exception", "crash", "hang", "nondeterminism", "mismatch", "code_exec",
                   "file_leak", "rss"]
        lines.append(f"{'target':8} {'cases':>6} {'executed':>8} " + " ".join(f"{c:>14}" for c in classes))
        for t in TARGETS:
            if s.cases[t]:
                lines.append(f"{t:8} {s.cases[t]:6d} {s.executed[t]:8d} "
                             + " ".join(f"{s.outcomes[t][c]:14d}" for c in classes))
        fails = sorted(s.sigs.values(), key=lambda i: (i.kind, i.result.outcome, -i.count))
        lines += ["", f"{len(fails)} distinct failure signature(s)"]
        for i, info in enumerate(fails, 1):
            r = info.result
            lines.append(f"{i:3}. [{info.kind}] {r.outcome} {r.etype} at {r.where or '(stage ' + r.stage + ')'}"
                         f"  x{info.count}  reproduced: {info.reproduced}")
            lines.append(f"       message: {r.msg[:160]}")
            lines.append(f"       example: {info.case.describe()[:240]}")
            if info.path:
                lines.append(f"       corpus:  {os.path.relpath(info.path)}")
        if s.wrapped:
            lines += ["", f"{len(s.wrapped)} kind(s) of KilnError converted from another exception (fine by the "
                          "contract; listed for hardening: kind | original type | its deepest kiln frame):"]
            for key, (n, c, r) in sorted(s.wrapped.items(), key=lambda kv: -kv[1][0])[:self.top_refusals * 2]:
                w_ = r.detail.get("wrapped", {})
                lines.append(f"  {n:6d}  {key}  (innermost {w_.get('inner')})")
                lines.append(f"          {r.etype}: {r.msg[:150]}")
                lines.append(f"          example: {c.describe()[:200]}")
        for t in TARGETS:
            if s.refusals[t]:
                lines += ["", f"most common refusals ({t}; KilnError, stage: message with names and numbers elided):"]
                lines += [f"  {n:6d}  {k}" for k, n in s.refusals[t].most_common(self.top_refusals)]
        lines.append("=" * 100)
        return "\n".join(lines)

    @property
    def failed(self) -> bool:
        return bool(self.stats.sigs)


def _refusal_kind(r: Result) -> str:
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'_'", r.msg)
    msg = re.sub(r"\d+", "N", msg)
    return f"{r.etype}, {r.stage}: {msg[:110]}"
