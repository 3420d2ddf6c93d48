"""Beam search over the engine: vLLM's `LLM.beam_search` and the OpenAI server's
`use_beam_search`.

A search keeps `beam_width` beams (generated token lists and their cumulative logprob,
the model's raw logprobs). Each step every live beam is one engine request of one token
asking for the `2 * beam_width` likeliest next tokens; the extensions that end in an end
of sequence (EOS, unless `ignore_eos`) are set aside as finished, and the `beam_width`
best of the others by score live on. After `max_tokens` steps (fewer where the beams fill the context, or when no beam is left)
the finished and live beams together are ranked by score and the `beam_width` best
returned, best first:

    score = cumulative logprob / L ** length_penalty

L being the tokens of the prompt and the beam (an EOS not counted), as vLLM scores.
Ties keep the earlier candidate (beam order, then likelihood rank), so a search is
deterministic. The engine's prefix cache holds each beam's full blocks, so a step
re-reads them and computes only the last partial block and the new token.

`BeamSearch` is one prompt's search, stepped by its caller, whoever runs the requests:
`pending()` gives the token lists to score this step, `advance()` takes each one's top
candidates. `braze.LLM.beam_search` steps all its prompts' searches together, each step
one batch on the engine; the server does the same over its async engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from braze.ir.errors import BrazeError

from .sampler import MAX_LOGPROBS, SamplingParams

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2      # a step asks for 2 * beam_width logprobs


@dataclass
class BeamSearchParams:
    """vLLM's names: `beam_width` beams, `max_tokens` steps at most, EOS ignored or not,
    and the length penalty of the score. `temperature` is vLLM's field too: the search
    ranks the model's raw logprobs, so it does not change the beams (it is checked, not
    applied). `include_stop_str_in_output`: a beam that ended at an EOS keeps it in its
    token ids (not counted in its length, as vLLM scores)."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def validate(self) -> None:
        v = self.beam_width
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_BEAM_WIDTH:
            raise BrazeError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}] (a step "
                             f"asks for 2 * beam_width logprobs, at most {MAX_LOGPROBS}), "
                             f"got {v!r}", param="beam_width")
        v = self.max_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BrazeError(f"max_tokens must be an integer >= 1, got {v!r}", param="max_tokens")
        v = self.temperature
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise BrazeError(f"temperature must be a finite number >= 0, got {v!r}",
                             param="temperature")
        v = self.length_penalty
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BrazeError(f"length_penalty must be a finite number, got {v!r}",
                             param="length_penalty")

    def step_params(self) -> SamplingParams:
        """What each beam's one-token request asks the engine for."""
        return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                              logprobs=2 * self.beam_width, output_kind="final")


@dataclass
class BeamSequence:
    """One result: the generated `token_ids` (the prompt not included, an EOS neither
    unless include_stop_str_in_output),
    their `cumulative_logprob`, its `score`, and `finish_reason` ("stop" at an EOS, else
    "length"); `text` where the caller decodes it (of `token_ids`: vLLM's offline
    beam_search decodes the prompt too). vLLM's names read too: `tokens` (the prompt's
    ids, then `token_ids`) and `cum_logprob`."""
    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str
    text: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def cum_logprob(self) -> float:
        """vLLM's BeamSearchSequence name for `cumulative_logprob`."""
        return self.cumulative_logprob

    @property
    def tokens(self) -> list[int]:
        """vLLM's BeamSearchSequence.tokens: the prompt's ids, then `token_ids`."""
        return self.prompt_token_ids + self.token_ids


@dataclass
class BeamSearchOutput:
    """A prompt's results, best first (at most beam_width of them)."""
    prompt_token_ids: list[int]
    sequences: list[BeamSequence] = field(default_factory=list)


class BeamSearch:
    """`max_model_len`: the context; a beam that fills it ends there ("length"), as a
    sampled sequence does (a prompt that fills it alone is left to the engine to refuse)."""

    def __init__(self, prompt: list[int], params: BeamSearchParams, eos_ids=(),
                 max_model_len: int | None = None):
        self.prompt = list(prompt)
        self.params = params
        self.max_steps = params.max_tokens
        if max_model_len is not None and len(self.prompt) < max_model_len:
            self.max_steps = min(self.max_steps, max_model_len - len(self.prompt))
        self.eos = frozenset() if params.ignore_eos else frozenset(eos_ids)
        self.beams: list[tuple[list[int], float]] = [([], 0.0)]
        self.finished: list[tuple[list[int], float]] = []     # ended at an EOS
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.beams or self.steps >= self.max_steps

    def pending(self) -> list[list[int]]:
        """The prompts to score this step: the prompt and each live beam."""
        return [self.prompt + tokens for tokens, _ in self.beams]

    def advance(self, tops: list[list[tuple[int, float]]]) -> None:
        """`tops[i]`: the likeliest next tokens of beam i, [(token id, logprob), ...]."""
        if len(tops) != len(self.beams):
            raise BrazeError(f"beam search: {len(tops)} candidate lists for "
                             f"{len(self.beams)} beams")
        grown = []
        for (tokens, cum), top in zip(self.beams, tops):
            for tid, lp in top:
                if tid in self.eos:
                    kept = tokens + [tid] if self.params.include_stop_str_in_output else tokens
                    self.finished.append((kept, cum + lp))
                else:
                    grown.append((tokens + [tid], cum + lp))
        grown.sort(key=self._score, reverse=True)       # stable: ties keep their order
        self.beams = grown[:self.params.beam_width]
        self.steps += 1

    def _score(self, beam: tuple[list[int], float]) -> float:
        tokens, cum = beam
        n = len(tokens) - (1 if tokens and tokens[-1] in self.eos else 0)   # a kept EOS
        return cum / (len(self.prompt) + n) ** self.params.length_penalty

    def result(self) -> BeamSearchOutput:
        ranked = [(b, "stop") for b in self.finished] + [(b, "length") for b in self.beams]
        ranked.sort(key=lambda r: self._score(r[0]), reverse=True)
        return BeamSearchOutput(self.prompt, [
            BeamSequence(list(tokens), cum, self._score((tokens, cum)), reason,
                         prompt_token_ids=self.prompt)
            for (tokens, cum), reason in ranked[:self.params.beam_width]])


def step_prompts(searches: list[BeamSearch]) -> list[list[int]]:
    """The token lists this step scores: every live beam of every unfinished search."""
    return [p for s in searches if not s.done for p in s.pending()]


def advance_all(searches: list[BeamSearch], tops: list) -> None:
    """Each unfinished search takes its beams' top candidates from `tops` (one list per
    token list of `step_prompts`, in that order)."""
    k = 0
    for s in [s for s in searches if not s.done]:
        n = len(s.beams)
        s.advance(tops[k:k + n])
        k += n
