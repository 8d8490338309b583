"""onnx.backend.base.Backend over Kiln: prepare() builds a plan (round-tripped through bytes), run() executes it."""
from __future__ import annotations

from typing import Any

import onnx
import torch
from onnx.backend.base import Backend, BackendRep

from kiln.builder import Builder, BuilderConfig
from kiln.logger import Logger
from kiln.plan.format import plan_from_bytes, plan_to_bytes
from kiln.runtime.engine import Engine


class KilnBackendRep(BackendRep):
    """A prepared model: an Engine and one ExecutionContext."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.context = engine.create_execution_context()

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        if isinstance(inputs, dict):
            feeds = inputs
        else:
            if not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            feeds = dict(zip(self.engine.input_names, inputs))
        outs = self.context.execute(feeds)
        return tuple(outs[n] for n in self.engine.output_names)


class KilnBackend(Backend):
    """ONNX backend interface for the conformance suite (CPU; CUDA where a GPU is present)."""

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> KilnBackendRep:
        dev = "cuda" if device.upper().startswith("CUDA") else "cpu"
        plan = Builder(Logger()).build(model, BuilderConfig(device=dev))
        return KilnBackendRep(Engine(plan_from_bytes(plan_to_bytes(plan))))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        d = device.upper()
        return d == "CPU" or (d.startswith("CUDA") and torch.cuda.is_available())


prepare = KilnBackend.prepare
run_model = KilnBackend.run_model
supports_device = KilnBackend.supports_device
