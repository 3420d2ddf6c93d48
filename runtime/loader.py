"""Open an artifact for serving: check format, versions and hashes; read graph and weights.

Never imports the compiler: the graph comes from graph.bir, not from tracing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from braze.artifact import GRAPH_FILE, TOKENIZER_DIR, read_manifest, verify_files
from braze.ir import Graph, parse_graph, verify
from braze.ir.contract import StepLimits
from braze.ir.errors import BrazeError

log = logging.getLogger("braze.runtime")


@dataclass
class Artifact:
    root: Path
    manifest: dict
    graph: Graph

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
    def tokenizer_dir(self) -> Path | None:
        t = self.manifest.get("tokenizer")
        return self.root / t if t else None

    def load_weights(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in self.manifest["weights"]["files"]:
            try:
                out.update(load_file(str(self.root / f), device=str(device)))
            except Exception as e:  # safetensors raises its own error types
                raise BrazeError(f"artifact weights {self.root / f} cannot be read ({e})") from None
        missing = [p for p in self.graph.params if p not in out]
        if missing:
            raise BrazeError(f"artifact {self.root}: parameter {missing[0]} is not in its weights")
        for name, p in self.graph.params.items():
            t = out[name]
            if tuple(t.shape) != tuple(p.type.shape):
                raise BrazeError(f"artifact {self.root}: weight {name} has shape "
                                 f"{list(t.shape)}, the graph expects {p.type}")
        return out


def open_artifact(path, check_hashes: bool = True) -> Artifact:
    root = Path(path)
    manifest = read_manifest(root)
    verify_files(root, manifest, check_hashes=check_hashes)
    _check_versions(root, manifest)
    try:
        graph = parse_graph((root / GRAPH_FILE).read_text())
        verify(graph)
    except BrazeError as e:
        raise BrazeError(f"artifact {root}: {GRAPH_FILE} is invalid: {e}") from None
    return Artifact(root, manifest, graph)


def _check_versions(root: Path, manifest: dict) -> None:
    made = manifest.get("versions", {})
    if made.get("torch") and made["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        log.info("artifact %s was compiled with torch %s; running with %s", root,
                 made["torch"], torch.__version__)


__all__ = ["Artifact", "open_artifact", "TOKENIZER_DIR"]
