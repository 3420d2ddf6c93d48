#!/usr/bin/env python
"""What opening an unsigned artifact costs to verify (runtime/trust.py): regenerating its
launch plans and kernel sources from graph.bir and comparing them byte for byte.

Two artifacts, both -O2 with no cubins:
  tiny-llama   a tiny random llama (braze.tiny), compiled for real
  llama3-8b    the Llama-3-8B shape from benchmarks/compile_time.py's config, traced with
               meta weights; graph.bir, kernels/ and the manifest are written as
               `braze compile` writes them, without weight files (verification reads none)

Each repeat runs in a fresh process and times
  parse        graph.bir -> verified Graph (every open pays this, signed or not)
  first        the first verification in the process, including importing codegen's
               lowering and its kernel templates (which import triton)
  again        a second verification in the same process (the work itself)
and the best of --repeat is reported.

    python benchmarks/verify_time.py
    python benchmarks/verify_time.py --repeat 5 --json verify.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_file import ResultsFile  # noqa: E402


def build_tiny(root: Path) -> Path:
    import contextlib
    import io

    import braze
    from braze.tiny import make_checkpoint
    with contextlib.redirect_stderr(io.StringIO()):
        make_checkpoint("llama", root / "model", seed=1)
    out = root / "tiny.braze"
    braze.compile(root / "model", out, opt_level=2, targets="")
    (out / "signature.json").unlink(missing_ok=True)
    return out


def _compile_time():
    spec = importlib.util.spec_from_file_location("compile_time", HERE / "compile_time.py")
    ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ct)
    return ct


def build_8b(root: Path) -> Path:
    """The 8B-shape -O2 graph, and an artifact around it with no weight files."""
    ct = _compile_time()
    model_dir = root / "llama3-8b"
    ct.write_config("llama3-8b", str(model_dir))
    return build_meta(model_dir, root / "llama3-8b.braze", ct.compile_options)


def build_meta(model_dir: Path, out: Path, compile_options=None) -> Path:
    """An artifact of the checkpoint config in `model_dir`, traced with meta weights and
    compiled at -O2 with `compile_options(loaded)` (compile_time.py's by default): graph.bir,
    kernels/ and the manifest as `braze compile` writes them, without weight files
    (verification reads none)."""
    from braze.artifact import FORMAT, FORMAT_VERSION, GRAPH_FILE, MANIFEST, sha256_file
    from braze.codegen.artifact_writer import versions
    from braze.codegen.emit import emit_kernels
    from braze.codegen.plan import build_plan
    from braze.compiler import manifest_model, materialize
    from braze.frontend import load_model
    from braze.ir import print_graph
    from braze.passes import PassContext, PassManager
    loaded = load_model(str(model_dir), with_weights=False)
    graph = loaded.graph
    options = (compile_options or _compile_time().compile_options)(loaded).to_json()
    PassManager.for_level(2, ctx=PassContext(options=options)).run(graph)
    materialize(graph, lambda name: None)
    out.mkdir()
    (out / GRAPH_FILE).write_text(print_graph(graph))
    entries = emit_kernels(build_plan(graph, options), out, targets=[])
    files = {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*"))
             if p.is_file()}
    model = {k: v for k, v in manifest_model(loaded, model_dir).items() if k != "config"}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
                "model": model, "weights": {"files": [], "params": {}, "bytes": 0},
                "options": options, **entries, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def worker(root: str) -> dict:
    """Time parse, first and second verification of the artifact at `root` (fresh process)."""
    from braze.artifact import GRAPH_FILE, read_manifest_bytes
    from braze.ir import parse_graph, verify
    from braze.runtime.trust import establish
    root = Path(root)
    manifest, raw = read_manifest_bytes(root)
    t = time.perf_counter()
    graph = parse_graph((root / GRAPH_FILE).read_text(), source=GRAPH_FILE)
    verify(graph)
    parse_s = time.perf_counter() - t
    times = []
    for _ in range(2):
        t = time.perf_counter()
        trust = establish(root, manifest, raw, graph)
        times.append(time.perf_counter() - t)
        if trust.how != "verified":
            raise SystemExit(f"{root} did not verify: {trust.detail}")
    return {"parse_s": parse_s, "first_s": times[0], "again_s": times[1],
            "nodes": len(graph.nodes), "kernel_files": sum(1 for f in manifest["files"]
                                                           if f.startswith("kernels/")),
            "launches": sum(len(s["launches"]) for s in manifest["plan"]["segments"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    ap.add_argument("--worker", metavar="ARTIFACT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    if args.repeat < 1:
        ap.error(f"--repeat {args.repeat}: give 1 or more runs")
    out = ResultsFile(args.json, {"repeat": args.repeat}, results={})
    print(f"{'model':<12} {'nodes':>6} {'launches':>9} {'kernels':>8} {'parse':>8} "
          f"{'first':>8} {'again':>8}   (best of {args.repeat}, seconds)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("XDG_CONFIG_HOME", str(Path(tmp) / "config"))   # no key made for you
        for name, build in (("tiny-llama", build_tiny), ("llama3-8b", build_8b)):
            artifact = build(Path(tmp))
            runs = []
            for _ in range(args.repeat):
                r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                                    str(artifact)], capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(r.stderr[-3000:])
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            best = {k: min(r[k] for r in runs) for k in ("parse_s", "first_s", "again_s")}
            r = {**runs[0], **best}
            out.put(name, r)
            print(f"{name:<12} {r['nodes']:>6} {r['launches']:>9} {r['kernel_files']:>8} "
                  f"{r['parse_s']:>8.3f} {r['first_s']:>8.3f} {r['again_s']:>8.3f}", flush=True)
    out.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
