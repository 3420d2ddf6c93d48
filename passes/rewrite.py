"""The rewrite driver: the loop every pattern pass used to write by hand, written once.

    @register_pass("fuse-attention", after=("fuse-rope",))
    def fuse_attention(g, ctx):
        return rewrite(g, ctx, [Rule("paged_attention", _fuse)])

    def _fuse(node, rw):                      # node: a paged_attention still in the graph
        if not concrete(...):
            return "head counts must be concrete"        # a near miss: --explain lists it
        with rw.g.inserting_before(node):
            flat = rw.g.op("attention", *node.operands, ...)
        rw.replace(node.results[0], flat, dead=[node])   # readers now read flat; node goes
        return 1                                         # rewrites made

`rewrite(g, ctx, rules)` walks the schedule as it was when the walk began
(`reverse=True`: last node first, for patterns matched from their outermost op),
and gives each node that is still in the graph, and whose op a rule is rooted at,
to that rule's `apply(node, rw)`, which returns

- a number (or True): the rewrites it made; the driver counts them, and the node's
  visit ends there;
- a string: a near miss, why it did not rewrite; the driver records it for
  `--explain` (`ctx.refuse`), prefixed by the rule's `explain`;
- None or 0: not this pattern at all; nothing is said (most nodes are not near
  misses, and a refusal for each would bury the real ones).

What the rules no longer have to get right by hand:
- uses: the graph keeps its use index current through every change (ir/graph.py),
  so `g.users(v)` and `match`'s one-use rule see the graph as it is now, not as it
  was when the pass began (a stale users map gave wrong one-use verdicts);
- erased nodes: skipped; nodes a rule adds are not visited in the same walk;
- dead matched nodes: `rw.replace(old, new, dead=m.nodes)` rewires the readers and
  erases whichever of `dead` nobody reads any more, last first so whole chains go;
- nodes already part of a match, rewritten or refused (`rw.claim(m.nodes)`), are
  not tried again as roots of a smaller match, in this walk or a later one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from braze.ir import Graph, Node, Value

from .manager import PassContext

ApplyFn = Callable[[Node, "Rewriter"], "int | str | None"]


@dataclass
class Rule:
    ops: str | tuple[str, ...]       # the ops a match is rooted at
    apply: ApplyFn
    explain: str = ""                # what a refusal from this rule starts with

    def __post_init__(self):
        if isinstance(self.ops, str):
            self.ops = (self.ops,)


class Rewriter:
    """One pass's rewriting session over a graph: walks (`run`), counts, and the helpers
    rules rewrite with. Claimed nodes carry over from one `run` to the next."""

    def __init__(self, g: Graph, ctx: PassContext):
        self.g, self.ctx = g, ctx
        self.count = 0
        self._claimed: set[Node] = set()
        self._rule: Rule | None = None

    def run(self, rules: Sequence[Rule], reverse: bool = False) -> int:
        """One walk over the schedule; returns the rewrites it made (also added to count)."""
        by_op: dict[str, list[Rule]] = {}
        for rule in rules:
            for op in rule.ops:
                by_op.setdefault(op, []).append(rule)
        nodes = list(self.g.nodes)
        if reverse:
            nodes.reverse()
        made = 0
        for node in nodes:
            here = by_op.get(node.op)
            if not here or not self.g.contains(node) or node in self._claimed:
                continue
            for rule in here:
                self._rule = rule
                out = rule.apply(node, self)
                if isinstance(out, str):
                    self.refuse(node, out)
                elif out:
                    made += int(out)
                    break
                if not self.g.contains(node):
                    break
        self._rule = None
        self.count += made
        return made

    # -- what rules call ------------------------------------------------------------
    def refuse(self, node: Node | str, reason: str) -> None:
        """A near miss at `node` (another node than the root, or a second one)."""
        self.ctx.refuse(node, (self._rule.explain if self._rule else "") + reason)

    def claim(self, nodes: Iterable[Node]) -> None:
        self._claimed.update(nodes)

    def claimed(self, node: Node) -> bool:
        return node in self._claimed

    def replace(self, old: Value | Sequence[Value], new: Value | Sequence[Value],
                dead: Iterable[Node] = ()) -> None:
        """Point the readers (and outputs) of each old value at the new one, then erase the
        nodes of `dead` that nothing reads any more."""
        olds = [old] if isinstance(old, Value) else list(old)
        news = [new] if isinstance(new, Value) else list(new)
        for o, n in zip(olds, news, strict=True):
            self.g.replace_all_uses(o, n)
        self.erase_dead(dead)

    def erase_dead(self, nodes: Iterable[Node]) -> None:
        g = self.g
        outputs = set(g.outputs.values())
        for n in sorted({n for n in nodes if g.contains(n)}, key=g.index, reverse=True):
            if not g.has_effects(n) and not any(g.num_users(r) or r in outputs
                                                for r in n.results):
                g.erase_node(n)

    def rebuild(self, anchor: Node, dead: Sequence[Node], op: str, operands: list[Value],
                attrs: dict, replacing: Sequence[Value]) -> Node:
        """Replace the nodes `dead` by one `op` node, placed where `anchor` is (before the first
        node from `anchor` on that survives), whose results take over the values `replacing`:
        their names, so the text stays readable, and their readers."""
        g, gone = self.g, set(dead)
        nodes, i = g.nodes, g.index(anchor)
        while i < len(nodes) and nodes[i] in gone:
            i += 1
        after = nodes[i] if i < len(nodes) else None
        for n in dead:                    # first, so the new results can take the names
            g.erase_node(n)
        with g.inserting_before(after):
            node = g.add_node(op, operands, attrs, names=[v.name for v in replacing])
        for old, new in zip(replacing, node.results, strict=True):
            g.replace_all_uses(old, new)
        return node


def rewrite(g: Graph, ctx: PassContext, rules: Sequence[Rule], reverse: bool = False) -> int:
    """One walk of `rules` over `g` (see the module docstring); returns the rewrites made."""
    return Rewriter(g, ctx).run(rules, reverse)
