"""Where plugins come from besides `@plugin` / `register_plugin` in code the user imports:

* Kiln's built-in plugins (`BUILTIN`), imported on the first plugin lookup;
* the `kiln.plugins` entry point group of installed packages, read once on the first plugin lookup: each
  entry point loads a module (which registers its plugins when imported), a callable (called with no
  arguments, it registers them) or an OpDef subclass or instance (registered). A broken entry point is a
  warning naming it, and whatever it registered before failing is unregistered;
* `load(path)`: a .py file the user names, imported as a module.

None of these is ever chosen by a plan or a model: a plan only names the plugins it needs, and loading it
fails when they are not registered (kiln.plugins.registry.check_plan_records).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import threading
import warnings
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator

from kiln.errors import KilnError
from kiln.ops.registry import OpDef
from kiln.plugins.registry import _PLUGINS, PluginError, line, register_plugin, unregister_plugin

GROUP = "kiln.plugins"
BUILTIN = ("kiln.plugins.detection",)
"""Modules of Kiln's own plugins (each registers its plugins when imported); a missing one is skipped."""

_LOCK = threading.RLock()
_state = {"builtins": False, "entry_points": False, "loading": False}
_files: dict[str, ModuleType] = {}


@contextmanager
def _all_or_nothing() -> Iterator[None]:
    """Plugins registered inside are unregistered again when the block raises."""
    before = dict(_PLUGINS)
    try:
        yield
    except BaseException:
        for (domain, op), info in list(_PLUGINS.items()):
            if before.get((domain, op)) is not info:
                unregister_plugin(op, domain)
        raise


def ensure_loaded() -> None:
    """Import the built-in plugins and read the entry points, each once (the first plugin lookup calls it).
    Other threads wait until that is done; the loading thread itself may look ops up meanwhile."""
    if _state["builtins"] and _state["entry_points"]:
        return
    with _LOCK:
        if _state["loading"] or (_state["builtins"] and _state["entry_points"]):
            return
        _state["loading"] = True
        try:
            if not _state["builtins"]:
                _state["builtins"] = True
                _import_builtins()
            if not _state["entry_points"]:
                load_entry_points()
                _state["entry_points"] = True
        finally:
            _state["loading"] = False


def _import_builtins() -> None:
    for name in BUILTIN:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except KilnError:
            raise
        except Exception as e:
            raise PluginError(f"Kiln's built-in plugins ({name}) failed to load: {type(e).__name__}: "
                              f"{line(e)}") from e


def load_entry_points() -> list[str]:
    """Load every `kiln.plugins` entry point; returns the names of those that failed (each also a warning)."""
    try:
        eps = list(importlib.metadata.entry_points(group=GROUP))
    except Exception as e:
        warnings.warn(f"kiln: cannot read the '{GROUP}' entry points ({type(e).__name__}: {line(e)})",
                      RuntimeWarning, stacklevel=2)
        return []
    failed = []
    for ep in eps:
        try:
            with _all_or_nothing():
                _apply(ep.load())
        except Exception as e:
            failed.append(ep.name)
            warnings.warn(f"kiln: plugin entry point '{ep.name}' ({ep.value}) failed to load, its plugins are not "
                          f"registered: {type(e).__name__}: {line(e)}", RuntimeWarning, stacklevel=2)
    return failed


def _apply(obj: Any) -> None:
    """What an entry point loaded: a module registered its plugins on import; anything else registers now."""
    if isinstance(obj, ModuleType):
        return
    if (isinstance(obj, type) and issubclass(obj, OpDef)) or isinstance(obj, OpDef):
        register_plugin(obj)
    elif callable(obj):
        obj()
    else:
        raise PluginError(f"loads a {type(obj).__name__}, not a module, a callable or an OpDef")


def load(path: str | os.PathLike[str]) -> ModuleType:
    """Import the Python file at `path` as a module (its plugins register when it runs); returns the module.

    Loading the same file again returns the module loaded the first time. A file that does not exist or
    fails while it runs is a PluginError of one line, and nothing it registered stays registered."""
    shown = os.fspath(path)
    real = os.path.realpath(shown)
    with _LOCK:
        if real in _files:
            return _files[real]
        if not os.path.isfile(real):
            raise PluginError(f"{shown}: no such plugin file")
        stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(real))[0])
        name = f"kiln_plugin_{stem}_{hashlib.sha1(real.encode()).hexdigest()[:10]}"
        spec = importlib.util.spec_from_file_location(name, real)
        if spec is None or spec.loader is None:
            raise PluginError(f"{shown}: cannot be imported as a Python module (expected a .py file)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # as an import does: dataclasses and pickling look their module up there
        try:
            with _all_or_nothing():
                spec.loader.exec_module(module)
        except KilnError as e:
            sys.modules.pop(name, None)
            raise PluginError(f"{shown}: {e}") from e
        except Exception as e:
            sys.modules.pop(name, None)
            raise PluginError(f"{shown}: the plugin file failed to load ({type(e).__name__}: {line(e)})") from e
        _files[real] = module
        return module


def save_state() -> tuple[dict[str, bool], dict[str, ModuleType]]:
    """What `restore_state` puts back (kiln.plugins.registry.isolated)."""
    return dict(_state), dict(_files)


def restore_state(saved: tuple[dict[str, bool], dict[str, ModuleType]]) -> None:
    flags, files = saved
    with _LOCK:
        for real, module in list(_files.items()):
            if real not in files:
                sys.modules.pop(module.__name__, None)
                del _files[real]
        _files.update(files)
        _state.update(flags)


def forget_entry_points() -> None:
    """Read the entry points again on the next plugin lookup."""
    _state["entry_points"] = False
