"""The textual form of a graph; `parser.parse_graph` reads it back exactly.

    graph @LlamaForCausalLM(%input_ids: i64[T], %positions: i64[T]) {
      param @model.norm.weight: f32[64]
      %0: f32[T, 64] = embedding(%input_ids, @model.embed_tokens.weight)
      %1: f32[T, 1] = mean(%0) {dims=[-1], keepdim=true}
      cache_write(%k, %v, %k_cache.0, %v_cache.0, %slot_mapping)
      return logits=%57
    }

Attributes print only where they differ from the op's default.
"""

from __future__ import annotations

import json
import math

from .graph import Graph, Node


def format_attr(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    if isinstance(v, dict):
        bad = [k for k in v if not isinstance(k, str)]
        if bad:
            raise TypeError(f"dict attribute keys must be strings, got {bad[0]!r}")
        return "{" + ", ".join(f"{json.dumps(str(k))}: {format_attr(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"attribute value {v!r} of type {type(v).__name__} has no text form")


def format_attrs(attrs: dict) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in attrs.items()) + "}"


def format_node(node: Node) -> str:
    lhs = ", ".join(f"{r.ref}: {r.type}" for r in node.results)
    rhs = f"{node.op}({', '.join(v.ref for v in node.operands)})"
    rhs += format_attrs(node.opdef.explicit_attrs(node.attrs))
    return f"{lhs} = {rhs}" if lhs else rhs


def print_graph(g: Graph) -> str:
    args = ", ".join(f"{v.ref}: {v.type}" for v in g.inputs)
    lines = [f"graph @{g.name}({args}) {{"]
    for p in g.params.values():
        recipe = f" = {format_node(p.recipe).split(' = ', 1)[1]}" if p.recipe is not None else ""
        lines.append(f"  param {p.ref}: {p.type}{recipe}")
    lines += ["  " + format_node(n) for n in g.nodes]
    if g.meta:
        lines.append("  meta" + format_attrs(g.meta))
    outs = ", ".join(f"{k}={v.ref}" for k, v in g.outputs.items())
    lines.append(f"  return {outs}".rstrip())
    lines.append("}")
    return "\n".join(lines) + "\n"
