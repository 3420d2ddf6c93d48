"""Chat messages rendered to a prompt with the tokenizer's chat template.

The template comes from the artifact's tokenizer directory: `chat_template.jinja` when
present, else chat_template.json's `chat_template` (the processor's file, where multimodal
checkpoints keep it), else `chat_template` in tokenizer_config.json (a string, or a list of
named templates where "default" wins). It is rendered in jinja2's immutable sandbox: templates
ship with models, and a template must not reach Python internals. Finding, sandboxing and
the text-part rule are runtime/chat_template.py's, which `LLM.chat` uses too.
"""

from __future__ import annotations

import threading

from braze.runtime.chat_template import (
    CONTINUE_MARKER,
    TemplateRejected,
    check_continue_final,
    join_text_parts,
    not_text_part,
    open_final,
    sandboxed,
    token_text,
)

from .protocol import ChatMessage, bad_request, check_text

NO_TEMPLATE = ("model has no chat template (no chat_template.jinja, chat_template.json or "
               "chat_template in its tokenizer_config.json, or one that does not compile): "
               "start the server with --chat-template FILE, or use /v1/completions with a "
               "prompt instead")


class ChatTemplate:
    """A compiled chat template; `render(messages)` returns the prompt text."""

    def __init__(self, source: str, config: dict | None = None):
        self.template = sandboxed(source)
        config = config or {}
        self.bos_token = token_text(config, "bos_token")
        self.eos_token = token_text(config, "eos_token")

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
               extra: dict | None = None, tools: list[dict] | None = None,
               continue_final: bool = False, documents: list[dict] | None = None) -> str:
        """`tools`: the request's tools, passed to the template as `tools` (as
        transformers' apply_chat_template does); assistant `tool_calls` and tool messages'
        `tool_call_id` reach the template too. `continue_final` (vLLM's
        continue_final_message): the text ends right after the final message's content,
        with no end-of-turn, so the model continues that message. As transformers does it,
        the content is rendered with a marker after it and the text is cut at the marker
        (runtime/chat_template.open_final)."""
        check_continue_final(continue_final, add_generation_prompt)
        from .tools import template_messages
        msgs = [{"role": m.role, "content": _content_text(m)}
                | ({"name": m.name} if m.name else {}) | more
                for m, more in zip(messages, template_messages(messages))]
        from jinja2 import TemplateError
        kw = dict(extra or {})
        if tools is not None:
            kw["tools"] = tools
        if documents is not None:        # RAG templates read them, as in transformers
            kw["documents"] = documents
        if continue_final:
            msgs[-1]["content"] += CONTINUE_MARKER
        try:
            text = self.template.render(
                messages=msgs, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **kw)
        except TemplateRejected as e:
            raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
        except TemplateError as e:
            raise bad_request(f"the chat template failed on these messages: {e}",
                              "messages") from None
        return open_final(text) if continue_final else text


def check_messages(messages: list[ChatMessage], text_only_origin: str | None = None) -> None:
    """400 for message text the tokenizer cannot take (lone surrogates), naming where, and
    for content parts other than text; `text_only_origin`: the multimodal architecture the
    artifact was compiled from text-only, which the 400 names."""
    for i, m in enumerate(messages):
        for j, p in enumerate(m.content if isinstance(m.content, list) else []):
            if p.type != "text":
                raise bad_request(not_text_part(f"messages[{i}].content[{j}]", p.type,
                                                text_only_origin, "text"), "messages")
        check_text(_content_text(m), "messages", f"messages[{i}].content")
        if m.name:
            check_text(m.name, "messages", f"messages[{i}].name")


class RequestTemplates:
    """Chat templates that requests bring (`chat_template`), each compiled once; the last
    `size` distinct ones are kept. Compile errors are the client's: 400 naming the field."""

    def __init__(self, config: dict | None, size: int = 16):
        self.config, self.size = config or {}, size
        self._compiled: dict[str, ChatTemplate] = {}
        self._lock = threading.Lock()    # used from the tokenising threads

    def get(self, source: str) -> ChatTemplate:
        with self._lock:
            t = self._compiled.pop(source, None)
        if t is None:
            from jinja2 import TemplateError
            check_text(source, "chat_template")
            try:
                t = ChatTemplate(source, self.config)
            except TemplateError as e:
                raise bad_request(f"chat_template does not compile: {e}", "chat_template") from None
        with self._lock:
            self._compiled[source] = t
            while len(self._compiled) > self.size:
                self._compiled.pop(next(iter(self._compiled)))
        return t


def chat_size(messages: list[ChatMessage]) -> int:
    """Characters of text in `messages`: what tokenising them costs, roughly."""
    n = 0
    for m in messages:
        if isinstance(m.content, str):
            n += len(m.content)
        elif m.content:
            n += sum(len(p.text or "") for p in m.content)
    return n


def _content_text(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for p in m.content:
        if p.type != "text":
            raise bad_request(f"message content of type {p.type!r} is not supported; "
                              "send text", "messages")
        parts.append(p.text or "")
    return join_text_parts(parts)
