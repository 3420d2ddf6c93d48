"""Put a plan's kernels into an artifact: kernel sources, cubins per target, manifest entries."""

from __future__ import annotations

import time
from pathlib import Path

from .compile_kernels import compile_all
from .plan import TEMPLATE_DIR, artifact_parts


def emit_kernels(plan: dict, root: Path, targets: list[str], log=None) -> dict:
    entries, files = artifact_parts(plan)
    (root / "kernels").mkdir()
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    t0 = time.perf_counter()
    table = compile_all(plan, TEMPLATE_DIR, root, targets, log=log) if targets else {}
    if log and targets and plan["kernels"]:
        n = sum(len(v["specs"]) for v in plan["kernels"].values())
        log(f"compiled {len(plan['kernels'])} kernels ({n} specialisations) for "
            f"{', '.join(targets)} in {time.perf_counter() - t0:.1f}s")
    kernels = {vid: dict(v, cubins=table.get(vid, {})) for vid, v in entries["kernels"].items()}
    return {"plan": entries["plan"], "kernels": kernels, "targets": targets}
