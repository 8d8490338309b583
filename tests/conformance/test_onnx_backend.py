"""The ONNX backend test suite (shipped inside onnx) against Kiln on the CPU.

Every case runs; excluded cases (tests/conformance/excluded.txt, [exclude]) carry a reason, and every
case that fails must be listed under [xfail] with its reason, so a regression fails this test.
"""
from __future__ import annotations

import os

import pytest

from kiln.conformance.runner import load_exclusions, run_suite, summarize, _match

MIN_PASSED = 1700
# one worker runs the whole module (pytest -n with --dist loadgroup): one suite run, not one per worker
pytestmark = pytest.mark.xdist_group("conformance")


@pytest.fixture(scope="module")
def outcomes():
    # one process: a fork pool inside a pytest-xdist worker (threads already running) can deadlock
    return run_suite(jobs=1)


def test_suite_counts(outcomes):
    print("\n" + summarize(outcomes))
    passed = sum(o.status == "passed" for o in outcomes)
    assert len(outcomes) >= 2000, "the suite should hold about 2033 CPU cases"
    assert passed >= MIN_PASSED, summarize(outcomes)


def test_light_models_all_pass(outcomes):
    light = [o for o in outcomes if o.category == "RealModel"]
    assert len(light) == 9 and all(o.status == "passed" for o in light), [(o.name, o.detail) for o in light]


def test_no_unexpected_failures(outcomes):
    excl = load_exclusions()
    unexpected = [f"{o.name}: {o.detail}" for o in outcomes if o.status == "failed" and not _match(o.name, excl)]
    assert not unexpected, "\n".join(unexpected[:50])


def test_every_exclusion_has_a_reason():
    for pattern, (section, reason) in load_exclusions().items():
        assert section in ("exclude", "xfail") and len(reason) > 10, pattern
