"""THE ordered list of graph passes the builder runs. Read top to bottom."""
from __future__ import annotations

from kiln.passes.base import Fixpoint, Pass
from kiln.passes.dce import DeadCodeElimination
from kiln.passes.fold import FoldConstants


def default_pipeline() -> list[Pass]:
    return [
        Fixpoint("simplify", [FoldConstants(), DeadCodeElimination()]),
    ]
