"""Offline batch inference with a Kiln plan over a Ray Dataset (Ray Data), on a laptop or a cluster.

    import ray, kiln.ray
    ds = kiln.ray.npy_dataset("shards/", input_name="x")          # or image_dataset(folder, "model.kiln", ...)
    kiln.ray.map_batches("model.kiln", ds, output="out/", format="parquet")

One Engine per actor (a callable class in `Dataset.map_batches`), batches of the plan's largest profile
batch by default, Ray Data's own progress bars. Ray is imported on first use: `import kiln` never imports it.
"""
from __future__ import annotations

import os
import types
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from kiln.errors import KilnError

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

__all__ = ["map_batches", "npy_dataset", "image_dataset", "PlanPredictor"]

FORMATS = ("npy", "parquet")


def _plan_bytes(plan: str | os.PathLike | bytes) -> tuple[str, bytes]:
    from kiln.plan.header import read_plan_file
    if isinstance(plan, (bytes, bytearray)):
        return "plan", bytes(plan)
    return read_plan_file(plan)


def _signature(where: str, data: bytes) -> Any:
    """The plan's signature, after a full load where its device is here (else every check short of kernels)."""
    import torch

    from kiln.plan.format import plan_from_bytes
    from kiln.runtime.engine import Engine, check_plan
    from kiln.serve.model import ModelSignature
    plan = plan_from_bytes(data, where)
    if plan.target.get("device") == "cpu" or torch.cuda.is_available():
        Engine(plan, where).close()
    else:
        check_plan(plan, where)
    return ModelSignature.from_header(plan.inputs, plan.outputs, plan.profiles, where)


class PlanPredictor:
    """The callable class Ray Data runs on each actor: one Engine and one execution context per actor.

    A batch (a dict of numpy columns) feeds the plan's inputs from `columns` (input name -> column); the
    plan's outputs are added as columns and the other columns are passed through (ids, paths). Each batch is
    split at the profile's max rows and a short last batch padded to `batch_size`, so the engine sees one
    batch shape."""

    def __init__(self, plan: list, where: str, columns: Mapping[str, str], batch_size: int, threads: int) -> None:
        import ray
        import torch

        from kiln.serve.model import ModelSignature
        from kiln.serve.plans import load_engine
        torch.set_num_threads(threads)
        data = plan[0] if isinstance(plan[0], (bytes, bytearray)) else ray.get(plan[0])
        self.engine: Any = load_engine(data, where)
        p = self.engine.plan
        self.sig = ModelSignature.from_header(p.inputs, p.outputs, p.profiles, where)
        self.ctx = self.engine.create_execution_context()
        self.columns = dict(columns)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from kiln.serve.model import run_rows
        feed = {name: np.ascontiguousarray(np.asarray(batch[col]).astype(spec.np_dtype, copy=False))
                for name, col, spec in ((s.name, self.columns[s.name], s) for s in self.sig.inputs)}
        place = self.sig.check(feed)
        outs = run_rows(self.ctx.execute, self.sig, place.profile, feed, sizes=[self.batch_size]
                        if self.sig.batched else None)
        used = set(self.columns.values())
        result = {k: v for k, v in batch.items() if k not in used}
        result.update(outs)
        return result


def map_batches(plan: str | os.PathLike | bytes, dataset: "ray.data.Dataset", *, batch_size: int | None = None,
                output: str | os.PathLike | None = None, format: str = "npy",
                columns: Mapping[str, str] | None = None, concurrency: int | tuple[int, int] = 1,
                num_cpus: float = 1.0, num_gpus: float | None = None) -> "ray.data.Dataset | list[str]":
    """Run a plan over every row of `dataset` with Ray Data; one Engine per actor.

    dataset: rows are samples; the plan's batch dimension (dim 0 of every input and output) is the batch.
    columns: plan input -> dataset column (default: the same names; a one-input plan also takes a dataset
        whose only column has another name). Other columns pass through to the result.
    batch_size: rows per batch (default: the plan's largest profile batch; larger batches are split).
    output: a folder to write: `parquet` (one file per block, every column) or `npy` (a sub-folder per plan
        output, `Dataset.write_numpy`); None returns the lazy result Dataset instead.
    concurrency: actors (or a (min, max) autoscaling range); num_cpus / num_gpus: per actor (a CUDA plan asks
        for 1 GPU unless given).
    Returns the Dataset, or the folders written. KilnError (one line) for a bad plan, column or option.
    """
    import ray
    import ray.data

    if format not in FORMATS:
        raise KilnError(f"map_batches: format must be one of {', '.join(FORMATS)}, got {format!r}")
    where, data = _plan_bytes(plan)
    sig = _signature(where, data)
    if not sig.batched:
        raise KilnError(f"{where}: the plan's inputs and outputs share no batch dimension (dim 0); "
                        "map_batches feeds dataset rows along it")
    names = list(dataset.schema().names) if dataset.schema() is not None else []
    cols = dict(columns or {})
    for s in sig.inputs:
        if s.name in cols:
            continue
        if s.name in names:
            cols[s.name] = s.name
        elif len(sig.inputs) == 1 and len(names) == 1:
            cols[s.name] = names[0]
        else:
            raise KilnError(f"map_batches: the dataset has no column for input '{s.name}' (columns: "
                            f"{', '.join(names) or 'none'}); pass columns={{'{s.name}': COLUMN}}")
    bad = next((c for c in cols.values() if c not in names), None)
    if bad is not None:
        raise KilnError(f"map_batches: the dataset has no column '{bad}' (columns: {', '.join(names)})")
    largest = sig.max_rows()
    if batch_size is None:
        batch_size = largest if largest is not None else 64
    if batch_size < 1:
        raise KilnError(f"map_batches: batch_size must be >= 1, got {batch_size}")
    from kiln.plan.header import header_from_bytes
    device = str(header_from_bytes(data, where).header.get("target", {}).get("device"))
    gpus = num_gpus if num_gpus is not None else (1.0 if device == "cuda" else 0.0)
    pad_to = min(batch_size, largest) if largest is not None else batch_size
    args = ([ray.put(data)], where, cols, pad_to, max(1, int(num_cpus)))
    pool = ray.data.ActorPoolStrategy(size=concurrency) if isinstance(concurrency, int) else \
        ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    out = dataset.map_batches(PlanPredictor, fn_constructor_args=args, batch_size=batch_size, batch_format="numpy",
                              compute=pool, num_cpus=num_cpus, num_gpus=gpus)
    if output is None:
        return out
    output = os.fspath(output)
    if format == "parquet":
        out.write_parquet(output)
        return [output]
    out = out.materialize()
    written = []
    for name in sig.output_names:
        folder = os.path.join(output, name)
        out.write_numpy(folder, column=name)
        written.append(folder)
    return written


def npy_dataset(paths: str | os.PathLike | Sequence[str], input_name: str = "data") -> "ray.data.Dataset":
    """A Dataset of the rows (first-axis slices) of .npy shards: a folder of them, or a list of files, as one
    column named `input_name` (the plan input it feeds)."""
    import ray.data
    ds = ray.data.read_numpy(paths if isinstance(paths, (list, tuple)) else os.fspath(paths))
    return ds.rename_columns({"data": input_name}) if input_name != "data" else ds


def image_dataset(folder: str | os.PathLike, plan: str | os.PathLike | bytes, preprocess: str = "",
                  include_paths: bool = True) -> "ray.data.Dataset":
    """A Dataset of the images in `folder`, decoded and preprocessed for a one-input image plan: one column
    named after the input, in its layout, plus `path`. `preprocess` takes the `kiln build --calib-preprocess`
    spec (resize, crop, scale, mean, std, order, layout)."""
    import ray.data

    from kiln.quant.images import IMAGE_EXTS, Preprocess
    where, data = _plan_bytes(plan)
    from kiln.plan.header import header_from_bytes
    inputs = header_from_bytes(data, where).header.get("inputs", [])
    if len(inputs) != 1:
        raise KilnError(f"image_dataset: {where} has {len(inputs)} inputs; images feed a one-input plan")
    spec = inputs[0]
    pre = Preprocess.parse(preprocess)
    inp = types.SimpleNamespace(name=spec["name"], type=types.SimpleNamespace(shape=spec.get("shape")))
    pre.geometry(inp)  # a bad spec fails here, before any file is read
    name = spec["name"]

    def decode(row: dict[str, Any]) -> dict[str, Any]:
        import io

        from PIL import Image
        try:
            with Image.open(io.BytesIO(row["bytes"])) as img:
                img.load()
                x = pre.apply(img, inp)[0]
        except KilnError:
            raise
        except Exception as e:
            where_ = row.get("path", "an image")
            raise KilnError(f"image_dataset: cannot decode {where_} ({type(e).__name__})") from None
        return {name: x, "path": row["path"]} if include_paths else {name: x}

    exts = [e[1:] for e in IMAGE_EXTS]
    ds = ray.data.read_binary_files(os.fspath(folder), include_paths=True, file_extensions=exts)
    return ds.map(decode)
