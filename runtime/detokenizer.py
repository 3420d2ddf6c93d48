"""Incremental detokenisation of a request's output, with stop strings.

Decoding each new token on its own is wrong (a character can span tokens, and some
decoders drop a token's leading space at the start of a text), and decoding the whole
output every step is quadratic. `IncrementalDetokenizer` keeps two offsets into the
token ids: text is emitted only for ids[read:], as the part that
decode(ids[prefix:]) adds to decode(ids[prefix:read]), so the few tokens before `read`
give the decoder its context. While the decoded window ends in U+FFFD (a multi-byte
character cut by a token boundary) only the text before the trailing U+FFFDs is emitted
and the window stays open until the character is complete; at `finish()` whatever is
left comes out as the decoder gives it. So the text never shows a U+FFFD that the
decode of all tokens at once would not.

Stop strings (OpenAI semantics): the first stop string to complete in the text (once
more than min_tokens output tokens are out, as vLLM checks them) ends
it, the text is cut right before that stop string, and no further tokens are taken.
A stop token (EOS, stop_token_ids) that ends the output adds no text either
(`leave_out_stop`), unless the request asks for include_stop_str_in_output.
Only the new text plus the last (longest stop - 1) characters before it are searched.
`output_delta` hands out text in order, holding back a tail that might still become
the start of a stop string until more text or the end shows it is not one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5       # prompt tokens decoded before the first output token, for context
_CHAR_TOKENS = 4         # a character spans at most 4 tokens (one per UTF-8 byte)
MAX_PENDING_TOKENS = 64  # past this many tokens in an open window, emit it U+FFFDs and all
_TRIM_AT = 256           # drop consumed token ids once this many pile up


class IncrementalDetokenizer:
    """Text of one request's output tokens, built as they arrive.

    `.text` is the text the output tokens add to the prompt's text (for byte-level BPE
    that is decode(output ids)), cut before the first stop string that completes (ties:
    the longest). `update` takes tokens, `output_delta` hands text out, `finish` ends.
    `tokenizer` needs `decode(ids, skip_special_tokens=...)` (runtime.tokenizer.Tokenizer
    or a `tokenizers.Tokenizer`).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], stop: Iterable[str] = (),
                 skip_special_tokens: bool = True, include_stop: bool = False,
                 min_tokens: int = 0):
        self._tok = tokenizer
        # stop strings count only from the (min_tokens + 1)-th output token on (vLLM's)
        self._min_tokens = min_tokens
        self._skip = skip_special_tokens
        self._include_stop = include_stop     # cut after the stop string, not before it
        self.stop = [s for s in dict.fromkeys(stop) if s]     # unique, in order
        self._max_stop = max((len(s) for s in self.stop), default=0)
        back = CONTEXT_TOKENS + 2 * _CHAR_TOKENS
        self._ids = [int(t) for t in prompt_token_ids[-back:]] if len(prompt_token_ids) else []
        self._read = len(self._ids)           # ids[read:] are not (all) in the text yet
        self._prefix = max(0, self._read - CONTEXT_TOKENS)   # ids[prefix:read]: context
        # the context starts at a character boundary (so it decodes the same on its own) ...
        for _ in range(_CHAR_TOKENS):
            if self._prefix == 0 or not self._decode(self._prefix, self._read).startswith(REPLACEMENT):
                break
            self._prefix -= 1
        # ... and ends at one: a prompt cut inside a character leaves it to the output
        for _ in range(_CHAR_TOKENS):
            if self._read == self._prefix or not self._decode(self._prefix, self._read).endswith(REPLACEMENT):
                break
            self._read -= 1
        self._prefix_text = self._decode(self._prefix, self._read)
        self._settled = 0                     # characters of ids[read:] already in the text
        self._chunks: list[str] = []          # the text, in pieces (joined on demand)
        self._len = 0
        self._tail = ""                       # last (max_stop - 1) characters of the text
        self._sent = 0                        # characters handed out by output_delta
        self.stop_reason: str | None = None   # the stop string that ended the text
        self.finished = False                 # finish() ran, or a stop string matched
        self.num_tokens = 0                   # output tokens taken
        self._text_tokens: int | None = None  # output tokens that make text (leave_out_stop)

    # ------------------------------------------------------------------------ input

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Take new output tokens; return the stop string they completed, if any.

        After a stop string (or `finish()`) further tokens are ignored and None returned.
        """
        if self.finished or len(new_token_ids) == 0:
            return None
        if self._text_tokens is not None:     # a stop token and what follows: no text
            keep = max(0, self._text_tokens - self.num_tokens)
            if keep < len(new_token_ids):
                self.num_tokens += len(new_token_ids) - keep
                new_token_ids = new_token_ids[:keep]
                if not new_token_ids:
                    return None
        self._ids.extend(int(t) for t in new_token_ids)
        self.num_tokens += len(new_token_ids)
        n = len(self._ids)
        window = self._decode(self._prefix, n)
        done = len(self._prefix_text) + self._settled
        if not window.endswith(REPLACEMENT) or n - self._read > MAX_PENDING_TOKENS:
            if len(window) <= len(self._prefix_text):
                return None                   # nothing new yet (e.g. skipped special tokens)
            self._advance(window)
            return self._append(window[done:])
        # the window ends inside a character: what comes before the trailing U+FFFDs
        # is settled and can go out now; the window stays open
        settled = window.rstrip(REPLACEMENT)
        if len(settled) <= done:
            return None
        self._settled += len(settled) - done
        return self._append(settled[done:])

    def leave_out_stop(self, num_tokens: int) -> None:
        """The output's `num_tokens`-th token is a stop token (EOS or a stop_token_ids one)
        that ended it: its text stays out of the text (as vLLM leaves it out unless
        include_stop_str_in_output). Call it before that token is taken."""
        self._text_tokens = num_tokens - 1

    def finish(self) -> str | None:
        """The output is over: emit text still waiting for a character to complete.

        Returns the stop string that text completed, if any. Idempotent.
        """
        if self.finished:
            return None
        hit = None
        if self._read < len(self._ids):
            window = self._decode(self._prefix, len(self._ids))
            done = len(self._prefix_text) + self._settled
            if len(window) > done:
                self._advance(window)
                hit = self._append(window[done:])
        self.finished = True
        return hit

    # ----------------------------------------------------------------------- output

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def text(self) -> str:
        """All text so far (cut before the stop string once one matched)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def output_delta(self, finished: bool) -> str:
        """Text not handed out before. Unless `finished` (or stopped), a tail that could
        still be the start of a stop string is held back."""
        if finished:
            self.finish()
        end = self._len if self.finished else self._len - self._held_back()
        if end <= self._sent:
            return ""
        text = self.text
        out = text[self._sent:end]
        self._sent = end
        return out

    # --------------------------------------------------------------------- internals

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _advance(self, window: str) -> None:
        """ids[read:] went into the text: they become the next context window."""
        n = len(self._ids)
        if self._read == self._prefix:                  # the window was only new tokens
            self._prefix_text = window
        else:
            self._prefix_text = self._decode(self._read, n)
        self._prefix, self._read = self._read, n
        self._settled = 0
        if self._prefix >= _TRIM_AT:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0

    def _append(self, delta: str) -> str | None:
        if not delta:
            return None
        start = self._len - len(self._tail)            # text index of self._tail[0]
        self._chunks.append(delta)
        self._len += len(delta)
        if not self.stop:
            return None
        searched = self._tail + delta
        best = None                                    # (end, -len, index, stop)
        for s in self.stop if self.num_tokens > self._min_tokens else ():
            # only a match ending in the new text: one inside the tail came before
            # min_tokens tokens were out (an earlier one would have ended the text)
            i = searched.find(s, max(0, len(self._tail) - len(s) + 1))
            if i >= 0:
                key = (i + len(s), -len(s), i, s)
                best = key if best is None or key < best else best
        if best is None:
            self._tail = searched[-(self._max_stop - 1):] if self._max_stop > 1 else ""
            return None
        cut, s = start + best[2] + (len(best[3]) if self._include_stop else 0), best[3]
        self._chunks = [self.text[:cut]]
        self._len = cut
        self._sent = min(self._sent, cut)
        self._tail = ""
        self.stop_reason = s
        self.finished = True
        return s

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        tail = self._tail
        for n in range(min(len(tail), self._max_stop - 1), 0, -1):
            piece = tail[-n:]
            if any(len(s) > n and s.startswith(piece) for s in self.stop):
                return min(n, self._len - self._sent)
        return 0
