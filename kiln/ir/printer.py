"""Readable text form of a Graph, for `--verbose` and debugging."""
from __future__ import annotations

from kiln.ir.graph import Graph, Node, Value


def _v(v: Value | None) -> str:
    if v is None:
        return "_"
    return f"%{v.name}" + ("*" if v.is_const else "")


def format_node(n: Node) -> str:
    attrs = ", ".join(f"{k}={_attr(a)}" for k, a in sorted(n.attrs.items()))
    outs = ", ".join(f"%{o.name}:{o.type}" for o in n.outputs)
    ins = ", ".join(_v(v) for v in n.inputs)
    dom = f"{n.domain}." if n.domain else ""
    return f"{outs} = {dom}{n.op_type}({ins})" + (f" {{{attrs}}}" if attrs else "") + f"  # {n.name}"


def _attr(a: object) -> str:
    if isinstance(a, Graph):
        return f"<graph {a.name}: {len(a.nodes)} nodes>"
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return f"<tensor {tuple(a.shape)}>"  # type: ignore[attr-defined]
    s = repr(a)
    return s if len(s) < 60 else s[:57] + "..."


def format_graph(g: Graph, indent: str = "") -> str:
    lines = [f"{indent}graph {g.name}("]
    lines += [f"{indent}    %{v.name}: {v.type}" for v in g.inputs]
    lines.append(f"{indent}) {{")
    consts = g.constants()
    if consts:
        lines.append(f"{indent}  # {len(consts)} constants, "
                     f"{sum(v.const.numel() * v.const.element_size() for v in consts)} bytes")
    for n in g.nodes:
        lines.append(f"{indent}  {format_node(n)}")
        for sg in n.subgraphs():
            lines.append(format_graph(sg, indent + "    "))
    lines.append(f"{indent}  return {', '.join(_v(v) for v in g.outputs)}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)
