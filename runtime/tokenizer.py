"""The artifact's tokenizer, through the `tokenizers` package (no transformers at run time)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from braze.ir.errors import BrazeError

LONG_TEXT = 4096      # characters; longer texts are tokenised without holding the GIL
# transformers' apply_chat_template options for padded tensors and dicts, which braze's
# apply_chat_template (text or a list of ids) does not make
_TENSOR_OPTIONS = ("padding", "truncation", "max_length", "return_tensors", "return_dict",
                   "return_assistant_tokens_mask", "tokenizer_kwargs")


class Tokenizer:
    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            raise BrazeError(f"{directory} has no tokenizer.json; pass token ids (--prompt-ids)")
        self._tok = HFTokenizer.from_file(str(path))
        self.directory = Path(directory)
        cfg_path = Path(directory) / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self._prompter = None       # the model's chat template, compiled at first use

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

    # ---- what vLLM scripts ask of get_tokenizer() (a transformers tokenizer there) ----
    @property
    def bos_token(self) -> str | None:
        from .chat_template import token_text
        return token_text(self.config, "bos_token") or None

    @property
    def eos_token(self) -> str | None:
        from .chat_template import token_text
        return token_text(self.config, "eos_token") or None

    @property
    def pad_token(self) -> str | None:
        from .chat_template import token_text
        return token_text(self.config, "pad_token") or None

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_id(self.pad_token)

    def convert_tokens_to_ids(self, tokens):
        """transformers': the id of a vocabulary entry (special tokens included), or a list
        of them for a list; for an entry not in the vocabulary, the unknown token's id
        (None where the tokenizer has none)."""
        if isinstance(tokens, str):
            return self._id_or_unknown(tokens)
        return [self._id_or_unknown(t) for t in tokens]

    def _id_or_unknown(self, token: str) -> int | None:
        tid = self.token_id(token)
        if tid is None:
            from .chat_template import token_text
            unk = token_text(self.config, "unk_token") or getattr(self._tok.model, "unk_token",
                                                                   None)
            tid = self.token_id(unk) if unk else None
        return tid

    def get_vocab(self) -> dict[str, int]:
        """Each vocabulary entry's id, added (special) tokens included (transformers')."""
        return self._tok.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_id(self.eos_token)

    def chat_prompter(self, chat_template: str | None = None):
        """runtime.chat_template.ChatPrompter of `chat_template` (a Jinja text), else of the
        model's template (compiled once); BrazeError when the model has none."""
        from .chat_template import ChatPrompter, template_source
        if chat_template is not None:
            return ChatPrompter(chat_template, self)
        if self._prompter is None:
            source = template_source(self.directory, self.config)
            if source is None:
                raise BrazeError("this model has no chat template (no chat_template.jinja, "
                                 "chat_template.json or chat_template in its "
                                 "tokenizer_config.json); pass chat_template=, or use "
                                 "generate with a prompt")
            self._prompter = ChatPrompter(source, self)
        return self._prompter

    def apply_chat_template(self, conversation, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True,
                            **kwargs):
        """transformers' apply_chat_template, with its defaults: the conversation (or a
        list of them) rendered with the model's chat template or `chat_template` (a Jinja
        text), as text, or with `tokenize` as token ids encoded without the tokenizer's own
        special tokens (the template writes them). Other keywords reach the template."""
        for k in _TENSOR_OPTIONS:        # at their neutral values they change nothing
            if kwargs.pop(k, None):
                raise BrazeError(f"apply_chat_template: {k} is not supported by braze's "
                                 "tokenizer; leave it out (it returns text or a list of "
                                 "token ids)")
        prompter = self.chat_prompter(chat_template)
        if documents is not None:
            kwargs["documents"] = documents
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 \
            and isinstance(conversation[0], (list, tuple))
        out = [prompter.text(list(c), add_generation_prompt, tools, kwargs,
                             continue_final_message)
               for c in (conversation if batched else [conversation])]
        if tokenize:
            out = [prompter.ids(t) for t in out]
        return out if batched else out[0]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """The vocabulary entry of each id (None for an id outside the vocabulary)."""
        return [self._tok.id_to_token(int(i)) for i in ids]
