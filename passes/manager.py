"""Pass registry and pass manager.

A pass is a function `run(graph, ctx) -> int` (the number of rewrites it made)
registered under its public name with `@register_pass("fuse-norm")`; its
docstring shows the IR before and after. Pass modules in this package are
found automatically: a new pass is one new file.

The manager runs a named pipeline (`-O0` nothing, `-O1` canonicalisation, `-O2`
everything), times each pass, counts its matches, can dump the IR after each
pass and verify between passes, and collects the reasons passes give for the
fusions they refused (`--explain`).
"""

from __future__ import annotations

import gc
import importlib
import pkgutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from braze.ir import Graph, Node, print_graph, verify
from braze.ir.errors import BrazeError

PassFn = Callable[[Graph, "PassContext"], int]


@dataclass
class PassInfo:
    name: str
    fn: PassFn
    doc: str


PASSES: dict[str, PassInfo] = {}

PIPELINES: dict[int, list[str]] = {
    0: [],
    1: ["canonicalize"],
    2: ["canonicalize", "merge-projections", "fuse-moe", "fuse-norm", "fuse-rope",
        "fuse-attention", "prune-logits", "canonicalize", "fuse-pointwise", "split-segments",
        "plan-memory"],
}


def register_pass(name: str):
    def deco(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name} registered twice")
        PASSES[name] = PassInfo(name, fn, (fn.__doc__ or fn.__module__).strip())
        return fn
    return deco


_discovered = False


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        here = Path(__file__).parent
        for mod in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
            if mod.name not in ("manager", "pattern"):
                importlib.import_module(f"{__package__}.{mod.name}")


def get_pass(name: str) -> PassInfo:
    _discover()
    if name not in PASSES:
        raise BrazeError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def all_passes() -> dict[str, PassInfo]:
    _discover()
    return dict(PASSES)


@dataclass
class Refusal:
    pass_name: str
    node: str
    reason: str


@dataclass
class PassContext:
    """What a pass may know besides the graph: compile options and a place to explain itself."""
    options: dict = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    current: str = ""

    def refuse(self, node: Node | str, reason: str) -> None:
        where = node if isinstance(node, str) else _describe(node)
        self.refusals.append(Refusal(self.current, where, reason))

    def option(self, name: str, default=None):
        v = self.options.get(name)
        return default if v is None else v


def _describe(node: Node) -> str:
    res = ", ".join(r.ref for r in node.results)
    return f"{res + ' = ' if res else ''}{node.op}(...)"


@dataclass
class PassRecord:
    name: str
    matches: int
    ms: float
    ops_after: int


class PassManager:
    def __init__(self, names: list[str], ctx: PassContext | None = None, verify_each: bool = False,
                 after_each: Callable[[str, int, Graph], None] | None = None, log=None):
        self.infos = [get_pass(n) for n in names]
        self.ctx = ctx or PassContext()
        self.verify_each = verify_each
        self.after_each = after_each
        self.log = log

    @classmethod
    def for_level(cls, level: int, **kw) -> "PassManager":
        if level not in PIPELINES:
            raise BrazeError(f"no pipeline for -O{level}; choose one of {sorted(PIPELINES)}")
        return cls(PIPELINES[level], **kw)

    def run(self, g: Graph) -> list[PassRecord]:
        # the passes allocate many small objects and free few: the cyclic collector's full
        # sweeps of a large graph cost more than the passes themselves (profiled: ~0.6 s of
        # 1.3 s on Qwen3-30B-A3B), so it pauses while they run
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(g)
        finally:
            if enabled:
                gc.enable()

    def _run(self, g: Graph) -> list[PassRecord]:
        records = []
        for i, info in enumerate(self.infos):
            self.ctx.current = info.name
            t0 = time.perf_counter()
            try:
                matches = int(info.fn(g, self.ctx) or 0)
            except BrazeError as e:
                raise BrazeError(f"pass {info.name}: {e}") from None
            ms = (time.perf_counter() - t0) * 1000
            if self.verify_each:
                try:
                    verify(g)
                except BrazeError as e:
                    raise BrazeError(f"after pass {info.name}: {e}") from None
            records.append(PassRecord(info.name, matches, round(ms, 3), len(g.nodes)))
            if self.log:
                self.log(f"  {info.name:<18} {matches:>4} matches {ms:8.1f} ms  {len(g.nodes)} ops")
            if self.after_each:
                self.after_each(info.name, i, g)
        return records


def dump_after_each(directory: Path):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def write(name: str, i: int, g: Graph) -> None:
        (directory / f"{i + 1:02d}-{name}.bir").write_text(print_graph(g))
    return write
