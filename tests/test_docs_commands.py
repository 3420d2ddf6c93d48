"""Every `braze ...` command that README.md, docs/*.md and benchmarks/README.md show is
one braze's own argument parser takes: a renamed or dropped flag breaks this test, not a
user's pasted command. (What the commands do is tested where the feature is.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# docs/ir.md and docs/writing-a-pass.md (the compiler surface) are checked with their passes
DOCS = ["README.md", "docs/serving.md", "docs/runtime.md", "docs/parallelism.md",
        "docs/kernels.md", "docs/trust.md", "docs/batch-contract.md", "benchmarks/README.md"]
SUBCOMMANDS = "compile|generate|serve|opt|inspect|demo"


def doc_commands(text: str) -> list[str]:
    """The braze command lines of a Markdown text's code (indented or fenced): a line
    continued with a backslash joined, a comment cut, `[--flag]` optional parts kept, what
    comes before a pipe (`cat f | braze ...`) or a launcher (`torchrun ... $(which braze) serve`)
    left out."""
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        if not (line.startswith("    ") or line.startswith("braze ")):
            continue
        line = line.replace("$(which braze)", "braze")
        m = re.search(rf"(?:^|[|\s])\s*(braze\s+(?:{SUBCOMMANDS})\b.*)", line.strip())
        if m:
            out.append(re.sub(r"\s+#.*$", "", m.group(1)).replace("[", "").replace("]", ""))
    return out


CASES = [(doc, cmd) for doc in DOCS for cmd in doc_commands((ROOT / doc).read_text())]


def test_the_docs_show_commands():
    assert {doc for doc, _ in CASES} >= {"README.md", "docs/serving.md", "docs/trust.md",
                                         "docs/parallelism.md", "docs/kernels.md"}
    assert len(CASES) >= 25


@pytest.mark.parametrize("doc, command", CASES, ids=[f"{d}:{c[:60]}" for d, c in CASES])
def test_documented_command_parses(doc, command, capsys):
    from braze.cli import build_parser
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit:
        pytest.fail(f"{doc}: `{command}` is refused by braze's parser: "
                    f"{capsys.readouterr().err.strip().splitlines()[-1]}")
