"""Pass registry, pipelines and the pass manager.

A pass is a function `run(graph, ctx) -> int` (the number of rewrites it made)
registered under its public name with `@register_pass(...)`; its docstring shows
the IR before and after. Pass modules in this package are found automatically,
and each declares its own place in the pipelines, so a new pass is one new file:

    @register_pass("fuse-rope", stage="fuse", after=("fuse-norm",))

- `stage`: one of STAGES, run in that order (a stage may run more than once:
  `simplify` cleans the traced graph and again what the fusions left);
- `after` / `before`: passes of the same stage it must follow or precede (naming a
  pass of another stage is allowed when the stage order already agrees);
- `level`: the lowest -O level that runs it (`-O0` nothing, `-O1` canonicalisation,
  `-O2` everything); None: only when named (`braze opt --passes`);
- `options`: the compile options (braze/config.py CompileOptions fields) it reads with
  `ctx.option(...)`. Reading an undeclared one is an error, so the list stays true:
  `braze opt --list-passes` shows it, and `braze opt --set KEY=VALUE` accepts only these.

Within a stage, passes with no order between them run by level, then in the order
they were found (module name, then registration). `PIPELINES[level]` is the result.

The manager runs a pipeline, times each pass, counts its matches, can dump the IR
after each pass and verify between passes, and collects the reasons passes give
for the fusions they refused (`--explain`).
"""

from __future__ import annotations

import gc
import importlib
import pkgutil
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from braze.ir import Graph, Node, print_graph, verify
from braze.ir.errors import BrazeError

PassFn = Callable[[Graph, "PassContext"], int]

STAGES = (
    ("simplify", "dead code, common subexpressions, no-ops, constants"),
    ("merge", "GEMMs that read one value become one; later patterns see reshape(split(linear))"),
    ("fuse", "pattern fusions, each replacing a subgraph with a fused op"),
    ("simplify", "clean what the fusions left"),
    ("group", "the remaining pointwise ops become generated kernels"),
    ("schedule", "record node indices (segments, memory plan): no node may change after"),
)
LEVELS = (0, 1, 2)


@dataclass
class PassInfo:
    name: str
    fn: PassFn
    doc: str
    stage: str = "fuse"
    level: int | None = 2
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    found: int = 0                   # registration order: the tie-break within a stage
    options: tuple[str, ...] = ()    # the compile options it reads

    @property
    def summary(self) -> str:
        """The first paragraph of its docstring, on one line."""
        return " ".join(self.doc.split("\n\n")[0].split())


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, *, stage: str = "fuse", level: int | None = 2,
                  after: tuple[str, ...] = (), before: tuple[str, ...] = (),
                  options: tuple[str, ...] = ()):
    if stage not in {s for s, _ in STAGES}:
        raise ValueError(f"pass {name}: stage must be one of {sorted({s for s, _ in STAGES})}")

    def deco(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name} registered twice")
        doc = fn.__doc__ or sys.modules[fn.__module__].__doc__ or fn.__module__
        PASSES[name] = PassInfo(name, fn, doc.strip(), stage, level,
                                tuple(after), tuple(before), len(PASSES), tuple(options))
        return fn
    return deco


def pipeline(level: int) -> list[str]:
    """The passes -O`level` runs, in order (see the module docstring)."""
    _discover()
    if level not in LEVELS:
        raise BrazeError(f"no pipeline for -O{level}; choose one of {list(LEVELS)}")
    for info in PASSES.values():
        _check_order(info)
    out: list[str] = []
    for stage, _ in STAGES:
        for name in _stage_order([p for p in PASSES.values() if p.stage == stage
                                  and p.level is not None and p.level <= level]):
            if not out or out[-1] != name:      # a stage that runs again right away is one run
                out.append(name)
    return out


def _check_order(info: PassInfo) -> None:
    """Every pass named in after/before exists, and a cross-stage one agrees with STAGES."""
    slots: dict[str, list[int]] = {}
    for i, (stage, _) in enumerate(STAGES):
        slots.setdefault(stage, []).append(i)
    for other, earlier in [(o, True) for o in info.after] + [(o, False) for o in info.before]:
        if other not in PASSES:
            raise BrazeError(f"pass {info.name} is placed relative to unknown pass {other!r}")
        o = PASSES[other]
        first, then = (o, info) if earlier else (info, o)
        if o.stage != info.stage and min(slots[first.stage]) > max(slots[then.stage]):
            raise BrazeError(f"pass {info.name} ({info.stage}) cannot run "
                             f"{'after' if earlier else 'before'} {other} ({o.stage}): "
                             f"the stages run in the other order")


def _stage_order(infos: list[PassInfo]) -> list[str]:
    """Kahn's algorithm over the stage's after/before edges; ties by (level, found)."""
    names = {p.name for p in infos}
    preds: dict[str, set[str]] = {p.name: set() for p in infos}
    for p in infos:
        preds[p.name].update(a for a in p.after if a in names)
        for b in p.before:
            if b in names:
                preds[b].add(p.name)
    by_name = {p.name: p for p in infos}
    out: list[str] = []
    while preds:
        ready = [n for n, ps in preds.items() if not ps]
        if not ready:
            raise BrazeError(f"passes {sorted(preds)} are ordered in a cycle (after/before)")
        first = min(ready, key=lambda n: (by_name[n].level, by_name[n].found))
        out.append(first)
        del preds[first]
        for ps in preds.values():
            ps.discard(first)
    return out


class _Pipelines(Mapping):
    """PIPELINES[level]: computed from the passes' declared places each time it is read."""

    def __getitem__(self, level: int) -> list[str]:
        if level not in LEVELS:
            raise KeyError(level)
        return pipeline(level)

    def __iter__(self):
        return iter(LEVELS)

    def __len__(self) -> int:
        return len(LEVELS)


PIPELINES: Mapping[int, list[str]] = _Pipelines()


_discovered = False


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        here = Path(__file__).parent
        for mod in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
            if mod.name not in ("manager", "pattern", "rewrite"):
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
    # facts a pass hands to the compiler beside the graph (the shard pass's weight slices)
    records: dict = field(default_factory=dict)

    def refuse(self, node: Node | str, reason: str) -> None:
        where = node if isinstance(node, str) else _describe(node)
        self.refusals.append(Refusal(self.current, where, reason))

    def option(self, name: str, default=None):
        """Compile option `name`, which the running pass must declare in `register_pass`."""
        _discover()            # (a context used outside a PassManager: the registry filled)
        info = PASSES.get(self.current)
        if info is not None and name not in info.options:
            raise ValueError(f"pass {info.name} reads option {name!r} without declaring it: "
                             f"add it to register_pass(..., options=...)")
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
        scheduled = None            # the first schedule pass: node indices are fixed from it
        for info in self.infos:
            if info.stage == "schedule":
                scheduled = scheduled or info.name
            elif scheduled:
                raise BrazeError(f"pass {info.name} cannot run after {scheduled}: schedule "
                                 f"passes record node indices (segments, the memory plan) that "
                                 f"a {info.stage}-stage pass would leave stale; name "
                                 f"{info.name} before {scheduled}")
        self.ctx = ctx or PassContext()
        self.verify_each = verify_each
        self.after_each = after_each
        self.log = log

    @classmethod
    def for_level(cls, level: int, **kw) -> "PassManager":
        return cls(pipeline(level), **kw)

    def names(self) -> list[str]:
        return [i.name for i in self.infos]

    def run(self, g: Graph) -> list[PassRecord]:
        # the passes allocate many small objects and free few: the cyclic collector's full
        # sweeps of a large graph cost more than the passes themselves (profiled: ~0.6 s of
        # 1.3 s on Qwen3-30B-A3B), so it pauses while they run
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(g)
        finally:
            self.ctx.current = ""
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
            except Exception as e:      # a bug: say in which pass (the traceback chains it)
                raise RuntimeError(f"pass {info.name} raised {type(e).__name__}: {e}") from e
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


# the files of one IR dump: NN-stage.bir, 00-traced.bir first, then one per pass
_DUMP_FILE = re.compile(r"\d{2}-[a-z0-9-]+\.bir")


def dump_after_each(directory: Path):
    """A writer of the IR after each pass into `directory`, cleared of an earlier dump's
    files first (a -O2 dump's 15-plan-memory.bir must not sit beside a -O1 dump as if it
    were this one's); other files there are left alone."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for f in directory.iterdir():
        if _DUMP_FILE.fullmatch(f.name) and f.is_file():
            f.unlink()

    def write(name: str, i: int, g: Graph) -> None:
        (directory / f"{i + 1:02d}-{name}.bir").write_text(print_graph(g))
    return write
