"""The plans `kiln serve` will run, loaded and checked in this process before Ray starts."""
from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import KilnError
from kiln.serve.config import ServeConfig
from kiln.serve.model import ModelSignature


@dataclass
class ServedModel:
    """One plan as served: its name, bytes (shipped to the replicas through Ray's object store, so workers on
    other nodes need no copy of the file), signature, target device and effective dynamic-batching limit."""

    name: str
    path: str
    data: bytes
    sig: ModelSignature
    device: str
    max_batch: int
    notes: list[str] = field(default_factory=list)


def load_engine(data: bytes, where: str) -> object:
    """An Engine from a plan file's bytes (the replicas' loader; KilnError of one line on a bad plan)."""
    from kiln.plan.format import plan_from_bytes
    from kiln.runtime.engine import Engine
    return Engine(plan_from_bytes(data, where), where)


def prepare(cfg: ServeConfig) -> list[ServedModel]:
    """Read every plan, load it fully where its device is here (else check everything short of building its
    kernels: a CUDA plan served from a head node without a GPU), and derive what the server needs."""
    import torch

    from kiln.plan.format import plan_from_bytes
    from kiln.plan.header import read_plan_file
    from kiln.runtime.engine import Engine, check_plan

    cfg.validate()
    models = []
    for i, (name, path) in enumerate(zip(cfg.names, cfg.plans)):
        asked = cfg.max_batch_of(i)
        where, data = read_plan_file(path)
        plan = plan_from_bytes(data, where)
        device = str(plan.target.get("device"))
        notes: list[str] = []
        if device == "cpu" or (device == "cuda" and torch.cuda.is_available()):
            Engine(plan, where).close()
        else:
            check_plan(plan, where)
            notes.append(f"model '{name}': plan targets {device}, not present here; loaded only on the replicas")
        sig = ModelSignature.from_header(plan.inputs, plan.outputs, plan.profiles, where)
        largest = sig.max_rows()
        if not sig.batched:
            max_batch = 1
            if asked is not None and asked > 1:
                notes.append(f"model '{name}': its inputs and outputs share no batch dimension (dim 0); "
                             "requests run one at a time, --max-batch does not apply")
        elif asked is not None:
            max_batch = asked
            if largest is not None and max_batch > largest:
                notes.append(f"model '{name}': --max-batch {max_batch} is above the profile's {largest} rows; "
                             f"larger batches run as several executes")
        else:
            max_batch = largest if largest is not None else 16
        models.append(ServedModel(name, where, bytes(data), sig, device, max_batch, notes))
    if cfg.num_gpus is not None and not any(m.device == "cuda" for m in models):
        raise KilnError("--num-gpus: every plan targets the CPU; GPUs are only asked for CUDA plans")
    return models
