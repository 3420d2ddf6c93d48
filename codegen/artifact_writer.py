"""Write an artifact directory (schema in braze/artifact.py).

Weights stream into safetensors shards of at most `shard_bytes`, one tensor at a time,
so compiling holds one weight in memory, never a model or a shard; each shard is hashed
from the bytes written, so an 8B model's 16 GB are not read back to hash them. The directory is built under a temporary name
and renamed into place at the end: a failed compile never leaves a
half-written artifact where a good one was expected.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from braze import __version__
from braze.artifact import (FORMAT, FORMAT_VERSION, GRAPH_FILE, MANIFEST, TOKENIZER_DIR,
                            TOKENIZER_FILES, is_artifact, sha256_file)
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
    check_destination(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out)
        # this compile's own: a second compile to the same path never deletes or fills it
        tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(out)}{os.getpid()}-",
                                    dir=out.parent))
    except OSError as e:
        raise BrazeError(f"cannot write the artifact {out}: {_why(e)}") from None
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
        # again: what appeared at `out` while compiling is replaced only if --force would
        # have replaced it at the start (an earlier artifact), never deleted unasked
        check_destination(out, overwrite)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:        # disk full, a directory made read-only meanwhile, ...
        shutil.rmtree(tmp, ignore_errors=True)
        raise BrazeError(f"writing the artifact {out} failed: {_why(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _partial_prefix(out: Path) -> str:
    # the host too: on a shared filesystem another host's pid says nothing here
    return f"{out.name}.partial-{socket.gethostname()}-"


def _remove_stale_partials(out: Path) -> None:
    """Remove what compiles to `out` killed before they could clean up left: a
    `NAME.partial-HOST-PID-...` directory of this host whose process is gone (or an older
    `NAME.partial`)."""
    legacy = out.with_name(f"{out.name}.partial")
    if legacy.is_dir() and not legacy.is_symlink():
        shutil.rmtree(legacy, ignore_errors=True)
    prefix = _partial_prefix(out)
    for p in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = p.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:              # another user's process: alive
        return True
    return True


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse, before any work is done, an artifact path that compiling could not write or
    must not delete. `overwrite` (--force) replaces an earlier artifact or an empty
    directory, never a file or any other directory: `-o` pointing at the model's own
    directory, or at a home directory, must not delete it."""
    out = Path(out)
    if out.is_symlink() or out.exists():
        if not overwrite:
            raise BrazeError(f"{out} already exists; pass --force (force=True in braze.compile) "
                             "to replace it")
        if out.is_symlink() or not out.is_dir():
            raise BrazeError(f"{out} exists and is not an artifact directory (a file or a "
                             "link); --force replaces only an earlier artifact: give -o a new "
                             "path")
        if not is_artifact(out) and any(out.iterdir()):
            raise BrazeError(f"{out} is a directory but not a braze artifact (it has no braze "
                             f"{MANIFEST}); --force replaces only an earlier artifact: give -o "
                             "a new path, or remove the directory yourself")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BrazeError(f"cannot write the artifact {out}: {parent} is not a directory")
    try:                          # what the user may do there, checked by doing it
        os.rmdir(tempfile.mkdtemp(prefix=".braze-probe-", dir=parent))
    except OSError as e:
        raise BrazeError(f"cannot write the artifact {out}: {_why(e)}") from None


def _why(e: OSError) -> str:
    return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")


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
    """One rank's weights, streamed into `prefix`-NNNNN.safetensors files."""
    names = list(graph.params)
    files: list[str] = []
    params: dict[str, str] = {}
    total_bytes, done = 0, 0
    for group in _plan_shards(graph, names, shard_bytes):
        fname = f"{prefix}-{len(files) + 1:05d}.safetensors"
        with open(root / fname, "wb") as f:
            writer = _ShardWriter(f, [(n, graph.params[n].type) for n in group])
            for name in group:
                writer.write(name, _checked(graph, name, load_param(name)))
                params[name] = fname
                done += 1
                if log and done % 64 == 0:
                    log(f"  weights ({prefix}): {done}/{len(names)} tensors, "
                        f"{(total_bytes + writer.written) / 2**20:.1f} MiB")
            digests[fname] = writer.finish()
            total_bytes += writer.written
        files.append(fname)
    return files, params, total_bytes


# safetensors' dtype names (its format spec); the header is JSON padded to 8 bytes.
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
              torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _nbytes(ptype) -> int:
    dt = torch_dtype(ptype.dtype)
    n = 1
    for d in ptype.shape:
        n *= int(d)
    return n * torch.empty((), dtype=dt).element_size()


def _plan_shards(graph: Graph, names: list[str], shard_bytes: int) -> list[list[str]]:
    """Group params into files of at most `shard_bytes` (a larger param gets its own file),
    from the graph's types alone: no weight is read to plan."""
    groups, size = [], 0
    for name in names:
        n = _nbytes(graph.params[name].type)
        if not groups or (groups[-1] and size + n > shard_bytes):
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _checked(graph: Graph, name: str, t: torch.Tensor) -> torch.Tensor:
    p = graph.params[name]
    if t.dtype != torch_dtype(p.type.dtype) or tuple(t.shape) != tuple(p.type.shape):
        raise BrazeError(f"parameter {name}: got {t.dtype} {list(t.shape)}, "
                         f"graph expects {p.type}")
    return t


class _ShardWriter:
    """Streams one safetensors file: the header is known from the graph's types, so each
    tensor is written (and hashed) as soon as it is loaded and then dropped. The writer
    never holds more than the tensor in hand; a whole shard used to be held twice (the
    tensors, then their serialized bytes)."""

    def __init__(self, f, entries):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        self._order = []
        for name, ptype in entries:
            n = _nbytes(ptype)
            header[name] = {"dtype": _ST_DTYPES[torch_dtype(ptype.dtype)],
                            "shape": [int(d) for d in ptype.shape],
                            "data_offsets": [offset, offset + n]}
            self._order.append((name, n))
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._f, self._hash, self.written, self._next = f, hashlib.sha256(), 0, 0
        self._emit(len(text).to_bytes(8, "little") + text)
        self.written = 0

    def _emit(self, data) -> None:
        self._f.write(data)
        self._hash.update(data)

    def write(self, name: str, t: torch.Tensor) -> None:
        want, n = self._order[self._next]
        if name != want:
            raise AssertionError(f"shard writer expected {want}, got {name}")
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != n:
            raise AssertionError(f"{name}: {data.nbytes} bytes, header says {n}")
        self._emit(memoryview(data))
        self.written += n
        self._next += 1

    def finish(self) -> str:
        if self._next != len(self._order):
            raise AssertionError("shard writer closed before every tensor was written")
        return self._hash.hexdigest()
