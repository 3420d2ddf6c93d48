"""Write an artifact directory (schema in braze/artifact.py).

Weights stream into shards of at most `shard_bytes`, so a model larger than
memory is never held whole; each shard is hashed from the bytes written, so an 8B
model's 16 GB are not read back to hash them. The directory is built under a temporary name
and renamed into place at the end: a failed compile never leaves a
half-written artifact where a good one was expected.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save

from braze import __version__
from braze.artifact import (FORMAT, FORMAT_VERSION, GRAPH_FILE, MANIFEST, TOKENIZER_DIR,
                            TOKENIZER_FILES, sha256_file)
from braze.ir import Graph, print_graph
from braze.ir.errors import BrazeError
from braze.ir.types import torch_dtype
from braze.signing import sign_artifact

SHARD_BYTES = 2 << 30


def versions() -> dict:
    import transformers
    out = {"braze": __version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def write_artifact(out: Path, graph: Graph, load_param, model: dict, options: dict,
                   model_dir: Path, extra: dict | None = None, shard_bytes: int = SHARD_BYTES,
                   overwrite: bool = False, log=None, emit=None, signing_key=None) -> Path:
    """`emit(root) -> dict` writes more files (kernels, cubins) before hashing and returns
    manifest entries for them; `signing_key` (Ed25519) signs the manifest."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise BrazeError(f"{out} already exists; pass --force to replace it")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        extra = dict(extra or {})
        if emit is not None:
            extra.update(emit(tmp))
        manifest = _write(tmp, graph, load_param, model, options, Path(model_dir), extra,
                          shard_bytes, log)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
        if signing_key is not None:
            key_id = sign_artifact(tmp, signing_key)
            if log:
                log(f"signed the artifact with {key_id}")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(root: Path, graph: Graph, load_param, model: dict, options: dict, model_dir: Path,
           extra: dict, shard_bytes: int, log) -> dict:
    (root / GRAPH_FILE).write_text(print_graph(graph))
    (root / "config.json").write_text(json.dumps(model["config"], indent=1) + "\n")
    t0 = time.perf_counter()
    digests: dict[str, str] = {}
    # one loader per tensor-parallel rank: each rank's shards go to their own files, so a
    # rank reads only its own weights
    loaders = load_param if isinstance(load_param, list) else [load_param]
    ranks, files, total_bytes = [], [], 0
    for r, load in enumerate(loaders):
        prefix = "weights" if len(loaders) == 1 else f"weights-rank{r}"
        rf, params, nbytes = _write_weights(root, graph, load, prefix, shard_bytes, digests, log)
        files += rf
        total_bytes += nbytes
        ranks.append({"files": rf, "params": params})
    if log:
        per = f" x {len(loaders)} ranks" if len(loaders) > 1 else ""
        log(f"wrote {len(graph.params)} weight tensors{per} "
            f"({total_bytes / 2**20:.1f} MiB) in {len(files)} file(s) in "
            f"{time.perf_counter() - t0:.2f}s")
    weights = {"files": files, "params": ranks[0]["params"], "bytes": total_bytes}
    if len(loaders) > 1:
        weights["ranks"] = ranks
    tok_files = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    if tok_files:
        (root / TOKENIZER_DIR).mkdir()
        for f in tok_files:
            shutil.copyfile(model_dir / f, root / TOKENIZER_DIR / f)
    hashes = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            hashes[rel] = digests.get(rel) or sha256_file(p)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "model": {k: v for k, v in model.items() if k != "config"},
        "options": options,
        "graph": {"file": GRAPH_FILE, "ops": graph.op_counts(), "nodes": len(graph.nodes),
                  "inputs": [v.name for v in graph.inputs], "outputs": list(graph.outputs)},
        "weights": weights,
        "tokenizer": TOKENIZER_DIR if tok_files else None,
        **extra,
        "files": hashes,
    }


def _write_weights(root: Path, graph: Graph, load_param, prefix: str, shard_bytes: int,
                   digests: dict, log) -> tuple[list[str], dict, int]:
    params_index, shard, shard_size, files = {}, {}, 0, []
    total_bytes = 0
    names = list(graph.params)

    def flush():
        nonlocal shard, shard_size
        if shard:
            fname = f"{prefix}-{len(files) + 1:05d}.safetensors"
            data = save(shard, metadata={"format": "pt"})
            (root / fname).write_bytes(data)
            digests[fname] = hashlib.sha256(data).hexdigest()
            files.append(fname)
            shard, shard_size = {}, 0

    for i, name in enumerate(names):
        p = graph.params[name]
        t = load_param(name)
        if t.dtype != torch_dtype(p.type.dtype) or tuple(t.shape) != tuple(p.type.shape):
            raise BrazeError(f"parameter {name}: got {t.dtype} {list(t.shape)}, "
                             f"graph expects {p.type}")
        nbytes = t.numel() * t.element_size()
        if shard and shard_size + nbytes > shard_bytes:
            flush()
        shard[name] = t.contiguous()
        shard_size += nbytes
        total_bytes += nbytes
        params_index[name] = len(files)
        if log and (i + 1) % 64 == 0:
            log(f"  weights ({prefix}): {i + 1}/{len(names)} tensors, "
                f"{total_bytes / 2**20:.1f} MiB")
    flush()
    return files, {n: files[k] for n, k in params_index.items()}, total_bytes
