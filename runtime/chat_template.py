"""Chat messages to prompt token ids with the model's chat template, for `LLM.chat`; and
the pieces the server's chat (serving/chat.py) renders with too: where the template is
found, the sandbox it renders in, the BOS/EOS text it is given, how text parts are joined.

The template is looked up in the artifact's tokenizer directory as transformers does:
`chat_template.jinja`, else chat_template.json's `chat_template`, else tokenizer_config.json's
(a string, or a list of named templates where "default" wins). It renders in jinja2's
immutable sandbox, since a template ships with a model and must not reach Python's
internals. Messages are passed to it as given (dicts with "role" and "content"), as
transformers' apply_chat_template passes them; content may be a string or a list of
{"type": "text", "text": ...} parts.

The rendered text is tokenised without the tokenizer's own special tokens, as
transformers' apply_chat_template(tokenize=True) and vLLM's chat do: the template writes
the BOS where the model wants one.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

from braze.ir.errors import BrazeError

log = logging.getLogger("braze.runtime")


def template_source(tokenizer_dir: Path | None, config: dict | None) -> str | None:
    """The model's chat template text, or None."""
    t = (config or {}).get("chat_template")
    if tokenizer_dir is not None:
        f = Path(tokenizer_dir) / "chat_template.jinja"
        if f.is_file():
            return f.read_text()
        f = Path(tokenizer_dir) / "chat_template.json"
        if f.is_file():
            try:
                t = json.loads(f.read_text()).get("chat_template", t)
            except (ValueError, AttributeError):
                log.warning("%s is not a JSON object with a chat_template; using "
                            "tokenizer_config.json's", f)
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t.strip() else None


def template_arg(value: str, flag: str = "--chat-template") -> str:
    """A chat template given on the command line, as vLLM's --chat-template takes it: the
    path of a file holding it, else the template itself (text with Jinja's braces or a
    newline); checked to compile. BrazeError naming `flag` otherwise."""
    from jinja2 import TemplateError
    path = Path(value).expanduser()
    if path.is_file():
        try:
            source = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise BrazeError(f"{flag} {value}: cannot read the file ({e})") from None
    elif any(c in value for c in "{}\n"):
        source = value
    else:
        raise BrazeError(f"{flag} {value}: no such file; give the path of a Jinja chat "
                         "template file, or the template text itself")
    try:
        sandboxed(source)
    except TemplateError as e:
        raise BrazeError(f"{flag}: the chat template does not compile: {e}") from None
    return source


class TemplateRejected(Exception):
    """A template's raise_exception(message): the messages are not what it accepts."""


def _raise(message):
    raise TemplateRejected(message)


def sandboxed(source: str):
    """`source` compiled in jinja2's immutable sandbox with what chat templates use beyond
    Jinja (raise_exception, strftime_now, tojson as transformers defines it); jinja2's
    TemplateError when it does not compile."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def token_text(config: dict, key: str) -> str:
    """tokenizer_config.json's bos_token / eos_token as text ("" when absent)."""
    v = config.get(key)
    if isinstance(v, dict):          # {"content": "<s>", "lstrip": false, ...}
        v = v.get("content")
    return v if isinstance(v, str) else ""


def join_text_parts(texts: list[str]) -> str:
    """A message's text content parts as the one string a template gets: a newline between
    parts, as vLLM joins them (joined with nothing, ["Summarise:", "The report"] would run
    the words together)."""
    return "\n".join(texts)


# what braze passes to a chat template itself: chat_template_kwargs cannot replace them
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "bos_token", "eos_token",
                            "continue_final_message")

CONTINUE_MARKER = "BRAZE_CONTINUE_FINAL_MESSAGE "   # after the final content (continue_final)


def check_continue_final(continue_final: bool, add_generation_prompt: bool) -> None:
    if continue_final and add_generation_prompt:
        raise BrazeError("continue_final_message and add_generation_prompt cannot both be "
                         "true: set add_generation_prompt to false to continue the final "
                         "message", param="continue_final_message")


def open_final(text: str) -> str:
    """For continue_final_message (vLLM's, transformers' apply_chat_template's): `text`, a
    chat rendered with CONTINUE_MARKER after the final message's content, cut where the
    marker is: at it when the template kept the marker's space, else before it with
    trailing spaces dropped (the template trimmed the content)."""
    i = text.rfind(CONTINUE_MARKER.strip())
    if i < 0:
        raise BrazeError("continue_final_message: the chat template dropped the final "
                         "message's content, so there is no place to continue it from",
                         param="continue_final_message")
    if text.startswith(CONTINUE_MARKER, i):
        return text[:i]
    return text[:i].rstrip()


class ChatPrompter:
    """Renders conversations with one template and tokenises them for `tokenizer`."""

    def __init__(self, source: str, tokenizer):
        from jinja2 import TemplateError
        try:
            self.template = sandboxed(source)
        except TemplateError as e:
            raise BrazeError(f"the chat template does not compile: {e}") from None
        config = getattr(tokenizer, "config", None) or {}
        self.bos_token = token_text(config, "bos_token")
        self.eos_token = token_text(config, "eos_token")
        self.tokenizer = tokenizer

    def text(self, messages: list[dict], add_generation_prompt: bool = True,
             tools: list[dict] | None = None, extra: dict | None = None,
             continue_final: bool = False, text_only_origin: str | None = None) -> str:
        """`continue_final`: the text ends inside the final message (open_final).
        `text_only_origin`: named when a message has an image or audio part."""
        from jinja2 import TemplateError
        check_continue_final(continue_final, add_generation_prompt)
        bad = [k for k in (extra or {}) if k in RESERVED_TEMPLATE_KWARGS]
        if bad:
            raise BrazeError(f"chat_template_kwargs must not set {bad[0]!r}: braze passes "
                             f"{', '.join(RESERVED_TEMPLATE_KWARGS)} to the template itself"
                             + (f" (pass {bad[0]}= to the call instead)"
                                if bad[0] in ("add_generation_prompt", "continue_final_message")
                                else ""), param="chat_template_kwargs")
        msgs = [_message(m, i, text_only_origin) for i, m in enumerate(messages)]
        if continue_final and msgs:
            msgs[-1] = {**msgs[-1], "content": (msgs[-1].get("content") or "") + CONTINUE_MARKER}
        kw = dict(extra or {})
        if tools is not None:
            kw["tools"] = tools
        try:
            text = self.template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, **kw)
            return open_final(text) if continue_final else text
        except TemplateRejected as e:
            raise BrazeError(f"the chat template rejected the messages: {e}") from None
        except TemplateError as e:
            raise BrazeError(f"the chat template failed on these messages: {e}") from None

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


def template_tool_calls(calls) -> list[dict]:
    """An assistant message's tool_calls as templates expect them (as vLLM passes them):
    each call's `arguments` a JSON object, not the JSON text OpenAI's messages carry."""
    out = []
    for c in calls if isinstance(calls, list) else [None]:
        if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
            raise BrazeError("an assistant message's tool_calls must be a list of "
                             "{\"id\", \"type\": \"function\", \"function\": {\"name\", "
                             "\"arguments\"}}", param="messages")
        f = dict(c["function"])
        args = f.get("arguments")
        if isinstance(args, str):
            try:
                f["arguments"] = json.loads(args) if args.strip() else {}
            except ValueError:
                raise BrazeError(f"tool call {f.get('name')!r} in messages has arguments "
                                 "that are not JSON", param="messages") from None
        out.append({"id": c.get("id"), "type": c.get("type", "function"), "function": f})
    return out


def not_text_part(where: str, kind: str, text_only_origin: str | None = None,
                  text_type: str = "text") -> str:
    """The refusal of a content part of type `kind` that is not text: braze chats in text;
    `text_only_origin`: the multimodal architecture a text-only artifact came from."""
    why = (f", but this artifact was compiled text-only from {text_only_origin} (its vision "
           "and audio towers are not in it)" if text_only_origin else
           "; braze chats in text")
    return f"{where} is of type {kind!r}{why}; send {text_type} content parts only"


def _message(m, i: int, text_only_origin: str | None = None) -> dict:
    """A message as the template sees it: content parts joined into one string, tool
    calls' arguments as objects."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BrazeError(f"messages[{i}] must be a dict with a \"role\" and a \"content\", "
                         f"got {m!r:.80}", param="messages")
    if m.get("tool_calls"):
        m = {**m, "tool_calls": template_tool_calls(m["tool_calls"])}
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for j, p in enumerate(content):
            if isinstance(p, dict) and p.get("type") == "text" and \
                    not isinstance(p.get("text"), str):
                raise BrazeError(f"messages[{i}].content[{j}] is a text part without a "
                                 "\"text\" string", param="messages")
            if isinstance(p, dict) and isinstance(p.get("type"), str) and p["type"] != "text":
                raise BrazeError(not_text_part(f"messages[{i}].content[{j}]", p["type"],
                                               text_only_origin), param="messages")
            if not isinstance(p, dict) or p.get("type") != "text":
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise BrazeError(f"messages[{i}].content[{j}] is of type {kind!r}; braze "
                                 "chats in text: give {\"type\": \"text\", \"text\": ...} parts",
                                 param="messages")
            texts.append(p["text"])
        m = {**m, "content": join_text_parts(texts)}
    elif content is not None and not isinstance(content, str):
        raise BrazeError(f"messages[{i}].content must be a string or a list of text parts, "
                         f"got {type(content).__name__}", param="messages")
    return m
