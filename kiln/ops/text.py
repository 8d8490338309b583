"""Text-feature ops on integer token tensors: TfIdfVectorizer (string pools are unsupported: no torch dtype)."""
from __future__ import annotations

from typing import Any

import torch

from kiln.errors import UnsupportedDTypeError
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ir.dtype import DType
from kiln.ops.registry import OpDef, register


def _gram_table(node: Node) -> dict[tuple[int, ...], int]:
    """Pool n-grams (grouped by length through ngram_counts) -> output index."""
    pool = node.attr("pool_int64s")
    if pool is None:
        raise UnsupportedDTypeError(f"node '{node.name}': TfIdfVectorizer with pool_strings needs string tensors")
    starts = list(node.attr("ngram_counts")) + [len(pool)]
    indexes = node.attr("ngram_indexes")
    table: dict[tuple[int, ...], int] = {}
    k = 0
    for n, (lo, hi) in enumerate(zip(starts[:-1], starts[1:]), start=1):
        for i in range(lo, hi, n):
            table[tuple(pool[i:i + n])] = indexes[k]
            k += 1
    return table


@register
class TfIdfVectorizer(OpDef):
    op_type = "TfIdfVectorizer"

    def infer(self, node: Node, types: Any, consts: Any) -> list[TensorType]:
        width = max(node.attr("ngram_indexes")) + 1
        t = types[0]
        if t is None or t.shape is None:
            return [TensorType(DType.FLOAT32, None)]
        return [TensorType(DType.FLOAT32, (width,) if len(t.shape) == 1 else (t.shape[0], width))]

    def compute(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        table = _gram_table(node)
        width = max(node.attr("ngram_indexes")) + 1
        lo, hi = int(node.attr("min_gram_length")), int(node.attr("max_gram_length"))
        max_skip = int(node.attr("max_skip_count", 0))
        rows = x.reshape(1, -1).tolist() if x.dim() == 1 else x.tolist()
        counts = torch.zeros(len(rows), width, dtype=torch.float32)
        for r, row in enumerate(rows):
            for n in range(lo, hi + 1):
                for skip in range(max_skip + 1 if n > 1 else 1):
                    step = skip + 1
                    for s in range(len(row) - (n - 1) * step):
                        idx = table.get(tuple(row[s + j * step] for j in range(n)))
                        if idx is not None:
                            counts[r, idx] += 1
        mode = node.attr("mode", "TF")
        weights = node.attr("weights")
        w = torch.ones(width)
        if weights:  # one weight per pool n-gram, placed at that n-gram's output index
            w[torch.tensor(node.attr("ngram_indexes"))] = torch.tensor(weights, dtype=torch.float32)
        if mode == "IDF":
            counts = (counts > 0).float() * w
        elif mode == "TFIDF":
            counts = counts * w
        out = counts[0] if x.dim() == 1 else counts
        return out.to(x.device)
