"""Plugins: custom op implementations the importer falls back to."""
from kiln.plugins.registry import find_plugin, register_plugin

__all__ = ["find_plugin", "register_plugin"]
