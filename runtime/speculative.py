"""Speculative decoding: cheap proposals, verified by the target model in one step.

For a decoding request, a proposer guesses its next k tokens d_1..d_k. The next step
runs the request's last token and the k guesses (k + 1 query tokens of one sequence;
the varlen attention already takes several per sequence) and computes a logits row at
each of those k + 1 positions (`logits_indices` holds them: the contract's R rows).
Row j is the target's distribution after the prefix ... d_j, so the sampler draws the
token x_j the target itself would draw there, with the same counter (output index) as
a step without speculation would use. The guesses are accepted while d_{j+1} == x_j;
the output is x_0 .. x_a (a accepted guesses plus the target's own next token).

Why that is exact: a proposer that guesses deterministically (prompt lookup; a draft
model decoding greedily) is a point-mass proposal q = delta(d). Leviathan et al.'s
rule accepts d with probability min(1, p(d) / q(d)) = p(d) and otherwise draws from
the residual norm(max(0, p - q)) = p without d, renormalised. The sampler's draw x_j
is a Gumbel-max over p (runtime/sampler.py) keyed by (seed, output index): P(x_j = d)
= p(d), and given x_j != d, x_j is distributed as p without d, renormalised -- the
same rule, with the acceptance coin and the residual draw coupled to the noise the
non-speculative step would use. So the output distribution is the target's, greedy
output is identical token for token, and a seeded request gives the same tokens with
or without speculation.

Bookkeeping (`Speculator.accept`): the KV of the rejected guesses was written into
slots the sequence no longer owns: its `num_computed` goes back to the accepted
prefix and its blocks past that are freed (`BlockManager.truncate`); the next step
overwrites those slots. Only blocks of accepted tokens reach the prefix cache.

Which requests speculate: decoding ones (their prompt is computed, one token to go)
whose sampling needs nothing but temperature / top-k / top-p / min-p / seed (not penalties,
logit bias, bad words, min_tokens, logprobs or a grammar, whose per-position state the
verification step does not rebuild). Speculation runs the engine synchronously.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from braze.ir.errors import BrazeError

from .request import Status

METHODS = ("ngram", "draft", "mtp")
# vLLM's names for the same methods
METHOD_ALIASES = {"draft_model": "draft", "deepseek_mtp": "mtp", "[ngram]": "ngram"}
MAX_SPECULATIVE_TOKENS = 16
# the MTP layers an artifact holds (braze/compile_mtp.py compiles one; Gemma 4's assistant
# is one model): `mtp`'s guesses where the config names no count, as vLLM takes n_predict
MTP_LAYERS = 1
# vLLM's speculative_config keys for what braze does one way only: taken at that value,
# refused (saying why) at any other; key -> (the value braze does, what braze does)
VLLM_FIXED = {
    "draft_tensor_parallel_size": (1, "a draft runs on rank 0 alone (the target's other "
                                      "ranks follow only the target)"),
}


@dataclass
class SpeculativeConfig:
    """`--speculative '{"method": ..., "num_speculative_tokens": k, ...}'` (vLLM's names).

    mtp: the artifact's multi-token-prediction graph (DeepSeek-V3's next-n layer, or
    Gemma 4's assistant model), chained k times. ngram: `prompt_lookup_max` / `prompt_lookup_min`, the longest and shortest n-gram
    of the request's tail looked up in its own tokens. draft: `model`, the path of a
    second braze artifact with the same tokenizer."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            self.method = METHOD_ALIASES.get(self.method, self.method)
        if self.method not in METHODS:
            raise BrazeError(f"speculative method {self.method!r} is unknown; choose one of "
                             f"{', '.join(METHODS)}", param="speculative")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise BrazeError(f"speculative num_speculative_tokens must be an integer from 1 to "
                             f"{MAX_SPECULATIVE_TOKENS}, got {k!r}", param="speculative")
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BrazeError(f"speculative {name} must be a positive integer, got {v!r}",
                                 param="speculative")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise BrazeError(f"speculative prompt_lookup_min ({self.prompt_lookup_min}) is above "
                             f"prompt_lookup_max ({self.prompt_lookup_max})", param="speculative")
        if self.model is not None and not isinstance(self.model, str):
            raise BrazeError(f"speculative \"model\" must be the path of a braze artifact, got "
                             f"{self.model!r}", param="speculative")
        if self.method == "draft" and not self.model:
            raise BrazeError("speculative method 'draft' needs \"model\": the path of a braze "
                             "artifact compiled from a smaller model with the same tokenizer",
                             param="speculative")
        if self.method != "draft" and self.model is not None:
            raise BrazeError(f"speculative \"model\" is for method 'draft', not {self.method!r}",
                             param="speculative")

    @classmethod
    def of(cls, value) -> "SpeculativeConfig | None":
        """From a SpeculativeConfig, a dict or its JSON text (None: no speculation), read
        as vLLM reads its speculative_config: a key set to null is not given, a "model"
        without a "method" is a draft model, `mtp` without num_speculative_tokens guesses
        once per MTP layer, and a prompt_lookup_min (max) given alone sets the other
        bound too (n-grams of that one length)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise BrazeError(f"--speculative is not valid JSON ({e.msg} at character "
                                 f"{e.pos}); give e.g. '{{\"method\": \"ngram\", "
                                 f"\"num_speculative_tokens\": 3}}'", param="speculative") from None
        if not isinstance(value, dict):
            raise BrazeError(f"speculative must be a dict like {{\"method\": \"ngram\", "
                             f"\"num_speculative_tokens\": 3}}, got {type(value).__name__}",
                             param="speculative")
        value = {k: v for k, v in value.items() if v is not None}
        if "method" not in value and "model" in value:
            value["method"] = "draft"
        if "num_speculative_tokens" not in value and isinstance(value.get("method"), str) \
                and METHOD_ALIASES.get(value["method"], value["method"]) == "mtp":
            value["num_speculative_tokens"] = MTP_LAYERS     # vLLM: the model's n_predict
        lo, hi = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
        if hi is None and isinstance(lo, int):      # (a bad one is refused by its own name)
            value["prompt_lookup_max"] = lo
        if lo is None and isinstance(hi, int):
            value["prompt_lookup_min"] = hi
        for key, (want, why) in VLLM_FIXED.items():
            v = value.pop(key, want)
            if not (v == want and type(v) is type(want)):
                raise BrazeError(f"speculative {key}={v!r}: {why}; leave {key} out or give "
                                 f"{want!r}", param="speculative")
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(value) - known)
        if bad:
            raise BrazeError(f"speculative has unknown key {bad[0]!r}; the keys are "
                             f"{', '.join(sorted(known))}", param="speculative")
        for need in ("method", "num_speculative_tokens"):
            if need not in value:
                raise BrazeError(f"speculative needs {need!r}", param="speculative")
        return cls(**value)

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------ proposers

def ngram_propose(tokens, k: int, n_max: int, n_min: int) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the
    sequence's last n tokens (the longest n from n_max down to n_min that occurs) that
    has k tokens after it, else the earliest (the most tokens: in a run of one token the
    latest has one); [] when none does. `tokens`: a list or a 1-D integer array.

    O(L) per call, not O(L * n_max^2): the candidates are the earlier positions holding
    the last token (one vectorised compare), each extended backwards while it keeps
    matching the tail, all at once, at most n_max - 1 times."""
    arr = np.asarray(tokens, dtype=np.int64)
    L = len(arr)
    n_top = min(n_max, L - 1)              # a match must end before the tail's last token
    if k < 1 or n_top < max(n_min, 1):
        return []
    ends = np.flatnonzero(arr[:L - 1] == arr[L - 1])     # where a match may end
    if ends.size == 0:
        return []
    length = np.ones(ends.size, dtype=np.int64)           # how far back each one matches
    alive = np.ones(ends.size, dtype=bool)
    for d in range(1, n_top):
        back = ends - d
        alive &= back >= 0
        alive[alive] = arr[back[alive]] == arr[L - 1 - d]
        if not alive.any():
            break
        length += alive
    n = int(length.max())
    if n < n_min:
        return []
    longest = ends[length >= n]
    # the latest of the longest with k tokens after it; where the tail repeats with a period
    # shorter than k none near the end has, and the earliest has the most (vLLM's and
    # transformers' prompt lookup take the first match)
    full = longest[longest <= L - 1 - k]
    j = int(full[-1] if full.size else longest[0]) + 1
    return arr[j:j + k].tolist()


class NgramProposer:
    """Each request's tokens are kept as an int64 array that grows by what the request
    appended since the last step (a 32k-token context is not converted again per step)."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self._arrays: dict[str, list] = {}   # request id -> [array (capacity), length, req]

    def _tokens(self, req) -> np.ndarray:
        toks = req.all_token_ids
        entry = self._arrays.get(req.request_id)
        # a request's tokens are only ever appended; a new request under a finished one's
        # id starts afresh
        if entry is None or entry[2] is not req or entry[1] > len(toks):
            buf = np.asarray(toks, dtype=np.int64)
            buf = np.concatenate([buf, np.empty(len(buf) // 2 + 16, dtype=np.int64)])
            entry = self._arrays[req.request_id] = [buf, len(toks), req]
        buf, n, _ = entry
        if len(toks) > n:
            if len(toks) > len(buf):
                grown = np.empty(2 * len(toks), dtype=np.int64)
                grown[:n] = buf[:n]
                buf = entry[0] = grown
            buf[n:len(toks)] = toks[n:]
            entry[1] = len(toks)
        return buf[:len(toks)]

    def propose(self, reqs: list, budgets: list[int]) -> list[list[int]]:
        c = self.config
        return [ngram_propose(self._tokens(r), b, c.prompt_lookup_max, c.prompt_lookup_min)
                for r, b in zip(reqs, budgets)]

    def forget(self, req) -> None:
        self._arrays.pop(req.request_id, None)


def eligible(req) -> bool:
    """Whether a running request may speculate in the next step: decoding (only its last
    token to compute, nothing in flight, no KV still being loaded) and sampling without
    per-position state (could_speculate)."""
    return (req.num_pending == 0 and req.num_computed == len(req.all_token_ids) - 1
            and not req.kv_loading and could_speculate(req))


def could_speculate(req) -> bool:
    """Whether a request's sampling lets it speculate at all: no per-position state
    (grammar, logprobs, penalties, bias, min_tokens, bad words, allowed ids). The MTP and
    assistant proposers keep no hidden states for requests that never will."""
    p = req.params
    return (req.matcher is None and req.grammar is None and p.logprobs is None
            and p.prompt_logprobs is None and not p.penalties and not p.logit_bias
            and not p.min_tokens and not p.bad_words and not p.bad_words_token_ids
            and p.allowed_token_ids is None)


# ------------------------------------------------------------------------ the engine side

class Speculator:
    """Proposes before each step, accepts after it, and counts."""

    def __init__(self, config: SpeculativeConfig, engine):
        self.config = config
        self.k = config.num_speculative_tokens
        runner = engine.runner
        # logits rows: one per sequence of the step, the rest for guesses
        self.max_rows, self.max_num_seqs = runner.max_logits_rows, runner.max_num_seqs
        # each logits row is a token of the step: rows as many as the token budget never
        # run out, whatever the number of sequences
        self.rows_bind = runner.max_logits_rows < runner.max_num_tokens
        if config.method == "ngram":
            self.proposer = NgramProposer(config)
        elif config.method == "mtp":       # the artifact's MTP graph (runtime/mtp_proposer.py)
            from .assistant_proposer import KIND, AssistantProposer
            from .mtp_proposer import MTPProposer
            mtp = engine.artifact.manifest.get("mtp") or {}
            cls = AssistantProposer if mtp.get("kind") == KIND else MTPProposer
            self.proposer = cls(config, engine)
        else:
            from .draft_proposer import DraftProposer
            self.proposer = DraftProposer(config, engine)
        self.num_drafts = 0               # verifications (requests x steps that proposed)
        self.num_draft_tokens = 0         # tokens proposed and scored
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * self.k   # guess j accepted (j = 0 .. k-1)
        self.proposed_per_position = [0] * self.k

    def propose(self, running: list, num_waiting: int = 0) -> None:
        """Set each running request's `draft_token_ids` for the next step (in which
        `num_waiting` requests may join them)."""
        if self.rows_bind:      # a row for each sequence the step may run, the rest for guesses
            budget = self.max_rows - min(self.max_num_seqs, len(running) + num_waiting)
        else:
            budget = self.max_rows
        reqs, budgets = [], []
        for req in running:
            req.draft_token_ids = []
            if budget <= 0 or not eligible(req):
                continue
            # never propose past the request's length limit (max_tokens included)
            b = min(self.k, req.max_len - len(req.all_token_ids) - 1, budget)
            if b > 0:
                reqs.append(req)
                budgets.append(b)
                budget -= b
        if reqs:
            for req, d in zip(reqs, self.proposer.propose(reqs, budgets)):
                req.draft_token_ids = d

    def accept(self, sched, tokens: list[int], logprobs, block_manager, batch):
        """The step's tokens are one per logits row. Returns (chunks, tokens, logprobs)
        with one entry per output token, a drafted chunk repeated once per token it
        produced; rolls rejected guesses back."""
        chunks, out_tokens, out_lps = [], [], None if logprobs is None else []
        i = 0
        for c in sched.chunks:
            n = 1 + c.num_draft
            got = tokens[i:i + n]
            if c.num_draft == 0:
                chunks.append(c)
                out_tokens.append(got[0])
                if out_lps is not None:
                    out_lps.append(logprobs[i])
                i += n
                continue
            req = c.request
            draft = req.draft_token_ids[:c.num_draft]
            a = 0
            while a < len(draft) and draft[a] == got[a]:
                a += 1
            self._count(len(draft), a)
            produced = got[:a + 1]
            chunks.extend([c] * len(produced))
            out_tokens.extend(produced)
            if out_lps is not None:
                out_lps.extend(logprobs[i:i + a + 1])
            i += n
            req.draft_token_ids = []
            req.num_pending += len(produced) - 1    # the engine counts one per token
            live = req.status is Status.RUNNING and c.epoch == req.metrics.num_preemptions
            computed = c.start + c.num_new - c.num_draft + a     # the last token + a guesses
            # prefix-cache commit covers only what is surely computed and known on the host
            c.num_new = c.num_new - c.num_draft
            c.num_draft = 0
            if live:
                req.num_computed = computed
                block_manager.truncate(req.request_id, computed)
                batch.rollback_blocks(req.row, block_manager.table_len(req.request_id))
        return chunks, out_tokens, out_lps

    def _count(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        for j in range(proposed):
            self.proposed_per_position[j] += 1
            if j < accepted:
                self.accepted_per_position[j] += 1

    def observe(self, chunks) -> None:
        """A step was launched: proposers that read the target's state keep what they need."""
        if hasattr(self.proposer, "observe"):
            self.proposer.observe(chunks)

    def forget(self, req) -> None:
        self.proposer.forget(req)

    def plans(self) -> list:
        """The launch plans the proposer runs besides the target's (the MTP graph's: its
        `run_graph` is runtime/mtp_graphs.MTPGraphs), so kernel_stats counts them too."""
        plan = getattr(getattr(self.proposer, "run_graph", None), "plan", None)
        return [] if plan is None else [plan]

    def graph_stats(self) -> list[dict]:
        """The graph runners' stats of what the proposer runs besides the target (the MTP
        graph's buckets, the draft artifact's runner), so the engine's CUDA-graph counts
        include them."""
        run_graph = getattr(self.proposer, "run_graph", None)
        if hasattr(run_graph, "stats"):
            return [run_graph.stats]
        own = getattr(self.proposer, "graph_stats", None)       # the draft's own runner
        return own() if own is not None else []

    def stats(self) -> dict:
        drafts, proposed = self.num_drafts, self.num_draft_tokens
        return {
            "spec_decode_method": self.config.method,
            "spec_decode_num_speculative_tokens": self.k,
            "spec_decode_num_drafts": drafts,
            "spec_decode_num_draft_tokens": proposed,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            # accepted / proposed; tokens per verification (accepted + the target's own)
            "spec_decode_acceptance_rate": self.num_accepted_tokens / proposed if proposed else 0.0,
            "spec_decode_mean_acceptance_length": (1 + self.num_accepted_tokens / drafts
                                                   if drafts else 0.0),
            "spec_decode_accepted_per_position": list(self.accepted_per_position),
            "spec_decode_proposed_per_position": list(self.proposed_per_position),
        }


def make_speculator(options, engine) -> Speculator | None:
    config = options.speculative
    if config is None:
        return None
    if options.async_scheduling:
        raise BrazeError("speculative decoding runs the engine synchronously: the proposals "
                         "need the last token on the host; drop --async-scheduling",
                         param="speculative")
    engine.async_scheduling = False
    return Speculator(config, engine)
