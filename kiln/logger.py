"""Logger with TensorRT-like severities; the builder narrates its work at VERBOSE."""
from __future__ import annotations

import enum
import sys
from typing import TextIO


class Severity(enum.IntEnum):
    ERROR = 0
    WARNING = 1
    INFO = 2
    VERBOSE = 3


class Logger:
    """Prints messages at or above a severity threshold to a stream (stderr by default)."""

    def __init__(self, level: Severity = Severity.WARNING, stream: TextIO | None = None) -> None:
        self.level = Severity(level)
        self.stream = stream

    def log(self, severity: Severity, msg: str) -> None:
        if severity <= self.level:
            stream = self.stream or sys.stderr
            print(f"[kiln] [{severity.name[0]}] {msg}", file=stream, flush=True)

    def error(self, msg: str) -> None:
        self.log(Severity.ERROR, msg)

    def warning(self, msg: str) -> None:
        self.log(Severity.WARNING, msg)

    def info(self, msg: str) -> None:
        self.log(Severity.INFO, msg)

    def verbose(self, msg: str) -> None:
        self.log(Severity.VERBOSE, msg)

    @property
    def is_verbose(self) -> bool:
        return self.level >= Severity.VERBOSE


class Progress:
    """A minimal progress indicator for long work (autotuning, calibration), shown at INFO and above."""

    def __init__(self, logger: Logger, total: int, what: str) -> None:
        self.logger, self.total, self.what, self.done = logger, max(total, 1), what, 0
        self._last = -1

    def step(self, n: int = 1) -> None:
        self.done += n
        pct = int(100 * self.done / self.total)
        if pct // 10 != self._last // 10 and self.logger.level >= Severity.INFO:
            self._last = pct
            self.logger.info(f"{self.what}: {self.done}/{self.total} ({pct}%)")
