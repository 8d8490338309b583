"""Small C kernels of the CPU backend, compiled on first use with the machine's C compiler.

``load(name)`` compiles ``<name>.c`` from this folder (``cc -O3 -march=native -fopenmp``, so the code
targets the CPU it runs on, and shares torch's OpenMP runtime) into a per-user cache keyed by the
source, compiler and CPU flags, and returns the ctypes library; None when no compiler works here (the
tactics built on it then decline every layer). ``KILN_CACHE_DIR`` moves the cache (default
``~/.cache/kiln``); ``KILN_CC`` names the compiler.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

_HERE = os.path.dirname(os.path.abspath(__file__))
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
_LOADED: dict[str, ctypes.CDLL | None] = {}
_ERRORS: dict[str, str] = {}
_LOCK = threading.Lock()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _compile(name: str) -> ctypes.CDLL:
    src = os.path.join(_HERE, f"{name}.c")
    with open(src, "rb") as f:
        code = f.read()
    from kiln.settings import settings
    cc = settings().cc
    if not cc:
        raise OSError("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256(code + cc.encode() + " ".join(_FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    cache = os.path.join(settings().cache_dir, "native")
    path = os.path.join(cache, f"{name}-{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *_FLAGS, src, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise OSError(f"{cc} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
            os.replace(tmp, path)  # atomic: concurrent builders never load a half-written library
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return ctypes.CDLL(path)


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library `name`, or None when it cannot be built here (`error(name)` says why)."""
    with _LOCK:
        if name not in _LOADED:
            try:
                _LOADED[name] = _compile(name)
            except (OSError, subprocess.SubprocessError) as e:
                _LOADED[name] = None
                _ERRORS[name] = str(e)
        return _LOADED[name]


def error(name: str) -> str:
    """Why `load(name)` returned None ('' when it did not)."""
    return _ERRORS.get(name, "")
