"""The artifact schema: what `braze compile` writes and the runtime reads.

An artifact is a plain directory, never pickle:

    manifest.json            format + versions, model, options, graph summary, weights
                             index, and the sha256 of every other file
    graph.bir                the IR text
    weights-NNNNN.safetensors
    config.json              the model's config, as given
    tokenizer/               tokenizer files, when the model directory had them

This module is shared by the compiler and the runtime, so it imports neither.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from braze.ir.errors import BrazeError

FORMAT = "braze-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH_FILE = "graph.bir"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise BrazeError(f"artifact {root} does not exist (make one with `braze compile`)")
    path = root / MANIFEST
    if not path.exists():
        raise BrazeError(f"{root} is not a braze artifact: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:      # RecursionError: absurdly deep nesting
        raise BrazeError(f"{path} is corrupt: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BrazeError(f"{path} is not a braze manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        made_by = manifest.get("versions", {}).get("braze", "an unknown braze")
        raise BrazeError(f"artifact {root} has format version {version} (made by braze "
                         f"{made_by}); this braze reads version {FORMAT_VERSION}: recompile "
                         f"it with `braze compile`")
    return manifest


def verify_files(root: Path, manifest: dict, check_hashes: bool = True) -> None:
    """Every file the manifest lists exists with its recorded sha256, and nothing is unlisted."""
    root = Path(root)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BrazeError(f"{root / MANIFEST} lists no files: the artifact is incomplete")
    for rel, digest in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise BrazeError(f"artifact {root} is missing {rel} (listed in its manifest)")
        if check_hashes and sha256_file(path) != digest:
            raise BrazeError(f"artifact file {path} does not match its sha256 in the manifest: "
                             f"it was modified or corrupted; recompile the artifact")
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    extra = sorted(present - set(files) - {MANIFEST})
    if extra:
        raise BrazeError(f"artifact {root} holds {extra[0]}, which its manifest does not list")
