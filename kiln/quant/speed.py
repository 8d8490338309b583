"""INT8 by measured speed: which conv/gemm layers run on integer kernels, chosen by timing them both ways.

An integer kernel is not always the faster one (on an H200 the Triton int8 convs are ~2x slower than cuDNN's FP16
convs on memory-bound layers), and a layer that changes precision puts reformat layers on the tensors between it
and its neighbours. As TensorRT does, the builder (BuilderConfig.int8_by_speed, `kiln build --int8-layers speed`)
keeps a layer in INT8 only where that is faster counting those reformats:

* beside the graph with every eligible layer INT8 (that of `--int8-layers all`), the float graph is lowered with
  none INT8;
* each conv/gemm layer is timed both ways at the opt shape through the autotuner (its tactic choice, its timing
  cache: the final build re-times nothing), as are the reformats a boundary would add and the data-movement ops
  that run on int8 or float data depending on the choice;
* the labelling of least total time is found exactly (a minimum s-t cut; a layer constrained to "int8" stays so),
  and the float graph is lowered once more with the layers labelled float kept float.

Cost model, per *group*: a value that a layer (or a graph input, or any other op) produces, with the values that
int8 data movement (max pooling, reshapes: passes.quantize.COMMUTING_OPS) makes of it. The lowering
(kiln.passes.quantize) keeps a group int8 only when its producer and every reader are integer layers; otherwise
the producer writes float (the dequantize in its epilogue: its float-output time, plus a Cast to the low type where
the float side runs FP16/BF16) and each tensor of the group that an integer layer reads gets one QuantizeLinear
(shared by all its integer readers; plus a Cast to float32 where the float side runs FP16/BF16). So a group costs

    sum_u q(u) [some reader of u int8]  +  (out_f(P) - out_q(P)) [P int8]  -  K [P and all readers int8]

(K = what an all-int8 group saves: its quantizes, its producer's float output over its int8 output, and the
movers' float time over their int8 time). Both kinds of term are submodular, so `LabelingProblem` solves the whole
network exactly by one minimum cut. A K below zero (an all-int8 group slower than the same with float boundaries)
cannot be expressed that way; it is taken as zero and said so in the verbose log. Fixed costs (the float movers)
are counted too, so the estimates are the time of the conv/gemm layers, their reformats and movers; conversions
the lowering adds between float types are counted where the float side runs FP16/BF16 (on CUDA, FoldCasts may
fold some of them into a neighbouring conv/gemm).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.ops.qlayers import FLOAT, QuantSpec, quant_layer
from kiln.passes.quantize import moves_8bit_data
from kiln.passes.rewrite import Uses, is_op

_SCALE = 1_000_000  # costs (ms) become integer capacities of 1e-6 ms: the cut is exact on them
_LOW = (DType.FLOAT16, DType.BFLOAT16)


# -- the exact solver ----------------------------------------------------------------------------------------------
class LabelingProblem:
    """Binary labelling (True = int8) of n variables minimizing a sum of terms that a minimum s-t cut solves exactly:
    per-variable costs, "cost c when any of these is int8" and "cost c when any of these is float" (c >= 0), and
    variables fixed to one label."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.unary = [[0.0, 0.0] for _ in range(n)]
        self.any_int8: list[tuple[tuple[int, ...], float]] = []
        self.any_float: list[tuple[tuple[int, ...], float]] = []
        self.fixed: dict[int, bool] = {}
        self.constant = 0.0

    def fix(self, i: int, int8: bool) -> None:
        """Variable i takes this label whatever it costs (a labelling breaking it has infinite energy)."""
        self.fixed[i] = int8

    def add_unary(self, i: int, float_cost: float, int8_cost: float) -> None:
        """Variable i costs `float_cost` when float, `int8_cost` when int8 (any sign)."""
        self.unary[i][0] += float_cost
        self.unary[i][1] += int8_cost

    def add_any_int8(self, members: Sequence[int], cost: float) -> None:
        """`cost` (>= 0) once when at least one of `members` is int8."""
        self._check(cost)
        if members and cost > 0:
            self.any_int8.append((tuple(sorted(set(members))), cost))

    def add_any_float(self, members: Sequence[int], cost: float) -> None:
        """`cost` (>= 0) once when at least one of `members` is float (always, for no members)."""
        self._check(cost)
        if not members:
            self.constant += cost
        elif cost > 0:
            self.any_float.append((tuple(sorted(set(members))), cost))

    @staticmethod
    def _check(cost: float) -> None:
        if not cost >= 0:
            raise ValueError(f"a group cost must be >= 0 (submodular), got {cost}")

    def energy(self, labels: Sequence[bool]) -> float:
        """The total cost of one labelling."""
        if any(labels[i] != x for i, x in self.fixed.items()):
            return float("inf")
        e = self.constant + sum(self.unary[i][1 if labels[i] else 0] for i in range(self.n))
        e += sum(c for m, c in self.any_int8 if any(labels[i] for i in m))
        e += sum(c for m, c in self.any_float if not all(labels[i] for i in m))
        return e

    def solve(self) -> list[bool]:
        """A labelling of least energy (exact up to the 1e-6 rounding of the costs)."""
        # nodes: 0 = source (float side), 1 = sink (int8 side), 2.. = variables, then one helper per group term.
        # An edge u -> v of capacity c is cut (costs c) when u is on the float side and v on the int8 side.
        flow = _MaxFlow(2 + self.n + len(self.any_int8) + len(self.any_float))
        caps: list[tuple[int, int, int]] = []
        for i, (f, q) in enumerate(self.unary):
            low = min(f, q)
            if q > low:
                caps.append((0, 2 + i, _cap(q - low)))
            if f > low:
                caps.append((2 + i, 1, _cap(f - low)))
        k = 2 + self.n
        joins: list[tuple[int, int]] = []  # infinite edges
        for members, c in self.any_int8:  # helper on the int8 side (cost c) whenever a member is
            caps.append((0, k, _cap(c)))
            joins += [(k, 2 + i) for i in members]
            k += 1
        for members, c in self.any_float:  # helper on the float side (cost c) whenever a member is
            caps.append((k, 1, _cap(c)))
            joins += [(2 + i, k) for i in members]
            k += 1
        inf = sum(c for _, _, c in caps) + 1
        joins += [(2 + i, 1) if x else (0, 2 + i) for i, x in self.fixed.items()]
        for u, v, c in caps:
            flow.add(u, v, c)
        for u, v in joins:
            flow.add(u, v, inf)
        flow.run(0, 1)
        float_side = flow.reachable(0)
        return [(2 + i) not in float_side for i in range(self.n)]


def _cap(c: float) -> int:
    return max(0, round(c * _SCALE))


class _MaxFlow:
    """Dinic's maximum flow on integer capacities (exact), with the residual reachability that gives the cut."""

    def __init__(self, n: int) -> None:
        self.adj: list[list[int]] = [[] for _ in range(n)]
        self.to: list[int] = []
        self.cap: list[int] = []

    def add(self, u: int, v: int, c: int) -> None:
        self.adj[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(c)
        self.adj[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0)

    def run(self, s: int, t: int) -> int:
        total = 0
        while True:
            level = self._levels(s)
            if level[t] < 0:
                return total
            it = [0] * len(self.adj)
            while True:
                pushed = self._push(s, t, level, it)
                if not pushed:
                    break
                total += pushed

    def _levels(self, s: int) -> list[int]:
        level = [-1] * len(self.adj)
        level[s] = 0
        todo = deque([s])
        while todo:
            u = todo.popleft()
            for e in self.adj[u]:
                if self.cap[e] > 0 and level[self.to[e]] < 0:
                    level[self.to[e]] = level[u] + 1
                    todo.append(self.to[e])
        return level

    def _push(self, s: int, t: int, level: list[int], it: list[int]) -> int:
        """One augmenting path in the level graph (iterative DFS), its flow pushed; 0 when none is left."""
        path: list[int] = []
        u = s
        while True:
            if u == t:
                f = min(self.cap[e] for e in path)
                for e in path:
                    self.cap[e] -= f
                    self.cap[e ^ 1] += f
                return f
            adj = self.adj[u]
            while it[u] < len(adj):
                e = adj[it[u]]
                v = self.to[e]
                if self.cap[e] > 0 and level[v] == level[u] + 1:
                    break
                it[u] += 1
            else:  # a dead end: no more paths through u
                if not path:
                    return 0
                level[u] = -1
                e = path.pop()
                u = self.to[e ^ 1]
                it[u] += 1
                continue
            path.append(adj[it[u]])
            u = self.to[adj[it[u]]]

    def reachable(self, s: int) -> set[int]:
        seen = {s}
        todo = [s]
        while todo:
            u = todo.pop()
            for e in self.adj[u]:
                if self.cap[e] > 0 and self.to[e] not in seen:
                    seen.add(self.to[e])
                    todo.append(self.to[e])
        return seen


# -- the network's groups -------------------------------------------------------------------------------------------
@dataclass
class Group:
    """A value and the values int8 data movement makes of it (see the module doc)."""

    root: str
    producer: str | None  # the candidate layer producing the root, else None (a fixed-float producer)
    readers: dict[str, list[str]] = field(default_factory=dict)  # value -> candidate layers reading it as data
    movers: list[str] = field(default_factory=list)  # the data-movement nodes inside the group
    blocked: bool = False  # something else reads a value of the group (a float op, a graph output)


def groups(pre: Graph, candidates: set[str]) -> list[Group]:
    """The groups of the float graph `pre` that touch a candidate layer (as producer or reader)."""
    uses = Uses(pre)
    roots: list[Value] = [v for v in pre.inputs if not v.is_const]
    roots += [o for n in pre.nodes if not moves_8bit_data(n) for o in n.outputs]
    out = []
    for root in roots:
        p = root.producer
        grp = Group(root.name, p.name if p is not None and p.name in candidates else None)
        todo = [root]
        while todo:
            u = todo.pop()
            grp.blocked |= uses.is_output(u)
            for r in uses.of(u):
                if r.name in candidates and all(i in (0, 3) for i, x in enumerate(r.inputs) if x is u):
                    if r.name not in grp.readers.setdefault(u.name, []):
                        grp.readers[u.name].append(r.name)
                elif moves_8bit_data(r) and r.inputs[0] is u and sum(x is u for x in r.all_inputs) == 1:
                    grp.movers.append(r.name)
                    todo.append(r.outputs[0])
                else:
                    grp.blocked = True
        if grp.producer is not None or grp.readers:
            out.append(grp)
    return out


# -- measurement ---------------------------------------------------------------------------------------------------
def layer_time(tuner: Any, node: Node, types: Mapping[str, TensorType]) -> float | None:
    """One layer's time (ms) at the opt shape as the build would choose its tactic (the tests replace this)."""
    return tuner.time_layer(node, types)


class _Probes:
    """Layers the build may make, timed without a graph: a QuantizeLinear or Cast at a shape, an integer layer with
    a float output. The probe values stay alive (the autotuner caches constants by object id)."""

    def __init__(self, tuner: Any) -> None:
        self.tuner = tuner
        self.keep: list[Any] = []
        self.scale = Value("probe_scale", const=torch.tensor(0.05, dtype=torch.float32))
        self.zero = Value("probe_zero_point", const=torch.tensor(0, dtype=torch.int8))
        self.float_outs: dict[str, Node] = {}

    def _time(self, n: Node, types: Mapping[str, TensorType]) -> float | None:
        self.keep.append(n)
        return layer_time(self.tuner, n, types)

    def quantize(self, shape: tuple[int, ...]) -> float | None:
        x = Value(f"probe_q{len(self.keep)}", TensorType(DType.FLOAT32, shape))
        y = Value(f"probe_q{len(self.keep)}_int8", TensorType(DType.INT8, shape))
        return self._time(Node("QuantizeLinear", [x, self.scale, self.zero], [y], {}, name=y.name, opset=13), {})

    def cast(self, src: DType, dst: DType, shape: tuple[int, ...]) -> float | None:
        x = Value(f"probe_c{len(self.keep)}", TensorType(src, shape))
        y = Value(f"probe_c{len(self.keep)}_out", TensorType(dst, shape))
        return self._time(Node("Cast", [x], [y], {"to": dst.onnx}, name=y.name), {})

    def float_output_node(self, n: Node, types: Mapping[str, TensorType]) -> Node | None:
        """Integer layer n writing float32 (the lowering's attributes for a layer no Q follows), one per layer."""
        t = types.get(n.outputs[0].name)
        if t is None or not t.is_static:
            return None
        if n.name not in self.float_outs:
            y = Value(f"{n.name}#float_out", TensorType(DType.FLOAT32, t.shape))
            attrs = {k: v for k, v in n.attrs.items() if k not in ("y_scale", "y_zero_point")}
            attrs["out_dtype"] = FLOAT
            self.float_outs[n.name] = Node(n.op_type, list(n.inputs), [y], attrs, name=y.name, domain=n.domain,
                                           opset=n.opset)
        return self.float_outs[n.name]

    def float_output(self, n: Node, types: Mapping[str, TensorType]) -> float | None:
        """The time of `float_output_node`."""
        probe = self.float_output_node(n, types)
        return None if probe is None else self._time(probe, types)


def _shape(t: TensorType | None) -> tuple[int, ...] | None:
    return tuple(int(d) for d in t.shape) if t is not None and t.is_static else None  # type: ignore[union-attr]


class _Unmeasured(Exception):
    """A time the model needs could not be measured."""


@dataclass
class Choice:
    """The decision: candidate layers, their labels, the model's estimates and the per-layer times."""

    names: list[str]
    labels: list[bool]
    estimated_ms: dict[str, float]
    times: dict[str, tuple[float, float]]  # layer -> (int8 ms as lowered in the all-int8 graph, float ms)

    @property
    def int8(self) -> set[str]:
        return {n for n, x in zip(self.names, self.labels) if x}


class SpeedModel:
    """The cost model of the module doc for one network, built from measured times."""

    def __init__(self, g8: Graph, gf: Graph, pre: Graph, t8: Mapping[str, TensorType],
                 tf: Mapping[str, TensorType], tuner: Any, logger: Logger, float_name: str,
                 forced: set[str] | frozenset[str] = frozenset()) -> None:
        """forced: layers a precision constraint keeps INT8 whatever the times."""
        self.logger, self.float_name = logger, float_name
        q8 = {n.name: n for n in g8.nodes if quant_layer(n)}
        fl = {n.name: n for n in gf.nodes}
        self.names = [name for name in q8 if name in fl]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.problem = LabelingProblem(len(self.names))
        for name in forced:
            if name in self.index:
                self.problem.fix(self.index[name], True)
        self.times: dict[str, tuple[float, float]] = {}
        self.float_out: dict[str, float] = {}  # an int8-output layer's time writing float instead
        self.notes: list[str] = []
        probes = _Probes(tuner)
        g8_nodes = {n.name: n for n in g8.nodes}

        def need(ms: float | None, what: str) -> float:
            if ms is None:
                raise _Unmeasured(what)
            return ms

        def low_cast(name: str, to_float32: bool) -> float:
            """A Cast between the low type and float32 at value `name`, where the float side runs FP16/BF16."""
            t = tf.get(name)
            if t is None or t.dtype not in _LOW:
                return 0.0
            shape = need(_shape(t), f"the shape of {name}")  # type: ignore[arg-type]
            src, dst = (t.dtype, DType.FLOAT32) if to_float32 else (DType.FLOAT32, t.dtype)
            return need(probes.cast(src, dst, shape), f"a Cast at {name}")  # type: ignore[arg-type]

        t_q: dict[str, float | None] = {}
        t_fo: dict[str, float] = {}
        layers: list[tuple[Node, Mapping[str, TensorType]]] = []
        for name in self.names:  # every variant of every layer compiled in one parallel batch before timing
            layers += [(fl[name], tf), (q8[name], t8)]
            probe = probes.float_output_node(q8[name], t8) if QuantSpec.of(q8[name]).quantized_out else None
            layers += [(probe, t8)] if probe is not None else []
        tuner.precompile_layers(layers)
        for name in self.names:
            nq, nf = q8[name], fl[name]
            float_ms = need(layer_time(tuner, nf, tf), f"{name} in {float_name}")
            own = need(layer_time(tuner, nq, t8), f"{name} in int8")
            if QuantSpec.of(nq).quantized_out:
                t_q[name] = own
                t_fo[name] = self.float_out[name] = need(probes.float_output(nq, t8), f"{name} writing float")
            else:
                t_q[name], t_fo[name] = None, own
            self.times[name] = (own, float_ms)
        for grp in groups(pre, set(self.names)):
            p = grp.producer
            readers = [self.index[r] for rs in grp.readers.values() for r in rs]
            quantizes = 0.0
            for u, rs in grp.readers.items():
                shape = need(_shape(tf.get(u)), f"the shape of {u}")
                q = need(probes.quantize(shape), f"a QuantizeLinear at {u}")  # type: ignore[arg-type]
                q += low_cast(u, True)
                self.problem.add_any_int8([self.index[r] for r in rs], q)
                quantizes += q
                self.logger.verbose(f"INT8 by speed: a float {u} read by integer layer(s) {', '.join(rs)} costs a "
                                    f"quantize of {q:.4f} ms")
            movers_f = sum(need(layer_time(tuner, fl[m], tf), m) for m in grp.movers if m in fl)
            self.problem.constant += movers_f
            if p is None:
                continue
            i = self.index[p]
            out_f = t_fo[p] + low_cast(grp.root, False)
            self.problem.add_unary(i, self.times[p][1], out_f)
            if t_q[p] is None or grp.blocked or not readers:
                continue
            movers_q = sum(need(layer_time(tuner, g8_nodes[m], t8), m) for m in grp.movers if m in g8_nodes)
            saves = quantizes + (out_f - t_q[p]) + movers_f - movers_q  # type: ignore[operator]
            if saves < 0:
                self.notes.append(f"group {grp.root}: all int8 it is {-saves:.4f} ms slower than with float "
                                  "boundaries (its producer's int8 output, its movers on int8 data): counted equal")
                saves = 0.0
            self.problem.add_any_float([i] + readers, saves)
            self.problem.constant -= saves

    def choose(self) -> Choice:
        """The labelling of least total time, with the estimates for it, for all-int8 and for all-float."""
        labels = self.problem.solve()
        n = len(self.names)
        floats = [self.problem.fixed.get(i, False) for i in range(n)]  # the layers constrained to INT8 stay so
        est = {"chosen": self.problem.energy(labels), "all_int8": self.problem.energy([True] * n),
               "all_float": self.problem.energy(floats)}
        for note in self.notes:
            self.logger.verbose(f"INT8 by speed: {note}")
        for name, x in zip(self.names, labels):
            i8, f = self.times[name]
            out = f", writing float {self.float_out[name]:.4f} ms" if name in self.float_out else ""
            self.logger.verbose(f"INT8 by speed: {name}: {'int8' if x else self.float_name} (int8 {i8:.4f} ms{out}, "
                                f"{self.float_name} {f:.4f} ms)")
        return Choice(self.names, labels, {k: round(v, 4) for k, v in est.items()}, self.times)


def _fake_quantized(n: Node) -> bool:
    """A float conv/gemm left between Q/DQ nodes (no integer kernel for it): labelled float, it loses them."""
    x = n.inputs[0] if n.domain == "kiln" and n.op_type in ("FusedConv", "FusedGemm") and n.inputs else None
    return x is not None and is_op(x.producer, "DequantizeLinear")


def select_by_speed(g: Graph, pre: Graph, variant: Callable[[set[str]], Graph],
                    types_at: Callable[[Graph], Mapping[str, TensorType]], tuner: Any, logger: Logger,
                    float_name: str, forced: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
    """Keeps in float the layers of the all-int8 graph `g` that are faster so, by measurement (module doc).

    pre: the float graph before quantization; variant(exclude): `pre` lowered with the layers named kept float,
    reduced precision applied; types_at(graph): its value types at the opt shape; tuner: an Autotuner sharing the
    build's timing cache; forced: layers constrained to INT8 (`layer_precisions`). g becomes the final graph.
    Returns the plan's build entries `int8_speed` (counts and estimates) and `int8_speed_layers` (layer -> its
    precision); None when g has no integer layer, or when a time could not be measured (then g stays all-int8, with
    a warning)."""
    if not any(quant_layer(n) for n in g.nodes):
        return None
    convs = {n.name for n in pre.nodes if n.domain == "kiln" and n.op_type in ("FusedConv", "FusedGemm")}
    gf = variant(convs)
    try:
        model = SpeedModel(g, gf, pre, types_at(g), types_at(gf), tuner, logger, float_name, forced)
    except _Unmeasured as e:
        logger.warning(f"INT8 by measured speed: could not time {e}; every layer with an integer kernel runs int8")
        return None
    choice = model.choose()
    if len(choice.int8) < len(choice.names) or any(_fake_quantized(n) for n in g.nodes):
        final = variant(convs - choice.int8)
        g.__dict__.update(final.__dict__)
    ints = sum(1 for n in g.nodes if quant_layer(n))
    est = choice.estimated_ms
    logger.info(f"INT8 by measured speed: {ints} of {len(choice.names)} conv/gemm layers run int8, "
                f"{len(choice.names) - ints} faster in {float_name} (saves {est['all_int8'] - est['chosen']:.3f} ms "
                "at the opt shape)")
    entry = {"int8_layers": ints, "float_layers": len(choice.names) - ints,
             **{f"estimated_ms_{k}": v for k, v in est.items()}}
    out: dict[str, Any] = {"int8_speed": entry}
    if len(choice.names) <= 4096:  # a plan's flat build entry holds that many
        out["int8_speed_layers"] = {n: "int8" if x else float_name for n, x in zip(choice.names, choice.labels)}
    return out
