"""Every setting Kiln reads from the environment, in one place (documented in docs/SETTINGS.md).

Code deep in Kiln never reads ``os.environ`` itself: it asks ``settings()`` for the one frozen
``Settings``. The environment is parsed once and cached; the cache is re-read only when one of the
KILN_* variables below changes (so ``monkeypatch.setenv`` in a test takes effect) or when ``reload()``
is called. A value that cannot be parsed (``KILN_MAX_LOOP_ITERATIONS=abc``) is a KilnError that names
the variable.

The few variables Kiln sets, rather than reads, for libraries that read them themselves are set here too
(``set_openmp_spin_default``, ``set_private_onnx_home``); they are not settings, as no Kiln code reads them.
"""
from __future__ import annotations

import os
import re
import shutil
import threading
from dataclasses import dataclass
from typing import Callable, Mapping

from kiln.errors import KilnError

__all__ = ["Settings", "settings", "reload", "VARIABLES", "set_openmp_spin_default", "set_private_onnx_home"]

# every environment variable Kiln reads; the cache key
VARIABLES = ("KILN_CACHE_DIR", "KILN_CC", "KILN_DNNL_LIB", "KILN_PARALLEL_COMPILE", "KILN_MAX_LOOP_ITERATIONS",
             "KILN_MAX_PLAN_BYTES", "KILN_MAX_ACTIVATION_BYTES", "TRITON_INTERPRET")


def physical_memory() -> int:
    """Bytes of physical RAM (os.sysconf); 16 GiB where the platform cannot say."""
    try:
        n = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
        if n > 0:
            return n
    except (ValueError, OSError, AttributeError):
        pass
    return 16 << 30


@dataclass(frozen=True)
class Settings:
    """Kiln's environment-controlled settings (see docs/SETTINGS.md)."""

    cache_dir: str
    """KILN_CACHE_DIR: folder of compiled kernels (native CPU libraries, generated Triton modules).
    Default ``~/.cache/kiln``."""

    cc: str | None
    """KILN_CC: the C compiler for the CPU backend's native kernels. Default ``cc`` or else ``gcc`` on
    PATH; None when neither is there (those tactics then decline every layer)."""

    dnnl_lib: str | None
    """KILN_DNNL_LIB: path of a oneDNN shared library to use before the ones installed beside Python.
    Default None."""

    parallel_compile: bool
    """KILN_PARALLEL_COMPILE: compile Triton kernel variants in parallel worker processes at build time
    (1/0, true/false, yes/no, on/off). Default True."""

    max_loop_iterations: int
    """KILN_MAX_LOOP_ITERATIONS: cap on the iterations of one Loop or Scan at run time; a model that
    asks for more is refused instead of running (nearly) forever. Default 100,000."""

    max_plan_bytes: int
    """KILN_MAX_PLAN_BYTES: the largest plan file (and the largest weights it may declare) the plan
    loader accepts. Default: the machine's physical RAM."""

    max_activation_bytes: int
    """KILN_MAX_ACTIVATION_BYTES: the largest activation tensor or arena a plan or a dummy input may
    need; larger ones are refused before allocation. Default: the machine's physical RAM."""

    triton_interpret: bool = False
    """TRITON_INTERPRET (Triton's own variable, read here only): Triton runs kernels in its CPU interpreter,
    so CUDA tactics' Triton kernels accept CPU tensors (the tests without a GPU). Set: anything but empty or
    ``0``."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Parse the settings from `env` (default: os.environ); KilnError naming the variable on bad values."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            v = env.get(name)
            return v.strip() if v is not None and v.strip() else None  # empty: unset

        ram = physical_memory()
        cache = get("KILN_CACHE_DIR")
        return cls(
            cache_dir=os.path.expanduser(cache) if cache else os.path.join(os.path.expanduser("~"), ".cache", "kiln"),
            cc=get("KILN_CC") or shutil.which("cc") or shutil.which("gcc"),
            dnnl_lib=get("KILN_DNNL_LIB"),
            parallel_compile=_parse("KILN_PARALLEL_COMPILE", get("KILN_PARALLEL_COMPILE"), _bool, True),
            max_loop_iterations=_parse("KILN_MAX_LOOP_ITERATIONS", get("KILN_MAX_LOOP_ITERATIONS"), _count,
                                       100_000),
            max_plan_bytes=_parse("KILN_MAX_PLAN_BYTES", get("KILN_MAX_PLAN_BYTES"), _bytes, ram),
            max_activation_bytes=_parse("KILN_MAX_ACTIVATION_BYTES", get("KILN_MAX_ACTIVATION_BYTES"), _bytes, ram),
            triton_interpret=get("TRITON_INTERPRET") not in (None, "0"),
        )


def _parse(name: str, raw: str | None, conv: Callable[[str], object], default: object):  # type: ignore[no-untyped-def]
    if raw is None:
        return default
    try:
        return conv(raw)
    except ValueError as e:
        raise KilnError(f"environment variable {name}={raw!r} is invalid: {e}") from None


def _bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _count(s: str) -> int:
    try:
        n = int(s.replace("_", ""))
    except ValueError:
        raise ValueError("expected a positive integer") from None
    if n < 1:
        raise ValueError("expected a positive integer")
    return n


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes(s: str) -> int:
    m = re.fullmatch(r"([0-9][0-9_]*)\s*([kmgt]?)(?:i?b)?", s.lower())
    if not m:
        raise ValueError("expected a byte count such as 8589934592, 8G or 512M")
    n = int(m.group(1).replace("_", "")) * _UNITS[m.group(2)]
    if n < 1:
        raise ValueError("expected a positive byte count")
    return n


_LOCK = threading.Lock()
_CACHED: tuple[tuple[str | None, ...], Settings] | None = None


def _key() -> tuple[str | None, ...]:
    return tuple(os.environ.get(v) for v in VARIABLES)


def settings() -> Settings:
    """The current Settings (parsed once; parsed again only when a KILN_* variable changed)."""
    global _CACHED
    cached, key = _CACHED, _key()
    if cached is not None and cached[0] == key:
        return cached[1]
    with _LOCK:
        s = Settings.from_env()
        _CACHED = (key, s)
        return s


def reload() -> Settings:
    """Drop the cache and parse the environment again (tests; a changed PATH for the compiler default)."""
    global _CACHED
    with _LOCK:
        _CACHED = None
    return settings()


# ---- variables Kiln sets (defaults for libraries that read the environment themselves) ----------------------

GOMP_SPINCOUNT_DEFAULT = "3000"


def set_openmp_spin_default() -> None:
    """GOMP_SPINCOUNT=3000 unless it is set: bounded OpenMP spin-waiting (torch's default spinning starves other
    processes on small shared CPUs). libgomp reads it when it loads, with torch: entry points call this before
    anything imports torch (kiln/cli/main.py)."""
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT_DEFAULT)


def child_process_env(pythonpath: list[str], keep_pythonpath: bool = False) -> dict[str, str]:
    """The environment of a Python child process Kiln starts (compile workers, `kiln bench` run by a script):
    this process's environment passed on whole (the child sees the same TRITON_*, CUDA_* and KILN_* variables)
    with PYTHONPATH set to `pythonpath` (followed by this process's own PYTHONPATH with keep_pythonpath), so the
    child imports the same kiln package."""
    env = dict(os.environ)
    own = env.get("PYTHONPATH", "").split(os.pathsep) if keep_pythonpath else []
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*pythonpath, *own] if p)
    return env


def openmp_spin_count() -> str:
    """GOMP_SPINCOUNT as this process runs with (set_openmp_spin_default's value unless the user set another),
    for processes Kiln starts elsewhere, such as Ray Serve replicas."""
    return os.environ.get("GOMP_SPINCOUNT", GOMP_SPINCOUNT_DEFAULT)


def ray_auth_mode_set() -> bool:
    """Whether RAY_AUTH_MODE is set (Ray's own variable: a driver joining a token-authenticated cluster needs it)."""
    return bool(os.environ.get("RAY_AUTH_MODE"))


def set_private_onnx_home() -> None:
    """ONNX_HOME pointed at a new temporary folder unless it is set: the onnx package's backend test suite
    writes its light models' inputs under it, and a private folder avoids races between concurrent runs."""
    if "ONNX_HOME" not in os.environ:
        import tempfile
        os.environ["ONNX_HOME"] = tempfile.mkdtemp(prefix="kiln-onnx-home-")
