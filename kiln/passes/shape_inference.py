"""The type inference pass. The graph-level driver lives in kiln.ops.infer (the plan loader uses it
too, and the runtime imports nothing from kiln.passes); it is re-exported here for existing imports."""
from __future__ import annotations

from kiln.ir.graph import Graph
from kiln.ops.infer import _reshape_to_shape_of, infer_types
from kiln.ops.infer import merge_types as _merge
from kiln.passes.base import Pass, PassContext

__all__ = ["InferTypes", "infer_types"]
_ = (_merge, _reshape_to_shape_of)  # old private names, kept importable


class InferTypes(Pass):
    """Re-runs type inference once folding has turned shape inputs into constants (the types set at
    load time could not read them); only types change, so it never counts as a rewrite."""

    name = "type inference"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        infer_types(g, ctx.logger)
        return False
