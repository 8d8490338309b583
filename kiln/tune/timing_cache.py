"""TimingCache: measured tactic times, keyed by device + software versions + node signature + precision.

File format (JSON, written atomically):

    {"format": "kiln-timing-cache", "version": 1,
     "entries": {KEY: {"env": {...}, "layer": "Conv f16[1x64x56x56] ...", "times": {CHOICE: ms | null}}}}

KEY is a digest of (environment fingerprint, node signature, precision); CHOICE is
"<tactic id> <config as sorted JSON>"; null records a tactic that failed (compile error, out of
memory, wrong result), so a rebuild does not try it again. Caches merge entry by entry (the union of
choices; for a choice timed in both, the smaller time). A rebuild with a warm cache times nothing it
already knows; entries from another GPU or software stack never match (their key differs).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from kiln.errors import KilnError

FORMAT = "kiln-timing-cache"
VERSION = 1


def choice_id(tactic_id: str, config: dict[str, Any]) -> str:
    """Stable name of one (tactic, config) candidate."""
    return f"{tactic_id} {json.dumps(config, sort_keys=True, separators=(',', ':'))}"


def parse_choice(choice: str) -> tuple[str, dict[str, Any]]:
    tid, _, cfg = choice.partition(" ")
    return tid, json.loads(cfg) if cfg else {}


def _driver_version() -> str:
    try:
        import pynvml  # nvidia-ml-py
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return "?"


_ENV_CACHE: dict[str, dict[str, str]] = {}


def environment(device: torch.device) -> dict[str, str]:
    """What a timing depends on besides the layer: device model, capability, driver and library versions."""
    key = str(device)
    if key in _ENV_CACHE:
        return _ENV_CACHE[key]
    from kiln import __version__
    env = {"kiln": __version__, "torch": torch.__version__}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cc = torch.cuda.get_device_capability(idx)
        env.update(gpu=torch.cuda.get_device_name(idx), capability=f"{cc[0]}.{cc[1]}",
                   driver=_driver_version(), cuda=str(torch.version.cuda),
                   cudnn=str(torch.backends.cudnn.version()))
        try:
            import triton
            env["triton"] = triton.__version__
        except Exception:
            env["triton"] = "none"
    else:
        from kiln.backends.cpu.features import cpu_model, vector_isa
        env.update(cpu=cpu_model(), isa=vector_isa(), threads=str(torch.get_num_threads()))
    _ENV_CACHE[key] = env
    return env


def entry_key(env: dict[str, str], signature: dict[str, Any], precision: str) -> str:
    blob = json.dumps({"env": env, "sig": signature, "precision": precision}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class TimingCache:
    """In-memory timing cache with JSON load/save/merge."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0

    # -- lookup ---------------------------------------------------------------------------------
    def times(self, key: str) -> dict[str, float | None]:
        """Known times of an entry: choice -> ms (None: the choice failed)."""
        e = self.entries.get(key)
        return dict(e["times"]) if e else {}

    def record(self, key: str, choice: str, ms: float | None, env: dict[str, str] | None = None,
               layer: str = "") -> None:
        e = self.entries.setdefault(key, {"env": env or {}, "layer": layer, "times": {}})
        old = e["times"].get(choice)
        e["times"][choice] = ms if old is None or (ms is not None and ms < old) else old

    def __len__(self) -> int:
        return len(self.entries)

    # -- files ----------------------------------------------------------------------------------
    def merge(self, other: "TimingCache") -> "TimingCache":
        """Add another cache's entries (union of choices; the smaller time where both have one)."""
        for key, e in other.entries.items():
            for choice, ms in e["times"].items():
                mine = self.entries.get(key, {}).get("times", {})
                if choice in mine and mine[choice] is not None and ms is None:
                    continue
                self.record(key, choice, ms, e.get("env"), e.get("layer", ""))
        return self

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "entries": self.entries}

    @classmethod
    def from_json(cls, d: Any, where: str = "timing cache") -> "TimingCache":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise KilnError(f"{where}: not a Kiln timing cache")
        if d.get("version") != VERSION:
            raise KilnError(f"{where}: timing cache version {d.get('version')}, this Kiln reads version {VERSION}")
        c = cls()
        entries = d.get("entries")
        if not isinstance(entries, dict):
            raise KilnError(f"{where}: malformed timing cache (no entries)")
        for key, e in entries.items():
            if not isinstance(e, dict) or not isinstance(e.get("times"), dict):
                raise KilnError(f"{where}: malformed timing cache entry {key!r}")
            c.entries[str(key)] = {"env": e.get("env", {}), "layer": e.get("layer", ""),
                                   "times": {str(k): (None if v is None else float(v)) for k, v in e["times"].items()}}
        return c

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TimingCache":
        """Read a cache file; a missing file is an empty cache."""
        path = os.fspath(path)
        if not os.path.exists(path):
            return cls()
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise KilnError(f"{path}: cannot read timing cache ({type(e).__name__})") from None
        return cls.from_json(data, path)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically, merged with whatever the file holds now (concurrent builds lose nothing)."""
        path = os.fspath(path)
        merged = TimingCache()
        if os.path.exists(path):
            try:
                merged = TimingCache.load(path)
            except KilnError:
                merged = TimingCache()
        merged.merge(self)
        from kiln.fileio import atomic_write
        atomic_write(path, json.dumps(merged.to_json(), indent=1, sort_keys=True).encode(), "timing cache")
