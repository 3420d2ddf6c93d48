"""The artifact's tokenizer, through the `tokenizers` package (no transformers at run time)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from braze.ir.errors import BrazeError

LONG_TEXT = 4096      # characters; longer texts are tokenised without holding the GIL


class Tokenizer:
    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            raise BrazeError(f"{directory} has no tokenizer.json; pass token ids (--prompt-ids)")
        self._tok = HFTokenizer.from_file(str(path))
        cfg_path = Path(directory) / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    @property
    def vocab_size(self) -> int:
        """Number of ids, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens`: with the tokenizer's own BOS etc."""
        return self._encoding(text, add_special_tokens).ids

    def encode_capped(self, text: str, cap: int,
                      add_special_tokens: bool = True) -> tuple[list[int], int]:
        """(ids, n): `text`'s n token ids, only the first `cap` of them when there are more.
        For a prompt the model cannot take anyway, this saves building a Python list of
        millions of ids (which holds the GIL)."""
        enc = self._encoding(text, add_special_tokens)
        n = len(enc)
        if n > cap:
            enc.truncate(cap)
        return enc.ids, n

    def _encoding(self, text: str, add_special_tokens: bool):
        if len(text) > LONG_TEXT:
            # `encode` holds the GIL throughout (seconds for megabytes: every other thread of
            # a server stops); `encode_batch` releases it and gives the same ids
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (any slice of a sequence); bytes of an incomplete UTF-8
        character at either end come out as U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """The vocabulary entry of each id (None for an id outside the vocabulary)."""
        return [self._tok.id_to_token(int(i)) for i in ids]
