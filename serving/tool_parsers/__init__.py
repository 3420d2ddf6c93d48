"""Tool-call parsers: one module per model family's output format (`--tool-call-parser`).

Each module has `parse(text, final) -> base.Parsed` (see base.py for the contract) and,
where its markers are special tokens, `SKIP_SPECIAL_TOKENS = False` so requests keep them
in the text. `detect(template)` picks a parser from a chat template's tool-call markers.
"""

from __future__ import annotations

import importlib

from .base import Parsed, ToolStreamer, final_message, new_call_id

PARSERS = {
    "hermes": "hermes",            # Hermes 2/3, Qwen2.5, Qwen3
    "llama3_json": "llama3_json",  # Llama 3.1/3.2/3.3
    "mistral": "mistral",
    "deepseek_v3": "deepseek_v3",  # DeepSeek-V3/R1 (and V3.1's shorter form)
    "phi4_mini_json": "phi4_mini",
    "internlm": "internlm2",       # InternLM2/2.5
    "gemma4": "gemma4",
}
ALIASES = {"qwen": "hermes", "qwen2_5": "hermes", "qwen3": "hermes", "llama3": "llama3_json",
           "deepseek_v31": "deepseek_v3", "phi4_mini": "phi4_mini_json", "internlm2": "internlm"}

# markers a chat template writes for tool calls, most specific first
_SIGNATURES = [
    ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
    ("<|action_start|>", "internlm"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|tool_call>", "gemma4"),
    ("<tool_call>", "hermes"),
    ("functools", "phi4_mini_json"),
    ("<|python_tag|>", "llama3_json"),
    ('"parameters": ', "llama3_json"),
]


class ToolParser:
    def __init__(self, name: str):
        name = ALIASES.get(name, name)
        if name not in PARSERS:
            raise ValueError(f"unknown tool-call parser {name!r}; choose one of "
                             f"{', '.join(sorted(PARSERS))}")
        self.name = name
        self.module = importlib.import_module(f"{__name__}.{PARSERS[name]}")
        self.skip_special_tokens = getattr(self.module, "SKIP_SPECIAL_TOKENS", True)
        # the ids of the calls it reads: the shape the model's template takes back
        self.new_call_id = getattr(self.module, "new_call_id", new_call_id)

    def parse(self, text: str, final: bool = True) -> Parsed:
        return self.module.parse(text, final)

    def streamer(self) -> ToolStreamer:
        return ToolStreamer(self.module.parse, self.new_call_id)


def detect(template: str | None) -> str | None:
    """The parser a chat template's tool-call markers point to, or None."""
    if not template:
        return None
    for marker, name in _SIGNATURES:
        if marker in template:
            return name
    return None


__all__ = ["PARSERS", "Parsed", "ToolParser", "ToolStreamer", "detect", "final_message"]
