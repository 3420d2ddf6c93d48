"""Structured output: grammars that constrain what a request may generate.

A request asks for one constraint (`StructuredOutputsParams`: a JSON schema, any JSON
object, a regex, a choice among strings, an EBNF grammar, or a structural tag: free text
in which what follows a trigger is held to a format, e.g. a tool call's JSON between
`<function=...>` and `</function>`). xgrammar compiles it
against the artifact's tokenizer into a `CompiledGrammar`; each request gets its own
`GrammarMatcher` over it. Before sampling, the matcher fills its row of a packed token
bitmask (int32[rows, ceil(vocab/32)], bit v of a row set = token v allowed); rows
without a grammar stay all ones, and the sampler sets the disallowed logits to -inf
(`runtime/sampler.apply_token_bitmask`). After sampling, the matcher accepts the
token; a matcher that terminates (the grammar is complete and a stop token came, or
nothing but a stop token could follow) ends the request with finish_reason "stop".

Compiling a grammar can take from milliseconds to seconds, so it happens in a worker
thread (`GrammarCache.compile_async`), never in the engine's step: a request whose
grammar is not ready waits outside the scheduler while the others run. Compiled
grammars are cached by their constraint (LRU).

xgrammar is imported on first use, so artifacts served without structured output need
no xgrammar installed.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from braze.ir.errors import BrazeError

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
DEFAULT_CACHE_SIZE = 128


def xgrammar():
    """The xgrammar module, or a clear error naming the missing package."""
    try:
        import xgrammar as xgr
    except ImportError:
        raise BrazeError("structured output (response_format, structured_outputs, guided_*, "
                         "tool_choice required/named) needs the 'xgrammar' package: "
                         "pip install xgrammar") from None
    return xgr


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint, in vLLM's `structured_outputs` shape: `json` (a JSON
    schema as dict or text), `regex`, `choice` (a list of strings), `grammar` (EBNF in
    xgrammar/GBNF syntax), `json_object=True` (any JSON object), or `structural_tag` (an
    object or its JSON text, in either of vLLM's shapes: `structural_tag_format`)."""
    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: Any = None

    @classmethod
    def of(cls, value) -> "StructuredOutputsParams | None":
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(KINDS) - {"disable_any_whitespace", "whitespace_pattern",
                                                 "disable_fallback", "disable_additional_properties"}
            if unknown:
                raise BrazeError(f"structured_outputs has unknown field(s) {sorted(unknown)}; "
                                 f"it takes one of {', '.join(KINDS)}")
            # vLLM's switches: braze's JSON grammars never allow free whitespace (its
            # disable_any_whitespace), and have no other backend to fall back to; a
            # whitespace pattern of the caller's would be dropped, so it is refused
            if value.get("whitespace_pattern") is not None:
                raise BrazeError("structured_outputs.whitespace_pattern is not supported: "
                                 "braze's JSON grammars allow no whitespace between tokens "
                                 "(vLLM's disable_any_whitespace); leave it out",
                                 param="structured_outputs")
            return cls(**{k: value[k] for k in KINDS if k in value})
        raise BrazeError(f"structured_outputs must be an object with one of "
                         f"{', '.join(KINDS)}, got {value!r}")

    def given(self) -> list[str]:
        """The kinds this asks for: each field that is set (json_object when true; a
        schema of false or 0 is set, and wrong, not absent)."""
        return [k for k in KINDS
                if getattr(self, k) is not None and (k != "json_object" or self.json_object
                                                     is not False)]

    def validate(self) -> None:
        given = self.given()
        if len(given) != 1:
            raise BrazeError(f"structured_outputs takes exactly one of {', '.join(KINDS)}; "
                             f"got {', '.join(given) or 'none'}")
        k = given[0]
        if k == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise BrazeError(f"the JSON schema is not valid JSON: {e}") from None
            if schema is False:
                raise BrazeError("the JSON schema false allows no value at all; give a schema "
                                 "object (true, or {}, for any JSON value)")
            if not isinstance(schema, (dict, bool)):
                raise BrazeError(f"a JSON schema must be an object, got {type(schema).__name__}")
        elif k == "choice":
            c = self.choice
            if (not isinstance(c, list) or not c
                    or not all(isinstance(s, str) and s for s in c)):
                raise BrazeError("structured_outputs.choice must be a non-empty list of "
                                 "non-empty strings")
        elif k == "structural_tag":
            structural_tag_format(self.structural_tag)
        elif k in ("regex", "grammar"):
            v = getattr(self, k)
            if not isinstance(v, str) or not v:
                raise BrazeError(f"structured_outputs.{k} must be a non-empty string")
        elif self.json_object is not True:
            raise BrazeError("structured_outputs.json_object must be true")

    def key(self) -> tuple[str, str]:
        """The cache key: (kind, canonical text)."""
        self.validate()
        for k in self.given():
            v = getattr(self, k)
            if k == "json":       # property order kept: it is the order of generation
                v = json.loads(v) if isinstance(v, str) else v
                return k, json.dumps(v, separators=(",", ":"))
            if k == "choice":
                return k, json.dumps(v)
            if k == "structural_tag":
                return k, json.dumps(structural_tag_format(v), separators=(",", ":"))
            return k, v if isinstance(v, str) else "true"
        raise AssertionError("validate() let an empty constraint through")


def structural_tag_format(value) -> dict:
    """A structural tag, as xgrammar's StructuralTag JSON object, from either of vLLM's
    shapes (an object or its JSON text):

    - `{"structures": [{"begin", "schema", "end"}, ...], "triggers": [...]}` (vLLM's first
      `response_format` shape): free text, until a trigger starts one of the begins; then
      a JSON value of that structure's schema (any JSON without one) and its end; then
      free text again. Each begin starts with one of the triggers.
    - `{"format": {...}}`: xgrammar's structural tag format, passed on as it is
      (xgrammar checks it when it compiles).

    BrazeError, naming the field, for anything else."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise BrazeError(f"structural_tag is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise BrazeError(f"structural_tag must be an object, got {type(value).__name__}")
    extra = set(value) - {"type", "structures", "triggers", "format"}
    if value.get("type", "structural_tag") != "structural_tag" or extra:
        raise BrazeError(f"structural_tag has unknown field(s) {sorted(extra) or ['type']}; "
                         f"it takes structures and triggers, or format")
    if "format" in value and "structures" not in value:
        if not isinstance(value["format"], dict):
            raise BrazeError("structural_tag.format must be an object (xgrammar's structural "
                             "tag format)")
        return {"type": "structural_tag", "format": value["format"]}
    structures, triggers = value.get("structures"), value.get("triggers")
    if not isinstance(structures, list) or not structures or "format" in value:
        raise BrazeError("structural_tag takes either structures (a non-empty list of "
                         "{begin, schema, end}) with triggers, or format")
    if (not isinstance(triggers, list) or not triggers
            or not all(isinstance(t, str) and t for t in triggers)):
        raise BrazeError("structural_tag.triggers must be a non-empty list of non-empty "
                         "strings")
    tags = []
    for i, st in enumerate(structures):
        if (not isinstance(st, dict) or set(st) - {"begin", "schema", "end"}
                or not all(isinstance(st.get(k), str) and st.get(k) for k in ("begin", "end"))):
            raise BrazeError(f"structural_tag.structures[{i}] must be an object with "
                             f"non-empty strings begin and end, and a schema")
        schema = st.get("schema")
        if schema is None:
            schema = True
        if not isinstance(schema, (dict, bool)):
            raise BrazeError(f"structural_tag.structures[{i}].schema must be a JSON schema "
                             f"object")
        if not any(st["begin"].startswith(t) for t in triggers):
            raise BrazeError(f"structural_tag.structures[{i}].begin {st['begin']!r} starts "
                             f"with none of the triggers {triggers}")
        tags.append({"type": "tag", "begin": st["begin"], "end": st["end"],
                     "content": {"type": "json_schema", "json_schema": schema}})
    return {"type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}


def choice_grammar(choices: list[str]) -> str:
    """EBNF that matches exactly one of `choices` (as vLLM's guided_choice does)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# ---------------------------------------------------------------------------------------
# the tokenizer as xgrammar sees it

def tokenizer_info(tokenizer_dir: Path, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar.TokenizerInfo for the artifact's `tokenizer.json` (the `tokenizers` package,
    as the runtime loads it: no transformers). `vocab_size` is the model's logits width,
    which may exceed the tokenizer's (a padded LM head): ids past the tokenizer are never
    allowed."""
    xgr = xgrammar()
    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    encoded = [""] * vocab_size
    for token, idx in vocab.items():
        if idx < vocab_size:           # a tokenizer wider than the LM head: ids it never emits
            encoded[idx] = token
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
    return xgr.TokenizerInfo(encoded,
                             vocab_type=meta["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids) or None,
                             add_prefix_space=meta["add_prefix_space"])


# ---------------------------------------------------------------------------------------
# compiling, off the engine thread, with an LRU cache

class GrammarCache:
    """Compiled grammars by constraint, compiled in a worker thread.

    `compile_async(params)` returns a Future of the CompiledGrammar (already done on a
    cache hit; two requests with the same constraint share one compilation). A failed
    compilation is not cached. `compile_fn(kind, text)` replaces xgrammar for tests.
    """

    def __init__(self, compiler=None, max_size: int = DEFAULT_CACHE_SIZE, compile_fn=None,
                 any_whitespace: bool = False):
        self.compiler = compiler
        self.max_size = max_size
        self.any_whitespace = any_whitespace
        self._compile_fn = compile_fn or self._xgrammar_compile
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="braze-grammar")
        self.hits = self.misses = 0

    def compile_async(self, params: StructuredOutputsParams) -> Future:
        key = params.key()
        with self._lock:
            fut = self._entries.get(key)
            if fut is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self._pool.submit(self._compile_fn, *key)
            self._entries[key] = fut
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
        fut.add_done_callback(lambda f, key=key: self._forget_failed(key, f))
        return fut

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar, waiting for it; BrazeError when it does not compile."""
        return self.compile_async(params).result()

    def _forget_failed(self, key, fut: Future) -> None:
        if fut.exception() is not None:
            with self._lock:
                if self._entries.get(key) is fut:
                    del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _xgrammar_compile(self, kind: str, text: str):
        c = self.compiler
        try:
            if kind == "json":
                return c.compile_json_schema(text, any_whitespace=self.any_whitespace)
            if kind == "json_object":        # an object, as OpenAI's json_object (and vLLM)
                return c.compile_json_schema('{"type": "object"}',
                                             any_whitespace=self.any_whitespace)
            if kind == "regex":
                return c.compile_regex(text)
            if kind == "choice":
                return c.compile_grammar(choice_grammar(json.loads(text)))
            if kind == "structural_tag":
                if not hasattr(xgrammar(), "StructuralTag"):
                    raise BrazeError("structural_tag needs a newer xgrammar (one with "
                                     "xgrammar.StructuralTag): pip install -U xgrammar")
                return c.compile_structural_tag(text)
            return c.compile_grammar(text)
        except BrazeError:
            raise
        except Exception as e:         # xgrammar raises RuntimeError/ValueError with its reason
            what = {"json": "JSON schema", "json_object": "JSON grammar", "regex": "regex",
                    "choice": "choice", "grammar": "grammar",
                    "structural_tag": "structural tag"}[kind]
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            why = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", why)     # xgrammar's log prefix
            if kind == "grammar" and "::=" not in text:
                why += ("; it has no '::=' rules, so it may be a Lark grammar (vLLM converts "
                        "those): braze takes xgrammar's EBNF (GBNF), e.g. "
                        "root ::= \"yes\" | \"no\"")
            raise BrazeError(f"the {what} could not be compiled: {why}") from None


# ---------------------------------------------------------------------------------------
# the engine's side: per-request matchers and the step's bitmask

class StructuredBackend:
    """What the engine holds for structured output: the tokenizer info, the compiler and
    its cache, and the step's bitmask buffer."""

    def __init__(self, tokenizer_dir: Path | None, vocab_size: int, stop_token_ids: list[int],
                 max_rows: int, device, cache_size: int = DEFAULT_CACHE_SIZE):
        xgr = xgrammar()
        if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").exists():
            raise BrazeError("structured output needs the artifact's tokenizer "
                             "(tokenizer.json), and this artifact has none")
        self.info = tokenizer_info(tokenizer_dir, vocab_size, stop_token_ids)
        self.vocab_size = vocab_size
        self.cache = GrammarCache(xgr.GrammarCompiler(self.info, max_threads=2,
                                                      cache_enabled=False), cache_size)
        self.device = torch.device(device)
        self._host = xgr.allocate_token_bitmask(max_rows, vocab_size)     # int32, CPU
        self._full = self._host.clone().fill_(-1)

        # xgrammar's JSON strings admit raw control characters (U+0000..U+001F), which
        # strict JSON parsers refuse; JSON rows also get this mask of tokens without them
        # (compact JSON never needs one outside a string either)
        self._no_control = _tokens_without(self.info.decoded_vocab, vocab_size,
                                           bytes(range(32)))

    def matcher(self, params: StructuredOutputsParams, compiled):
        m = xgrammar().GrammarMatcher(compiled)
        return _Matcher(m, params.json is not None or params.json_object)

    def bitmask(self, matchers: list) -> torch.Tensor | None:
        """int32[len(matchers), ceil(V/32)] on the device: row i filled by matchers[i],
        all ones where it is None. None when no row has a matcher."""
        if all(m is None for m in matchers):
            return None
        n = len(matchers)
        host = self._host[:n]
        host.copy_(self._full[:n])
        for i, m in enumerate(matchers):
            if m is not None:
                m.fill(host, i, self._no_control)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.clone()

    def close(self) -> None:
        self.cache.close()


class _Matcher:
    """A request's GrammarMatcher, and whether its grammar is JSON."""
    __slots__ = ("matcher", "json")

    def __init__(self, matcher, json: bool):
        self.matcher, self.json = matcher, json

    def fill(self, host: torch.Tensor, row: int, no_control: torch.Tensor) -> None:
        """Row `row` of the packed bitmask `host`: the tokens the grammar allows next
        (JSON ones also without raw control characters); left as it is once complete."""
        if not self.matcher.is_terminated():
            self.matcher.fill_next_token_bitmask(host, row)
            if self.json:
                host[row] &= no_control

    def accept_token(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


def _tokens_without(decoded_vocab: list[bytes], vocab_size: int, banned: bytes) -> torch.Tensor:
    """int32[ceil(V/32)] packed mask: bit v set unless token v's bytes contain a banned one."""
    ok = torch.ones(-(-vocab_size // 32) * 32, dtype=torch.bool)
    table = bytes.maketrans(b"", b"")
    for v, b in enumerate(decoded_vocab[:vocab_size]):
        if b and b.translate(table, banned) != b:
            ok[v] = False
    return pack_bits(ok.view(-1, 32))


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """bool[..., 32] -> int32[...]: bit j set where allowed[..., j]."""
    weights = torch.tensor([1 << j for j in range(32)], dtype=torch.int64)
    packed = (allowed.to(torch.int64) * weights).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def apply_bitmask_fast(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: xgrammar's kernel for the logits' device (its CPU kernel, or its Triton
    kernel on CUDA; never its compiled-torch backend), falling back to the plain torch
    version in runtime/sampler.py."""
    from .sampler import apply_token_bitmask
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        apply_token_bitmask(logits, bitmask)
        return
    try:
        xgr = xgrammar()
        backend = "cpu" if logits.device.type == "cpu" else "triton"
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(
            logits.shape[-1], bitmask.shape[-1] * 32), backend=backend)
    except Exception:      # no triton, an unsupported device: the plain torch version
        apply_token_bitmask(logits, bitmask)
