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
from dataclasses import dataclass, field

import torch
from braze.ir.errors import BrazeError

MAX_STOP_STRINGS = 16
OUTPUT_KINDS = ("delta", "final")
SEED_LIMIT = 1 << 63          # seeds are in [0, 2**63)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 (or -1) = no limit
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)   # a str or a list of str; None = []
    # "delta": the engine reports the request after every step that gives it tokens (for
    # streaming); "final": only when it finishes (offline generation: less host work)
    output_kind: str = "delta"

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

    def validate(self) -> None:
        """Raise BrazeError naming the first bad parameter and its value."""
        v = self.max_tokens
        if not _is_int(v) or v < 1:
            raise BrazeError(f"max_tokens must be an integer >= 1, got {v!r}", param="max_tokens")
        v = self.temperature
        if not _is_real(v) or not math.isfinite(v) or v < 0:
            raise BrazeError(f"temperature must be a finite number >= 0 (0 = greedy), got {v!r}",
                             param="temperature")
        v = self.top_p
        if not _is_real(v) or not math.isfinite(v) or not 0 < v <= 1:
            raise BrazeError(f"top_p must be a number in (0, 1], got {v!r}", param="top_p")
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
            raise BrazeError(f"ignore_eos must be true or false, got {self.ignore_eos!r}",
                             param="ignore_eos")
        if self.output_kind not in OUTPUT_KINDS:
            raise BrazeError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, "
                             f"got {self.output_kind!r}", param="output_kind")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        """True when top-k or top-p restricts the sampled set (matters only when not greedy)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


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


def _restrict(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the entries of each row outside its top-k / top-p set.

    Sorted descending, a row keeps its first min(k, n_p) entries, where n_p is the
    smallest count whose probability mass (softmax over the top-k entries) reaches top_p;
    every entry equal to the last kept value is kept too, so ties never depend on the
    sort order.
    """
    vocab = scaled.shape[-1]
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


def sample_batch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor,
                 filter: bool = True) -> torch.Tensor:
    """One token per row: logits [S, V] -> i64[S], on the logits' device.

    temperature f32[S] (0 = greedy argmax), top_k i64[S] (0 = no limit), top_p f32[S],
    seeds i64[S], counters i64[S]. `filter=False` skips top-k/top-p (and their sort);
    pass it only when no sampled row restricts its set.
    """
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    scaled = logits / t[:, None]
    if filter:
        scaled = _restrict(scaled, top_k, top_p.float())
    scores = scaled + gumbel_noise(seeds, counters, logits.shape[-1])
    return torch.where(greedy, logits.argmax(dim=-1), scores.argmax(dim=-1))


class SamplingTensors:
    """Per-row sampling parameters in persistent tensors, one row per persistent-batch slot.

    The engine calls `set_rows` when requests take slots; `sample(logits, rows, counters)`
    samples logits row i for slot rows[i]. The counter (the index of the token being
    sampled in the request's output) is not stored here: the caller derives it from the
    sequence, so it stays right across preemption and recompute.
    """

    def __init__(self, max_rows: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.max_rows = max_rows
        f32, i64 = torch.float32, torch.int64
        self.temperature = torch.zeros(max_rows, dtype=f32, device=self.device)
        self.top_k = torch.zeros(max_rows, dtype=i64, device=self.device)
        self.top_p = torch.ones(max_rows, dtype=f32, device=self.device)
        self.seeds = torch.zeros(max_rows, dtype=i64, device=self.device)
        self._greedy = [True] * max_rows      # host mirrors, to pick the cheap path
        self._filters = [False] * max_rows

    def set_rows(self, rows: Sequence[int], params: Sequence[SamplingParams],
                 seeds: Sequence[int]) -> None:
        """Fill slots `rows` from validated params; `seeds` already resolved (resolve_seed)."""
        if not rows:
            return
        if not len(rows) == len(params) == len(seeds):
            raise ValueError("rows, params and seeds must have the same length")
        idx = torch.tensor(list(rows), dtype=torch.int64, device=self.device)

        def put(dst: torch.Tensor, values) -> None:
            dst.index_copy_(0, idx, torch.tensor(values, dtype=dst.dtype, device=self.device))

        put(self.temperature, [float(p.temperature) for p in params])
        put(self.top_k, [int(p.top_k) if p.top_k > 0 else 0 for p in params])
        put(self.top_p, [float(p.top_p) for p in params])
        put(self.seeds, [int(s) for s in seeds])
        for r, p in zip(rows, params):
            self._greedy[r] = p.greedy
            self._filters[r] = p.filters

    def all_greedy(self, rows: Iterable[int]) -> bool:
        return all(self._greedy[r] for r in rows)

    def needs_filter(self, rows: Iterable[int]) -> bool:
        return any(self._filters[r] for r in rows)

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, counters: torch.Tensor, *,
               filter: bool = True, greedy_only: bool = False) -> torch.Tensor:
        """Tokens i64[S] for logits [S, V] whose row i belongs to slot rows[i] (i64[S] on
        device), drawing token number counters[i] of that request's output.

        Host flags (from `all_greedy` / `needs_filter`) choose cheaper paths:
        greedy_only=True is a plain argmax, filter=False skips the top-k/top-p sort.
        """
        if greedy_only:
            return logits.argmax(dim=-1)
        return sample_batch(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows],
                            self.seeds[rows], counters, filter=filter)
