"""Put a plan's kernels into an artifact: kernel sources, cubins per target, manifest entries."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .compile_kernels import compile_all

TEMPLATE_DIR = Path(__file__).parent / "kernels"


def emit_kernels(plan: dict, root: Path, targets: list[str], log=None) -> dict:
    kdir = root / "kernels"
    kdir.mkdir()
    modules = sorted({v["module"] for v in plan["kernels"].values()})
    for m in modules:
        if m in plan["sources"]:
            (kdir / f"{m}.py").write_text(plan["sources"][m])
        else:
            shutil.copyfile(TEMPLATE_DIR / f"{m}.py", kdir / f"{m}.py")
    t0 = time.perf_counter()
    table = compile_all(plan, TEMPLATE_DIR, root, targets, log=log) if targets else {}
    if log and targets and plan["kernels"]:
        n = sum(len(v["specs"]) for v in plan["kernels"].values())
        log(f"compiled {len(plan['kernels'])} kernels ({n} specialisations) for "
            f"{', '.join(targets)} in {time.perf_counter() - t0:.1f}s")
    kernels = {vid: dict(v, cubins=table.get(vid, {})) for vid, v in plan["kernels"].items()}
    return {"plan": {"segments": plan["segments"], "workspaces": plan["workspaces"],
                     "extern_ops": plan["extern_ops"]},
            "kernels": kernels, "targets": targets}
