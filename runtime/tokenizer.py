"""The artifact's tokenizer, through the `tokenizers` package (no transformers at run time)."""

from __future__ import annotations

import json
from pathlib import Path

from braze.ir.errors import BrazeError


class Tokenizer:
    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            raise BrazeError(f"{directory} has no tokenizer.json; pass token ids (--prompt-ids)")
        self._tok = HFTokenizer.from_file(str(path))
        cfg_path = Path(directory) / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
