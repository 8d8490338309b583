"""Logger with TensorRT-like severities, and the one progress display of a build.

The levels as `kiln build` uses them: ERROR (`-q`: errors only), INFO (the default: warnings, the progress
display and the build summary), VERBOSE (`-v`: every pass, fusion and tactic timing besides). WARNING, the
library's default, is INFO without the display and the summary. From Python: Builder(Logger(Severity.INFO)).

The progress display (rich) is drawn only at INFO and above and only when the logger writes to a terminal
(or to an injected rich Console that says it is one); elsewhere (pipes, files, CI logs, tests) it writes
nothing, while stage times are still measured (they go into the plan's build record).
"""
from __future__ import annotations

import contextlib
import enum
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator, TextIO

if TYPE_CHECKING:
    from rich.console import Console


class Severity(enum.IntEnum):
    ERROR = 0
    WARNING = 1
    INFO = 2
    VERBOSE = 3


class Logger:
    """Prints messages at or above a severity threshold to a stream (stderr by default).

    console: a rich Console for the progress display (default: one on `stream`, made only when that stream is
    a terminal); while the display is live every message goes through it, above the display line."""

    def __init__(self, level: Severity = Severity.WARNING, stream: TextIO | None = None,
                 console: "Console | None" = None) -> None:
        self.level = Severity(level)
        self.stream = stream
        self.console = console
        self._display: BuildProgress | None = None
        self._stage: Stage | None = None

    @classmethod
    def from_flags(cls, quiet: bool = False, verbose: bool = False, stream: TextIO | None = None) -> "Logger":
        """The logger of a command's -q / -v flags: ERROR, INFO (neither) or VERBOSE."""
        return cls(Severity.ERROR if quiet else Severity.VERBOSE if verbose else Severity.INFO, stream)

    def log(self, severity: Severity, msg: str) -> None:
        if severity <= self.level:
            self._emit(f"[kiln] [{severity.name[0]}] {msg}")

    def _emit(self, line: str) -> None:
        display = self._display
        if display is not None and display.drawn:
            display.print(line)
        else:
            print(line, file=self._stream(), flush=True)

    def _stream(self) -> TextIO:
        if self.stream is not None:
            return self.stream
        return self.console.file if self.console is not None else sys.stderr

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

    @property
    def current_stage(self) -> "Stage | None":
        """The build stage running now (see `progress`), for work that counts its steps (Progress)."""
        return self._stage

    def progress(self, title: str) -> "BuildProgress":
        """A context manager timing a build's stages and drawing the progress display where it is wanted."""
        return BuildProgress(self, title)

    def demoted(self) -> "Logger":
        """This logger with INFO messages demoted to VERBOSE: for a component whose own summary lines the
        caller's summary already gives (the autotuner's totals)."""
        return _Demoted(self)

    def terminal_console(self) -> "Console | None":
        """The console to draw the progress display on: the injected one if it is a terminal, else one on the
        stream when that stream is a terminal (not a dumb one); None otherwise."""
        if self.console is not None:
            return self.console if self.console.is_terminal and not self.console.is_dumb_terminal else None
        stream = self._stream()
        try:
            tty = bool(stream.isatty())
        except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
            tty = False
        if not tty:
            return None
        from rich.console import Console
        console = Console(file=stream, force_terminal=True)
        return None if console.is_dumb_terminal else console


class _Demoted(Logger):
    """A view of another logger whose INFO messages go out at VERBOSE (Logger.demoted)."""

    def __init__(self, parent: Logger) -> None:  # no super().__init__: every piece of state is the parent's
        self._parent = parent

    @property  # type: ignore[override]
    def level(self) -> Severity:
        return self._parent.level

    @property  # type: ignore[override]
    def current_stage(self) -> "Stage | None":
        return self._parent.current_stage

    def log(self, severity: Severity, msg: str) -> None:
        self._parent.log(Severity.VERBOSE if severity == Severity.INFO else severity, msg)

    def progress(self, title: str) -> "BuildProgress":
        return self._parent.progress(title)

    def terminal_console(self) -> "Console | None":
        return self._parent.terminal_console()

    def __getattr__(self, name: str) -> Any:  # stream, console, ...: the parent's
        return getattr(self._parent, name)


class Stage:
    """One stage of a build (import, optimize, autotune, ...): its step count when it has one."""

    def __init__(self, owner: "BuildProgress", name: str, unit: str) -> None:
        self.owner, self.name, self.unit = owner, name, unit
        self.total: int | None = None
        self.done = 0

    def set_total(self, total: int) -> None:
        self.total, self.done = total, 0
        self.owner.show(self)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.owner.show(self, refresh=self.done == self.total)  # the last count is drawn, however quick


class BuildProgress:
    """The stages of one build: each stage's wall time (`seconds`, always) and, at INFO and above on a
    terminal, one live line naming the stage with its count (e.g. "autotune 23/56 layers") and the time
    so far. The line is removed when the build ends; log lines printed meanwhile appear above it."""

    def __init__(self, logger: Logger, title: str) -> None:
        self.logger, self.title = logger, title
        self.seconds: dict[str, float] = {}
        self._rich: Any = None
        self._task: Any = None
        self._previous: BuildProgress | None = None

    @property
    def drawn(self) -> bool:
        return self._rich is not None

    def __enter__(self) -> "BuildProgress":
        console = self.logger.terminal_console() if self.logger.level >= Severity.INFO else None
        if console is not None and self.logger._display is None:  # a build inside a build draws nothing
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            self._rich = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                                  TextColumn("{task.fields[count]}"), TimeElapsedColumn(), console=console,
                                  transient=True, redirect_stdout=False, redirect_stderr=False,
                                  refresh_per_second=8)
            self._task = self._rich.add_task(self.title, total=None, count="")
            self._rich.start()
        self._previous = self.logger._display
        if self._rich is not None:
            self.logger._display = self
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
            self.logger._display = self._previous

    @contextlib.contextmanager
    def stage(self, name: str, unit: str = "") -> Iterator[Stage]:
        """Times the body as stage `name` (times of a stage entered twice add up); the stage is the logger's
        current_stage meanwhile, so that a Progress inside it counts on the display."""
        st = Stage(self, name, unit)
        before = self.logger._stage
        self.logger._stage = st
        self.show(st, refresh=True)
        t0 = time.perf_counter()
        try:
            yield st
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.logger._stage = before

    def show(self, st: Stage, refresh: bool = False) -> None:
        if self._rich is None:
            return
        count = f"{st.done}/{st.total} {st.unit}".rstrip() if st.total is not None else ""
        self._rich.update(self._task, description=f"{self.title}: {st.name}", total=st.total,
                          completed=st.done, count=count)
        if refresh:
            self._rich.refresh()

    def print(self, line: str) -> None:
        self._rich.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)


class Progress:
    """Counts the steps of long work (the autotuner's layers) inside the logger's current build stage: the
    progress display shows them; where none is drawn, VERBOSE gets a line every 10%."""

    def __init__(self, logger: Logger, total: int, what: str) -> None:
        self.logger, self.total, self.what, self.done = logger, max(total, 1), what, 0
        self._last = -1
        self._stage = logger.current_stage
        if self._stage is not None:
            self._stage.set_total(total)

    def step(self, n: int = 1) -> None:
        self.done += n
        if self._stage is not None:
            self._stage.advance(n)
            if self._stage.owner.drawn:
                return
        pct = int(100 * self.done / self.total)
        if pct // 10 != self._last // 10 and self.logger.level >= Severity.VERBOSE:
            self._last = pct
            self.logger.verbose(f"{self.what}: {self.done}/{self.total} ({pct}%)")
