"""Plugins: custom ops (domain, name, version) with a torch reference and optional tactics; docs/PLUGINS.md.

    from kiln.plugins import plugin          # @plugin on an OpDef subclass registers it
    kiln.plugins.register_plugin(instance)   # the same from code
    kiln.plugins.load("my_plugin.py")        # import a file the user names
    # and the `kiln.plugins` entry point group of installed packages, read on the first plugin lookup
"""
from kiln.plugins.loader import load, load_entry_points
from kiln.plugins.registry import (PluginError, PluginInfo, find_plugin, get_plugin, isolated, plugin, register_plugin,
                                   registered, unregister_plugin)

__all__ = ["PluginError", "PluginInfo", "find_plugin", "get_plugin", "isolated", "load", "load_entry_points", "plugin",
           "register_plugin", "registered", "unregister_plugin"]
