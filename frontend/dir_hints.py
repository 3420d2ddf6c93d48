"""What a path given as a model directory is, when it is not one: the hint that ends the
error (empty when nothing is recognised), so the user knows what to pass instead."""

from __future__ import annotations

import json
from pathlib import Path

from braze.hub import download_advice, looks_like_repo_id


def no_config_hint(model_dir: Path) -> str:
    """For a directory without config.json: GGUF files, a LoRA adapter, Mistral's/Meta's
    own format, or a Hugging Face cache entry."""
    ggufs = sorted(f.name for f in model_dir.glob("*.gguf"))
    if ggufs:
        return (f"; it holds GGUF files: compile one of them ({', '.join(ggufs[:8])}"
                f"{', ...' if len(ggufs) > 8 else ''})")
    return (_adapter_hint(model_dir) or _native_format_hint(model_dir)
            or _snapshot_hint(model_dir))


def missing_dir_hint(path: Path) -> str:
    """For a missing path spelled like a Hub repository id (`org/name`): how to get it."""
    text = str(path)
    if not looks_like_repo_id(text):
        return ""
    return (f"; braze compiles a local directory: to compile the Hugging Face repository "
            f"{text}, {download_advice(text)} and pass DIR")


def _adapter_hint(model_dir: Path) -> str:
    """For a PEFT adapter directory: compile its base model, serve the adapter on it."""
    path = model_dir / "adapter_config.json"
    if not path.is_file():
        return ""
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        base = None
    return (f"; it is a LoRA adapter (adapter_config.json): compile its base model"
            f"{f' {base}' if base else ''} with --lora-slots K (and --max-lora-rank R), then "
            f"pass this directory to braze generate --lora or braze serve --lora-modules")


def _native_format_hint(model_dir: Path) -> str:
    """For Mistral's or Meta's own checkpoint format (params.json, consolidated.*)."""
    if not (model_dir / "params.json").is_file():
        return ""
    return ("; its params.json and consolidated.* weights are Mistral's/Meta's own format: "
            "braze reads the Hugging Face format (config.json and model*.safetensors, in the "
            "same repository on the Hub, or converted with transformers' conversion script)")


def _snapshot_hint(model_dir: Path) -> str:
    """For a Hugging Face cache entry (models--org--name): the snapshot to pass instead,
    the one refs/main names, else the newest."""
    snapshots = model_dir / "snapshots"
    if not snapshots.is_dir():
        return ""
    main = model_dir / "refs" / "main"
    named = snapshots / main.read_text().strip() if main.is_file() else None
    found = sorted((d for d in snapshots.iterdir() if (d / "config.json").is_file()),
                   key=lambda d: d.stat().st_mtime)
    pick = named if named in found else (found[-1] if found else None)
    if pick is None:
        return ""
    return f"; it is a Hugging Face cache entry: pass its snapshot {pick}"
