"""Host data onto the device without stopping the host.

A CPU tensor in pageable memory copied to a GPU with a plain `.to(device)` (or made there
by `torch.tensor(values, device=...)`) is copied synchronously: torch waits for every
kernel already queued on the stream, so the host stops until the step in flight ends and
the next one cannot be prepared meanwhile. Copied from pinned memory with
`non_blocking=True`, the copy is queued behind that work instead (the caching host
allocator keeps the pinned source until the copy has run). `tests/test_uploads.py` keeps
the runtime from making device tensors any other way.
"""

from __future__ import annotations

import torch


def upload(host: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device`, queued behind the stream's work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def upload_values(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Python numbers (a list, nested lists) as a `dtype` tensor on `device`, as `upload`."""
    return upload(torch.tensor(values, dtype=dtype), device)
