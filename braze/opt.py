"""`braze opt`: run passes on IR text, as mlir-opt does, for people who write passes.

    braze opt FILE.bir --passes canonicalize,fuse-norm [--print-after-all] [--explain]
    braze opt FILE.bir --passes shard --set tensor_parallel_size=2
    braze opt --list-passes

A pass reads compile options (braze/config.py CompileOptions) that it declares in
`register_pass(..., options=...)`; `--set KEY=VALUE` gives one, checked against those
declarations and validated as `braze compile` validates its flags, so an option no chosen
pass reads is an error rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap

from braze.config import CompileOptions
from braze.ir.errors import BrazeError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def list_passes() -> str:
    """One block per registered pass: name, stage, level, options, summary; in -O2 order."""
    from braze.passes.manager import all_passes, pipeline
    passes = all_passes()
    order = list(dict.fromkeys(pipeline(2))) + sorted(n for n in passes if n not in pipeline(2))
    lines = []
    for name in order:
        info = passes[name]
        level = "only when named" if info.level is None else f"-O{info.level}"
        opts = f"; options: {', '.join(info.options)}" if info.options else ""
        lines.append(f"{name:<20} {info.stage} stage, {level}{opts}")
        summary = info.summary.removeprefix(f"{name}: ")
        lines += textwrap.wrap(summary[:1].upper() + summary[1:], 100, initial_indent=" " * 21,
                               subsequent_indent=" " * 21)
    return "\n".join(lines) + "\n"


def _convert(key: str, text: str):
    field = {f.name: f for f in dataclasses.fields(CompileOptions)}[key]
    kind = str(field.type)
    if "bool" in kind:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise BrazeError(f"--set {key}={text}: {key} is true or false")
    if "int" in kind:
        try:
            return int(text)
        except ValueError:
            raise BrazeError(f"--set {key}={text}: {key} is an integer") from None
    return text


def parse_sets(items: list[str], names: list[str], flags: dict | None = None) -> dict:
    """`--set KEY=VALUE` items as compile options that the passes `names` read; `flags`
    (option -> value) are those given by their own flag (--max-num-tokens N), checked alike."""
    from braze.passes.manager import get_pass
    reads = {opt: [n for n in names if opt in get_pass(n).options]
             for n in names for opt in get_pass(n).options}
    fields = {f.name for f in dataclasses.fields(CompileOptions)}
    got = {}

    def take(key: str, value, said: str):
        if key not in reads:
            readers = ", ".join(sorted(reads)) or "none"
            raise BrazeError(f"{said}: no pass in --passes reads {key} (their options: "
                             f"{readers}); braze opt --list-passes shows which pass reads what")
        got[key] = value

    for key, value in (flags or {}).items():
        if value is not None:
            take(key, value, f"--{key.replace('_', '-')} {value}")
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise BrazeError(f"--set {item!r}: give KEY=VALUE, e.g. --set tensor_parallel_size=2")
        if key not in fields:
            raise BrazeError(f"--set {key}: not a compile option; they are: "
                             f"{', '.join(sorted(fields))}")
        take(key, _convert(key, text.strip()), f"--set {key}")
    CompileOptions(**got).validate()
    return got


def run_opt(a) -> int:
    from braze.ir import parse_graph, print_graph, verify
    from braze.passes import PassContext, PassManager
    if a.list_passes:
        sys.stdout.write(list_passes())
        return 0
    if a.file is None:
        raise BrazeError("braze opt needs FILE.bir (or - for standard input), "
                         "or --list-passes")
    names = [p.strip() for p in (a.passes or "").split(",") if p.strip()]
    options = parse_sets(a.set or [], names, {"max_num_tokens": a.max_num_tokens,
                                              "cudagraph_mode": a.cudagraph_mode})
    try:
        text = sys.stdin.read() if a.file == "-" else open(a.file, encoding="utf-8").read()
    except OSError as e:
        raise BrazeError(f"cannot read {a.file}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise BrazeError(f"{a.file} is not IR text: not UTF-8 ({e.reason} at byte {e.start}); "
                         f"give a .bir file (braze compile --dump-ir DIR writes them)") from None
    g = parse_graph(text, source="<stdin>" if a.file == "-" else a.file)
    verify(g)
    ctx = PassContext(options=options)

    def show(name, i, graph):
        sys.stdout.write(f"// ----- after {name} -----\n{print_graph(graph)}")

    records = PassManager(names, ctx, verify_each=True,
                          after_each=show if a.print_after_all else None).run(g)
    if not (a.print_after_all and names):       # no pass ran: the graph as read is the answer
        sys.stdout.write(print_graph(g))
    if a.explain:
        for r in ctx.refusals:
            print(f"refused [{r.pass_name}] {r.node}: {r.reason}", file=sys.stderr)
        if not ctx.refusals:
            print("--explain: nothing refused", file=sys.stderr)
    if a.stats:
        for r in records:
            print(f"{r.name}: {r.matches} matches, {r.ms:.1f} ms", file=sys.stderr)
    return 0
