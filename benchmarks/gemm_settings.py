"""The skinny GEMM's settings compared, from kernel_bench --gemm-configs rows (one row per
case and setting): what `kernel_bench.py` prints and what the device suite's summary says.
Standard library only, like the suite itself."""

from __future__ import annotations

import math


def timed_cases(rows: list[dict]) -> tuple[dict[tuple, dict[str, float]], list[str]]:
    """The rows that were timed and matched the reference -> {(model, kernel, tokens):
    {setting: us}}, and the settings in the order they were tried (the first is the
    module's current default)."""
    cases: dict[tuple, dict[str, float]] = {}
    order: list[str] = []
    for r in rows:
        if r.get("config") and r.get("us") and r.get("ok"):
            cases.setdefault((r["model"], r["kernel"], r["tokens"]), {})[r["config"]] = r["us"]
            if r["config"] not in order:
                order.append(r["config"])
    return cases, order


def relative_geomean(cases: list[dict[str, float]], setting: str) -> float:
    """The geometric mean over `cases` (each {setting: us}, all holding `setting`) of the
    setting's time over the case's fastest: 1.00 means fastest in every one."""
    return math.exp(sum(math.log(by[setting] / min(by.values())) for by in cases) / len(cases))
