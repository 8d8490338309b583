"""Runtime: Engine (loaded plan) and ExecutionContext."""
from kiln.runtime.engine import Engine, ExecutionContext

__all__ = ["Engine", "ExecutionContext"]
