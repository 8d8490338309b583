"""Op definitions, one module per family; each module registers its OpDefs on import."""
from kiln.ops.registry import OpDef, all_ops, is_registered, lookup, register, simple_op

__all__ = ["OpDef", "all_ops", "is_registered", "lookup", "register", "simple_op"]
