"""A request's life in the engine, and what the engine reports about it.

    WAITING ──schedule──▶ RUNNING ──stop/length──▶ FINISHED
       ▲                     │
       └──── preempted ──────┘  (blocks freed; recomputed from prompt + output so far)

Aborted requests finish with reason "abort" from any state.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class RequestMetrics:
    arrival_time: float                      # time.monotonic() at add_request
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0               # prompt tokens served from the prefix cache
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to the first step that ran it."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    def tpot(self, num_generated: int) -> float | None:
        """Mean seconds per output token after the first."""
        if num_generated < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (num_generated - 1)

    def as_dict(self, num_generated: int) -> dict:
        return {"arrival_time": self.arrival_time, "queue_time": self.queue_time,
                "ttft": self.ttft, "tpot": self.tpot(num_generated),
                "num_cached_tokens": self.num_cached_tokens,
                "num_preemptions": self.num_preemptions}


class Logprob:
    """vLLM's Logprob: one token's entry in a TokenLogprobs read as a dict."""

    __slots__ = ("logprob", "rank", "decoded_token")

    def __init__(self, logprob: float, rank: int | None, decoded_token: str | None = None):
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token

    def __eq__(self, other) -> bool:
        return isinstance(other, Logprob) and (self.logprob, self.rank, self.decoded_token) == (
            other.logprob, other.rank, other.decoded_token)

    def __repr__(self) -> str:
        return (f"Logprob(logprob={self.logprob}, rank={self.rank}, "
                f"decoded_token={self.decoded_token!r})")


class TokenLogprobs(Mapping):
    """The model's raw logprobs at one output position: the sampled `token_id`, its
    `logprob` and `rank` (1 = most likely), and `top`: [(token id, logprob), ...] of the
    N most likely, best first (N = the request's `logprobs`).

    It also reads as vLLM's dict {token id: Logprob}: the sampled token first, then the
    top N (one entry per id), each with its text when the engine has a tokenizer."""

    __slots__ = ("token_id", "logprob", "rank", "top", "tokenizer")

    def __init__(self, token_id: int, logprob: float, rank: int, top: list, tokenizer=None):
        self.token_id, self.logprob, self.rank, self.top = token_id, logprob, rank, top
        self.tokenizer = tokenizer

    def _entry(self, tid: int, logprob: float, rank: int) -> Logprob:
        text = (None if self.tokenizer is None     # special tokens by name, as the server's
                else self.tokenizer.decode([tid], skip_special_tokens=False))
        return Logprob(logprob, rank, text)

    def __getitem__(self, tid) -> Logprob:
        for r, (t, v) in enumerate(self.top, 1):
            if t == tid:
                return self._entry(t, v, r)
        if tid == self.token_id:
            return self._entry(tid, self.logprob, self.rank)
        raise KeyError(tid)

    def __iter__(self):
        yield self.token_id
        yield from (t for t, _ in self.top if t != self.token_id)

    def __len__(self) -> int:
        return 1 + sum(t != self.token_id for t, _ in self.top)

    __hash__ = object.__hash__

    def __eq__(self, other) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"TokenLogprobs({self.token_id}, {self.logprob:.4f}, rank={self.rank}, top={self.top})"


class RequestOutput:
    """One request's state as the engine reports it after a step (or at the end).

    `token_ids`/`text` are everything generated so far (text with a stop string cut
    off); `new_token_ids`/`new_text` are what this report adds to the previous one.
    While the request runs, `token_ids` is the engine's live list (it keeps growing;
    copy it to keep a snapshot); once finished it no longer changes. `metrics` is
    filled in the final report.

    Text is detokenised where it is read, not in the engine's step (except for requests
    with stop strings, which the engine must see as text): reading `text`/`new_text`
    of a request's reports in order gives each piece once.
    """

    __slots__ = ("request_id", "prompt_token_ids", "token_ids", "new_token_ids", "finished",
                 "finish_reason", "stop_reason", "metrics", "_text", "_new_text", "_lazy",
                 "logprobs", "new_logprobs", "cumulative_logprob", "outputs", "prompt_logprobs",
                 "prompt", "num_cached_tokens", "index")

    def __init__(self, request_id: str, prompt_token_ids: list[int], token_ids: list[int],
                 text: str | None, new_token_ids: list[int] | None = None, new_text: str = "",
                 finished: bool = False, finish_reason: str | None = None, stop_reason=None,
                 metrics: dict | None = None, lazy=None):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.token_ids = token_ids
        self.new_token_ids = new_token_ids if new_token_ids is not None else []
        self.finished = finished
        self.finish_reason = finish_reason   # "stop", "length" or "abort" once finished
        self.stop_reason = stop_reason       # the stop token id or string that ended it; None: EOS
        self.metrics = metrics if metrics is not None else {}
        self._text, self._new_text = text, new_text
        self._lazy = lazy                    # (detokenizer, tokens upto) to decode on demand
        # with SamplingParams.logprobs: a TokenLogprobs per output token (the live list, like
        # token_ids), those of this report, and the sum of the sampled tokens' logprobs
        self.logprobs: list[TokenLogprobs] | None = None
        self.new_logprobs: list[TokenLogprobs] | None = None
        self.cumulative_logprob: float | None = None
        # LLM.generate: the chosen samples, best first for best_of (this report's own fields
        # are those of outputs[0], which is itself); None in the engine's step reports
        self.outputs: list[RequestOutput] | None = None
        self.prompt: str | None = None       # LLM.generate: the prompt, when it was text
        # vLLM's: prompt tokens served from the prefix cache when the request was admitted
        self.num_cached_tokens = 0
        # vLLM's CompletionOutput.index: LLM.generate's sample number in `outputs` (0..n-1)
        self.index = 0
        # with SamplingParams.prompt_logprobs: None for the first prompt token, then a
        # TokenLogprobs per prompt token (its logprob given the tokens before it)
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None

    def _resolve(self) -> None:
        detok, upto = self._lazy
        self._lazy = None
        if detok.num_tokens < upto:
            detok.update(self.token_ids[detok.num_tokens:upto])
        self._new_text = detok.output_delta(self.finished)
        self._text = detok.text

    @property
    def text(self) -> str | None:
        if self._lazy is not None:
            self._resolve()
        return self._text

    @property
    def new_text(self) -> str:
        if self._lazy is not None:
            self._resolve()
        return self._new_text

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def __repr__(self) -> str:
        return (f"RequestOutput({self.request_id!r}, tokens={len(self.token_ids)}, "
                f"finished={self.finished}, finish_reason={self.finish_reason!r})")


def now() -> float:
    return time.monotonic()


class Request:
    """The engine's record of one request. `all_token_ids` is prompt + output so far;
    `num_computed` counts its tokens already in the KV cache."""

    __slots__ = ("request_id", "prompt_token_ids", "output_token_ids", "all_token_ids", "params",
                 "status", "num_computed", "row", "metrics", "detok", "finish_reason",
                 "stop_reason", "stop_ids", "max_len", "reported_tokens", "num_pending",
                 "kv_policy", "grammar", "matcher", "bias", "logprobs", "cumulative_logprob",
                 "group", "prompt_logprobs", "bad_sequences", "lora", "lora_slot", "kv_salt",
                 "draft_token_ids", "kv_loading", "cache_salt", "priority")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params, eos_ids=(),
                 max_len: int = 1 << 62, arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.status = Status.WAITING
        self.num_computed = 0
        self.row: int | None = None           # persistent-batch row while running
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else now())
        self.detok = None                     # runtime.detokenizer.IncrementalDetokenizer
        self.finish_reason: str | None = None
        self.stop_reason = None
        # the token ids that end it: EOS (the caller passes none for ignore_eos) and the
        # request's stop_token_ids, as one set for the per-token check
        self.stop_ids = frozenset(eos_ids).union(getattr(params, "stop_token_ids", ()) or ())
        # total tokens (prompt + output) allowed: also max_tokens, so one length check ends it
        max_tokens = getattr(params, "max_tokens", None)
        self.max_len = max_len if max_tokens is None else min(
            max_len, len(self.prompt_token_ids) + max_tokens)
        self.reported_tokens = 0              # output tokens already reported
        self.num_pending = 0                  # tokens sampled on the device, not yet read back
        self.kv_policy = None                 # runtime.kv_offload.KVTransferPolicy, if set
        self.grammar = None                   # Future of its compiled grammar (structured output)
        self.matcher = None                   # its xgrammar GrammarMatcher once compiled
        self.bias: list = []                  # sparse bias table entries (sampler.bias_entries)
        self.bad_sequences: list[list[int]] = []   # multi-token bad words, as token ids
        self.logprobs: list[TokenLogprobs] | None = None if params.logprobs is None else []
        self.cumulative_logprob = 0.0
        self.group = None                     # parallel samples of one prompt share a group
        self.lora = None                      # its LoRA adapter's name (runtime/lora.py)
        self.lora_slot = None                 # the device slot it holds while running
        self.kv_salt = None                   # keys its KV blocks apart (the adapter's)
        self.cache_salt = None                # vLLM's cache_salt: its prefix cache's tenant
        self.priority = 0                     # vLLM's (scheduling_policy "priority"): lower first
        # speculative proposals to verify after its last token in the next step
        # (runtime/speculative.py); empty when not speculating
        self.draft_token_ids: list[int] = []
        # its blocks are being copied in from a lower KV tier (runtime/kv_offload.py): it
        # holds them but is not scheduled until the copy has landed
        self.kv_loading = False
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            None if params.prompt_logprobs is None else [None] * len(self.prompt_token_ids))

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, counting those still being sampled on the device."""
        return len(self.all_token_ids) + self.num_pending

    @property
    def reaches_limit(self) -> bool:
        """Its tokens so far (pending ones included) already end it by length: nothing more
        to run for it, whatever the pending tokens turn out to be."""
        return self.num_tokens >= self.max_len          # max_len counts max_tokens in

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed})")
