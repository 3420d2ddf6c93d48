"""Open an artifact for serving: check format, versions, paths and hashes; read the graph;
decide what of it may run (runtime/trust.py); read the weights.

Never imports the compiler: the graph comes from graph.bir, not from tracing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from braze.artifact import (GRAPH_FILE, TOKENIZER_DIR, changed, read_manifest_bytes,
                            text_only_origin, verify_files)
from braze.ir import Graph, parse_graph, verify
from braze.ir.contract import StepLimits
from braze.ir.errors import BrazeError
from braze.ir.types import torch_dtype

from .trust import Trust, establish, refusal

log = logging.getLogger("braze.runtime")


@dataclass
class Artifact:
    root: Path
    manifest: dict
    graph: Graph
    trust: Trust

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def options(self) -> dict:
        return self.manifest["options"]

    @property
    def limits(self) -> StepLimits:
        """The step limits it was compiled for (ir/contract.py), as the manifest records them."""
        return StepLimits.from_manifest(self.manifest, f"artifact {self.root}")

    @property
    def text_only_origin(self) -> str | None:
        """The multimodal architecture it was compiled from, text-only (braze/artifact.py)."""
        return text_only_origin(self.manifest)

    @property
    def tokenizer_dir(self) -> Path | None:
        t = self.manifest.get("tokenizer")
        return self.root / t if t else None

    def load_weights(self, device: torch.device | str = "cpu",
                     rank: int | None = None) -> dict[str, torch.Tensor]:
        """The weights of tensor-parallel rank `rank` (default: this process's rank in its
        torch.distributed group, else 0): only that rank's files are read."""
        out: dict[str, torch.Tensor] = {}
        weights = self.manifest["weights"]
        files = weights["files"]
        if "ranks" in weights:
            from .parallel import current_rank
            rank = current_rank() if rank is None else rank
            if not 0 <= rank < len(weights["ranks"]):
                raise BrazeError(f"artifact {self.root} has weights for ranks "
                                 f"0..{len(weights['ranks']) - 1}, not rank {rank}")
            files = weights["ranks"][rank]["files"]
        source: dict[str, str] = {}
        for f in files:
            try:
                got = load_file(str(self.root / f), device=str(device))
            except Exception as e:  # safetensors raises its own error types
                raise BrazeError(f"artifact weights {self.root / f} cannot be read ({e})") from None
            out.update(got)
            source.update(dict.fromkeys(got, f))
        missing = [p for p in self.graph.params if p not in out]
        if missing:
            raise BrazeError(f"artifact {self.root}: parameter {missing[0]} is not in its weights")
        for name, p in self.graph.params.items():
            t = out[name]
            # weights are data no signature-less check covers: one rewritten after compiling
            # (cast to save space, say) is named here, not by the first op that meets it
            if tuple(t.shape) != tuple(p.type.shape) or t.dtype != torch_dtype(p.type.dtype):
                raise BrazeError(f"artifact {self.root / source[name]}: weight {name} is "
                                 f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}, the "
                                 f"graph expects {p.type}: the weights were changed after "
                                 f"compiling; recompile the artifact")
        return out


def open_artifact(path, check_hashes: bool = True, trusted_keys=None,
                  trust_artifact: bool = False, require_trust: bool = True) -> Artifact:
    """Open the artifact at `path`. Unless `require_trust` is False (`braze inspect` only
    reports), it is refused unless it is signed by a trusted key (the per-user
    trusted-keys directory and `trusted_keys`, a directory), verified by regenerating its
    plans and kernels, or `trust_artifact` is given (runtime/trust.py)."""
    root = Path(path)
    manifest, manifest_bytes = read_manifest_bytes(root)
    verify_files(root, manifest, check_hashes=check_hashes)
    _check_versions(root, manifest)
    graph = _read_graph(root, manifest)
    # trust does not rest on `check_hashes`: the signature covers the manifest's bytes, and
    # executable files are checked against the manifest when they are read to run
    # (braze/kernel_modules.py, trust.check_loaded_cubin); check_hashes=False skips
    # re-hashing the rest (weights), e.g. right after compile wrote and hashed them
    trust = establish(root, manifest, manifest_bytes, graph, trusted_keys, trust_artifact)
    if require_trust and not trust.admitted:
        raise BrazeError(refusal(root, trust))
    if trust.admitted:
        log.info("artifact %s: %s", root, trust.detail)
    return Artifact(root, manifest, graph, trust)


def _read_graph(root: Path, manifest: dict) -> Graph:
    data = (root / GRAPH_FILE).read_bytes()        # read once: parsed is what was hashed
    if hashlib.sha256(data).hexdigest() != manifest["files"][GRAPH_FILE]:
        raise BrazeError(changed(root, GRAPH_FILE))
    try:
        graph = parse_graph(data.decode("utf-8"), source=GRAPH_FILE)
    except UnicodeDecodeError:
        raise BrazeError(f"artifact {root}: {GRAPH_FILE} is not UTF-8 text") from None
    except BrazeError as e:
        raise BrazeError(f"artifact {root}: {e}") from None
    try:
        verify(graph)
    except BrazeError as e:
        raise BrazeError(f"artifact {root}: {GRAPH_FILE} is invalid: {e}") from None
    return graph


def _check_versions(root: Path, manifest: dict) -> None:
    made = manifest.get("versions", {})
    if made.get("torch") and made["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        log.info("artifact %s was compiled with torch %s; running with %s", root,
                 made["torch"], torch.__version__)


__all__ = ["Artifact", "open_artifact", "TOKENIZER_DIR"]
