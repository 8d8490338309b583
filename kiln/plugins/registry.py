"""The plugin registry: custom ops (an OpDef with a domain and an integer version) the op lookup falls back to.

A plugin is an OpDef subclass naming one op outside ai.onnx, with a `version`, its declared `attributes`,
`infer`, a torch reference `compute` and, optionally, `tactics` (kiln.backends.tactic.Tactic instances or
classes) that compete in the autotuner with the reference. It is registered by `@plugin` on the class,
`register_plugin(instance)`, a package's `kiln.plugins` entry point or `kiln.plugins.load(path)`
(kiln.plugins.loader); at most one version of a (domain, op) is registered at a time. docs/PLUGINS.md
describes the API and what a plan records about the plugins it uses (`plan_records`, `check_plan_records`).
"""
from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from kiln.errors import KilnError, PlanFormatError
from kiln.ops.attrs import PRIVATE, Attr
from kiln.ops.registry import OpDef

MAX_VERSION = 2**31 - 1
_OP = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_DOMAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_ONNX_DOMAINS = ("", "ai.onnx")


class PluginError(KilnError):
    """A plugin that cannot be registered or loaded (one line naming it)."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin: its (domain, op, version), the OpDef instance and its tactics."""

    domain: str
    op: str
    version: int
    opdef: OpDef
    tactics: tuple[Any, ...] = ()


def describe(op: str, domain: str, version: int | None = None) -> str:
    """'plugin Op (domain d) version N', as every message names a plugin."""
    return f"plugin {op} (domain {domain})" + ("" if version is None else f" version {version}")


_PLUGINS: dict[tuple[str, str], PluginInfo] = {}
_LOCK = threading.RLock()


def line(e: BaseException) -> str:
    """An exception's first line (a message stays one line)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _class_name(x: Any) -> str:
    cls = x if isinstance(x, type) else type(x)
    return f"{cls.__module__}.{cls.__qualname__}"


def _validate(opdef: OpDef) -> tuple[str, str, int]:
    """(domain, op, version) of a plugin definition, or PluginError naming what is wrong with it."""
    who = _class_name(opdef)
    op, domain, version = type(opdef).op_type, type(opdef).domain, getattr(type(opdef), "version", None)
    if not isinstance(op, str) or not _OP.fullmatch(op):
        raise PluginError(f"plugin {who}: op_type must be one op name (letters, digits, '_'), got {op!r}")
    if not isinstance(domain, str) or domain in _ONNX_DOMAINS or not _DOMAIN.fullmatch(domain):
        raise PluginError(f"plugin {who} ({op}): domain must name a custom domain (not '' or 'ai.onnx'), got {domain!r}")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise PluginError(f"plugin {who} ({op}): class attribute 'version' must be an int in [1, {MAX_VERSION}], "
                          f"got {version!r}")
    attrs = type(opdef).attributes
    if not isinstance(attrs, dict) or not all(isinstance(k, str) and isinstance(a, Attr) for k, a in attrs.items()):
        raise PluginError(f"plugin {who} ({op}): 'attributes' must map names to kiln.ops.attrs.Attr declarations")
    for name in attrs:
        if name in PRIVATE or not _OP.fullmatch(name):
            raise PluginError(f"plugin {who} ({op}): cannot declare an attribute named {name!r}")
    if type(opdef).compute is OpDef.compute:
        raise PluginError(f"plugin {who} ({op}): defines no compute (its torch reference implementation)")
    from kiln.ops.registry import is_registered
    if is_registered(op, domain):
        raise PluginError(f"{describe(op, domain, version)}: {op} (domain {domain}) is a built-in op of Kiln; "
                          "a plugin cannot replace it")
    return domain, op, version


def _tactics(opdef: OpDef, key: tuple[str, str], label: str) -> list[Any]:
    """The plugin's tactic instances, each restricted to the plugin's nodes, after checking their ids are free."""
    from kiln.backends.tactic import Tactic, get_tactic
    out = []
    for t in getattr(type(opdef), "tactics", ()) or ():
        if isinstance(t, type) and issubclass(t, Tactic):
            t = t()
        if not isinstance(t, Tactic):
            raise PluginError(f"{label}: 'tactics' must hold Tactic subclasses or instances, got {t!r}")
        if not isinstance(t.id, str) or not t.id or t.id == "ref" or len(t.id) > 256:
            raise PluginError(f"{label}: tactic {_class_name(t)} needs an id of its own, got {t.id!r}")
        if not set(t.devices) <= {"cpu", "cuda"}:
            raise PluginError(f"{label}: tactic {t.id} names devices {t.devices!r}; Kiln targets 'cpu' and 'cuda'")
        if get_tactic(t.id) is not None or any(t.id == o.id for o in out):
            raise PluginError(f"{label}: tactic id '{t.id}' is already registered")
        out.append(_restricted(t, key))
    return out


def _restricted(t: Any, key: tuple[str, str]) -> Any:
    """A plugin's tactic only ever takes its plugin's nodes: the autotuner does not offer it for other layers,
    and a plan naming it for another layer is refused by the loader's `supports` check."""
    own = type(t).supports

    def supports(node: Any, ctx: Any) -> bool:
        return (node.domain, node.op_type) == key and bool(own(t, node, ctx))
    t.supports = supports
    return t


def _clear_caches() -> None:
    from kiln.ops.attrs import declared
    declared.cache_clear()  # it memoises each op's declaration, which a (re)registered plugin changes


def register_plugin(opdef: OpDef | type[OpDef]) -> OpDef:
    """Register a plugin (an OpDef instance, or its class); returns the registered instance.

    The same class registered again under its (domain, op, version) is a no-op; another class under the
    same (domain, op) is a PluginError, whatever its version."""
    if isinstance(opdef, type) and issubclass(opdef, OpDef):
        opdef = _instance(opdef)
    if not isinstance(opdef, OpDef):
        raise PluginError(f"register_plugin: expected an OpDef subclass or instance, got {type(opdef).__name__}")
    domain, op, version = _validate(opdef)
    label = describe(op, domain, version)
    with _LOCK:
        old = _PLUGINS.get((domain, op))
        if old is not None:
            if type(old.opdef) is type(opdef) and old.version == version:
                return old.opdef
            if old.version != version:
                raise PluginError(f"{label}: version {old.version} is already registered "
                                  f"({_class_name(old.opdef)}); unregister it first")
            raise PluginError(f"{label} is already registered by {_class_name(old.opdef)}; cannot register "
                              f"{_class_name(opdef)} under the same name and version")
        _install(PluginInfo(domain, op, version, opdef, tuple(_tactics(opdef, (domain, op), label))))
    return opdef


def _instance(cls: type[OpDef]) -> OpDef:
    try:
        return cls()
    except Exception as e:
        raise PluginError(f"plugin {_class_name(cls)}: cannot be instantiated without arguments "
                          f"({type(e).__name__}: {line(e)})") from e


def _install(info: PluginInfo) -> None:
    from kiln.backends.tactic import register_tactic
    for t in info.tactics:
        register_tactic(t)
    _PLUGINS[(info.domain, info.op)] = info
    _clear_caches()


def plugin(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator: register an OpDef subclass as a plugin (see `register_plugin`); returns the class."""
    if not (isinstance(cls, type) and issubclass(cls, OpDef)):
        raise PluginError(f"@plugin decorates an OpDef subclass, got {cls!r}")
    register_plugin(_instance(cls))
    return cls


def unregister_plugin(op: str, domain: str) -> PluginInfo | None:
    """Remove a plugin and its tactics; returns what was registered (None when nothing was)."""
    from kiln.backends.tactic import unregister_tactic
    with _LOCK:
        info = _PLUGINS.pop((domain, op), None)
        if info is not None:
            for t in info.tactics:
                unregister_tactic(t.id)
            _clear_caches()
    return info


def get_plugin(op: str, domain: str) -> PluginInfo | None:
    """The registered plugin of (domain, op), after the built-in plugins and entry points are loaded."""
    from kiln.plugins.loader import ensure_loaded
    ensure_loaded()
    return _PLUGINS.get((domain, op))


def find_plugin(op_type: str, domain: str) -> OpDef | None:
    """The OpDef of a registered plugin (kiln.ops.registry.lookup's fallback after the built-in ops)."""
    info = get_plugin(op_type, domain)
    return None if info is None else info.opdef


def registered() -> list[PluginInfo]:
    """Every registered plugin, by domain and op."""
    from kiln.plugins.loader import ensure_loaded
    ensure_loaded()
    with _LOCK:
        return [_PLUGINS[k] for k in sorted(_PLUGINS)]


@contextmanager
def isolated(reload_entry_points: bool = False) -> Iterator[None]:
    """Plugins registered or unregistered inside are put back as they were on exit (tests, notebooks).

    `reload_entry_points`: the `kiln.plugins` entry points are read again on the next lookup inside."""
    from kiln.plugins import loader
    loader.ensure_loaded()
    with _LOCK:
        saved = dict(_PLUGINS)
        state = loader.save_state()
        if reload_entry_points:
            loader.forget_entry_points()
    try:
        yield
    finally:
        with _LOCK:
            for key in list(_PLUGINS):
                if saved.get(key) is not _PLUGINS[key]:
                    unregister_plugin(key[1], key[0])
            for key, info in saved.items():
                if key not in _PLUGINS:
                    _install(info)
            loader.restore_state(state)


# ---- plans --------------------------------------------------------------------------------------------

def plan_records(nodes: Sequence[Any]) -> list[dict[str, Any]]:
    """What a plan records of the plugins its steps use: [{domain, op, version}], sorted, once each. The
    steps themselves carry each node's attributes, as data."""
    seen: dict[tuple[str, str], int] = {}
    for n in nodes:
        info = _PLUGINS.get((n.domain, n.op_type)) if n.domain not in _ONNX_DOMAINS else None
        if info is not None:
            seen[(info.domain, info.op)] = info.version
    return [{"domain": d, "op": o, "version": v} for (d, o), v in sorted(seen.items())]


def check_plan_records(records: Sequence[tuple[str, str, int]], nodes: Sequence[Any], where: str) -> None:
    """A plan's plugin records against this process: every plugin it lists is registered at the version it
    was built with, and every step whose op no built-in claims is a plugin it lists. PlanFormatError of one
    line otherwise, naming the plugin, its version and how to register it."""
    from kiln.ops.registry import is_registered
    at = "" if where == "plan" else f"{where}: "
    listed = {(d, o): v for d, o, v in records}
    for n in nodes:
        domain = "" if n.domain == "ai.onnx" else n.domain
        if domain and not is_registered(n.op_type, domain) and (domain, n.op_type) not in listed:
            raise PlanFormatError(f"{at}layer '{n.name}' uses op {n.op_type} (domain {domain}), which is neither a "
                                  "built-in op nor a plugin the plan lists")
    used = {(("" if n.domain == "ai.onnx" else n.domain), n.op_type) for n in nodes}
    for (domain, op), version in listed.items():
        if (domain, op) not in used:
            raise PlanFormatError(f"{at}plan lists {describe(op, domain, version)}, which no layer uses")
        if is_registered(op, domain):
            raise PlanFormatError(f"{at}plan lists {describe(op, domain, version)}, but {op} (domain {domain}) "
                                  "is a built-in op of this Kiln; rebuild the plan")
        info = get_plugin(op, domain)
        if info is None:
            raise PlanFormatError(f"{at}plan needs {describe(op, domain, version)}, which is not registered; "
                                  "register it before loading the plan (install the package providing it as a "
                                  "'kiln.plugins' entry point, or call kiln.plugins.load('path/to/plugin.py'))")
        if info.version != version:
            raise PlanFormatError(f"{at}plan was built with {describe(op, domain, version)}, but version "
                                  f"{info.version} is registered; register version {version} or rebuild the plan")


def records_from_json(x: Any, fail: Any, limit: int) -> list[tuple[str, str, int]]:
    """A plan's `plugins` list (untrusted JSON) as (domain, op, version) triples; `fail(path, msg)` makes the
    error of one line for the first thing wrong."""
    if not isinstance(x, list):
        raise fail("plugins", f"expected a list, got {type(x).__name__}")
    if len(x) > limit:
        raise fail("plugins", f"{len(x)} entries, above the limit of {limit}")
    out: list[tuple[str, str, int]] = []
    seen: set[tuple[str, str]] = set()
    for i, r in enumerate(x):
        path = f"plugins[{i}]"
        if not isinstance(r, dict) or set(r) != {"domain", "op", "version"}:
            raise fail(path, f"expected {{domain, op, version}}, got {_show(r)}")
        domain, op, version = r["domain"], r["op"], r["version"]
        if not isinstance(domain, str) or domain in _ONNX_DOMAINS or not _DOMAIN.fullmatch(domain):
            raise fail(f"{path}.domain", f"expected a custom domain name, got {_show(domain)}")
        if not isinstance(op, str) or not _OP.fullmatch(op):
            raise fail(f"{path}.op", f"expected an op name, got {_show(op)}")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
            raise fail(f"{path}.version", f"expected an int in [1, {MAX_VERSION}], got {_show(version)}")
        if (domain, op) in seen:
            raise fail(path, f"lists {describe(op, domain)} twice")
        seen.add((domain, op))
        out.append((domain, op, version))
    return out


def _show(x: Any, limit: int = 60) -> str:
    r = repr(x)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _all_nodes(graph: Any) -> list[Any]:
    return [n for sub in graph.all_graphs() for n in sub.nodes]


def graph_records(graph: Any) -> list[dict[str, Any]]:
    """`plan_records` of every node of a graph and of its subgraphs."""
    return plan_records(_all_nodes(graph))


def check_graph_records(records: Sequence[tuple[str, str, int]], graph: Any, where: str) -> None:
    """`check_plan_records` over every node of a loaded plan's graph (subgraphs included)."""
    check_plan_records(records, _all_nodes(graph), where)
