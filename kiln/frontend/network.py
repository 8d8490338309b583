"""NetworkDefinition: build a network layer by layer (the alternative to importing ONNX)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import Dim, TensorType
from kiln.ops.registry import lookup


class NetworkDefinition:
    """Layer-by-layer network construction. Layers are ONNX ops by name, resolved through the op registry.

    net = NetworkDefinition()
    x = net.add_input("x", DType.FLOAT32, ("N", 3, 32, 32))
    w = net.add_constant(np.random.randn(8, 3, 3, 3).astype(np.float32))
    y = net.add_layer("Conv", [x, w], pads=[1, 1, 1, 1])
    net.mark_output(net.add_layer("Relu", [y]), "y")
    """

    def __init__(self, name: str = "network", opset: int = 21) -> None:
        self.graph = Graph(name)
        self.graph.opsets = {"": opset}
        self.opset = opset

    def add_input(self, name: str, dtype: DType, shape: Sequence[Dim]) -> Value:
        if any(v.name == name for v in self.graph.inputs):
            raise KilnError(f"network already has an input named '{name}'")
        v = Value(self.graph.unique_name(name), TensorType(dtype, tuple(shape)))
        self.graph.inputs.append(v)
        return v

    def add_constant(self, data: np.ndarray | torch.Tensor, name: str = "const") -> Value:
        t = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(data))
        return self.graph.constant(name, t.detach().clone())

    def add_layer(self, op_type: str, inputs: Sequence[Value | None], num_outputs: int = 1, name: str = "",
                  domain: str = "", **attrs: Any) -> Any:
        """Append a layer; returns its output Value (or a list when num_outputs > 1)."""
        name = name or self.graph.unique_name(op_type.lower())
        opdef = lookup(op_type, domain, self.opset if not domain else None, where=name)
        outs = [self.graph.new_value(f"{name}_out{i}" if num_outputs > 1 else f"{name}_out") for i in range(num_outputs)]
        node = Node(op_type, list(inputs), outs, attrs, name=name, domain=domain, opset=self.opset)
        opdef.check(node)
        types = opdef.infer(node, [None if v is None else v.type for v in inputs],
                            [None if v is None else v.const for v in inputs])
        for v, t in zip(outs, types):
            v.type = t
        self.graph.add_node(node)
        return outs[0] if num_outputs == 1 else outs

    def mark_output(self, value: Value, name: str | None = None) -> None:
        if name and name != value.name:
            ident = self.add_layer("Identity", [value], name=f"{name}_identity")
            self.graph._names.discard(name)
            ident.name = self.graph.unique_name(name)
            value = ident
        self.graph.outputs.append(value)
