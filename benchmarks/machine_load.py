"""How loaded the machine was around a benchmark, as measured: the load average, and the share of the
CPUs that other processes used just before the run and during its timed parts.

"Other processes" is everything on the machine less this process and the children it has waited for
(from /proc/stat and getrusage): the engines' own threads do not count as load. Time stolen by the
hypervisor (a VM's "steal") is reported on its own. A run is labelled "busy" when others used at least
BUSY_SHARE of the CPUs (before or during), or the hypervisor stole that much; else "idle".

    meter = LoadMeter()
    meter.sample_before()          # 1 s with nothing of ours running
    with meter.measure():          # any number of timed sections; they add up
        ...
    print(meter.describe())        # e.g. "load average 1.9 before, 2.4 after (...) on 2 CPUs; other processes
                                   #  used 48% of the CPUs before the run, 51% during the timing (busy)"
"""
from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import dataclass
from typing import Iterator

BUSY_SHARE = 0.10
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class _Share:
    others: float = 0.0    # CPU-seconds used by other processes
    steal: float = 0.0     # CPU-seconds the hypervisor gave to other guests
    capacity: float = 0.0  # CPU-seconds the machine had (wall x CPUs)

    def add(self, other: "_Share") -> None:
        self.others += other.others
        self.steal += other.steal
        self.capacity += other.capacity

    def pct(self, part: float) -> float:
        return 100.0 * part / self.capacity if self.capacity > 0 else 0.0


def _cpu_stat() -> tuple[float, float, float] | None:
    """(busy, steal, total) CPU-seconds of the whole machine since boot; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy / _TICK, steal / _TICK, (busy + steal + idle + iowait) / _TICK


def _own_cpu() -> float:
    """CPU-seconds of this process (all threads) and of its children that have been waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


class LoadMeter:
    """Measures other processes' share of the CPUs before a run and during its timed sections."""

    def __init__(self, during: str = "the timing") -> None:
        self.what = during  # what the measured sections are, for describe()
        self.cpus = os.cpu_count() or 1
        self.load_before = load_average()
        self.load_after: tuple[float, float, float] | None = None
        self.before: _Share | None = None
        self.during = _Share()
        self.measurable = _cpu_stat() is not None

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Count a timed section (sections add up)."""
        a, own_a = _cpu_stat(), _own_cpu()
        try:
            yield
        finally:
            b, own_b = _cpu_stat(), _own_cpu()
            self.load_after = load_average()
            if a is not None and b is not None:
                self.during.add(_delta(a, b, own_b - own_a))

    def sample_before(self, seconds: float = 1.0) -> None:
        """Sample the machine for `seconds` while this process sleeps."""
        a, own_a = _cpu_stat(), _own_cpu()
        time.sleep(seconds)
        b, own_b = _cpu_stat(), _own_cpu()
        if a is not None and b is not None:
            self.before = _delta(a, b, own_b - own_a)

    @property
    def busy(self) -> bool | None:
        """True/False as measured; None where nothing could be measured."""
        shares = [s for s in (self.before, self.during) if s is not None and s.capacity > 0]
        if not shares:
            return None
        return any(s.others >= BUSY_SHARE * s.capacity or s.steal >= BUSY_SHARE * s.capacity for s in shares)

    @property
    def label(self) -> str:
        return {True: "busy", False: "idle", None: "load not measured"}[self.busy]

    def describe(self) -> str:
        """One sentence: load average, others' share before / during, steal, and the label."""
        parts = []
        if self.load_before is not None:
            la = f"load average {self.load_before[0]:.1f}"
            if self.load_after is not None:
                la += f" before, {self.load_after[0]:.1f} after (the run's own threads included)"
            parts.append(f"{la} on {self.cpus} CPUs")
        if not self.measurable:
            parts.append("CPU use of other processes not measurable here (no /proc/stat)")
            return "; ".join(parts)
        shares = []
        if self.before is not None and self.before.capacity > 0:
            shares.append(f"{self.before.pct(self.before.others):.0f}% of the CPUs before the run")
        if self.during.capacity > 0:
            shares.append(f"{self.during.pct(self.during.others):.0f}% during {self.what}")
        if shares:
            parts.append("other processes used " + ", ".join(shares))
        steal = max((s.pct(s.steal) for s in (self.before, self.during) if s is not None and s.capacity > 0),
                    default=0.0)
        if steal >= 1.0:
            parts.append(f"hypervisor steal up to {steal:.0f}%")
        return "; ".join(parts) + f" ({self.label})"


def _delta(a: tuple[float, float, float], b: tuple[float, float, float], own: float) -> _Share:
    busy, steal, total = (y - x for x, y in zip(a, b))
    return _Share(others=max(busy - own, 0.0), steal=max(steal, 0.0), capacity=max(total, 0.0))
