"""Plans: the builder's output and the runtime's input.

The names below come from kiln.plan.format on first use, so that importing a torch-free submodule
(kiln.plan.header, kiln.plan.inspect: `kiln inspect`) does not import torch through this package.
"""
from typing import Any

__all__ = ["FORMAT_VERSION", "Plan", "load_plan", "plan_from_bytes", "plan_to_bytes", "save_plan"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kiln.plan import format
        return getattr(format, name)
    raise AttributeError(f"module 'kiln.plan' has no attribute {name!r}")
