"""The artifact schema: what `braze compile` writes and the runtime reads.

An artifact is a plain directory, never pickle:

    manifest.json            format + versions, model, options, graph summary, weights
                             index, and the sha256 of every other file
    graph.bir                the IR text
    weights-NNNNN.safetensors
    config.json              the model's config, as given (for a GGUF source: read from
                             its metadata; manifest model.source names the file and sha256;
                             for an fp8 checkpoint: without quantization_config, since the
                             weights are dequantized, and model.source says from what)
    tokenizer/               tokenizer files, when the model directory had them (for a GGUF:
                             converted from its metadata by transformers)
    kernels/, cubin/         kernel sources and their ahead-of-time binaries (codegen)
    signature.json           an Ed25519 signature of manifest.json (braze/signing.py)

Every path the manifest names is relative, resolves inside the artifact, and is listed
with its sha256 in `files`; links and anything but regular files are refused, and so is
any file the manifest does not list. What may run from an artifact is decided after
these checks (runtime/trust.py).

This module is shared by the compiler and the runtime, so it imports neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

from braze.ir.errors import BrazeError

FORMAT = "braze-artifact"
FORMAT_VERSION = 2     # 2: step limits recorded; cubins per spec key
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
GRAPH_FILE = "graph.bir"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")
# chat_template.json: where multimodal checkpoints (their processor) keep the chat template


def text_only_origin(manifest: dict) -> str | None:
    """The multimodal architecture (Gemma3ForConditionalGeneration, ...) whose language model
    the artifact is, compiled text-only (manifest model.multimodal, frontend/multimodal.py);
    None for an artifact of a text model."""
    mm = (manifest.get("model") or {}).get("multimodal")
    if isinstance(mm, dict) and mm.get("text_only"):
        return str(mm.get("architecture") or "a multimodal model")
    return None


def adapter_prefixes(manifest: dict) -> dict[str, str | None]:
    """For an artifact compiled text-only from a multimodal checkpoint: the module-name
    prefixes of an adapter trained on the multimodal model -> the text model's prefix, or
    None for a tower's or projector's (manifest model.multimodal, frontend/multimodal.py);
    {} otherwise, or for an artifact compiled before braze recorded them."""
    if text_only_origin(manifest) is None:
        return {}
    got = manifest["model"]["multimodal"].get("adapter_prefixes")
    return dict(got) if isinstance(got, dict) else {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    # O_NOFOLLOW: a file swapped for a link after the artifact was walked is not followed
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_artifact(d: Path) -> bool:
    """Whether directory `d` holds a braze manifest (checked no further)."""
    try:
        return json.loads((Path(d) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(root: Path) -> dict:
    return read_manifest_bytes(root)[0]


def read_manifest_bytes(root: Path) -> tuple[dict, bytes]:
    """The manifest and the exact bytes it was parsed from (what a signature covers)."""
    root = Path(root)
    if not root.is_dir():
        raise BrazeError(_not_a_directory(root))
    path = root / MANIFEST
    if not path.exists():
        hint = (f"; it is a Hugging Face checkpoint (config.json): compile it first, "
                f"braze compile {root} -o ARTIFACT (or braze.compile), and run ARTIFACT"
                if (root / "config.json").is_file() else "")
        raise BrazeError(f"{root} is not a braze artifact: it has no {MANIFEST}{hint}")
    data = path.read_bytes()
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:      # RecursionError: absurdly deep nesting
        raise BrazeError(f"{path} is corrupt: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BrazeError(f"{path} is not a braze manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    versions = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
    made_by = versions.get("braze", "an unknown braze")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        from braze import __version__
        raise BrazeError(f"artifact {root} has format version {version}, newer than this braze "
                         f"{__version__} reads ({FORMAT_VERSION}): it was made by braze "
                         f"{made_by}; upgrade braze on this host to that version, or recompile "
                         f"the model with this braze")
    if version != FORMAT_VERSION:
        raise BrazeError(f"artifact {root} has format version {version} (made by braze "
                         f"{made_by}); this braze reads version {FORMAT_VERSION}: recompile "
                         f"it with `braze compile`")
    _check_sections(path, manifest)
    return manifest, data


# what every manifest holds and every reader takes as given (codegen/artifact_writer.py)
_SECTIONS = {"model": dict, "options": dict, "versions": dict, "weights": dict, "files": dict}
_MODEL_INTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim")


def _check_sections(path: Path, manifest: dict) -> None:
    """The manifest's sections have the shapes compile writes, so that a hand-edited or
    damaged one is refused here, naming what is wrong, not deep in a reader as a bug."""
    def bad(where: str, what: str):
        raise BrazeError(f"{path} is damaged: its {where} is not {what} (the manifest was "
                         f"edited by hand or damaged); copy the artifact again or recompile it")

    for key, kind in _SECTIONS.items():
        if not isinstance(manifest.get(key), kind):
            bad(f'"{key}"', "an object")
    model, weights = manifest["model"], manifest["weights"]
    for key in ("architecture", "family", "dtype"):
        if not isinstance(model.get(key), str):
            bad(f'model "{key}"', "a string")
    for key in _MODEL_INTS:
        if not _is_int(model.get(key)):
            bad(f'model "{key}"', "an integer")
    eos = model.get("eos_token_ids")
    if eos is not None and not (isinstance(eos, list) and all(map(_is_int, eos))):
        bad('model "eos_token_ids"', "a list of token ids")
    if not isinstance(weights.get("files"), list) or not all(
            isinstance(f, str) for f in weights["files"]):
        bad('weights "files"', "a list of file names")
    if not _is_int(weights.get("bytes")):
        bad('weights "bytes"', "an integer")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _not_a_directory(root: Path) -> str:
    """Why `root`, not a directory, is no artifact: a URL (s3://..., which Path has already
    folded to s3:/...), a file (an archive of an artifact, say), or nothing."""
    parts = root.parts
    if not root.exists() and len(parts) > 1 and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]+:",
                                                              parts[0]):
        url = f"{parts[0]}//{'/'.join(parts[1:])}"
        return (f"artifact {url} is a URL; braze opens artifacts from a local directory "
                f"only: download it first (for S3: `aws s3 sync {url} DIR`), then give DIR")
    if root.exists():
        return (f"artifact {root} is a file, not an artifact directory (`braze compile` "
                f"writes a directory; unpack an archive of one first, and give the directory)")
    return f"artifact {root} does not exist (make one with `braze compile`)"


def verify_files(root: Path, manifest: dict, check_hashes: bool = True) -> None:
    """Every file the manifest lists lies inside `root` and exists with its recorded sha256,
    nothing else is there (no links, no unlisted files), and every file the manifest refers
    to elsewhere (weights, graph, tokenizer, cubins) is one of the listed files."""
    root = Path(root)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BrazeError(f"{root / MANIFEST} lists no files: the artifact is incomplete")
    for rel, digest in files.items():
        _inside(root, rel)
        if not isinstance(digest, str):
            raise BrazeError(f"{root / MANIFEST}: the sha256 of {rel} is not a string")
    present = _regular_files(root)
    for rel in sorted(files):
        if rel not in present:
            raise BrazeError(f"artifact {root} is missing {rel} (listed in its manifest): "
                             f"{AGAIN}")
    extra = sorted(present - set(files) - {MANIFEST, SIGNATURE})
    if extra:
        raise BrazeError(f"artifact {root} holds {extra[0]}, which its manifest does not list: "
                         f"remove it (braze reads only the files an artifact lists and hashes)")
    _check_references(root, manifest, files)
    if check_hashes:
        for rel, digest in sorted(files.items()):
            if sha256_file(root / rel) != digest:
                raise BrazeError(changed(root, rel))


# a shipped artifact is most often damaged on the way (a copy or download cut short)
AGAIN = "copy the artifact again, whole, or recompile it"


def changed(root: Path, rel: str) -> str:
    """The refusal of a file whose bytes are not the ones the manifest hashed."""
    return (f"artifact file {root / rel} does not match its sha256 in the manifest: it was "
            f"modified, corrupted or copied incompletely; {AGAIN}")


def _inside(root: Path, rel) -> Path:
    """`root / rel` for a manifest path `rel` that stays inside the artifact: relative,
    POSIX, no `..`, `.` or empty parts. Nothing is looked up on disk for a refused path."""
    ok = isinstance(rel, str) and rel and "\\" not in rel and "\0" not in rel
    parts = PurePosixPath(rel).parts if ok else ()
    if not ok or PurePosixPath(rel).is_absolute() or any(p in ("..", ".") for p in parts) \
            or "/".join(parts) != rel:
        raise BrazeError(f"artifact {root}: its manifest names {str(rel)[:200]!r}, which is not a "
                         f"plain relative path inside the artifact; braze reads nothing outside "
                         f"it (the manifest was edited by hand or by an attacker: recompile it)")
    return root / rel


def _regular_files(root: Path) -> set[str]:
    """The relative paths of the files under `root`; a link (to a file or a directory) or a
    special file (a FIFO would block whoever hashes it) anywhere is refused."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise BrazeError(f"artifact {root} holds a symbolic link, {rel}: braze refuses "
                                 f"links in an artifact (copy the file in instead)")
            if name in filenames and not stat.S_ISREG(mode):
                raise BrazeError(f"artifact {root} holds {rel}, which is not a regular file")
            if name in filenames:
                out.add(rel)
    return out


def _check_references(root: Path, manifest: dict, files: dict) -> None:
    def listed(rel, what: str) -> None:
        if rel not in files:
            raise BrazeError(f"artifact {root}: its {what} {str(rel)[:200]!r} is not one of the "
                             f"files its manifest lists and hashes; recompile the artifact")

    listed(GRAPH_FILE, "graph")
    weights = manifest.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("files"), list):
        raise BrazeError(f"{root / MANIFEST} has no list of weight files")
    for f in weights["files"]:
        listed(f, "weight file")
    for r, rank in enumerate(_entries(root, weights.get("ranks"), "weights \"ranks\"")):
        for f in _entries(root, rank.get("files"), f"weights of rank {r}"):
            listed(f, f"weight file of rank {r}")
    # the MTP graph and its weights (codegen/mtp_writer.py): read by verification and by the
    # proposer, so listed and hashed like the rest (verification covers no weights)
    mtp = manifest.get("mtp")
    if mtp is not None:
        if not isinstance(mtp, dict):
            raise BrazeError(f"{root / MANIFEST}: its \"mtp\" entry is not an object")
        if "graph" in mtp:
            listed(mtp["graph"], "MTP graph")
        for f in _entries(root, mtp.get("files"), "MTP weights"):
            listed(f, "MTP weight file")
        for r, rank in enumerate(_entries(root, mtp.get("ranks"), "MTP \"ranks\"")):
            for f in _entries(root, rank.get("files"), f"MTP weights of rank {r}"):
                listed(f, f"MTP weight file of rank {r}")
    if manifest.get("tokenizer") not in (None, TOKENIZER_DIR):
        raise BrazeError(f"artifact {root}: its tokenizer directory must be {TOKENIZER_DIR!r}, "
                         f"got {str(manifest.get('tokenizer'))[:200]!r}")
    kernels = manifest.get("kernels") or {}
    if not isinstance(kernels, dict):
        raise BrazeError(f"{root / MANIFEST}: its kernel table is not an object")
    for vid, k in kernels.items():
        for key, rel in _file_entries(k):
            listed(rel, f"{key} file of kernel {vid}")


def _entries(root: Path, value, what: str) -> list:
    """A list the manifest holds (of file names, or of objects for "ranks"); [] if absent."""
    if value is None:
        return []
    if not isinstance(value, list) or (what.endswith('"ranks"') and not all(
            isinstance(v, dict) for v in value)):
        raise BrazeError(f"{root / MANIFEST}: its {what} is not a list"
                         + (" of objects" if what.endswith('"ranks"') else ""))
    return value


def _file_entries(value):
    """("cubin" | "meta", path) for every file a kernel-table entry names, however deep
    (per target, per specialisation)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("cubin", "meta"):
                yield k, v
            else:
                yield from _file_entries(v)
    elif isinstance(value, list):
        for v in value:
            yield from _file_entries(v)
