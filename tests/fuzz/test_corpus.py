"""Replay of the fuzz corpus (every failure the fuzzers ever found) and a short fixed-seed fuzz smoke run.

Each corpus case runs in the crash-isolated fuzz worker (tests/fuzz/worker.py), exactly as during a
campaign; it passes when it ends as ``ok`` or with a KilnError. A failing case names what it was
(the mutation that made it, from its .json sidecar) and how it failed now. See docs/FUZZING.md.
"""
from __future__ import annotations

import os

import pytest

from tests.fuzz.harness import CORPUS_DIR, Worker, corpus_files, load_corpus_case
from tests.fuzz.worker import ALLOWED

pytestmark = pytest.mark.xdist_group("fuzz")  # one worker process serves the whole file

CASES = corpus_files()
SMOKE_SEED = 20250611
SMOKE_CASES = {"plans": 40, "models": 20}


@pytest.fixture(scope="module")
def worker():
    w = Worker(timeout=10.0)
    w.start()
    yield w
    w.close()


@pytest.mark.parametrize("kind, path", CASES, ids=[os.path.relpath(p, CORPUS_DIR) for _, p in CASES])
def test_corpus_case(worker, kind, path):
    case, meta = load_corpus_case(kind, path)
    r = worker.run(case)
    assert r.outcome in ALLOWED, (
        f"{os.path.relpath(path, CORPUS_DIR)} now ends as {r.outcome}: {r.etype} at {r.where or r.stage}: {r.msg}\n"
        f"  case: {case.describe()}\n  found as: {meta.get('signature', '?')}")


def test_fuzz_smoke():
    """40 mutated plans and 20 mutated models from a fixed hypothesis seed: the mutators produce cases that
    reach every stage (rejected at load, run to the end), and none of them fails."""
    from tests.fuzz.campaign import Campaign
    lines: list[str] = []
    camp = Campaign(None, jobs=1, timeout=10.0, verify=False, log=lines.append, progress_every=1e9)
    stats = camp.run(["plans", "models"], seed=SMOKE_SEED, cases=SMOKE_CASES)
    ran = sum(stats.cases.values()) + stats.duplicates
    assert ran == sum(SMOKE_CASES.values()), camp.summary()
    assert stats.outcomes["plans"]["kiln_error"] > 0 and stats.executed["plans"] > 0, camp.summary()
    assert stats.outcomes["models"]["kiln_error"] > 0 and stats.executed["models"] > 0, camp.summary()
    assert not camp.failed and not stats.harness_errors, camp.summary()
