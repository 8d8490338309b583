"""Small C kernels of the CPU backend, compiled on first use with the machine's C compiler.

``load(name)`` compiles ``<name>.c`` from this folder (``cc -O3 -march=native -fopenmp``, so the code
targets the CPU it runs on, and shares torch's OpenMP runtime) into a per-user cache keyed by the
source, compiler and CPU flags, and returns the ctypes library; None when no compiler works here (the
tactics built on it then decline every layer). ``KILN_CACHE_DIR`` moves the cache (default
``~/.cache/kiln``); ``KILN_CC`` names the compiler.

``compile_source(name, code, flags)`` does the same for C source generated at build time (the CPU
Pointwise programs of kiln.backends.cpu.pointwise_c) with the caller's flags, in the same cache.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from typing import Sequence

from kiln.backends.cpu.features import cpu_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
_LOADED: dict[str, ctypes.CDLL | None] = {}
_ERRORS: dict[str, str] = {}
_LOCK = threading.Lock()


_INCLUDE = re.compile(rb'^#include "([a-z][a-z0-9_]*\.[ch])"[ \t]*$', re.M)


def source(name: str) -> bytes:
    """`<name>.c` with each ``#include "x.h"`` (or ``"x.c"``: one kernel built twice, with another macro) of this
    folder replaced by that file's text, expanded likewise (once per file), so the compiled code, and with it
    the cache key, covers them too."""
    with open(os.path.join(_HERE, f"{name}.c"), "rb") as f:
        code = f.read()
    seen: set[bytes] = set()

    def expand(m: re.Match[bytes]) -> bytes:
        if m.group(1) in seen:
            return b""
        seen.add(m.group(1))
        with open(os.path.join(_HERE, m.group(1).decode()), "rb") as h:
            return _INCLUDE.sub(expand, h.read())
    return _INCLUDE.sub(expand, code)


def _compile(name: str) -> ctypes.CDLL:
    return ctypes.CDLL(_build(name, source(name), _FLAGS))


def _build(name: str, code: bytes, flags: Sequence[str]) -> str:
    """Path of the library compiled from `code` with `flags` (compiled into the cache unless already there)."""
    from kiln.settings import settings
    cc = settings().cc
    if not cc:
        raise OSError("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256(code + cc.encode() + " ".join(flags).encode() + " ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    cache = os.path.join(settings().cache_dir, "native")
    path = os.path.join(cache, f"{name}-{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        sfd, src = tempfile.mkstemp(suffix=".c", dir=cache)
        try:
            with os.fdopen(sfd, "wb") as f:
                f.write(code)
            compiler_flags = [f for f in flags if not f.startswith("-l")]
            libs = [f for f in flags if f.startswith("-l")]
            proc = subprocess.run([cc, *compiler_flags, src, "-o", tmp, *libs, "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                raise OSError(f"{cc} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
            os.replace(tmp, path)  # atomic: concurrent builders never load a half-written library
        finally:
            for p in (tmp, src):
                if os.path.exists(p):
                    os.remove(p)
    return path


_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_GENERATED: dict[str, ctypes.CDLL] = {}


def compile_source(name: str, code: str, flags: Sequence[str]) -> ctypes.CDLL:
    """The library compiled from generated C source `code` with `flags` (``-l<lib>`` entries are linked after
    the source), cached on disk and per process; raises OSError when it cannot be built here.

    `name` is a fixed identifier of the generator ([a-z][a-z0-9_]*), used in the file name only; the code
    must come from validated structure (see docs/ARCHITECTURE.md, 8b)."""
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"invalid native library name {name!r}")
    data = code.encode()
    with _LOCK:
        try:
            path = _build(name, data, list(flags))
        except subprocess.SubprocessError as e:
            raise OSError(str(e)) from None
        lib = _GENERATED.get(path)
        if lib is None:
            lib = _GENERATED[path] = ctypes.CDLL(path)
        return lib


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
