"""Compile every kernel variant of a plan for every target, in parallel, with progress.

Each variant is compiled once per spec key it lists (codegen/specialize.py) and target:
`cubin/<target>/<id>@<key>.cubin` plus `<id>@<key>.json` (Triton's metadata: shared
memory, warps, the kernel's name), hashed by the manifest.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from braze.ir.errors import BrazeError


def _file_stem(variant_id: str, key: str) -> str:
    return f"{variant_id.replace('#', '_')}@{key}"


def _ignore_interrupts() -> None:
    """A worker leaves Ctrl-C to the compiler's process, which cancels the queued jobs
    (a terminal sends SIGINT to the whole process group: without this each worker would
    also die printing a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _compile_one(kernel_dir: str, launch: dict, target: str, sources: dict, key: str) -> tuple:
    from braze.codegen.aot import compile_launch
    k = compile_launch(Path(kernel_dir), launch, target, sources, key)
    # Triton's own metadata file, exactly as its cache holds it: what its CompiledKernel
    # needs to load this cubin again without compiling
    group = getattr(k, "metadata_group", None) or {}
    meta_file = next((p for name, p in group.items() if name.endswith(".json")), None)
    meta = json.loads(Path(meta_file).read_text()) if meta_file else {
        key: getattr(k.metadata, key) for key in ("name", "shared", "num_warps", "num_stages")
        if hasattr(k.metadata, key)}
    return k.asm["cubin"], meta


def compile_all(plan: dict, kernel_dir: Path, out_dir: Path, targets: list[str], log=None,
                workers: int | None = None, cubin_dir: str = "cubin") -> dict:
    """-> {variant_id: {target: {key: {"cubin": rel path, "meta": rel path, "name": kernel,
    "shared": bytes, "hash": Triton's}}}}; the files go under `out_dir`/`cubin_dir` (a
    second graph's plan uses its own directory: its variant ids repeat the main plan's)."""
    jobs = []
    for vid, v in plan["kernels"].items():
        launch = dict(v, args=[{"ty": t} for t in v["signature"]])
        for key in v["specs"]:
            for t in targets:
                jobs.append((vid, t, key, launch))
    if not jobs:
        return {}
    table: dict[str, dict] = {}
    workers = workers or max(1, min(os.cpu_count() or 1, len(jobs)))
    t0 = time.perf_counter()
    done = 0

    def record(vid, t, key, cubin, meta):
        d = out_dir / cubin_dir / t
        d.mkdir(parents=True, exist_ok=True)
        stem = _file_stem(vid, key)
        (d / f"{stem}.cubin").write_bytes(cubin)
        (d / f"{stem}.json").write_text(json.dumps(meta, sort_keys=True) + "\n")
        table.setdefault(vid, {}).setdefault(t, {})[key] = {
            "cubin": f"{cubin_dir}/{t}/{stem}.cubin", "meta": f"{cubin_dir}/{t}/{stem}.json",
            "name": meta.get("name"), "shared": meta.get("shared", 0), "hash": meta.get("hash")}

    if workers == 1:
        for vid, t, key, launch in jobs:
            record(vid, t, key, *_compile_one(str(kernel_dir), launch, t, plan["sources"], key))
            done += 1
            if log:
                log(f"  kernels: {done}/{len(jobs)} compiled ({vid} {key} for {t})")
        return table
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_interrupts)
    try:
        futs = {pool.submit(_compile_one, str(kernel_dir), launch, t, plan["sources"], key):
                (vid, t, key) for vid, t, key, launch in jobs}
        for fut in as_completed(futs):
            vid, t, key = futs[fut]
            try:
                cubin, meta = fut.result()
            except BrazeError:
                raise
            except Exception as e:
                raise BrazeError(f"kernel {vid} (spec {key}) does not compile for {t}: {e}") from None
            record(vid, t, key, cubin, meta)
            done += 1
            if log and (done % 8 == 0 or done == len(jobs)):
                log(f"  kernels: {done}/{len(jobs)} compiled on {workers} processes "
                    f"({time.perf_counter() - t0:.1f}s)")
    except BaseException:
        # Ctrl-C or a kernel that does not compile: the queued jobs are dropped, not run
        # to the end first (`with ProcessPoolExecutor` would wait for all of them: minutes
        # on a large model)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return table
