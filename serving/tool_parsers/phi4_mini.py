"""Phi-4-mini: `functools[{"name": ..., "arguments": {...}}, ...]`; text before it is content."""

from __future__ import annotations

from .base import Parsed
from .mistral import parse_array_after

MARKER = "functools"


def parse(text: str, final: bool) -> Parsed:
    return parse_array_after(text, final, MARKER)
