"""InternLM2 / 2.5: `<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>`
(special tokens: the request keeps them in the text)."""

from __future__ import annotations

from .base import Parsed
from .hermes import parse_tagged

START, END = "<|action_start|><|plugin|>", "<|action_end|>"
SKIP_SPECIAL_TOKENS = False


def parse(text: str, final: bool) -> Parsed:
    return parse_tagged(text, final, START, END)
