"""Write a checkpoint's multi-token-prediction layer into the artifact (frontend/mtp.py).

With the layer traced (`graph`): `mtp.bir`, its second graph, and the weights only it
has in `mtp-00001.safetensors`, ... (streamed in shards like the main weights); the
embedding and LM head it shares with the main graph are read from the main weights at
run time (the manifest's `mtp.shared`); for a tensor-parallel artifact, each rank's
slices in its own files (`mtp-rank<r>-*`, the entry's "ranks"; how they are split in its
"parallel"). Without a traced layer (an incomplete one): the checkpoint's MTP tensors as
they are, named as in the checkpoint, kept for a later compile; the runtime then refuses
method 'mtp'. Floating-point tensors are in the
compile dtype, except the float32 router of MoE layers (`mlp.gate.weight`,
`e_score_correction_bias`), which stays float32 as the main model's does.

`write_assistant` writes Gemma 4's assistant model the same way (its graph and own
weights; the target's embedding shared), as manifest entry "mtp" of kind
"gemma4_assistant".
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from braze.ir import print_graph
from braze.ir.types import torch_dtype
from braze.passes.shard import parallel_manifest

SHARD_BYTES = 2 << 30
GRAPH_FILE = "mtp.bir"
_FLOAT32_KEPT = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


def _write_shards(root: Path, names: list[str], get, shard_bytes: int, prefix: str = "mtp"):
    files, where, shard, size, total = [], {}, {}, 0, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"{prefix}-{len(files) + 1:05d}.safetensors"
            (Path(root) / name).write_bytes(save(shard, metadata={"format": "pt"}))
            files.append(name)
            shard, size = {}, 0

    for name in names:
        t = get(name)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = t.contiguous()
        where[name] = len(files)
        size += nbytes
        total += nbytes
    flush()
    return files, {n: files[i] for n, i in where.items()}, total


def _write_graph(root: Path, mtp, load_param, shard_bytes: int, log):
    """The second graph and the weights only it has: -> (manifest entry, file of each).
    `load_param`: one loader, or one per tensor-parallel rank (each rank's slices go to its
    own `mtp-rank<r>-*` files, listed in the entry's "ranks", as the main weights are)."""
    graph = mtp.graph
    (Path(root) / GRAPH_FILE).write_text(print_graph(graph))
    own = [n for n in graph.params if n not in mtp.shared]
    loaders = load_param if isinstance(load_param, list) else [load_param]
    ranks, files, total, where = [], [], 0, {}
    for r, load in enumerate(loaders):
        prefix = "mtp" if len(loaders) == 1 else f"mtp-rank{r}"
        rf, w, nbytes = _write_shards(root, own, load, shard_bytes, prefix)
        ranks.append({"files": rf})
        files += rf
        total += nbytes
        where = where or w              # the layer's files: rank 0's
    if log:
        per = f" x {len(loaders)} ranks" if len(loaders) > 1 else ""
        log(f"wrote the MTP graph ({GRAPH_FILE}, {len(graph.nodes)} ops) and its {len(own)} "
            f"own weights{per} ({total / 2**20:.1f} MiB) in {len(files)} file(s)")
    entry = {"files": files, "bytes": total, "graph": GRAPH_FILE,
             "hidden_input": "hidden_states", "shared": sorted(mtp.shared)}
    if len(loaders) > 1:
        entry["ranks"] = ranks
        entry["parallel"] = parallel_manifest(graph, mtp.shards, len(loaders),
                                              bool(graph.meta.get("expert_parallel")))
    return entry, where


def write_assistant(root: Path, mtp, load_param, shard_bytes: int = SHARD_BYTES,
                    log=None) -> dict:
    """-> the manifest entry of Gemma 4's assistant model (frontend/gemma4_assistant.py)."""
    entry, _ = _write_graph(root, mtp, load_param, shard_bytes, log)
    return {"mtp": {"kind": "gemma4_assistant", **entry}}


def write_mtp(root: Path, checkpoint, layers: dict[int, list[str]], dtype: str,
              shard_bytes: int = SHARD_BYTES, log=None, mtp=None, load_param=None) -> dict:
    """-> the manifest entries ({"mtp": ...}, or {} without MTP layers). `mtp`: the traced
    layer (frontend.mtp.MTPGraph) and `load_param` its weights, or None to ship raw tensors."""
    if not layers:
        return {}
    if mtp is not None:
        entry, where = _write_graph(root, mtp, load_param, shard_bytes, log)
        entry.update(num_layers=len(layers), layer=mtp.layer, layers={str(mtp.layer): where})
        return {"mtp": entry}
    want = torch_dtype(dtype)

    def get(name):
        t = checkpoint.get(name)
        if t.is_floating_point():
            t = t.to(torch.float32 if name.endswith(_FLOAT32_KEPT) else want)
        return t

    names = [n for layer in sorted(layers) for n in layers[layer]]
    files, where, total = _write_shards(root, names, get, shard_bytes)
    if log:
        log(f"wrote {len(where)} MTP tensors ({total / 2**20:.1f} MiB) in {len(files)} file(s)")
    return {"mtp": {"num_layers": len(layers), "files": files, "bytes": total,
                    "layers": {str(i): {n: where[n] for n in names}
                               for i, names in sorted(layers.items())}}}
