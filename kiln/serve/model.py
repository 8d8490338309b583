"""What a served plan accepts, read from its header: tensors, profiles and the batch dimension.

Ray-free and torch-free: the HTTP protocol, the dynamic batcher and `kiln.ray.map_batches` share it.
A plan is *batched* when dim 0 of every input and every output is one batch dimension (the same symbol,
or the same static size): requests can then be stacked along dim 0, padded up to the profile's minimum
and split at its maximum. Other plans run one request per execute.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kiln.errors import KilnError

Dim = int | str | None


class ServeError(KilnError):
    """A request that cannot be answered; `status` is the HTTP status it maps to."""

    status = 500


class BadRequest(ServeError):
    """The request is malformed or does not fit the model (400)."""

    status = 400


class NotFound(ServeError):
    """No such model, version or route (404)."""

    status = 404


class ModelFailure(ServeError):
    """The model failed while running a batch (500)."""

    status = 500


class Unavailable(ServeError):
    """The model is shutting down or cannot take requests (503)."""

    status = 503


class RequestTimeout(ServeError):
    """The request got no result within its timeout (504)."""

    status = 504


# Kiln's element types (plan header names) that the KServe v2 protocol can carry, with numpy's types
NUMPY_TYPES: dict[str, Any] = {
    "bool": np.bool_, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "float16": np.float16, "float32": np.float32, "float64": np.float64, "bfloat16": "bfloat16",
}


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a Kiln element type name ('bfloat16' through ml_dtypes)."""
    t = NUMPY_TYPES[name]
    if t == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(t)


def show_shape(dims: Sequence[Dim]) -> str:
    """[N,3,16,16]: symbols by name, unknown dims as '?'."""
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, Kiln element type name, declared dims (int, symbol, or None)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)


@dataclass(frozen=True)
class Placement:
    """Where a checked request goes: its profile, its rows (dim 0 when batched) and its batching key."""

    profile: int
    rows: int
    key: Any


@dataclass(frozen=True)
class ModelSignature:
    """A plan's inputs, outputs and profile ranges, and whether requests can be batched along dim 0."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ranges: tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...]]], ...] = field(default=())
    batched: bool = False
    opts: tuple[dict[str, tuple[int, ...]], ...] = field(default=())

    @classmethod
    def from_header(cls, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]],
                    profiles: Sequence[Mapping[str, Any]], where: str = "plan") -> "ModelSignature":
        """From a plan header's `inputs`, `outputs` and `profiles`; KilnError (one line) for what cannot be served."""
        def spec(d: Mapping[str, Any], what: str) -> TensorSpec:
            name = str(d.get("name"))
            if d.get("kind", "tensor") != "tensor":
                raise KilnError(f"{where}: {what} '{name}' is a {d.get('kind')}; only tensors can be served")
            dtype = d.get("dtype")
            if dtype not in NUMPY_TYPES:
                raise KilnError(f"{where}: {what} '{name}' has element type {dtype}, which the KServe v2 "
                                "protocol cannot carry")
            shape = d.get("shape")
            if not isinstance(shape, (list, tuple)):
                raise KilnError(f"{where}: {what} '{name}' has no declared rank; it cannot be served")
            dims = tuple(d_ if isinstance(d_, (int, str)) and not isinstance(d_, bool) else None for d_ in shape)
            return TensorSpec(name, str(dtype), dims)

        ins = tuple(spec(d, "input") for d in inputs)
        outs = tuple(spec(d, "output") for d in outputs)
        ranges, opts = [], []
        for p in profiles or [{}]:
            r, o = {}, {}
            for s in ins:
                e = p.get(s.name) if isinstance(p, Mapping) else None
                if isinstance(e, Mapping) and "min" in e and "max" in e:
                    r[s.name] = (tuple(int(v) for v in e["min"]), tuple(int(v) for v in e["max"]))
                    o[s.name] = tuple(int(v) for v in e.get("opt", e["min"]))
            ranges.append(r)
            opts.append(o)
        first = [s.shape[0] if s.shape else None for s in ins + outs]
        batched = bool(ins) and first[0] is not None and all(f == first[0] for f in first)
        return cls(ins, outs, tuple(ranges), batched, tuple(opts))

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def _range(self, profile: int, s: TensorSpec) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        return self.ranges[profile].get(s.name) if self.ranges else None

    def batch_range(self, profile: int) -> tuple[int, int | None]:
        """(min, max) rows one execute takes under a profile; max None where nothing bounds it."""
        lo, hi = 1, None
        for s in self.inputs:
            d0 = s.shape[0]
            if isinstance(d0, int):
                return d0, d0
            r = self._range(profile, s)
            if r is not None:
                lo = max(lo, r[0][0])
                hi = r[1][0] if hi is None else min(hi, r[1][0])
        return lo, hi

    def batch_sizes(self, profile: int, max_batch: int) -> list[int]:
        """The batch sizes executes use under a profile: its min, the powers of two above it and the cap
        (max_batch or the profile's max, the smaller). A batch is padded up to the next of these, so an engine
        sees a few shapes (oneDNN primitives, CUDA graphs, arena layouts made once each), not every size."""
        lo, hi = self.batch_range(profile)
        cap = max(lo, max_batch if hi is None else min(hi, max_batch))
        sizes, k = {lo, cap}, 1
        while k < cap:
            if k > lo:
                sizes.add(k)
            k *= 2
        return sorted(sizes)

    def example(self, profile: int, rows: int) -> dict[str, np.ndarray]:
        """Zero inputs of `rows` rows with the profile's opt shape beyond dim 0 (warm-up data)."""
        feed = {}
        for s in self.inputs:
            opt = self.opts[profile].get(s.name) if self.opts else None
            dims = [d if isinstance(d, int) else (opt[i] if opt else 1) for i, d in enumerate(s.shape)]
            if self.batched:
                dims[0] = rows
            feed[s.name] = np.zeros(dims, dtype=s.np_dtype)
        return feed

    def max_rows(self) -> int | None:
        """The largest batch any profile takes (None: unbounded); 1 for a plan that is not batched."""
        if not self.batched:
            return 1
        his = [self.batch_range(p)[1] for p in range(max(len(self.ranges), 1))]
        return None if any(h is None for h in his) else max(h for h in his if h is not None)

    def check(self, inputs: Mapping[str, np.ndarray], max_rows: int | None = None) -> Placement:
        """Names, element types and shapes of one request against the plan; BadRequest (one line) naming the
        input, its shape and the allowed range. `max_rows` bounds dim 0 of a batched plan's request."""
        for n in inputs:
            if self.input(n) is None:
                raise BadRequest(f"unknown input '{n}'; inputs are: {', '.join(self.input_names)}")
        for s in self.inputs:
            if s.name not in inputs:
                raise BadRequest(f"missing input '{s.name}'; inputs are: {', '.join(self.input_names)}")
        rows, first = None, None
        for s in self.inputs:
            x = inputs[s.name]
            if x.dtype != s.np_dtype:
                raise BadRequest(f"input '{s.name}' has element type {x.dtype}, expected {s.dtype}")
            if len(x.shape) != len(s.shape) or any(isinstance(d, int) and d != n for d, n in zip(s.shape, x.shape)):
                raise BadRequest(f"input '{s.name}' has shape {show_shape(x.shape)}, expected {show_shape(s.shape)}")
            if self.batched:
                n = int(x.shape[0])
                if rows is None:
                    rows, first = n, s.name
                elif n != rows:
                    raise BadRequest(f"inputs disagree on the batch size: '{first}' has {rows} rows, "
                                     f"'{s.name}' has {n}")
        if self.batched:
            assert rows is not None
            if rows < 1:
                raise BadRequest(f"input '{first}' has shape {show_shape(inputs[first].shape)}: an empty batch")
            if max_rows is not None and rows > max_rows:
                raise BadRequest(f"input '{first}' has {rows} rows, more than the max batch {max_rows}")
        for p in range(max(len(self.ranges), 1)):
            if all(self._fits(p, s, inputs[s.name].shape) for s in self.inputs):
                key = (p, tuple((s.name, tuple(inputs[s.name].shape[1:])) for s in self.inputs)) if self.batched \
                    else object()
                return Placement(p, rows if rows is not None else 1, key)
        bad = next(s for s in self.inputs if not any(self._fits(p, s, inputs[s.name].shape)
                                                     for p in range(len(self.ranges))))
        allowed = " or ".join(show_shape(r[0]) + ".." + show_shape(r[1]) for r in
                              (self._range(p, bad) for p in range(len(self.ranges))) if r is not None)
        raise BadRequest(f"input '{bad.name}' has shape {show_shape(inputs[bad.name].shape)}, outside the "
                         f"profile range {allowed}")

    def _fits(self, profile: int, s: TensorSpec, shape: Sequence[int]) -> bool:
        r = self._range(profile, s)
        if r is None:
            return True
        skip = 1 if self.batched else 0  # the batch dim is padded or split to the profile, not checked
        return all(a <= n <= b for a, n, b in list(zip(r[0], shape, r[1]))[skip:])


def run_rows(execute: Callable[[dict[str, np.ndarray]], Mapping[str, Any]], sig: ModelSignature, profile: int,
             inputs: Mapping[str, np.ndarray], on_execute: Callable[[int, float], None] | None = None,
             sizes: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """One stacked batch through `execute`, split into pieces of at most the profile's max rows (or the largest
    of `sizes`) and each piece padded (repeating its last row) up to the profile's min, or up to the next of
    `sizes` (ModelSignature.batch_sizes); padded rows are dropped from the outputs.

    A plan that is not batched runs the inputs as they are. `on_execute(rows, seconds)` is told each execute's
    real rows and duration.
    An output whose dim 0 does not follow the batch is a ModelFailure."""
    if not sig.batched:
        t0 = time.perf_counter()
        outs = execute(dict(inputs))
        if on_execute is not None:
            on_execute(1, time.perf_counter() - t0)
        return {n: np.asarray(outs[n]) for n in sig.output_names}
    rows = int(next(iter(inputs.values())).shape[0])
    lo, hi = sig.batch_range(profile)
    step = rows if hi is None else hi
    if sizes:
        step = min(step, max(sizes))
    parts: dict[str, list[np.ndarray]] = {n: [] for n in sig.output_names}
    for a in range(0, rows, step):
        b = min(a + step, rows)
        n = b - a
        size = max(lo, next((k for k in sorted(sizes) if k >= n), n) if sizes else n)
        feed = {}
        for name, x in inputs.items():
            piece = x[a:b]
            if n < size:
                piece = np.concatenate([piece, np.repeat(piece[-1:], size - n, axis=0)])
            feed[name] = np.ascontiguousarray(piece)
        t0 = time.perf_counter()
        outs = execute(feed)
        if on_execute is not None:
            on_execute(n, time.perf_counter() - t0)
        for name in sig.output_names:
            o = np.asarray(outs[name])
            if o.ndim == 0 or o.shape[0] != size:
                raise ModelFailure(f"output '{name}' has shape {show_shape(o.shape)} for a batch of {size}: "
                                   "the plan's outputs do not follow its batch dimension")
            parts[name].append(o[:n])
    return {name: v[0] if len(v) == 1 else np.concatenate(v) for name, v in parts.items()}
