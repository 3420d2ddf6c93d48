"""Write a checkpoint's multi-token-prediction weights into the artifact (frontend/mtp.py).

Files `mtp-00001.safetensors`, ... (streamed in shards like the main weights, so a large
MTP layer is never held whole), tensors named as in the checkpoint and converted to the
compile dtype, except the float32 router of MoE layers (`mlp.gate.weight`,
`e_score_correction_bias`), which stays float32 as the main model's does. The manifest's
`mtp` entry lists them by layer; the runtime does not run them yet.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from braze.ir.types import torch_dtype

SHARD_BYTES = 2 << 30
_FLOAT32_KEPT = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


def write_mtp(root: Path, checkpoint, layers: dict[int, list[str]], dtype: str,
              shard_bytes: int = SHARD_BYTES, log=None) -> dict:
    """-> the manifest entries ({"mtp": ...}, or {} without MTP layers)."""
    if not layers:
        return {}
    want = torch_dtype(dtype)
    files, where, shard, size = [], {}, {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"mtp-{len(files) + 1:05d}.safetensors"
            (Path(root) / name).write_bytes(save(shard, metadata={"format": "pt"}))
            files.append(name)
            shard, size = {}, 0

    total = 0
    for layer in sorted(layers):
        for name in layers[layer]:
            t = checkpoint.get(name)
            if t.is_floating_point():
                t = t.to(torch.float32 if name.endswith(_FLOAT32_KEPT) else want)
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > shard_bytes:
                flush()
            shard[name] = t.contiguous()
            where[name] = len(files)
            size += nbytes
            total += nbytes
    flush()
    if log:
        log(f"wrote {len(where)} MTP tensors ({total / 2**20:.1f} MiB) in {len(files)} file(s)")
    return {"mtp": {"num_layers": len(layers), "files": files, "bytes": total,
                    "layers": {str(i): {n: files[where[n]] for n in names}
                               for i, names in sorted(layers.items())}}}
