"""Requests' prompts to token ids, for the routes: long ones off the event loop, text the
tokenizer cannot take refused, prompts longer than the model allows refused before their
ids travel, chats rendered with the model's chat template or the request's own.

Prompts up to INLINE_CHARS characters are tokenised on the event loop (microseconds).
Longer ones go to a small pool of tokenising threads: a megabyte prompt takes seconds,
and on the loop it stopped /health and every other stream for as long. That helps only
because runtime.tokenizer.Tokenizer tokenises long texts without holding the GIL; the
threads run at a lower priority (nice TOKENIZE_NICE), so that on a busy machine the long
prompt itself waits rather than the engine thread and the loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from .chat import (
    NO_TEMPLATE,
    ChatTemplate,
    RequestTemplates,
    chat_size,
    check_messages,
)
from .protocol import bad_request, check_text

INLINE_CHARS = 4096
TOKENIZE_NICE = 10


def _lower_priority() -> None:
    """Linux threads have their own niceness; elsewhere setpriority would renice the whole
    process, so it is left alone."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TOKENIZE_NICE)
        except OSError:
            pass


class Prompts:
    """Token ids for the prompts of `svc` (serving/app.Service: its tokenizer, chat
    template, max_model_len), read from it at each call."""

    def __init__(self, svc, trust_request_chat_template: bool = False):
        self.svc = svc
        self.trust_request_chat_template = trust_request_chat_template
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="braze-tokenize",
                                       initializer=_lower_priority)
        self.request_templates = RequestTemplates(getattr(svc.tokenizer, "config", None))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def off_loop(self, size: int, fn, *args):
        """fn(*args): on the event loop when `size` (characters to tokenise) is small, else
        on a tokenising thread."""
        if size <= INLINE_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- completions and /tokenize ---------------------------------------------------
    async def kept(self, prompt, keep: int, add_special_tokens: bool = True,
                   param: str = "prompt") -> tuple[list[int], bool]:
        """(the last `keep` ids of a completion's prompt, whether it had more), checked:
        vLLM's truncate_prompt_tokens."""
        ids = prompt if isinstance(prompt, list) else await self.off_loop(
            len(prompt), self._encode, prompt, add_special_tokens)
        self.check_length(min(len(ids), keep), param)
        return ids[-keep:], len(ids) > keep

    async def for_model(self, prompt, param: str = "prompt",
                        add_special_tokens: bool = True) -> list[int]:
        """The ids of a completion's prompt (text or ids); a text prompt longer than the
        model allows is refused without building the list of all its ids."""
        if isinstance(prompt, list):
            return prompt
        return await self.off_loop(len(prompt), self._capped, prompt, param, add_special_tokens)

    async def ids(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """All the ids of a text (for /tokenize)."""
        return await self.off_loop(len(prompt), self._encode, prompt, add_special_tokens)

    def _tokenizer(self, param: str):
        tok = self.svc.tokenizer
        if tok is None:
            raise bad_request("this model has no tokenizer: send the prompt as token ids", param)
        return tok

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self._tokenizer("prompt")
        check_text(text, "prompt")
        return tok.encode(text, add_special_tokens)

    def _capped(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        tok = self._tokenizer(param)
        check_text(text, param)
        if not hasattr(tok, "encode_capped"):
            return tok.encode(text, add_special_tokens)
        ids, n = tok.encode_capped(text, self.svc.max_model_len, add_special_tokens)
        self.check_length(n, param)
        return ids

    def check_length(self, n: int, param: str) -> None:
        """The engine's own check (Engine.add_request), made before the ids travel."""
        if n >= self.svc.max_model_len:
            raise bad_request(self.svc.aengine.engine.too_long(n), param)

    # ---- chat ------------------------------------------------------------------------
    def template_for(self, body) -> ChatTemplate:
        """The request's own chat_template where the server takes those, else the model's."""
        if getattr(body, "chat_template", None) is not None:
            if not self.trust_request_chat_template:
                raise bad_request("this server does not take chat templates from requests; "
                                  "start it with --trust-request-chat-template to allow them",
                                  "chat_template")
            return self.request_templates.get(body.chat_template)
        if self.svc.chat_template is None:
            raise bad_request(NO_TEMPLATE, "messages")
        return self.svc.chat_template

    async def chat(self, body, add_special_tokens: bool | None = None,
                   for_model: bool = False, tools: list[dict] | None = None,
                   keep: int | None = None) -> list[int]:
        """The prompt of a chat request. `add_special_tokens` None: as chat completions
        feed the model (exactly one BOS, the template's or else the tokenizer's);
        True/False: the rendered text encoded so.
        `for_model`: refuse a prompt longer than the model allows. `tools`: the request's
        tools, for the template. `keep`: only the last `keep` ids (truncate_prompt_tokens),
        then checked."""
        size = chat_size(body.messages) + len(getattr(body, "chat_template", None) or "")
        if keep is None:
            return await self.off_loop(size, self._chat, body, add_special_tokens, for_model,
                                       tools)
        ids = (await self.off_loop(size, self._chat, body, add_special_tokens, False,
                                   tools))[-keep:]
        self.check_length(len(ids), "messages")
        return ids

    def _chat(self, body, add_special_tokens, for_model, tools=None) -> list[int]:
        template = self.template_for(body)
        tok = self.svc.tokenizer
        if tok is None:
            raise bad_request("this model has no tokenizer, so it cannot chat; use "
                              "/v1/completions with token ids", "messages")
        check_messages(body.messages, self.svc.text_only_origin)
        # the server's defaults (--default-chat-template-kwargs) under the request's own
        effort = getattr(body, "reasoning_effort", None)     # OpenAI's, as vLLM passes it
        kwargs = {**self.svc.default_chat_template_kwargs,
                  **({} if effort is None else {"reasoning_effort": effort}),
                  **(body.chat_template_kwargs or {})}
        text = template.render(body.messages, body.add_generation_prompt, kwargs, tools=tools,
                               continue_final=getattr(body, "continue_final_message", False),
                               documents=getattr(body, "documents", None))
        check_text(text, "chat_template_kwargs", "the prompt the chat template made")
        if add_special_tokens is not None:
            return tok.encode(text, add_special_tokens)
        # the text as one piece, as transformers' apply_chat_template and vLLM tokenise it
        # (cutting off a template's BOS and encoding the rest anew would change how the
        # rest begins for some tokenizers), and exactly one BOS where the tokenizer has one
        bos = self.svc.bos_id
        if for_model and hasattr(tok, "encode_capped"):
            ids, n = tok.encode_capped(text, self.svc.max_model_len, False)
            if bos is not None and ids[:1] != [bos]:
                ids, n = [bos] + ids, n + 1
            self.check_length(n, "messages")
            return ids
        ids = tok.encode(text, False)
        return [bos] + ids if bos is not None and ids[:1] != [bos] else ids
