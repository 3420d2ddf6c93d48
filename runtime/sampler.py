"""Sampling: the request's `SamplingParams`, and the batched on-device sampler.

`sample_batch` draws one token per row of a logits matrix with per-row temperature,
top-k, top-p, seed and counter, entirely with tensor ops on the logits' device: no
host reads, no Python loop over rows, the same op sequence for any data, so it can be
captured in a CUDA graph.

Randomness is counter-based, not a stateful generator: the noise for vocabulary entry
`v` of a row is an integer hash of (seed, counter, v), turned into a Gumbel variate,
and the token is argmax(logits / T + gumbel) over the row's allowed set (Gumbel-max,
an exact draw from softmax(logits / T) restricted to that set). A row's token depends
only on its own logits, parameters, seed and counter: never on the other rows, the
batch size or the row's position. With counter = the number of tokens the request has
generated so far, a seeded request gives the same tokens across runs, batch
compositions and preemption-with-recompute.

`SamplingTensors` keeps those per-row parameters in persistent tensors (one row per
persistent-batch slot) that the engine fills when a request takes a slot.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from braze.ir.errors import BrazeError

from .uploads import upload_values

MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024          # OpenAI allows 300; vLLM any. Entries per request.
MAX_ALLOWED_TOKEN_IDS = 4096   # allowed_token_ids per request (they widen the bias table)
MAX_LOGPROBS = 20              # OpenAI's top_logprobs limit
MAX_N = 128                    # samples per prompt (n, best_of): bounds the fan-out
MAX_REPETITION_PENALTY = 100.0
OUTPUT_KINDS = ("delta", "final")
SEED_LIMIT = 1 << 63          # seeds are in [0, 2**63)
# below this temperature a request samples greedily (vLLM's _SAMPLING_EPS): logits divided
# by a tiny temperature overflow float32
GREEDY_BELOW = 1e-5


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    max_tokens: int | None = 16       # None: up to max_model_len, as in vLLM
    temperature: float = 0.0          # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 (or -1) = no limit
    # vLLM's min_p: drop tokens less likely than min_p times the likeliest (0 = off)
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)   # a str or a list of str; None = []
    # "delta": the engine reports the request after every step that gives it tokens (for
    # streaming); "final": only when it finishes (offline generation: less host work)
    output_kind: str = "delta"
    # a grammar the output must follow (runtime/structured.py): a StructuredOutputsParams
    # or its dict form {"json": schema} / {"regex": ...} / {"choice": [...]} / {"grammar": ...}
    structured_outputs: object = None
    skip_special_tokens: bool = True      # drop special tokens from the text
    # vLLM's: braze decodes with the tokenizer's own spacing, as vLLM's fast-tokenizer
    # detokenizer does (True, vLLM's default); False (a slow tokenizer's) is refused
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False   # vLLM's: keep the stop string/token that ended it
    # logits processing (vLLM semantics), applied on the device, batched (sample_batch)
    presence_penalty: float = 0.0     # OpenAI: minus this for every token already generated
    frequency_penalty: float = 0.0    # OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0   # HF/vLLM: prompt + output tokens: logit / p if > 0 else * p
    logit_bias: dict[int, float] | None = None   # token id -> bias, each in [-100, 100]
    min_tokens: int = 0               # EOS, stop_token_ids, stop strings held back until this many are out
    bad_words: list[str] = field(default_factory=list)   # words never generated
    bad_words_token_ids: list[int] = field(default_factory=list)   # ids never generated
    allowed_token_ids: list[int] | None = None   # vLLM's: only these ids are generated
    # what is reported: raw model logprobs (vLLM's default logprobs_mode "raw_logprobs")
    logprobs: int | None = None       # None: none; N >= 0: the sampled token's and top N
    # each prompt token's logprob given the tokens before it, and the top N (vLLM); needs
    # an artifact with logits at every position (compiled without prune-logits: -O0/-O1)
    prompt_logprobs: int | None = None
    # parallel samples: `n` outputs per prompt, the best `n` of `best_of` by cumulative logprob
    n: int = 1
    best_of: int | None = None
    # vLLM's: keep only the prompt's last N tokens (-1: max_model_len); None: all of them
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (tuple, list)):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if _is_int(self.top_k) and self.top_k == -1:
            self.top_k = 0
        if self.structured_outputs is not None:
            from .structured import StructuredOutputsParams
            self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        if self.bad_words is None:
            self.bad_words = []
        elif isinstance(self.bad_words, (str, tuple)):
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
        if self.bad_words_token_ids is None:
            self.bad_words_token_ids = []
        elif isinstance(self.bad_words_token_ids, tuple):
            self.bad_words_token_ids = list(self.bad_words_token_ids)
        if isinstance(self.allowed_token_ids, (tuple, set, frozenset)):
            self.allowed_token_ids = list(self.allowed_token_ids)

    def validate(self) -> None:
        """Raise BrazeError naming the first bad parameter and its value."""
        v = self.max_tokens
        if v is not None and (not _is_int(v) or v < 1):    # None: up to max_model_len (vLLM)
            raise BrazeError(f"max_tokens must be null (up to the model's length limit) or an "
                             f"integer >= 1, got {v!r}", param="max_tokens")
        v = self.temperature
        if not _is_real(v) or not math.isfinite(v) or v < 0:
            raise BrazeError(f"temperature must be a finite number >= 0 (0 = greedy), got {v!r}",
                             param="temperature")
        v = self.top_p
        if not _is_real(v) or not math.isfinite(v) or not 0 < v <= 1:
            raise BrazeError(f"top_p must be a number in (0, 1], got {v!r}", param="top_p")
        v = self.min_p
        if not _is_real(v) or not math.isfinite(v) or not 0 <= v <= 1:
            raise BrazeError(f"min_p must be a number in [0, 1] (0 = off), got {v!r}",
                             param="min_p")
        v = self.top_k
        if not _is_int(v) or v < -1:
            raise BrazeError(f"top_k must be an integer >= 0 (0 or -1 = no limit), got {v!r}",
                             param="top_k")
        if v == -1:
            self.top_k = 0
        v = self.seed
        if v is not None and (not _is_int(v) or not 0 <= v < SEED_LIMIT):
            raise BrazeError(f"seed must be null or an integer in [0, 2**63), got {v!r}", param="seed")
        v = self.stop
        if not isinstance(v, list):
            raise BrazeError(f"stop must be a string or a list of strings, got {v!r}", param="stop")
        if len(v) > MAX_STOP_STRINGS:
            raise BrazeError(f"stop has {len(v)} strings; at most {MAX_STOP_STRINGS} are allowed",
                             param="stop")
        for s in v:
            if not isinstance(s, str) or not s:
                raise BrazeError(f"stop strings must be non-empty strings, got {s!r} in stop", param="stop")
        v = self.stop_token_ids
        if not isinstance(v, list):
            raise BrazeError(f"stop_token_ids must be a list of integers >= 0, got {v!r}",
                             param="stop_token_ids")
        for t in v:
            if not _is_int(t) or t < 0:
                raise BrazeError(f"stop_token_ids must hold integers >= 0, got {t!r} in "
                                 "stop_token_ids", param="stop_token_ids")
        if not isinstance(self.ignore_eos, bool):
            raise BrazeError(f"ignore_eos must be true or false, got {self.ignore_eos!r}", param="ignore_eos")
        if self.structured_outputs is not None:
            self.structured_outputs.validate()
        if not isinstance(self.include_stop_str_in_output, bool):
            raise BrazeError(f"include_stop_str_in_output must be true or false, got "
                             f"{self.include_stop_str_in_output!r}",
                             param="include_stop_str_in_output")
        if not isinstance(self.skip_special_tokens, bool):
            raise BrazeError(f"skip_special_tokens must be true or false, "
                             f"got {self.skip_special_tokens!r}", param="skip_special_tokens")
        if self.spaces_between_special_tokens is not True:
            raise BrazeError(f"spaces_between_special_tokens={self.spaces_between_special_tokens!r}"
                             f" is not supported: braze decodes special tokens with the "
                             f"tokenizer's own spacing (vLLM's fast detokenizer does too); "
                             f"leave it out or give True",
                             param="spaces_between_special_tokens")
        if self.output_kind not in OUTPUT_KINDS:
            raise BrazeError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, "
                             f"got {self.output_kind!r}", param="output_kind")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or not -2 <= v <= 2:
                raise BrazeError(f"{name} must be a number in [-2, 2], got {v!r}", param=name)
        v = self.repetition_penalty
        if not _is_real(v) or not math.isfinite(v) or not 0 < v <= MAX_REPETITION_PENALTY:
            raise BrazeError(f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY}] "
                             f"(1 = none), got {v!r}", param="repetition_penalty")
        v = self.logit_bias
        if v is not None:
            if not isinstance(v, dict):
                raise BrazeError(f"logit_bias must be a map of token id to bias, got {v!r}", param="logit_bias")
            if len(v) > MAX_LOGIT_BIAS:
                raise BrazeError(f"logit_bias has {len(v)} entries; at most {MAX_LOGIT_BIAS} are allowed", param="logit_bias")
            clean = {}
            for t, b in v.items():
                tid = int(t) if isinstance(t, str) and t.strip().lstrip("-").isdigit() else t
                if not _is_int(tid) or tid < 0:
                    raise BrazeError(f"logit_bias keys must be token ids >= 0, got {t!r} in logit_bias", param="logit_bias")
                if not _is_real(b) or not math.isfinite(b):
                    raise BrazeError(f"logit_bias values must be numbers in [-100, 100], got {b!r} "
                                     f"for token {t!r} in logit_bias", param="logit_bias")
                clean[int(tid)] = max(-100.0, min(100.0, float(b)))
            self.logit_bias = clean
        v = self.min_tokens
        if not _is_int(v) or v < 0:
            raise BrazeError(f"min_tokens must be an integer >= 0, got {v!r}", param="min_tokens")
        if _is_int(self.max_tokens) and v > self.max_tokens:
            raise BrazeError(f"min_tokens ({v}) must not exceed max_tokens ({self.max_tokens})", param="min_tokens")
        v = self.bad_words
        if not isinstance(v, list) or not all(isinstance(w, str) and w for w in v):
            raise BrazeError(f"bad_words must be a list of non-empty strings, got {v!r}", param="bad_words")
        v = self.bad_words_token_ids
        if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
            raise BrazeError(f"bad_words_token_ids must be a list of token ids >= 0, got {v!r}", param="bad_words_token_ids")
        v = self.allowed_token_ids
        if v is not None and (not isinstance(v, list) or not v
                              or not all(_is_int(t) and t >= 0 for t in v)):
            raise BrazeError(f"allowed_token_ids must be null or a non-empty list of token ids "
                             f">= 0, got {v!r}", param="allowed_token_ids")
        if v is not None and len(v) > MAX_ALLOWED_TOKEN_IDS:
            raise BrazeError(f"allowed_token_ids has {len(v)} ids; at most "
                             f"{MAX_ALLOWED_TOKEN_IDS} are allowed (ban the others with "
                             "bad_words_token_ids instead)", param="allowed_token_ids")
        v = self.logprobs
        if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
            raise BrazeError(f"logprobs must be null or an integer in [0, {MAX_LOGPROBS}], got {v!r}", param="logprobs")
        v = self.prompt_logprobs
        if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
            raise BrazeError(f"prompt_logprobs must be null or an integer in [0, {MAX_LOGPROBS}], "
                             f"got {v!r}", param="prompt_logprobs")
        v = self.n
        if not _is_int(v) or not 1 <= v <= MAX_N:
            raise BrazeError(f"n must be an integer in [1, {MAX_N}], got {v!r}", param="n")
        v = self.best_of
        if v is not None and (not _is_int(v) or not self.n <= v <= MAX_N):
            raise BrazeError(f"best_of must be null or an integer in [n, {MAX_N}] (n={self.n}), "
                             f"got {v!r}", param="best_of")
        v = self.truncate_prompt_tokens
        if v is not None and (not _is_int(v) or not (v == -1 or v >= 1)):
            raise BrazeError(_TRUNCATE_RANGE + f", got {v!r}", param="truncate_prompt_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def filters(self) -> bool:
        """True when top-k, top-p or min-p restricts the sampled set (matters only when not
        greedy)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1 or self.min_p > 0)

    @property
    def penalties(self) -> bool:
        """True when a penalty changes the logits (they need the token history)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def num_samples(self) -> int:
        """Sequences generated for the prompt: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    def children(self) -> list[SamplingParams]:
        """The n=1 requests that make up a parallel-sampling request (itself when n=1 and no
        best_of). A seeded parent gives child i the seed + i (each child is reproducible and
        the children differ); best_of > n also needs each child's cumulative logprob. Only
        the first child computes prompt_logprobs (the others may share the prompt's KV)."""
        k = self.num_samples
        if k == 1:
            return [self]
        lp = self.logprobs if self.logprobs is not None or k == self.n else 0
        return [replace(self, n=1, best_of=None, logprobs=lp,
                        seed=None if self.seed is None else (self.seed + i) % SEED_LIMIT,
                        prompt_logprobs=self.prompt_logprobs if i == 0 else None)
                for i in range(k)]


_TRUNCATE_RANGE = ("truncate_prompt_tokens must be null (the whole prompt), an integer >= 1 "
                   "(the prompt's last N tokens are kept) or -1 (the model's max_model_len)")


def prompt_keep(k, max_model_len: int) -> int | None:
    """How many of a prompt's last tokens vLLM's truncate_prompt_tokens `k` keeps (None:
    all of them), refusing a `k` that keeps more than the model can run."""
    if k is None:
        return None
    if not _is_int(k) or not (k == -1 or k >= 1):
        raise BrazeError(_TRUNCATE_RANGE + f", got {k!r}", param="truncate_prompt_tokens")
    if k > max_model_len:           # (vLLM refuses it too): it keeps more than can run
        raise BrazeError(f"truncate_prompt_tokens ({k}) is more than this model's "
                         f"max_model_len ({max_model_len}); give at most {max_model_len - 1} "
                         f"(the last tokens kept leave room to generate), or leave it out",
                         param="truncate_prompt_tokens")
    return max_model_len if k == -1 else int(k)


def resolve_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one for an unseeded request."""
    return secrets.randbits(63) if seed is None else int(seed)


# ---------------------------------------------------------------------------------------
# counter-based noise: int64 tensors holding unsigned 32-bit values; every product stays
# below 2**63, so nothing overflows on any device.

_M32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D             # lowbias32 (Wellons, hash-prospector) multipliers;
_MUL2_LOW = 0x846CA68B - (1 << 31)   # the second is > 2**31, so it is applied as
                                     # x * (m - 2**31) + x * 2**31 (mod 2**32)
_SEED_SALT = 0x9E3779B9
_VOCAB_SALT = 0x85EBCA6B


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors with values in [0, 2**32): a bijective 32-bit mix."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32                                   # < 2**32 * 2**31
    x = x ^ (x >> 15)
    x = (x * _MUL2_LOW + ((x & 1) << 31)) & _M32             # < 2**32 * 2**27 + 2**31
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """i64[S] 32-bit key per row from its (seed, counter); any int64 values work."""
    seeds, counters = seeds.to(torch.int64), counters.to(torch.int64)
    k = _mix32((seeds & _M32) ^ _SEED_SALT)
    k = _mix32(k ^ ((seeds >> 32) & _M32))
    k = _mix32(k ^ (counters & _M32))
    return _mix32(k ^ ((counters >> 32) & _M32))


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """f32[S, V] standard Gumbel noise; entry (s, v) depends only on (seeds[s], counters[s], v).

    Entry (s, v) is lowbias32(key_s ^ lowbias32(v ^ salt)), written out with in-place
    ops so that at most two [S, V] int64 tensors are alive at once.
    """
    keys = row_keys(seeds, counters)
    vocab = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) ^ _VOCAB_SALT)
    # the mix's first step, x ^ (x >> 16), distributes over the xor of key and vocab
    x = (keys ^ (keys >> 16))[:, None] ^ (vocab ^ (vocab >> 16))[None, :]
    x.mul_(_MUL1).bitwise_and_(_M32)
    x ^= x >> 15
    low_bit = (x & 1).bitwise_left_shift_(31)
    x.mul_(_MUL2_LOW).add_(low_bit).bitwise_and_(_M32)
    del low_bit
    x ^= x >> 16
    # top 23 bits + 1/2 -> uniform in (0, 1), exactly representable in float32 (never 0 or 1)
    x >>= 9
    u = x.to(torch.float32)
    del x
    return u.add_(0.5).mul_(2.0 ** -23).log_().neg_().log_().neg_()


def _restrict(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Set to -inf the entries of each row outside its min-p, then top-k / top-p, set.

    min-p first, as vLLM orders them: an entry whose probability is below min_p times the
    row's largest is dropped, i.e. scaled < max + log(min_p) (min_p 0: log 0 = -inf keeps
    all). Then, sorted descending, a row keeps its first min(k, n_p) entries, where n_p is
    the smallest count whose probability mass (softmax over the top-k entries) reaches
    top_p; every entry equal to the last kept value is kept too, so ties never depend on
    the sort order.
    """
    vocab = scaled.shape[-1]
    if min_p is not None:
        floor = scaled.max(dim=-1).values + torch.log(min_p)
        scaled = scaled.masked_fill(scaled < floor[:, None], float("-inf"))
    ordered = torch.sort(scaled, dim=-1, descending=True).values
    rank = torch.arange(vocab, device=scaled.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    ordered = ordered.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    mass = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
    # entry j is kept when the mass ranked strictly above it is below top_p
    n_p = 1 + (mass[:, :-1] < top_p[:, None]).sum(dim=-1)
    n = torch.minimum(n_p, k)
    threshold = ordered.gather(-1, (n - 1)[:, None])
    return scaled.masked_fill(scaled < threshold, float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """In place: logits [S, V] entry (s, v) becomes -inf where bit v % 32 of
    bitmask[s, v // 32] (int32 [S, ceil(V/32)], the packed layout xgrammar fills) is 0.
    Plain torch, any device; runtime/structured.py uses xgrammar's kernels where it can."""
    vocab = logits.shape[-1]
    # word j's bit b is bit b % 8 of its byte b // 8 (little-endian, as every torch device)
    # and a table turns each byte into its 8 flags: one byte per vocabulary entry, no wider
    byte_bits = torch.arange(256, device=bitmask.device, dtype=torch.int32)[:, None] \
        >> torch.arange(8, device=bitmask.device, dtype=torch.int32)
    table = (byte_bits & 1) == 0                  # [256, 8]: True = disallowed
    packed = bitmask.contiguous().view(torch.uint8)
    banned = table.index_select(0, packed.flatten().int()).view(packed.shape[0], -1)[:, :vocab]
    return logits.masked_fill_(banned, float("-inf"))
# ---------------------------------------------------------------------------------------
# logits processing: each step is a function of the logits and per-row tensors, in the
# order vLLM's sampler applies them (bias-like processors, then penalties); temperature,
# top-k/top-p and the Gumbel draw follow in sample_batch. A new step (a grammar bitmask,
# say) is one more function called from `process_logits`.

NEVER = 1 << 62        # an "until" counter no request reaches: the entry always applies
ALLOWED = -1           # the "until" of an allowed_token_ids entry: it adds nothing itself,
                       # and a row with any bans every token it does not list


def apply_sparse_bias(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                      until: torch.Tensor, counters: torch.Tensor,
                      allowed: bool = False) -> torch.Tensor:
    """Add values[s, j] to logits[s, ids[s, j]] while counters[s] < until[s, j].

    One table holds logit_bias (finite values), bad words (-inf) and min_tokens (-inf for
    EOS and stop ids until the row's min_tokens); unused entries are (id 0, value 0).
    One scatter_add into a copy of the logits: O(S * W) work past the copy.
    `allowed` (some row has allowed_token_ids, whose entries' until is ALLOWED): a row
    with such entries keeps only their ids, the others become -inf (one more [S, V] pass).
    """
    live = counters[:, None] < until
    out = logits.scatter_add(1, ids, torch.where(live, values, 0.0))
    if allowed:
        allow = until == ALLOWED
        mask = torch.full_like(out, float("-inf")).scatter_reduce_(
            1, ids, torch.zeros_like(values).masked_fill_(~allow, float("-inf")), "amax")
        out = out + torch.where(allow.any(dim=1, keepdim=True), mask, 0.0)
    return out


def apply_bad_word_sequences(logits: torch.Tensor, prefix: torch.Tensor, last: torch.Tensor,
                             live: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Multi-token bad words (vLLM): ban a word's last token where the output so far ends
    with the rest of it. prefix i64[S, M, P]: word m's tokens but the last, right-aligned,
    -1 before them; last i64[S, M]; live bool[S, M] (False: padding); tail i64[S, P]: the
    row's last P output tokens, right-aligned, -2 where the output is shorter."""
    match = ((prefix == tail[:, None, :]) | (prefix < 0)).all(dim=-1) & live
    return logits.scatter_add(1, last, torch.where(match, float("-inf"), 0.0))


def apply_penalties(logits: torch.Tensor, tokens: torch.Tensor, prompt_len: torch.Tensor,
                    seq_len: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties from each row's token history (tokens i64[S, L]: positions below
    prompt_len[s] are the prompt, those in [prompt_len[s], seq_len[s]) the output so far;
    later columns are ignored; seq_len >= 1). Repetition (prompt and output): a positive
    logit is divided by the penalty, a negative one multiplied. Then frequency (times the
    token's count in the output) and presence (once per token in the output) are
    subtracted.

    The counts are rebuilt from the history each step (as vLLM does) rather than kept in a
    persistent [slots, vocab] tensor: nothing to keep right across preemption, recompute
    and async steps, and the [S, V] count scratch exists only in steps with penalties.
    Only the tokens of the history change, so the new values are computed at the history's
    [S, L] positions and scattered into a copy of the logits (every position of a token
    carries the same value; positions past seq_len repeat position 0's).
    """
    V = logits.shape[1]
    pos = torch.arange(tokens.shape[1], device=logits.device)
    seen = pos[None, :] < seq_len[:, None]
    is_out = seen & (pos[None, :] >= prompt_len[:, None])
    tok = tokens.clamp(0, V - 1)
    counts = torch.zeros_like(logits).scatter_add_(1, tok, is_out.to(logits.dtype))
    g = logits.gather(1, tok)
    cnt = counts.gather(1, tok)
    rep = repetition[:, None]
    new = (torch.where(g > 0, g / rep, g * rep) - frequency[:, None] * cnt
           - presence[:, None] * (cnt > 0).to(logits.dtype))
    idx = torch.where(seen, tok, tok[:, :1])
    return logits.scatter(1, idx, torch.where(seen, new, new[:, :1]))


@dataclass
class Processing:
    """Per-row inputs of the logits-processing steps for one step's rows; a None group
    skips its step (the host knows from its mirrors which steps any row needs)."""
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # ids, values, until
    allowed: bool = False     # a row of `bias` lists allowed_token_ids (apply_sparse_bias)
    bad_words: tuple[torch.Tensor, ...] | None = None   # prefix, last, live, tail
    penalties: tuple[torch.Tensor, ...] | None = None   # tokens, prompt_len, seq_len, pres, freq, rep

    @property
    def empty(self) -> bool:
        return self.bias is None and self.bad_words is None and self.penalties is None


def process_logits(logits: torch.Tensor, counters: torch.Tensor | None,
                   proc: Processing | None) -> torch.Tensor:
    """The logits the sampler draws from: float32, then each processing step in order."""
    logits = logits.float()
    if proc is None:
        return logits
    if proc.bias is not None:
        logits = apply_sparse_bias(logits, *proc.bias, counters, allowed=proc.allowed)
    if proc.bad_words is not None:
        logits = apply_bad_word_sequences(logits, *proc.bad_words)
    if proc.penalties is not None:
        logits = apply_penalties(logits, *proc.penalties)
    return logits


def sample_batch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor,
                 filter: bool = True, proc: Processing | None = None,
                 min_p: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row: logits [S, V] -> i64[S], on the logits' device.

    temperature f32[S] (0 = greedy argmax), top_k i64[S] (0 = no limit), top_p f32[S],
    seeds i64[S], counters i64[S], min_p f32[S] (None or 0 = off). `filter=False` skips
    min-p/top-k/top-p (and their sort); pass it only when no sampled row restricts its set.
    `proc`: penalties, logit bias, bad words, min_tokens (process_logits), applied first,
    to greedy rows too.
    """
    logits = process_logits(logits, counters, proc)
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    scaled = logits / t[:, None]
    if filter:
        scaled = _restrict(scaled, top_k, top_p.float(),
                           None if min_p is None else min_p.float())
    scores = scaled + gumbel_noise(seeds, counters, logits.shape[-1])
    return torch.where(greedy, row_argmax(logits), row_argmax(scores))


class KernelSampler:
    """`sample_batch` as one Triton launch (runtime/sampling_kernel.py) rather than ~116
    torch ops (~139 and a sort of every row with top-k / top-p / min-p). JIT-compiled on the
    GPU at first use; under the interpreter on the CPU."""

    def __init__(self, interpret: bool, rounds: int = 4):
        """`rounds`: redraws after a draw top-p rejects before the kernel bisects the kept
        set's boundary instead (runtime/sampling_kernel.py step 5)."""
        from pathlib import Path

        from braze.kernel_modules import load_source
        path = Path(__file__).with_name("sampling_kernel.py")
        mod = load_source("sampling_kernel", path.read_text(), str(path), interpret)
        self.kernel = mod.sample_rows_kernel
        self.block = 1024 if interpret else 4096
        self.rounds = rounds
        self.launches = 0

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor,
                 seeds: torch.Tensor, counters: torch.Tensor,
                 filters: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                 ) -> torch.Tensor:
        """Tokens i64[S] for logits [S, V] (row i samples with slot rows[i]'s temperature
        and seed, output counter counters[i]). `filters`: the slot tables top_k i64, top_p
        f32 and min_p f32 (indexed like temperature), or None when no row restricts its set
        (the launch then skips that work)."""
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        s, v = logits.shape
        out = torch.empty(s, dtype=torch.int64, device=logits.device)
        if s:
            top_k, top_p, min_p = filters if filters is not None else (seeds, temperature,
                                                                        temperature)
            self.kernel[(s,)](logits, rows, temperature, seeds, counters, out, top_k, top_p,
                              min_p, v, logits.stride(0), BLOCK_V=min(self.block, _pow2(v)),
                              FILTER=filters is not None, ROUNDS=self.rounds)
            self.launches += 1
        return out


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """The index of each row's maximum (the first one on ties, as argmax). `max(dim)` gives
    the same indices and runs 2-3x faster than `argmax` on CPUs (measured with torch 2.13 on
    [256, 512] float32: 80 vs 212 us), which the reference backend's decode pays every step."""
    return x.max(dim=-1).indices


@dataclass
class Logprobs:
    """The model's logprobs (log_softmax of the raw logits) for a step's rows: the sampled
    token's f32[S] and its rank i64[S] (1 = the most likely), the top ids and logprobs
    [S, K] (K = the largest request's top count in the step)."""
    sampled: torch.Tensor
    rank: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


def compute_logprobs(raw_logits: torch.Tensor, tokens: torch.Tensor, k: int) -> Logprobs:
    """Raw logprobs, as vLLM reports by default (logprobs_mode "raw_logprobs"): of the
    model's distribution, before penalties, bias, temperature and top-k/top-p."""
    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    k = min(k, lp.shape[-1])
    sampled = lp.gather(1, tokens[:, None])
    rank = (lp > sampled).sum(dim=-1) + 1
    top = torch.topk(lp, k, dim=-1) if k > 0 else None
    empty = lp[:, :0]
    return Logprobs(sampled[:, 0], rank,
                    top.indices if top is not None else empty.long(),
                    top.values if top is not None else empty)


def bias_entries(params: SamplingParams, stop_ids: Iterable[int] = (),
                 bad_ids: Iterable[int] = ()) -> list[tuple[int, float, int]]:
    """The (token id, value, until) rows of a request's sparse bias table: logit_bias,
    single-token bad words (-inf always), EOS/stop ids banned (-inf) while fewer than
    min_tokens tokens are out, and allowed_token_ids (until ALLOWED). `stop_ids`: the ids
    that would end it (EOS unless ignore_eos, and stop_token_ids); `bad_ids`: bad words'
    token ids."""
    out = [(t, b, NEVER) for t, b in (params.logit_bias or {}).items()]
    out += [(t, 0.0, ALLOWED) for t in dict.fromkeys(params.allowed_token_ids or ())]
    out += [(t, float("-inf"), NEVER) for t in dict.fromkeys(bad_ids)]
    if params.min_tokens > 0:
        out += [(t, float("-inf"), params.min_tokens) for t in dict.fromkeys(stop_ids)]
    return out


class SamplingTensors:
    """Per-row sampling parameters in persistent tensors, one row per persistent-batch slot.

    The engine calls `set_rows` when requests take slots; `sample(logits, rows, counters)`
    samples logits row i for slot rows[i]. The counter (the index of the token being
    sampled in the request's output) is not stored here: the caller derives it from the
    sequence, so it stays right across preemption and recompute.

    Logits processing: penalties (f32 per row), and a sparse bias table [rows, W] of
    (id, value, until) entries (bias_entries) whose width W grows to the widest request
    seen (a few KB per row; the table is only read in steps where a row has entries).
    """

    def __init__(self, max_rows: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.max_rows = max_rows
        f32, i64 = torch.float32, torch.int64
        self.temperature = torch.zeros(max_rows, dtype=f32, device=self.device)
        self.top_k = torch.zeros(max_rows, dtype=i64, device=self.device)
        self.top_p = torch.ones(max_rows, dtype=f32, device=self.device)
        self.min_p = torch.zeros(max_rows, dtype=f32, device=self.device)
        self.seeds = torch.zeros(max_rows, dtype=i64, device=self.device)
        self.presence = torch.zeros(max_rows, dtype=f32, device=self.device)
        self.frequency = torch.zeros(max_rows, dtype=f32, device=self.device)
        self.repetition = torch.ones(max_rows, dtype=f32, device=self.device)
        self.bias_ids = torch.zeros(max_rows, 0, dtype=i64, device=self.device)
        self.bias_values = torch.zeros(max_rows, 0, dtype=f32, device=self.device)
        self.bias_until = torch.zeros(max_rows, 0, dtype=i64, device=self.device)
        # multi-token bad words: [rows, M, P] right-aligned prefixes, [rows, M] last tokens
        self.bw_prefix = torch.full((max_rows, 0, 0), -1, dtype=i64, device=self.device)
        self.bw_last = torch.zeros(max_rows, 0, dtype=i64, device=self.device)
        self.bw_live = torch.zeros(max_rows, 0, dtype=torch.bool, device=self.device)
        self._greedy = [True] * max_rows      # host mirrors, to pick the cheap path
        self._filters = [False] * max_rows
        self._num_sampling = 0                # slots not greedy / with top-k or top-p: at 0
        self._num_filtering = 0               # the per-row checks are skipped
        self._penalties = [False] * max_rows
        self._bias = [False] * max_rows
        self._allowed = [False] * max_rows    # its bias entries hold allowed_token_ids
        self._bad_words = [False] * max_rows
        self._logprobs = [-1] * max_rows      # top count reported, -1: no logprobs
        # slots whose last request used any of those (a step with none of them among its
        # rows skips the per-row checks; a freed slot stays here until it is reused)
        self._optioned: set[int] = set()
        # the fused kernel for steps no row restricts (EngineOptions.sampler "triton")
        self.kernel: KernelSampler | None = None

    def set_rows(self, rows: Sequence[int], params: Sequence[SamplingParams],
                 seeds: Sequence[int], entries: Sequence[list] | None = None,
                 sequences: Sequence[list] | None = None) -> None:
        """Fill slots `rows` from validated params; `seeds` already resolved (resolve_seed);
        `entries`: each row's sparse bias table (bias_entries), default logit_bias only;
        `sequences`: each row's multi-token bad words (token id lists), default none."""
        if not rows:
            return
        if not len(rows) == len(params) == len(seeds):
            raise ValueError("rows, params and seeds must have the same length")
        if entries is None:
            entries = [bias_entries(p) for p in params]
        idx = upload_values(list(rows), torch.int64, self.device)

        def put(dst: torch.Tensor, values) -> None:
            dst.index_copy_(0, idx, upload_values(values, dst.dtype, self.device))

        put(self.temperature, [0.0 if p.greedy else float(p.temperature) for p in params])
        put(self.top_k, [int(p.top_k) if p.top_k > 0 else 0 for p in params])
        put(self.top_p, [float(p.top_p) for p in params])
        put(self.min_p, [float(p.min_p) for p in params])
        put(self.seeds, [int(s) for s in seeds])
        put(self.presence, [float(p.presence_penalty) for p in params])
        put(self.frequency, [float(p.frequency_penalty) for p in params])
        put(self.repetition, [float(p.repetition_penalty) for p in params])
        width = max(len(e) for e in entries)
        if width > self.bias_ids.shape[1]:
            self._widen(width)
        if width or any(self._bias[r] for r in rows):
            w = self.bias_ids.shape[1]
            pad = [e + [(0, 0.0, 0)] * (w - len(e)) for e in entries]
            put(self.bias_ids, [[t for t, _, _ in e] for e in pad])
            put(self.bias_values, [[v for _, v, _ in e] for e in pad])
            put(self.bias_until, [[u for _, _, u in e] for e in pad])
        if sequences is None:
            sequences = [[] for _ in rows]
        self._set_bad_words(rows, idx, sequences)
        for r, p, e in zip(rows, params, entries):
            self._set_flags(r, p.greedy, p.filters)
            self._penalties[r] = p.penalties
            self._bias[r] = bool(e)
            self._allowed[r] = any(u == ALLOWED for _, _, u in e)
            self._logprobs[r] = -1 if p.logprobs is None else int(p.logprobs)
            if self._penalties[r] or self._bias[r] or self._bad_words[r] or self._logprobs[r] >= 0:
                self._optioned.add(r)
            else:
                self._optioned.discard(r)

    def _set_bad_words(self, rows, idx: torch.Tensor, sequences: Sequence[list]) -> None:
        m = max(len(s) for s in sequences)
        p = max((len(w) - 1 for s in sequences for w in s), default=0)
        M, P = self.bw_last.shape[1], self.bw_prefix.shape[2]
        if m > M or p > P:         # grow, keeping the rows that use them (right-aligned)
            M2, P2 = max(m, M), max(p, P)
            prefix = torch.full((self.max_rows, M2, P2), -1, dtype=torch.int64, device=self.device)
            prefix[:, :M, P2 - P:] = self.bw_prefix
            last = torch.zeros(self.max_rows, M2, dtype=torch.int64, device=self.device)
            last[:, :M] = self.bw_last
            live = torch.zeros(self.max_rows, M2, dtype=torch.bool, device=self.device)
            live[:, :M] = self.bw_live
            self.bw_prefix, self.bw_last, self.bw_live = prefix, last, live
            M, P = M2, P2
        if not M:
            return
        if m == 0 and not any(self._bad_words[r] for r in rows):
            return
        pre = [[[-1] * P for _ in range(M)] for _ in rows]
        last = [[0] * M for _ in rows]
        live = [[False] * M for _ in rows]
        for i, seqs in enumerate(sequences):
            for j, w in enumerate(seqs):
                pre[i][j][P - (len(w) - 1):] = w[:-1]
                last[i][j] = w[-1]
                live[i][j] = True
        dev = self.device
        self.bw_prefix.index_copy_(0, idx, upload_values(pre, torch.int64, dev))
        self.bw_last.index_copy_(0, idx, upload_values(last, torch.int64, dev))
        self.bw_live.index_copy_(0, idx, upload_values(live, torch.bool, dev))
        for r, seqs in zip(rows, sequences):
            self._bad_words[r] = bool(seqs)

    def _widen(self, width: int) -> None:
        w = 1 << max(0, width - 1).bit_length()           # next power of two
        old = self.bias_ids.shape[1]

        def grow(t: torch.Tensor) -> torch.Tensor:
            new = torch.zeros(self.max_rows, w, dtype=t.dtype, device=self.device)
            new[:, :old] = t
            return new
        self.bias_ids, self.bias_values, self.bias_until = (
            grow(self.bias_ids), grow(self.bias_values), grow(self.bias_until))

    def release(self, row: int) -> None:
        """Slot `row` is free again: it no longer counts as sampling or filtering."""
        self._set_flags(row, True, False)

    def _set_flags(self, row: int, greedy: bool, filters: bool) -> None:
        self._num_sampling += (not greedy) - (not self._greedy[row])
        self._num_filtering += bool(filters) - self._filters[row]
        self._greedy[row], self._filters[row] = bool(greedy), bool(filters)

    @property
    def any_sampling(self) -> bool:
        """Whether any occupied slot samples (temperature > 0)."""
        return self._num_sampling > 0

    def all_greedy(self, rows: Iterable[int]) -> bool:
        return self._num_sampling == 0 or all(self._greedy[r] for r in rows)

    def needs_filter(self, rows: Iterable[int]) -> bool:
        return self._num_filtering > 0 and any(self._filters[r] for r in rows)

    @property
    def any_optioned(self) -> bool:
        """Whether any slot's request used penalties, the bias table or logprobs."""
        return bool(self._optioned)

    def any_options(self, rows: Iterable[int]) -> bool:
        """Whether a row uses penalties, the bias table or logprobs (cheap when no slot does)."""
        return bool(self._optioned) and not self._optioned.isdisjoint(rows)

    def needs_penalties(self, rows: Iterable[int]) -> bool:
        return any(self._penalties[r] for r in rows)

    def needs_bias(self, rows: Iterable[int]) -> bool:
        return any(self._bias[r] for r in rows)

    def needs_allowed(self, rows: Iterable[int]) -> bool:
        return any(self._allowed[r] for r in rows)

    def num_logprobs(self, rows: Iterable[int]) -> int:
        """The largest top count the rows report; -1 when none reports logprobs."""
        return max((self._logprobs[r] for r in rows), default=-1)

    def needs_bad_words(self, rows: Iterable[int]) -> bool:
        return any(self._bad_words[r] for r in rows)

    @property
    def bad_word_prefix_len(self) -> int:
        """P: the longest multi-token bad word less its last token (the output tail needed)."""
        return self.bw_prefix.shape[2]

    def processing(self, rows: torch.Tensor, *, bias: bool, penalties: bool,
                   allowed: bool = False,
                   tokens: torch.Tensor | None = None, prompt_len: torch.Tensor | None = None,
                   seq_len: torch.Tensor | None = None, tail: torch.Tensor | None = None
                   ) -> Processing | None:
        """The Processing of slots `rows` (i64[S] on device) for the steps asked for;
        penalties need each row's token history (tokens [S, L]) and its prompt and
        sequence lengths; multi-token bad words (when `tail` is given) the last
        `bad_word_prefix_len` output tokens of each row (tail [S, P], -2 for none)."""
        if not (bias or penalties or tail is not None):
            return None
        proc = Processing()
        if tail is not None:
            proc.bad_words = (self.bw_prefix[rows], self.bw_last[rows], self.bw_live[rows], tail)
        if bias:
            proc.bias = (self.bias_ids[rows], self.bias_values[rows], self.bias_until[rows])
            proc.allowed = allowed
        if penalties:
            proc.penalties = (tokens, prompt_len, seq_len, self.presence[rows],
                              self.frequency[rows], self.repetition[rows])
        return proc

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, counters: torch.Tensor | None, *,
               filter: bool = True, greedy_only: bool = False,
               proc: Processing | None = None) -> torch.Tensor:
        """Tokens i64[S] for logits [S, V] whose row i belongs to slot rows[i] (i64[S] on
        device), drawing token number counters[i] of that request's output.

        Host flags (from `all_greedy` / `needs_filter`) choose cheaper paths:
        greedy_only=True is an argmax (of the processed logits when `proc` is given),
        filter=False skips the top-k/top-p sort.
        """
        if greedy_only:
            if proc is None:
                return row_argmax(logits)
            return row_argmax(process_logits(logits, counters, proc))
        if self.kernel is not None:
            if proc is not None:
                logits = process_logits(logits, counters, proc)
            return self.kernel(logits, rows, self.temperature, self.seeds, counters,
                               (self.top_k, self.top_p, self.min_p) if filter else None)
        return sample_batch(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows],
                            self.seeds[rows], counters, filter=filter, proc=proc,
                            min_p=self.min_p[rows])
