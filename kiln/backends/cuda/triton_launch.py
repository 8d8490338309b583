"""Triton launches, and parallel ahead-of-time compilation of the launches a build is about to time.

Triton compiles a kernel variant on its first launch, holding the GIL (threads do not help). A cold
autotune would compile every tile config of every epilogue serially. Instead the autotuner first runs
each Triton candidate once under `recording()`: launches are recorded, not executed. `precompile()`
then compiles the distinct variants in a pool of spawned processes (each calls the kernel's
`warmup`, which compiles without running); they land in Triton's on-disk cache, where the builder's
own first launch of each variant finds them. Any failure here only costs the time: the builder's
launches compile whatever is missing.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import time
from typing import Any, Iterator

import torch

_RECORDING: list[dict[str, Any]] | None = None


def launch(kernel: Any, grid: tuple[int, ...], args: list[Any], kwargs: dict[str, Any]) -> None:
    """kernel[grid](*args, **kwargs), or record it while a precompile pass collects launches."""
    if _RECORDING is not None:
        _RECORDING.append(_recipe(kernel, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording() -> Iterator[list[dict[str, Any]]]:
    """Collect Triton launches (without running them) made inside the block."""
    global _RECORDING
    prev, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = prev


def _arg(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return ["t", str(a.dtype).replace("torch.", ""), (a.data_ptr() % 16) // a.element_size()]
    if isinstance(a, bool):
        return ["b", a]
    if isinstance(a, int):
        return ["i", a]
    if isinstance(a, float):
        return ["f", a]
    return ["o", a]


def _recipe(kernel: Any, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    fn = kernel.fn
    return {"module": fn.__module__, "name": fn.__name__, "file": inspect.getsourcefile(fn),
            "args": [_arg(a) for a in args], "kwargs": dict(kwargs)}


def _spec_key(r: dict[str, Any]) -> str:
    """What Triton specializes on: dtypes, 16-byte alignment, ints equal to 1 / divisible by 16."""
    feats = []
    for kind, *v in r["args"]:
        if kind == "t":
            feats.append(f"t{v[0]}{v[1] == 0}")
        elif kind == "i":
            x = int(v[0])
            feats.append(f"i{x == 1}{x % 16 == 0}{abs(x) >= 2**31}")
        else:
            feats.append(kind)
    return f"{r['module']}.{r['name']}|{'|'.join(feats)}|{sorted(r['kwargs'].items())}"


def _load_kernel(r: dict[str, Any]) -> Any:
    mod = sys.modules.get(r["module"])
    if mod is None:
        try:
            mod = importlib.import_module(r["module"])
        except ImportError:
            spec = importlib.util.spec_from_file_location(r["module"], r["file"])
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[r["module"]] = mod
            spec.loader.exec_module(mod)
    return getattr(mod, r["name"])


def _compile_one(r: dict[str, Any]) -> tuple[bool, float, str]:
    """Worker: compile one recorded launch with the kernel's warmup (no GPU work)."""
    t0 = time.perf_counter()
    try:
        kernel = _load_kernel(r)
        args: list[Any] = []
        for kind, *v in r["args"]:
            if kind == "t":
                dt = getattr(torch, v[0])
                base = torch.empty(16 + int(v[1]), dtype=dt, device="cuda")
                args.append(base[int(v[1]):])
            else:
                args.append(v[0])
        kernel.warmup(*args, grid=(1,), **r["kwargs"])
        return True, time.perf_counter() - t0, ""
    except Exception as e:  # reported by the parent at verbose level
        return False, time.perf_counter() - t0, f"{type(e).__name__}: {str(e)[:200]}"


def _worker_main() -> None:
    """Entry of a compile worker process: JSON recipes on stdin, JSON results on stdout."""
    import json
    recipes = json.loads(sys.stdin.read())
    results = [_compile_one(r) for r in recipes]
    sys.stdout.write(json.dumps(results))


def precompile(recipes: list[dict[str, Any]], logger: Any, max_workers: int | None = None) -> int:
    """Compile the distinct recorded variants in parallel worker processes; returns how many compiled."""
    import json
    import subprocess
    unique: dict[str, dict[str, Any]] = {}
    for r in recipes:
        unique.setdefault(_spec_key(r), r)
    todo = list(unique.values())
    from kiln.settings import child_process_env, settings
    if len(todo) < 2 or not settings().parallel_compile:
        return 0
    workers = max_workers or max(1, min(len(todo), 12, (os.cpu_count() or 2) - 1))
    chunks = [todo[i::workers] for i in range(workers)]
    env = child_process_env([p for p in sys.path if p and os.path.isdir(p)])
    cmd = [sys.executable, "-c", "from kiln.backends.cuda.triton_launch import _worker_main; _worker_main()"]
    t0 = time.perf_counter()
    ok = 0
    try:
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  env=env, text=True) for _ in chunks]
        for proc, chunk in zip(procs, chunks):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(chunk))
            proc.stdin.close()
        for proc, chunk in zip(procs, chunks):
            assert proc.stdout is not None
            out = proc.stdout.read()
            proc.wait(timeout=600)
            if proc.returncode != 0 or not out:
                logger.verbose(f"Triton compile worker exited with {proc.returncode}")
                continue
            for r, (good, _secs, msg) in zip(chunk, json.loads(out)):
                ok += bool(good)
                if not good:
                    logger.verbose(f"Precompile of {r['name']} {r['kwargs']} failed ({msg}); it compiles on use")
    except Exception as e:  # no subprocesses here: compile on first use instead
        logger.warning(f"parallel Triton compilation unavailable ({type(e).__name__}: {e}); compiling serially")
        return ok
    logger.info(f"Compiled {ok}/{len(todo)} Triton kernel variants in {workers} processes, "
                f"{time.perf_counter() - t0:.1f} s")
    return ok
