"""The fuzz worker: a child process that runs one case at a time and reports how it ended.

Started by ``tests.fuzz.harness.Worker`` as ``python -m tests.fuzz.worker SANDBOX RESPONSE_FD``. Requests
come on stdin and responses go out on RESPONSE_FD, both as one JSON object per line (nothing is
pickled: a case that managed to run code in here must not reach the driver through the protocol).
stdout goes nowhere; stderr is a log file the driver reads when the worker dies (faulthandler writes
the Python stack of a fatal signal there) or hangs (a traceback dump shortly before the case's timeout).

A case is
    plan:  plan_from_bytes(data) -> Engine -> context -> execute twice with the same random inputs
    model: the model written to SANDBOX/case/model.onnx (+ side files: external data, symlinks)
           -> Builder.build(opt level 0, CPU) -> plan bytes -> the plan case above
and ends as one of the outcomes in ``OUTCOMES`` (see docs/FUZZING.md). The sandbox holds the worker's
cwd and TMPDIR (where a code-execution payload drops its CANARY file) and SANDBOX/outside/SECRET, a
file an external-data reference must never be able to read into a plan.
"""
from __future__ import annotations

import base64
import faulthandler
import gc
import hashlib
import io
import json
import os
import resource
import shutil
import sys
import time
import traceback
from typing import Any

OUTCOMES = ("ok", "kiln_error", "exception", "nondeterminism", "mismatch", "code_exec", "file_leak", "rss", "crash",
            "hang", "harness_error")
ALLOWED = ("ok", "kiln_error")
SECRET = b"KILN-FUZZ-SECRET-" + hashlib.sha256(b"kiln-fuzz").hexdigest().encode()
CANARY = "CANARY"
MAX_INPUT_ELEMENTS = 1 << 22  # inputs larger than this are not generated (the case is still loaded)
KILN_DIR = None  # set in main(): the kiln package folder, to find the deepest kiln frame


def deepest_kiln_frame(tb: Any) -> str:
    """'kiln/path.py:LINE in func' of the innermost traceback frame inside the kiln package."""
    where = ""
    for fs in traceback.extract_tb(tb):
        fn = os.path.abspath(fs.filename)
        if KILN_DIR and fn.startswith(KILN_DIR + os.sep):
            where = f"kiln/{os.path.relpath(fn, KILN_DIR)}:{fs.lineno} in {fs.name}"
    return where


def _in_harness(tb: Any) -> bool:
    """Whether the exception was raised by the fuzz harness's own code (innermost frame in tests/fuzz)."""
    frames = traceback.extract_tb(tb)
    return bool(frames) and os.path.dirname(os.path.abspath(frames[-1].filename)) == os.path.dirname(
        os.path.abspath(__file__))


def innermost_frame(tb: Any) -> str:
    frames = traceback.extract_tb(tb)
    if not frames:
        return ""
    fs = frames[-1]
    return f"{os.path.basename(fs.filename)}:{fs.lineno} in {fs.name}"


class _Stage:
    name = "start"


class Case:
    def __init__(self, req: dict[str, Any], sandbox: str) -> None:
        self.kind = req["kind"]
        self.data = base64.b64decode(req["data"])
        self.files = req.get("files") or {}
        self.seed = int(req.get("seed", 0))
        self.sandbox = sandbox


# ---- inputs ---------------------------------------------------------------------------------------

def make_inputs(plan: Any, rng: Any) -> dict[str, Any] | None:
    """Random inputs that fit the plan's own input specs and its first profile; None when no valid
    input can be made (negative or huge dims, an unknown dtype) - the case then only loads."""
    import numpy as np
    from kiln.ir.dtype import DType
    dims: dict[str, int] = {}
    prof = plan.profiles[0] if plan.profiles and isinstance(plan.profiles[0], dict) else {}
    feeds: dict[str, Any] = {}
    for spec in plan.inputs:
        name = spec["name"]
        if spec.get("kind", "tensor") == "sequence":
            feeds[name] = []
            continue
        if spec.get("kind", "tensor") == "optional":
            feeds[name] = None
            continue
        shape_decl = spec.get("shape")
        if shape_decl is None:
            shape_decl = [2]
        rng_spec = prof.get(name) if isinstance(prof, dict) else None
        shape: list[int] = []
        for k, d in enumerate(shape_decl):
            if isinstance(d, bool) or not isinstance(d, (int, str)):
                return None
            if isinstance(d, int):
                shape.append(d)
                continue
            lo = hi = None
            try:
                lo, hi = int(rng_spec["min"][k]), int(rng_spec["max"][k])  # type: ignore[index]
            except Exception:
                pass
            if d not in dims:
                if lo is not None and hi is not None and 0 <= lo <= hi:
                    top = min(hi, lo + 64)
                    dims[d] = int(rng.choice([lo, top, int(rng.integers(lo, top + 1))]))
                else:
                    dims[d] = int(rng.integers(1, 4))
            shape.append(dims[d])
        if any(s < 0 for s in shape) or int(np.prod(shape, dtype=np.float64)) > MAX_INPUT_ELEMENTS:
            return None
        try:
            dt = DType(spec["dtype"]) if spec.get("dtype") else DType.FLOAT32
        except Exception:
            return None
        t = dt.torch
        import torch
        if t.is_floating_point:
            arr = torch.from_numpy(np.asarray(rng.standard_normal(shape), np.float32)).to(t)
        elif t == torch.bool:
            arr = torch.from_numpy(np.asarray(rng.random(shape) < 0.5))
        elif t.is_complex:
            return None
        else:
            arr = torch.from_numpy(np.asarray(rng.integers(0, 4, size=shape))).to(t)
        feeds[name] = _to_numpy(arr)
    return feeds


def _to_numpy(t: Any) -> Any:
    from kiln.runtime.engine import _to_numpy as to_np
    return to_np(t)


def _digest(x: Any) -> Any:
    """A comparable digest of an output (arrays by dtype, shape and bytes; NaN payloads included)."""
    import numpy as np
    import torch
    if isinstance(x, torch.Tensor):
        x = _to_numpy(x)
    if isinstance(x, np.ndarray):
        return (str(x.dtype), x.shape, hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest())
    if isinstance(x, (list, tuple)):
        return [_digest(v) for v in x]
    if isinstance(x, dict):
        return {k: _digest(v) for k, v in x.items()}
    return repr(x)


def _scribble() -> None:
    """Reuse freed memory with a fresh pattern, so a kernel reading memory it never wrote differs next run."""
    import torch
    bufs = [torch.full((n,), float(n % 251) + 0.5) for n in (1 << 10, 1 << 14, 1 << 18, 1 << 20)]
    del bufs


def _copy_feeds(feeds: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in feeds.items()}


def _locate_divergence(engine: Any, feeds: dict[str, Any]) -> str:
    """The first step whose output differs between two runs: 'op (tactic)' or '' if it did not repeat."""
    fn = engine.function
    records: list[dict[int, Any]] = [{}, {}]
    run = [0]
    patched: list[tuple[Any, str, Any]] = []

    def wrap(i: int, k: Any) -> Any:
        def w(*a: Any, **kw: Any) -> Any:
            r = k(*a, **kw)
            records[run[0]][i] = _digest(r)
            return r
        return w

    try:
        for i, st in enumerate(fn.steps):
            for attr in ("fn", "kernel"):  # whichever the interpreter calls
                k = getattr(st, attr, None)
                if callable(k):
                    patched.append((st, attr, k))
                    setattr(st, attr, wrap(i, k))
        for i in range(2):
            run[0] = i
            ctx = engine.create_execution_context()
            try:
                ctx.execute(_copy_feeds(feeds))
            except Exception:
                pass
            _scribble()
    finally:
        for st, attr, k in patched:
            setattr(st, attr, k)
    tactics = {}
    try:
        for s in engine.plan.graph.get("steps", []):
            tactics[s.get("name")] = s.get("tactic")
    except Exception:
        pass
    for i, st in enumerate(fn.steps):
        a, b = records[0].get(i), records[1].get(i)
        if a != b:
            return f"{st.node.op_type} ({tactics.get(st.node.name, '?')})"
    return ""


REL_TOL = 1e-3  # normwise: max |got - want| / max |want|; Winograd and oneDNN stay within ~1e-5 of the reference


def _with_ref_tactics(graph: Any) -> tuple[Any, bool]:
    """A copy of a plan graph with every step (subgraphs too) on the reference tactic; whether any changed."""
    import copy
    g = copy.deepcopy(graph)
    changed = False
    stack = [g]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if "op" in o and "tactic" in o:
                if o.get("tactic") != "ref" or o.get("config"):
                    changed = True
                o["tactic"], o["config"] = "ref", {}
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return g, changed


def _mismatch(got: Any, want: Any) -> str:
    """'' when got matches want (floats within REL_TOL where both are finite, the same non-finite pattern;
    other types exactly), else what differs."""
    import numpy as np
    import torch
    if isinstance(got, torch.Tensor):
        got = _to_numpy(got)
    if isinstance(want, torch.Tensor):
        want = _to_numpy(want)
    if isinstance(got, (list, tuple)) or isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or not isinstance(want, (list, tuple)) or len(got) != len(want):
            return "sequence structure"
        for a, b in zip(got, want):
            m = _mismatch(a, b)
            if m:
                return m
        return ""
    if not isinstance(got, np.ndarray) or not isinstance(want, np.ndarray):
        return "" if repr(got) == repr(want) else f"{type(got).__name__} vs {type(want).__name__}"
    if got.shape != want.shape:
        return f"shape {list(got.shape)} vs {list(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} vs {want.dtype}"
    if got.size == 0:
        return ""
    if got.dtype.kind in "fc" or got.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        a, b = got.astype(np.float64), want.astype(np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return ""  # inf/NaN (from NaN weights, extreme alphas): kernels may legitimately differ; inconclusive
        scale = max(float(np.abs(b).max()), 1e-6)
        err = float(np.abs(a - b).max()) / scale
        tol = REL_TOL if got.dtype.itemsize >= 4 else 1e-2  # half types round at ~1e-3 already
        if not err <= tol:
            return f"normwise error {err:.3g}"
        return ""
    return "" if np.array_equal(got, want) else "values differ"


def _compare_reference(plan: Any, engine: Any, feeds: dict[str, Any], result: dict[str, Any]) -> None:
    """Differential check: the plan's tactics against the same plan on the reference tactic everywhere."""
    import dataclasses
    from kiln.runtime.engine import Engine
    ref_graph, changed = _with_ref_tactics(plan.graph)
    if not changed or _random_ops(plan.graph):
        return
    try:
        ref = Engine(dataclasses.replace(plan, graph=ref_graph))
        want = ref.create_execution_context().execute(_copy_feeds(feeds))
    except Exception as e:  # the reference cannot run what the tactics ran: nothing to compare with
        result["reference_error"] = f"{type(e).__name__}: {_line(e)}"
        return
    got = engine.create_execution_context().execute(_copy_feeds(feeds))
    for name in want:
        m = _mismatch(got.get(name), want[name])
        if m:
            result.update(outcome="mismatch", etype="WrongResult", msg=f"output '{name}': {m} against the reference tactics",
                          where=_locate_mismatch(engine, ref, feeds) or "unlocated")
            return


def _step_outputs(engine: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    """{node name: its first output (a copy)} over one run of the engine's top-level steps."""
    import torch
    out: dict[str, Any] = {}
    patched: list[tuple[Any, str, Any]] = []

    def wrap(st: Any, k: Any) -> Any:
        def w(*a: Any, **kw: Any) -> Any:
            r = k(*a, **kw)
            first = r[0] if isinstance(r, (tuple, list)) and r else r
            out[st.node.name] = first.detach().clone() if isinstance(first, torch.Tensor) else first
            return r
        return w

    try:
        for st in engine.function.steps:
            for attr in ("fn", "kernel"):
                k = getattr(st, attr, None)
                if callable(k):
                    patched.append((st, attr, k))
                    setattr(st, attr, wrap(st, k))
        try:
            engine.create_execution_context().execute(_copy_feeds(feeds))
        except Exception:
            pass
    finally:
        for st, attr, k in patched:
            setattr(st, attr, k)
    return out


def _locate_mismatch(engine: Any, ref: Any, feeds: dict[str, Any]) -> str:
    got, want = _step_outputs(engine, feeds), _step_outputs(ref, feeds)
    tactics = {s.get("name"): s.get("tactic") for s in engine.plan.graph.get("steps", []) if isinstance(s, dict)}
    for st in engine.function.steps:
        n = st.node.name
        if n in got and n in want and _mismatch(got[n], want[n]):
            return f"{st.node.op_type} ({tactics.get(n, '?')})"
    return ""


RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial", "Bernoulli",
              "Dropout"}


def _random_ops(graph: Any) -> bool:
    """Whether the plan's graph (or a subgraph) holds an op whose output is random by definition."""
    stack = [graph]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if isinstance(o.get("op"), str) and o["op"] in RANDOM_OPS:
                return True
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return False


# ---- one case -------------------------------------------------------------------------------------

def run_plan(data: bytes, seed: int, stage: _Stage, result: dict[str, Any]) -> Any:
    import numpy as np
    from kiln.plan.format import plan_from_bytes
    from kiln.runtime.engine import Engine
    stage.name = "load"
    plan = plan_from_bytes(data)
    stage.name = "engine"
    engine = Engine(plan)
    stage.name = "context"
    ctx = engine.create_execution_context()
    stage.name = "inputs"
    rng = np.random.default_rng(seed)
    try:
        feeds = make_inputs(plan, rng)
    except Exception as e:  # the spec is too broken to make inputs from: Engine accepted it, nothing to run
        feeds = None
        result["input_error"] = f"{type(e).__name__}: {_line(e)}"
    if feeds is None:
        result["note"] = "no valid inputs: not executed"
        return plan
    stage.name = "execute"
    out1 = ctx.execute(_copy_feeds(feeds))
    d1 = _digest(out1)
    del out1
    _scribble()
    stage.name = "execute2"
    out2 = ctx.execute(_copy_feeds(feeds))
    d2 = _digest(out2)
    del out2
    result["executed"] = True
    if _random_ops(plan.graph):
        result["note"] = "random ops: outputs not compared"
        return plan
    if d1 != d2:
        stage.name = "diagnose"
        result["outcome"] = "nondeterminism"
        result["etype"] = "Nondeterminism"
        where = _locate_divergence(engine, feeds)
        result["where"] = where or "unlocated"
        result["msg"] = "two runs with the same inputs differ"
        return plan
    if not result.get("skip_reference"):
        stage.name = "reference"
        _compare_reference(plan, engine, feeds, result)
        if result.get("outcome") != "ok":
            return plan
    # other dynamic dims in between (kernels and the arena cache per shape), then the first inputs again
    try:
        other = make_inputs(plan, np.random.default_rng(seed + 1))
    except Exception:
        other = None
    if other is not None and {k: getattr(v, "shape", None) for k, v in other.items()} != {
            k: getattr(v, "shape", None) for k, v in feeds.items()}:
        stage.name = "execute-other-shape"
        try:
            ctx.execute(_copy_feeds(other))
        except BaseException as e:
            if not _is_kiln_error(e):
                raise
            result["other_shape_error"] = _line(e)
        stage.name = "execute3"
        d3 = _digest(ctx.execute(_copy_feeds(feeds)))
        result["shape_switch"] = True
        if d3 != d1:
            result.update(outcome="nondeterminism", etype="StaleAfterShapeChange",
                          where=_locate_divergence(engine, feeds) or "unlocated",
                          msg="the same inputs give another result after a run at other dynamic dims")
    return plan


def _write_case_files(case: Case) -> str:
    d = os.path.join(case.sandbox, "case")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for name, spec in case.files.items():
        path = os.path.join(d, name)
        if not os.path.abspath(path).startswith(d + os.sep):
            continue  # side files live inside the case folder; the model's references may point anywhere
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if "symlink" in spec:
            os.symlink(spec["symlink"], path)
        else:
            with open(path, "wb") as f:
                f.write(base64.b64decode(spec.get("b64", "")))
    path = os.path.join(d, "model.onnx")
    with open(path, "wb") as f:
        f.write(case.data)
    return path


def run_model(case: Case, stage: _Stage, result: dict[str, Any]) -> None:
    from kiln.builder import Builder, BuilderConfig
    from kiln.logger import Logger, Severity
    from kiln.plan.format import plan_to_bytes
    stage.name = "files"
    path = _write_case_files(case)
    stage.name = "build"
    plan = Builder(Logger(Severity.ERROR, io.StringIO())).build(path, BuilderConfig(device="cpu", optimization_level=0))
    stage.name = "serialize"
    data = plan_to_bytes(plan)
    leak = _leaked_file(data)
    if leak:
        result.update(outcome="file_leak", etype="FileLeak", where="plan weights", msg=f"the built plan holds {leak}")
        return
    result["built"] = True
    stage.name = "built-plan"
    try:
        run_plan(data, case.seed, stage, result)
    except BaseException as e:
        if _is_kiln_error(e) and stage.name in ("load", "engine"):
            # the builder made a plan that Kiln itself refuses to load: a bug, not a refusal of bad input
            result["unloadable"] = True
            tb = e.__traceback__
            result.update(outcome="exception", etype=f"Unloadable:{type(e).__name__}",
                          where=deepest_kiln_frame(tb), msg=_line(e))
            return
        raise


def _leaked_file(data: bytes) -> str:
    if SECRET in data:
        return "the sandbox's SECRET file (outside the model's folder)"
    try:
        with open("/etc/passwd", "rb") as f:
            head = f.read(64)
        if len(head) >= 16 and head[:32] in data:
            return "the contents of /etc/passwd"
    except OSError:
        pass
    return ""


def _wrapped(e: BaseException) -> BaseException | None:
    """The non-Kiln exception a KilnError was raised from or while handling (a catch-all's conversion)."""
    seen = 0
    c: BaseException | None = e
    while c is not None and seen < 20:
        seen += 1
        nxt = c.__cause__ or c.__context__
        if nxt is None:
            return None
        if not _is_kiln_error(nxt):
            return nxt
        c = nxt
    return None


def _is_kiln_error(e: BaseException) -> bool:
    from kiln.errors import KilnError
    return isinstance(e, KilnError)


def _line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]


def run_case(case: Case) -> dict[str, Any]:
    result: dict[str, Any] = {"outcome": "ok"}
    stage = _Stage()
    t0 = time.perf_counter()
    try:
        if case.kind == "plan":
            run_plan(case.data, case.seed, stage, result)
        else:
            run_model(case, stage, result)
    except BaseException as e:  # noqa: BLE001 - classifying every way a case can end is the point
        tb = e.__traceback__
        if _is_kiln_error(e):
            result.update(outcome="kiln_error", etype=type(e).__name__, msg=_line(e))
            inner = _wrapped(e)
            if inner is not None:
                result["wrapped"] = {"etype": type(inner).__name__, "where": deepest_kiln_frame(inner.__traceback__),
                                     "inner": innermost_frame(inner.__traceback__), "msg": _line(inner)}
        elif _in_harness(tb):  # a bug of this fuzzer, not of Kiln: reported apart, never saved as a Kiln failure
            result.update(outcome="harness_error", etype=type(e).__name__, where=innermost_frame(tb), msg=_line(e),
                          trace=traceback.format_exception(type(e), e, tb)[-6:])
        else:
            result.update(outcome="exception", etype=type(e).__name__, where=deepest_kiln_frame(tb),
                          inner=innermost_frame(tb), msg=_line(e))
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            result["fatal"] = True
        del tb
    result["stage"] = stage.name
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> int:
    """This process's peak resident set (VmHWM: per address space, so not inherited from the parent the way
    getrusage's ru_maxrss is)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def canary_hits(sandbox: str) -> list[str]:
    hits = []
    for d in ("cwd", "tmp", "case", "."):
        p = os.path.join(sandbox, d, CANARY)
        if os.path.lexists(p):
            hits.append(p)
    return hits


def _canary_where(hits: list[str]) -> str:
    """Payloads that write their stack into the canary tell where they ran: the deepest kiln frame."""
    import re
    for h in hits:
        try:
            with open(h, errors="replace") as f:
                text = f.read(200_000)
        except OSError:
            continue
        where, gen = "", ""
        for m in re.finditer(r'File "([^"]+)", line (\d+), in (\S+)', text):
            if m.group(1).startswith("<"):  # generated code, e.g. '<kiln pointwise NODE>': its kind only
                gen = " ".join(m.group(1).strip("<>").split()[:2])
                continue
            fn = os.path.abspath(m.group(1))
            if KILN_DIR and fn.startswith(KILN_DIR + os.sep):
                where = f"kiln/{os.path.relpath(fn, KILN_DIR)}:{m.group(2)} in {m.group(3)}"
                gen = ""
            elif "kiln_pw_" in m.group(1) or "triton_pointwise" in m.group(1):
                gen = "generated triton module"
        if where or gen:
            return where + (f" -> <{gen}>" if gen else "")
    return "unlocated"


def clear_canaries(sandbox: str) -> None:
    for p in canary_hits(sandbox):
        try:
            os.remove(p)
        except OSError:
            pass


def main() -> None:
    global KILN_DIR
    sandbox, resp_fd = sys.argv[1], int(sys.argv[2])
    limit_gb = float(os.environ.get("KILN_FUZZ_RLIMIT_GB", "6"))
    if limit_gb > 0:
        lim = int(limit_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    faulthandler.enable(file=sys.stderr, all_threads=True)
    resp = os.fdopen(resp_fd, "w", buffering=1)
    import torch
    torch.set_num_threads(1)
    import kiln
    KILN_DIR = os.path.dirname(os.path.abspath(kiln.__file__))
    import kiln.builder  # noqa: F401  warm the imports so the first case is not slower than the rest
    import kiln.runtime.engine  # noqa: F401
    from kiln.backends.tactic import _ensure_loaded
    _ensure_loaded()
    resp.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    n_cases = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        n_cases += 1
        if n_cases % 64 == 0:
            gc.collect()  # a full collection costs ~0.1 s with torch loaded: not after every case
        req = json.loads(line)
        case = Case(req, sandbox)
        timeout = float(req.get("timeout", 20))
        clear_canaries(sandbox)
        sys.stderr.write(f"\n=== kiln-fuzz case {req.get('id')} ===\n")
        sys.stderr.flush()
        if timeout > 4:
            faulthandler.dump_traceback_later(timeout - 3, exit=False, file=sys.stderr)
        result = run_case(case)
        faulthandler.cancel_dump_traceback_later()
        hits = canary_hits(sandbox)
        if hits:
            result.update(outcome="code_exec", etype="CodeExecution", where=_canary_where(hits),
                          msg=f"the case created {', '.join(os.path.relpath(h, sandbox) for h in hits)} "
                              f"(stage {result.get('stage')})")
            clear_canaries(sandbox)
        result["id"] = req.get("id")
        resp.write(json.dumps(result, default=str) + "\n")
        if result.get("fatal"):
            break


if __name__ == "__main__":
    main()
