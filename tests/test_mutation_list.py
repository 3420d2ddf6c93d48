"""tests/mutation_check.py names each bug by the exact source it replaces. When a later
change rewrites that line, the script stops before running any mutation (it found one
stale entry only when someone ran it). This keeps every entry pointing at the code as it
is: its text once in its file, and its tests existing."""

from __future__ import annotations

import pytest

from mutation_check import MUTATIONS, ROOT


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_names_code_that_exists_once(m):
    src = (ROOT / m.path).read_text()
    assert src.count(m.old) == 1, f"{m.name}: its original is in {m.path} {src.count(m.old)} times"
    assert m.new != m.old
    for t in m.tests:
        assert (ROOT / t.split("::")[0]).is_file(), f"{m.name}: no test file {t}"


def test_names_are_unique():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names))
