"""Kiln's intermediate representation."""
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.printer import format_graph
from kiln.ir.types import Dim, QuantParams, TensorType

__all__ = ["DType", "Dim", "Graph", "Node", "QuantParams", "TensorType", "Value", "format_graph"]
