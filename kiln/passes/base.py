"""Pass infrastructure: a Pass rewrites a Graph and says whether it changed; PassManager runs them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.errors import BuildError, KilnError
from kiln.ir.graph import Graph
from kiln.logger import Logger


@dataclass
class PassContext:
    """What passes may consult: the logger, target device type, precision flags, input shapes in force."""

    logger: Logger
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


class Pass:
    """A graph rewrite. `run` returns True when it modified the graph."""

    name: str = "pass"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        raise NotImplementedError


class Fixpoint(Pass):
    """Repeats a group of passes until none modifies the graph (bounded)."""

    def __init__(self, name: str, passes: list[Pass], max_iters: int = 8) -> None:
        self.name, self.passes, self.max_iters = name, passes, max_iters

    def run(self, g: Graph, ctx: PassContext) -> bool:
        any_change = False
        for _ in range(self.max_iters):
            changed = False
            for p in self.passes:
                changed |= PassManager([p]).run(g, ctx)
            any_change |= changed
            if not changed:
                break
        return any_change


class PassManager:
    """Runs passes in order; logs "After <pass>: N layers" at verbose level when a pass changes the graph."""

    def __init__(self, passes: list[Pass]) -> None:
        self.passes = passes

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        for p in self.passes:
            try:
                modified = p.run(g, ctx)
            except KilnError:
                raise
            except (Exception, RecursionError) as e:  # a model that breaks a pass is reported, not a traceback
                if isinstance(p, Fixpoint):
                    raise
                msg = (str(e).strip().splitlines() or [""])[0][:200]
                raise BuildError(f"pass '{p.name}' failed on this model: {type(e).__name__}: {msg}") from e
            if modified and not isinstance(p, Fixpoint):
                ctx.logger.verbose(f"After {p.name}: {len(g.nodes)} layers")
            changed |= modified
        return changed
