"""Pass infrastructure: a Pass rewrites a Graph and says whether it changed; PassManager runs them.

With ``subgraphs=True`` (the builder's optimization pipeline) every pass also runs on every subgraph
(If branches, Loop / Scan bodies, recursively), right after it ran on the graph holding it. A body is
rewritten as a graph of its own behind a fixed interface: its inputs and outputs (names and order) stay,
and the outer values it captures look to its passes like graph inputs - their producers, which live in
an enclosing graph, are hidden while the body's passes run, so no rewrite reaches across the boundary
(a Relu in a body never fuses into a Conv outside it, a BatchNorm in a body never folds into an outer
conv's weights) and no residual donation writes into an outer value. Afterwards each body's captures
are brought up to date (`sync_captures`): outer values folded into constants are read as constants,
values no longer read are dropped, and the node lists the union, as the importer does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from kiln.errors import BuildError, KilnError
from kiln.ir.dims import body_inference
from kiln.ir.graph import Graph, Node, Value
from kiln.logger import Logger


@dataclass
class PassContext:
    """What passes may consult: the logger, target device type, precision flags, input shapes in force."""

    logger: Logger
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


class Pass:
    """A graph rewrite. `run` returns True when it modified the graph."""

    name: str = "pass"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        raise NotImplementedError


class Fixpoint(Pass):
    """Repeats a group of passes until none modifies the graph (bounded)."""

    def __init__(self, name: str, passes: list[Pass], max_iters: int = 8) -> None:
        self.name, self.passes, self.max_iters = name, passes, max_iters

    def run(self, g: Graph, ctx: PassContext) -> bool:
        any_change = False
        for _ in range(self.max_iters):
            changed = False
            for p in self.passes:
                changed |= PassManager([p]).run(g, ctx)
            any_change |= changed
            if not changed:
                break
        return any_change


class PassManager:
    """Runs passes in order; logs "After <pass>: N layers" at verbose level when a pass changes the graph.

    subgraphs=True: each pass then runs on every subgraph too, innermost graphs after the graphs holding
    them (see the module doc for how a body's interface is kept)."""

    def __init__(self, passes: list[Pass], subgraphs: bool = False) -> None:
        self.passes = passes
        self.subgraphs = subgraphs

    def run(self, g: Graph, ctx: PassContext) -> bool:
        if self.subgraphs:
            share_names(g)
        changed = False
        for p in self.passes:
            changed |= self._apply(p, g, ctx, "")
            if self.subgraphs:
                changed |= self._apply_bodies(p, g, ctx, "")
        return changed

    @staticmethod
    def _apply(p: Pass, g: Graph, ctx: PassContext, where: str) -> bool:
        try:
            modified = p.run(g, ctx)
        except KilnError:
            raise
        except (Exception, RecursionError) as e:  # a model that breaks a pass is reported, not a traceback
            if isinstance(p, Fixpoint):
                raise
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            at = f" in subgraph '{where}'" if where else ""
            raise BuildError(f"pass '{p.name}' failed on this model{at}: {type(e).__name__}: {msg}") from e
        if modified and not isinstance(p, Fixpoint):
            ctx.logger.verbose(f"After {p.name}{f' ({where})' if where else ''}: {len(g.nodes)} layers")
        return modified

    def _apply_bodies(self, p: Pass, g: Graph, ctx: PassContext, where: str) -> bool:
        changed = False
        for n in list(g.nodes):
            subs = list(subgraph_attrs(n))
            if not subs:
                continue
            for key, sub in subs:
                label = f"{where}/{n.name}.{key}" if where else f"{n.name}.{key}"
                with standalone(sub), body_inference():
                    changed |= self._apply(p, sub, ctx, label)
                    changed |= self._apply_bodies(p, sub, ctx, label)
                _keep_captures_intact(sub)
            changed |= sync_captures(n)
        return changed


# ---- subgraph helpers (the builder's passes, the hoisting pass and the autotuner use them) ------------------

def subgraph_attrs(n: Node) -> Iterator[tuple[str, Graph]]:
    """(attribute name, graph) for each subgraph of a node ("then_branch", "body", ...; lists as name[i])."""
    for k, v in n.attrs.items():
        if isinstance(v, Graph):
            yield k, v
        elif isinstance(v, list) and v and isinstance(v[0], Graph):
            for i, sg in enumerate(v):
                yield f"{k}[{i}]", sg


def bodies(g: Graph, where: str = "") -> list[tuple[Graph, str]]:
    """Every subgraph of g, recursively (each before the graphs it holds), with a label naming where it sits:
    'loop.body', 'loop.body/if.then_branch' (node name, attribute)."""
    out: list[tuple[Graph, str]] = []
    for n in g.nodes:
        for key, sub in subgraph_attrs(n):
            label = f"{where}/{n.name}.{key}" if where else f"{n.name}.{key}"
            out.append((sub, label))
            out.extend(bodies(sub, label))
    return out



def share_names(g: Graph) -> None:
    """One name table for g and all its subgraphs: a name a pass makes in one graph is then taken in all, so
    a body never makes a value named like an outer one it captures (plans and captures go by name), and a
    node hoisted out of a body keeps its name."""
    gs = g.all_graphs()
    table = gs[0]._names
    if all(x._names is table for x in gs):
        return
    for x in gs:
        table |= x._names
        table.update(v.name for v in x.values())
    for x in gs:
        x._names = table


class standalone:
    """While a body's own passes run: the producers of the outer values it captures are hidden (None), so
    the body reads them as it reads its inputs and no rewrite follows a value across the body boundary."""

    def __init__(self, sub: Graph) -> None:
        self.sub = sub
        self.saved: list[tuple[Value, Node | None]] = []

    def __enter__(self) -> "standalone":
        self.saved = [(v, v.producer) for v in self.sub.captures]
        for v, _ in self.saved:
            v.producer = None
        return self

    def __exit__(self, *exc: Any) -> None:
        for v, p in reversed(self.saved):
            v.producer = p


def _keep_captures_intact(sub: Graph) -> None:
    """A FusedConv in a body may not add into a residual the body captures (it is an outer value, read again
    by the next iteration or by the outer graph): residual donation is taken back there."""
    outer = {id(v) for v in sub.captures}
    for n in sub.nodes:
        if n.attrs.get("kiln_z_donate") and len(n.inputs) > 3 and n.inputs[3] is not None \
                and id(n.inputs[3]) in outer:
            n.attrs["kiln_z_donate"] = 0


def outer_reads(sub: Graph) -> list[Value]:
    """Values a subgraph reads from enclosing scopes (its nodes' inputs and their own subgraphs' captures, its
    outputs), in first-read order: everything it reads that it neither defines nor holds as a constant."""
    own = {id(v) for v in sub.inputs} | {id(v) for n in sub.nodes for v in n.outputs}
    seen: set[int] = set()
    out: list[Value] = []
    for v in [x for n in sub.nodes for x in n.all_inputs] + list(sub.outputs):
        if v is None or v.is_const or id(v) in own or id(v) in seen:
            continue
        seen.add(id(v))
        out.append(v)
    return out


def sync_captures(n: Node) -> bool:
    """Bring the captures of n's subgraphs (each, recursively first) and of n itself up to date after
    rewrites: each subgraph captures the outer values it still reads (kept in their old order, new ones
    after them; constants are read as constants, not captured), and n lists its subgraphs' captures in
    turn, each once - the form the importer makes and the plan reader checks. True when anything changed."""
    changed = False
    for sub in n.subgraphs():
        for m in sub.nodes:
            if m.subgraphs():
                changed |= sync_captures(m)
        reads = outer_reads(sub)
        ids = {id(v) for v in reads}
        kept = [v for v in sub.captures if id(v) in ids]
        known = {id(v) for v in kept}
        new = kept + [v for v in reads if id(v) not in known]
        if [id(v) for v in new] != [id(v) for v in sub.captures]:
            sub.captures = new
            changed = True
    caps: list[Value] = []
    seen: set[int] = set()
    for sub in n.subgraphs():
        for v in sub.captures:
            if id(v) not in seen:
                seen.add(id(v))
                caps.append(v)
    if [id(v) for v in caps] != [id(v) for v in n.captures]:
        n.captures = caps
        changed = True
    return changed
