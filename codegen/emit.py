"""Put a plan's kernels into an artifact: kernel sources, cubins per target, manifest entries."""

from __future__ import annotations

import time
from pathlib import Path

from braze.ir.errors import BrazeError

from .compile_kernels import compile_all
from .plan import TEMPLATE_DIR, artifact_parts

MTP_CUBIN_DIR = "mtp-cubin"


def emit_kernels(plan: dict, root: Path, targets: list[str], log=None,
                 cubin_dir: str = "cubin") -> dict:
    """Writes the plan's kernel files into kernels/ (beside those of a plan emitted before:
    a module of the same name is the same text, templates and content-named generated
    ones alike) and its cubins under `cubin_dir`; -> its manifest entries."""
    entries, files = artifact_parts(plan)
    (root / "kernels").mkdir(exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        if path.exists():
            if path.read_bytes() != data:
                raise BrazeError(f"two plans of one artifact write different {rel}; report this")
            continue
        path.write_bytes(data)
    t0 = time.perf_counter()
    table = (compile_all(plan, TEMPLATE_DIR, root, targets, log=log, cubin_dir=cubin_dir)
             if targets else {})
    if log and targets and plan["kernels"]:
        n = sum(len(v["specs"]) for v in plan["kernels"].values())
        log(f"compiled {len(plan['kernels'])} kernels ({n} specialisations) for "
            f"{', '.join(targets)} in {time.perf_counter() - t0:.1f}s")
    kernels = {vid: dict(v, cubins=table.get(vid, {})) for vid, v in entries["kernels"].items()}
    if log and table:
        log(_resources_line(root, kernels))
    return {"plan": entries["plan"], "kernels": kernels, "targets": targets}


def _resources_line(root: Path, kernels: dict) -> str:
    """What the new cubins ask of an SM, read with Triton's cuobjdump: resource usage
    only (~2 ms a cubin; the disassembly that `braze inspect --kernels` reads for load
    widths costs ~300 ms a cubin, minutes on a large model's hundreds of cubins)."""
    from .cubin_report import cuobjdump, kernel_rows, summary_line
    tool = cuobjdump()
    if tool is None:
        return "cubin resources not read: this Triton ships no cuobjdump"
    try:
        return summary_line(kernel_rows(root, {"kernels": kernels}, tool, sass=False))
    except RuntimeError as e:      # an unreadable cubin is for inspect to report, not fatal
        return f"cubin resources not read: {e}"


def emit_mtp_kernels(plan: dict, root: Path, targets: list[str], log=None) -> dict:
    """The MTP graph's launch plan (codegen/mtp_writer.py): its kernel files in kernels/,
    its cubins in mtp-cubin/; -> the "plan" and "kernels" of its manifest entry."""
    out = emit_kernels(plan, root, targets, log=log, cubin_dir=MTP_CUBIN_DIR)
    return {"plan": out["plan"], "kernels": out["kernels"]}
