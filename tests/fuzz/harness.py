"""Driver side of the fuzzers: crash-isolated workers, outcome signatures, and the corpus.

``Worker`` owns one ``tests.fuzz.worker`` child process and runs cases through it one at a time. A
case that kills the child (signal, abort, os._exit) is a ``crash``; one that does not answer within
the per-case timeout is a ``hang`` (the child is killed); in both cases the deepest kiln frame is read
from the child's faulthandler log, and a fresh child starts for the next case. The child runs with
RLIMIT_AS (default 6 GiB) so that a wild allocation fails inside it instead of taking the machine down,
and a case after which the child's peak RSS passed ``rss_limit_mb`` (default 4 GiB) is an ``rss`` failure
(the child is restarted, as its high-water mark cannot go down).

Outcome classes (``worker.OUTCOMES``): ok and kiln_error are fine; everything else is a failure, with a
signature (target, class, exception type, deepest kiln frame) that identifies it across cases.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from tests.fuzz.worker import ALLOWED, SECRET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS_DIR = os.path.join(ROOT, "tests", "fuzz", "corpus")
EXT = {"plan": ".kiln", "model": ".onnx"}
SUBDIR = {"plan": "plans", "model": "models"}


@dataclass
class Case:
    """One input to run: a plan file or an ONNX model (with side files for external data)."""

    kind: str  # "plan" | "model"
    data: bytes
    desc: list[str] = field(default_factory=list)  # what the mutators did, one line each
    seed_name: str = ""
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"b64": ...} | {"symlink": target}
    input_seed: int = 0

    def describe(self) -> str:
        return f"{self.seed_name}: " + "; ".join(self.desc) if self.desc else self.seed_name or "(corpus file)"


@dataclass
class Result:
    outcome: str
    etype: str = ""
    where: str = ""
    msg: str = ""
    stage: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """A Kiln failure (a harness_error is the fuzzer's own bug: reported, never counted against Kiln)."""
        return self.outcome not in ALLOWED and self.outcome != "harness_error"


def signature(kind: str, r: Result) -> str:
    """A failure's identity: target, outcome class, exception type and the deepest kiln frame's file and
    function (for a hang only the file: the dump samples wherever the endless loop happens to be)."""
    where = r.where or f"stage {r.stage}"
    if r.outcome == "hang" and r.where:
        where = r.where.split(":")[0]
    where = re.sub(r":\d+ in ", " in ", where)  # file and function, not the line: lines move as kiln is edited
    return f"{kind} | {r.outcome} | {r.etype} | {where}"


def kiln_stack(text: str) -> list[str]:
    """The kiln frames (innermost first) of the first thread dump in a faulthandler log that has any."""
    kiln_dir = os.path.join(ROOT, "kiln")
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text)
    ordered = [b for b in blocks if b.startswith("Current thread")] + [b for b in blocks if not b.startswith("Current thread")]
    for b in ordered:
        frames = []
        for m in _FRAME.finditer(b):
            fn = os.path.abspath(m.group(1))
            if fn.startswith(kiln_dir + os.sep):
                frames.append(f"kiln/{os.path.relpath(fn, kiln_dir)}:{m.group(2)} in {m.group(3)}")
        if frames:
            return frames
    return []


def sig_hash(sig: str) -> str:
    return hashlib.sha256(sig.encode()).hexdigest()[:16]


_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def _kiln_frame_from_log(text: str) -> str:
    """Deepest kiln frame of the first thread dump in a faulthandler log that has one (most recent first)."""
    frames = kiln_stack(text)
    return frames[0] if frames else ""


def _fatal_line(text: str) -> str:
    m = re.search(r"Fatal Python error: ([^\n]+)", text)
    return m.group(1).strip() if m else ""


def worker_env(sandbox: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        "TRITON_INTERPRET": "1",  # cuda.triton_* tactics named in a CPU plan run in Triton's interpreter
        "KILN_CACHE_DIR": os.path.join(sandbox, "cache"),  # generated kernels stay in the sandbox
        "TMPDIR": os.path.join(sandbox, "tmp"),
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
    })
    # tight but legitimate limits: what a smaller machine would have (docs/SETTINGS.md)
    env.setdefault("KILN_MAX_LOOP_ITERATIONS", "100000")
    env.setdefault("KILN_MAX_ACTIVATION_BYTES", "1G")
    env.setdefault("KILN_MAX_PLAN_BYTES", "1G")
    env.update(extra or {})
    return env


class Worker:
    """A persistent crash-isolated child running cases one at a time."""

    def __init__(self, timeout: float = 20.0, rlimit_gb: float = 6.0, rss_limit_mb: int = 4096,
                 sandbox: str | None = None, nice: int = 0, env: dict[str, str] | None = None) -> None:
        self.timeout, self.rlimit_gb, self.rss_limit_mb, self.nice = timeout, rlimit_gb, rss_limit_mb, nice
        self._own_sandbox = sandbox is None
        self.sandbox = sandbox or tempfile.mkdtemp(prefix="kiln-fuzz-")
        for d in ("cwd", "tmp", "cache", "case", "outside"):
            os.makedirs(os.path.join(self.sandbox, d), exist_ok=True)
        with open(os.path.join(self.sandbox, "outside", "SECRET"), "wb") as f:
            f.write(SECRET * 64)
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.cases = 0
        self._next_id = 0

    # -- process management --
    def start(self) -> None:
        self.close_proc()
        r, w = os.pipe()
        self._log_path = os.path.join(self.sandbox, f"worker-{self.starts}.log")
        self._log = open(self._log_path, "w+b")
        env = worker_env(self.sandbox, dict(self.extra_env, KILN_FUZZ_RLIMIT_GB=str(self.rlimit_gb)))
        cmd = [sys.executable, "-m", "tests.fuzz.worker", self.sandbox, str(w)]
        nice = self.nice
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log,
                                     cwd=os.path.join(self.sandbox, "cwd"), env=env, pass_fds=(w,),
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        os.close(w)
        self._resp = os.fdopen(r, "rb", buffering=0)
        self._buf = b""
        self.starts += 1
        hello = self._read_line(120.0)
        if hello is None or not json.loads(hello).get("ready"):
            tail = self._log_tail(0)
            self.close_proc()
            raise RuntimeError(f"fuzz worker failed to start: {tail[-2000:]}")

    def _read_line(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._resp], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._resp.fileno(), 1 << 16)
            if not chunk:
                return None  # EOF: the child is gone
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _log_tail(self, start: int) -> str:
        try:
            self._log.flush()
            with open(self._log_path, "rb") as f:
                f.seek(start)
                return f.read(1 << 20).decode("utf-8", "replace")
        except OSError:
            return ""

    def close_proc(self) -> None:
        p = self.proc
        self.proc = None
        if p is not None:
            try:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=30)
            except Exception:
                pass
            for s in (p.stdin,):
                try:
                    s.close()  # type: ignore[union-attr]
                except Exception:
                    pass
            try:
                self._resp.close()
                self._log.close()
            except Exception:
                pass

    def close(self) -> None:
        self.close_proc()
        if self._own_sandbox:
            shutil.rmtree(self.sandbox, ignore_errors=True)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- running cases --
    def run(self, case: Case, timeout: float | None = None) -> Result:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        timeout = timeout or self.timeout
        self._next_id += 1
        self.cases += 1
        log_start = os.path.getsize(self._log_path)
        req = {"id": self._next_id, "kind": case.kind, "data": base64.b64encode(case.data).decode(),
               "files": case.files, "seed": case.input_seed, "timeout": timeout}
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        line = self._read_line(timeout)
        if line is None:
            alive = self.proc.poll() is None
            if alive:  # hang: the dump_traceback_later output is in the log by now
                time.sleep(0.2)
                text = self._log_tail(log_start)
                self.close_proc()
                return Result("hang", "Timeout", _kiln_frame_from_log(text), f"no answer within {timeout:.0f} s",
                              detail={"log": text[-4000:], "stack": kiln_stack(text)})
            self.proc.wait()
            rc = self.proc.returncode
            text = self._log_tail(log_start)
            self.close_proc()
            sig = -rc if rc < 0 else 0
            name = signal.Signals(sig).name if sig else f"exit {rc}"
            fatal = _fatal_line(text)
            return Result("crash", name, _kiln_frame_from_log(text), fatal or f"worker died ({name})",
                          detail={"log": text[-4000:], "returncode": rc, "stack": kiln_stack(text)})
        try:
            d = json.loads(line)
        except ValueError:
            self.close_proc()
            return Result("crash", "ProtocolError", "", f"worker wrote {line[:200]!r}")
        r = Result(d.get("outcome", "?"), d.get("etype", ""), d.get("where", ""), d.get("msg", ""),
                   d.get("stage", ""), detail=d)
        if r.outcome in ALLOWED and int(d.get("peak_rss_mb", 0)) > self.rss_limit_mb:
            r = Result("rss", "RSS", f"stage {r.stage}", f"peak RSS {d['peak_rss_mb']} MB > {self.rss_limit_mb} MB",
                       r.stage, detail=d)
        if int(d.get("peak_rss_mb", 0)) > self.rss_limit_mb // 2 or d.get("fatal"):
            self.close_proc()  # a fresh child: the high-water mark cannot go down
        return r


# ---- corpus -----------------------------------------------------------------------------------------

def corpus_files(corpus: str = CORPUS_DIR) -> list[tuple[str, str]]:
    """(kind, path) of every case in a corpus folder, sorted."""
    out = []
    for kind in ("plan", "model"):
        d = os.path.join(corpus, SUBDIR[kind])
        if os.path.isdir(d):
            out += [(kind, os.path.join(d, n)) for n in sorted(os.listdir(d)) if n.endswith(EXT[kind])]
    return out


def load_corpus_case(kind: str, path: str) -> tuple[Case, dict[str, Any]]:
    with open(path, "rb") as f:
        data = f.read()
    side = os.path.splitext(path)[0] + ".json"
    meta: dict[str, Any] = {}
    if os.path.exists(side):
        with open(side) as f:
            meta = json.load(f)
    case = Case(kind, data, list(meta.get("mutations", [])), meta.get("seed", ""), meta.get("files", {}),
                int(meta.get("input_seed", 0)))
    return case, meta


def save_corpus_case(corpus: str, case: Case, r: Result, sig: str, extra: dict[str, Any] | None = None) -> str:
    """Write the case as <corpus>/<plans|models>/<sig-hash><ext> with a .json sidecar; keeps the smaller
    of an existing case with the same signature and this one. Returns the case's path."""
    d = os.path.join(corpus, SUBDIR[case.kind])
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, sig_hash(sig))
    path = base + EXT[case.kind]
    if os.path.exists(path) and os.path.getsize(path) <= len(case.data):
        return path
    meta = {"signature": sig, "outcome": r.outcome, "exception": r.etype, "where": r.where,
            "message": r.msg[:500], "stage": r.stage, "seed": case.seed_name, "mutations": case.desc,
            "input_seed": case.input_seed, "files": case.files, **(extra or {})}
    if r.detail.get("stack"):
        meta["kiln_stack"] = r.detail["stack"][:30]
    with open(path, "wb") as f:
        f.write(case.data)
    with open(base + ".json", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    return path
