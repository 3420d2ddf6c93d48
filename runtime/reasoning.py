"""Reasoning ("thinking") output: where a reply's reasoning ends and its answer begins.

Reasoning models write their chain of thought between two marker tokens, then the answer:
Qwen3 and DeepSeek-R1 `<think>...</think>`, Gemma 4 `<|channel>thought\\n...<channel|>`,
Magistral `[THINK]...[/THINK]`. With `--reasoning-parser NAME` (vLLM's flag; the engine
option `reasoning_parser`) braze splits a chat reply into `reasoning` and `content`, as
vLLM does (serving/app.py), and holds a structured-output grammar (response_format,
tool_choice required or named) back until the reasoning has ended, so the model may think
first and the answer alone is held to the format (`ReasoningGate`).

Where the reply starts is read off the prompt, not guessed from the reply: the chat
template decides. The last marker in the prompt's tokens sets it (`prompt_state`):

  - a start marker (Qwen3.5's and DeepSeek-R1's templates open `<think>` themselves, and
    DeepSeek-V3.1's does with thinking=True): the reply begins inside the reasoning;
  - an end marker with nothing but whitespace after it (`enable_thinking=False` renders
    `<think>\\n\\n</think>\\n\\n`): the reply is all answer. One followed by more of
    the conversation closed an earlier reply's reasoning (Qwen3's templates render it in
    tool-calling loops; Magistral's system prompt spells the markers), and decides
    nothing about the new reply: undecided;
  - neither (the first Qwen3 templates; Gemma 4): the reply is reasoning if it opens with
    the start marker, else all answer.

A tool call's marker ends the reasoning too, where a format names one (Qwen3.5 and Gemma 4
may call a tool without closing their reasoning, as vLLM reads them); the grammar gate
waits for the end marker alone.

A reply cut off before its end marker is all reasoning (content null), as in vLLM. The
markers are single tokens of the model's vocabulary; a parser whose markers the tokenizer
lacks is refused when the engine starts. Markers that are special tokens (Gemma 4's,
Magistral's) would vanish from decoded text, so requests of a reasoning server keep them
(`needs_special_tokens`), as vLLM's parsers do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from braze.ir.errors import BrazeError

REASONING, ANSWER, UNDECIDED = "reasoning", "answer", "undecided"   # where a reply is


@dataclass(frozen=True)
class ReasoningFormat:
    """A family's reasoning markers; `label`: text right after the start marker that names
    the channel, not part of the reasoning (Gemma 4's "thought\\n"); `calls`: the marker
    of a tool call, which ends the reasoning too when the model calls a tool without
    closing it (Qwen3.5's `<tool_call>`, Gemma 4's `<|tool_call>`, as vLLM reads them):
    the answer starts with the call."""
    start: str
    end: str
    label: str = ""
    calls: str = ""


THINK = ReasoningFormat("<think>", "</think>")
# vLLM's parser names, for the families braze compiles (and their reasoning variants)
FORMATS = {
    "qwen3": replace(THINK, calls="<tool_call>"),
    "deepseek_r1": THINK,          # DeepSeek-R1 and its distills, QwQ, Phi-4-mini-reasoning
    "deepseek_v3": THINK,          # DeepSeek-V3.1: thinking=True in chat_template_kwargs
    "gemma4": ReasoningFormat("<|channel>", "<channel|>", "thought\n", "<|tool_call>"),
    "mistral": ReasoningFormat("[THINK]", "[/THINK]"),       # Magistral
}


def check_name(name) -> str | None:
    """`name` if braze has that parser (None stays None); else an error listing them."""
    if name is None or name in FORMATS:
        return name
    raise BrazeError(f"reasoning parser {name!r} is not one braze has; choose one of "
                     f"{', '.join(sorted(FORMATS))}", param="reasoning_parser")


@dataclass(frozen=True)
class ReasoningMarkers:
    """A parser resolved against the model's tokenizer: its format and marker token ids."""
    name: str
    format: ReasoningFormat
    start_id: int
    end_id: int
    needs_special_tokens: bool      # the markers are special tokens: keep them in the text
    calls_id: int | None = None     # the tool-call marker's token, if the format has one
    # the tokenizer's decode(ids, skip_special_tokens): what follows an end marker
    decode: object = field(default=None, compare=False, repr=False)

    @classmethod
    def resolve(cls, name: str, tokenizer) -> "ReasoningMarkers":
        """`tokenizer`: runtime.tokenizer.Tokenizer (or None: refused)."""
        fmt = FORMATS[check_name(name)]
        if tokenizer is None:
            raise BrazeError(f"--reasoning-parser {name} reads the reply's text, and this "
                             f"artifact has no tokenizer", param="reasoning_parser")
        ids = {m: tokenizer.token_id(m) for m in (fmt.start, fmt.end)}
        missing = [m for m, i in ids.items() if i is None]
        if missing:
            raise BrazeError(f"--reasoning-parser {name} marks reasoning with {fmt.start} ... "
                             f"{fmt.end}, and this model's tokenizer has no token "
                             f"{' or '.join(missing)}: the model does not reason in that "
                             f"format; choose the parser of its family "
                             f"({', '.join(sorted(FORMATS))}) or leave the flag out",
                             param="reasoning_parser")
        special = any(tokenizer.decode([i], skip_special_tokens=True) == ""
                      for i in ids.values())
        calls = tokenizer.token_id(fmt.calls) if fmt.calls else None
        return cls(name, fmt, ids[fmt.start], ids[fmt.end], special, calls, tokenizer.decode)

    def prompt_state(self, prompt_ids) -> str:
        """Where a reply to `prompt_ids` starts: REASONING, ANSWER or UNDECIDED."""
        for i in range(len(prompt_ids) - 1, -1, -1):
            t = prompt_ids[i]
            if t == self.start_id:
                return REASONING
            if t == self.end_id:       # the template's own (closing it), or an earlier reply's
                return ANSWER if self._blank(prompt_ids[i + 1:]) else UNDECIDED
        return UNDECIDED

    def _blank(self, ids) -> bool:
        """Whether `ids` are whitespace alone (special tokens, a turn's end, are not)."""
        if self.decode is None or not ids:
            return not ids
        return not self.decode(list(ids), skip_special_tokens=False).strip()

    def reply(self, prompt_ids) -> Reply:
        """A reply to `prompt_ids`, as this parser splits it."""
        return Reply(self, self.prompt_state(prompt_ids))

    def skip_special_tokens(self, asked: bool) -> bool:
        """A request's skip_special_tokens as this parser runs it: markers that are
        special tokens stay in the text."""
        return asked and not self.needs_special_tokens

    def reasoning_tokens(self, output_ids, state: str) -> int:
        """How many of a reply's tokens are reasoning (the markers not counted): what
        usage's reasoning_tokens reports."""
        return self._scan(output_ids, state)[0]

    def answer_start(self, output_ids, state: str) -> int | None:
        """Where a reply's answer starts among its tokens: after the end marker (at a tool
        call's marker, which is the answer's); None while it still reasons."""
        return self._scan(output_ids, state)[1]

    def _scan(self, output_ids, state: str) -> tuple[int, int | None]:
        n, inside = 0, state == REASONING
        for i, t in enumerate(output_ids):
            if state == UNDECIDED and i == 0:
                inside = t == self.start_id
                if not inside:
                    return 0, 0
            elif inside:
                if t == self.end_id:
                    return n, i + 1
                if t == self.calls_id:
                    return n, i
                n += 1
        return n, None if inside or (state == UNDECIDED and not output_ids) else 0


def _held(text: str, marker: str) -> int:
    """Characters at the end of `text` that could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def split_reply(text: str, fmt: ReasoningFormat, state: str,
                final: bool = True) -> tuple[str | None, str | None]:
    """(reasoning, content) of a reply's `text` that starts in `state`; None for a part
    the reply has not (yet) reached. Before the reply is `final`, text that may still turn
    into a marker is held back, so each part only ever grows as text arrives."""
    if state == ANSWER:
        return None, text
    pos = 0
    if state == UNDECIDED:
        if text.startswith(fmt.start):
            pos = len(fmt.start)
        elif fmt.start.startswith(text) and not final:
            return None, None                 # "<thi": not known yet
        else:
            return None, text
    end, after = _end(text, fmt, pos)
    label = fmt.label
    if label:
        rest = text[pos:] if end < 0 else text[pos:end]
        if rest.startswith(label):
            pos += len(label)
        elif label.startswith(rest) and end < 0 and not final:
            return "", None
    if end >= 0:
        return text[pos:end], text[after:]
    held = max(_held(text, fmt.end), _held(text, fmt.calls) if fmt.calls else 0)
    stop = len(text) if final else len(text) - held
    return text[pos:max(pos, stop)], None


def _end(text: str, fmt: ReasoningFormat, pos: int) -> tuple[int, int]:
    """(where the reasoning stops, where the answer starts) in `text` from `pos`: at the
    end marker, or at a tool call's marker if that comes first; (-1, -1) for neither."""
    end = text.find(fmt.end, pos)
    found = (end, end + len(fmt.end)) if end >= 0 else (-1, -1)
    call = text.find(fmt.calls, pos) if fmt.calls else -1
    if call >= 0 and (end < 0 or call < end):
        return call, call
    return found


@dataclass(frozen=True)
class Reply:
    """Where one reply starts (`state`), with its parser's markers: what splits its text
    and counts its reasoning tokens."""
    markers: ReasoningMarkers
    state: str

    def split(self, text: str, final: bool = True) -> tuple[str | None, str | None]:
        return split_reply(text, self.markers.format, self.state, final)

    def splitter(self) -> ReplySplitter:
        return ReplySplitter(self.markers.format, self.state)

    def reasoning_tokens(self, output_ids) -> int:
        return self.markers.reasoning_tokens(output_ids, self.state)

    def answer_start(self, output_ids) -> int | None:
        return self.markers.answer_start(output_ids, self.state)


class ReplySplitter:
    """A streamed reply's reasoning and content deltas: `feed(text, final)` takes the whole
    text so far and returns (reasoning delta, content delta), "" where nothing is new."""

    def __init__(self, fmt: ReasoningFormat, state: str):
        self.fmt, self.state = fmt, state
        self.reasoning_sent = self.content_sent = 0
        self.reasoning: str | None = None
        self.content: str | None = None

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        self.reasoning, self.content = split_reply(text, self.fmt, self.state, final)
        r, c = self.reasoning or "", self.content or ""
        dr, dc = r[self.reasoning_sent:], c[self.content_sent:]
        self.reasoning_sent, self.content_sent = len(r), len(c)
        return dr, dc


class ReasoningGate:
    """A request's grammar matcher (runtime/structured.py `_Matcher`), held back while the
    reply reasons: no mask and no grammar step until the end marker, then the grammar
    from the next token on. Undecided (the prompt opens no reasoning), the first token may
    be the start marker or what the grammar allows."""
    __slots__ = ("inner", "markers", "state")

    def __init__(self, inner, markers: ReasoningMarkers, state: str):
        self.inner, self.markers, self.state = inner, markers, state

    def fill(self, host, row: int, no_control) -> None:
        if self.state == REASONING:
            return                                      # the row stays all ones
        self.inner.fill(host, row, no_control)
        if self.state == UNDECIDED:
            t = self.markers.start_id
            word = int(host[row, t // 32]) | (1 << (t % 32))
            host[row, t // 32] = word - (1 << 32) if word >= 1 << 31 else word

    def accept_token(self, token: int) -> bool:
        if self.state == REASONING:
            if token == self.markers.end_id:
                self.state = ANSWER
            return True
        if self.state == UNDECIDED:
            if token == self.markers.start_id:
                self.state = REASONING
                return True
            self.state = ANSWER
        return self.inner.accept_token(token)

    def is_terminated(self) -> bool:
        return self.state == ANSWER and self.inner.is_terminated()
