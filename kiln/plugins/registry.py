"""Plugin registry: user-provided op definitions for custom ops, consulted after built-in ops."""
from __future__ import annotations

from kiln.ops.registry import OpDef

_PLUGINS: dict[tuple[str, str], OpDef] = {}


def register_plugin(opdef: OpDef, op_type: str | None = None, domain: str | None = None) -> None:
    """Make `opdef` the implementation of a custom op (domain, op_type)."""
    name = op_type or (opdef.op_type if isinstance(opdef.op_type, str) else opdef.op_type[0])
    _PLUGINS[(domain if domain is not None else opdef.domain, name)] = opdef


def find_plugin(op_type: str, domain: str) -> OpDef | None:
    return _PLUGINS.get((domain, op_type))
