"""Hugging Face Hub repository ids (`org/name`) given where braze reads a local directory (a
model to compile, a LoRA adapter to serve), as vLLM and transformers take them: recognised
so the error can say how to get the directory. Shared by the compiler and the runtime, so
it imports neither."""

from __future__ import annotations


def looks_like_repo_id(text: str) -> bool:
    """`org/name`: two non-empty parts, not a relative (./, ../) or home (~) path."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def download_advice(repo: str) -> str:
    return f"download it first (huggingface-cli download {repo} --local-dir DIR)"
