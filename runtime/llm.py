"""The Python face of serving: `braze.LLM(artifact).generate(prompts, SamplingParams(...))`.

`LLM(artifact, trusted_keys=DIR, trust_artifact=True)` admit artifacts that neither a key
this user trusts signed nor this braze can regenerate (docs/trust.md).

`generate` queues every prompt on the engine at once (continuous batching) and
returns one `RequestOutput` per prompt, in the prompts' order. `beam_search` runs vLLM's
beam search (runtime/beam_search.py) for each prompt, all prompts' beams in one batch a
step.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import random

from braze.ir.errors import BrazeError

from .engine import Engine
from . import vllm_args
from .beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams, advance_all
from .kv_offload import KVTransferPolicy
from .options import EngineOptions
from .request import RequestOutput
from .sampler import SEED_LIMIT, SamplingParams
from .scheduler import check_priority

log = logging.getLogger("braze.runtime")

Completion = RequestOutput      # the name braze used before the engine


class LLM:
    def __init__(self, artifact=None, options: EngineOptions | None = None, *, model=None,
                 **overrides):
        """`artifact` (or `model=`, vLLM's name): the compiled artifact's directory.
        `options` (runtime/options.py) and/or its fields as keywords: backend,
        num_kv_blocks, max_num_seqs, max_num_tokens, cudagraph_mode, ... (and vLLM's names
        for some: runtime/options.VLLM_NAMES, e.g. speculative_config=). vLLM's enable_lora,
        max_loras and max_lora_rank are checked against what the artifact was compiled
        with (--lora-slots, --max-lora-rank); max_loras below its slots bounds the
        adapters one batch holds, as in vLLM. Its tensor_parallel_size,
        enable_expert_parallel and pipeline_parallel_size are checked likewise
        (--tensor-parallel-size, --expert-parallel: runtime/parallel.VLLM_OPTIONS), and
        vLLM's other compile-time arguments by runtime/vllm_args.py."""
        if (artifact is None) == (model is None):
            raise BrazeError("give the artifact directory once: LLM(ARTIFACT) or "
                             "LLM(model=ARTIFACT)")
        # vLLM's seed: requests without their own seed take the next of this generator's,
        # so a script's sampling repeats run to run
        seed = overrides.pop("seed", None)
        SamplingParams(seed=seed).validate()
        self._seeds = None if seed is None else random.Random(seed)
        from .lora import VLLM_OPTIONS, apply_vllm_options
        lora_asks = {k: overrides.pop(k) for k in VLLM_OPTIONS if k in overrides}
        from . import parallel
        parallel_asks = {k: overrides.pop(k) for k in parallel.VLLM_OPTIONS if k in overrides}
        if parallel_asks:       # before the engine starts the artifact's ranks
            from braze.artifact import read_manifest
            root = artifact if model is None else model
            parallel.check_vllm_options(read_manifest(root), root, **parallel_asks)
        compiled_asks = vllm_args.take(overrides)
        self.engine = Engine(artifact if model is None else model,
                             EngineOptions.of(options, **overrides))
        try:
            vllm_args.check(compiled_asks, self.engine.artifact.manifest,
                            self.engine.artifact.root)
            if lora_asks:
                apply_vllm_options(self.engine.lora, self.engine.artifact.root, **lora_asks)
        except BrazeError:
            self.close()          # a tensor-parallel artifact's other ranks, too
            raise
        self.artifact = self.engine.artifact
        if self.engine.sampling_defaults:
            log.info("generate and chat without SamplingParams use the model's sampling "
                     "defaults %s (generation_config='vllm' turns them off)",
                     self.engine.sampling_defaults)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: what `generate` and `chat` sample with when given no SamplingParams: the
        model's own defaults (its generation_config.json's temperature, top_p, top_k, min_p,
        repetition_penalty and max_new_tokens; runtime/sampling_defaults.py) over
        SamplingParams()'s. generation_config='vllm' leaves SamplingParams() as it is."""
        return SamplingParams(**self.engine.sampling_defaults)

    def get_tokenizer(self):
        """The artifact's tokenizer (runtime/tokenizer.py), or None if it has none."""
        return self.tokenizer

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request=None, *, sampling_params=None,
                 kv_transfer_params: dict | list | None = None,
                 priority: list[int] | None = None, use_tqdm=True) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, a dict {"prompt": text} or
        {"prompt_token_ids": ids} (vLLM's TextPrompt / TokensPrompt), or a list of those; a
        dict may carry vLLM's "cache_salt" (prefix-cache hits only among prompts of the same
        salt).
        params (or `sampling_params=`, vLLM's name): one SamplingParams for all prompts, or
        one per prompt.
        lora_request: a LoRARequest (runtime/lora.py) for all prompts, or one per prompt
        (None where a prompt uses the base model); the artifact needs --lora-slots. As in
        vLLM, a new lora_int_id under a name already used replaces that adapter (requests
        running with the old one finish with it).
        kv_transfer_params: what each request may do with the KV tiers below the device
        (--kv-offload-*), as the server's field of that name: {"max_load_tokens": N (0:
        load nothing), "store": false (keep its blocks out of them)}, for all prompts or
        one per prompt (None: no limits).
        priority: vLLM's, one per prompt: with scheduling_policy="priority", lower runs
        first; under the default "fcfs" only zeros are taken (as vLLM's).
        use_tqdm: vLLM's progress-bar switch, taken for its scripts; braze draws none.

        Returns one RequestOutput per prompt, in order: its `outputs` lists the samples
        (one unless n > 1), so vLLM's `out.outputs[0].text` reads the first; `prompt` is
        the prompt's text (None for token ids)."""
        self.engine.check_open()        # (before a grammar reaches the stopped compiler)
        if sampling_params is not None:
            if params is not None:
                raise BrazeError("give the sampling parameters once: as the second argument "
                                 "or as sampling_params=")
            params = sampling_params
        salts = _cache_salts(prompts)
        prompts = _prompt_list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise BrazeError(f"{len(params)} SamplingParams for {len(prompts)} prompts; "
                                 f"give one, or one per prompt")
            plist = list(params)
        else:
            plist = [params or self.get_default_sampling_params()] * len(prompts)
        for sp in plist:
            if not isinstance(sp, SamplingParams):
                raise BrazeError(f"sampling parameters must be braze.SamplingParams, got "
                                 f"{type(sp).__name__}: write SamplingParams(**{{...}})")
        for sp in plist:
            sp.validate()
        if self._seeds is not None:     # LLM(seed=...): each unseeded request the next seed
            plist = [sp if sp.seed is not None else
                     dataclasses.replace(sp, seed=self._seeds.randrange(SEED_LIMIT))
                     for sp in plist]
        loras = _per_prompt(lora_request, len(prompts), "lora_requests")
        transfers = _per_prompt(kv_transfer_params, len(prompts), "kv_transfer_params")
        priorities = [check_priority(pr, self.engine.options.scheduling_policy)
                      for pr in _per_prompt(priority, len(prompts), "priorities")]
        # (refused before any prompt is queued)
        for t in transfers:
            if t is not None:           # refused before any prompt is queued
                KVTransferPolicy.of(t)
        # only final results are wanted: the engine skips the per-step reports
        plist = [dataclasses.replace(sp, output_kind="final") for sp in plist]
        for sp in plist:
            if sp.structured_outputs is not None:
                # a grammar that does not compile is the caller's error, raised here (the
                # engine would only abort the request)
                sp.validate()
                self.engine.structured.cache.compile(sp.structured_outputs)
        groups, ids = [], []
        try:
            for p, sp, lora, transfer, salt, pr in zip(prompts, plist, loras, transfers, salts,
                                                       priorities):
                base = f"llm-{next(self._ids)}"
                children = sp.children()       # n > 1 / best_of: one request per sample
                group = [base] if len(children) == 1 else [f"{base}-{i}" for i in range(len(children))]
                for rid, child in zip(group, children):
                    self.engine.add_request(rid, p, child,
                                            group=base if len(children) > 1 else None,
                                            lora_request=lora, kv_transfer_params=transfer,
                                            cache_salt=salt, priority=pr)
                    ids.append(rid)
                groups.append((sp, group))
            final = self.engine.run_to_completion(ids)
        except BaseException:
            for rid in ids:             # an interrupted call leaves nothing running
                self.engine.abort_request(rid)
            raise
        outs = [pick_samples(sp, [final[rid] for rid in group]) for sp, group in groups]
        for out, p in zip(outs, prompts):
            for o in out.outputs:
                o.prompt = p if isinstance(p, str) else None
        return outs

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm=True, lora_request=None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", *,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
             tools: list[dict] | None = None,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """Generate replies to conversations, rendered with the model's chat template (or
        `chat_template`, a Jinja template text) as `generate` prompts (runtime/chat_template.py).
        messages: one conversation, a list of {"role": ..., "content": ...} dicts, or a list
        of conversations. `chat_template_kwargs` and `tools` are passed to the template.
        `continue_final_message` (with add_generation_prompt=False, as in vLLM): the prompt
        ends inside each conversation's final message, which the model continues.
        `use_tqdm` as in generate; it comes third, before `lora_request`, as in vLLM's.
        `chat_template_content_format` (vLLM's): braze renders a message's content as one
        string (its text parts joined), vLLM's "string", which "auto" is here too; "openai"
        (the parts as a list) is refused.
        Returns one RequestOutput per conversation; its `prompt` is the rendered text."""
        if self.tokenizer is None:
            raise BrazeError("this artifact has no tokenizer, so it cannot chat; use generate "
                             "with token ids")
        if chat_template_content_format not in ("auto", "string"):
            raise BrazeError(f"chat_template_content_format={chat_template_content_format!r}: "
                             f"braze renders a message's content as one string (its text "
                             f"parts joined), vLLM's \"string\"; give \"auto\" or \"string\"",
                             param="chat_template_content_format")
        prompter = self.tokenizer.chat_prompter(chat_template)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise BrazeError("messages must be a non-empty list of {\"role\", \"content\"} dicts, "
                             "or a list of such lists", param="messages")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        texts = [prompter.text(c if isinstance(c, (list, tuple)) else [c],
                               add_generation_prompt, tools, chat_template_kwargs,
                               continue_final_message, self.artifact.text_only_origin)
                 for c in conversations]
        outs = self.generate([{"prompt_token_ids": prompter.ids(t)} for t in texts],
                             sampling_params, lora_request)
        for out, text in zip(outs, texts):
            for o in out.outputs:
                o.prompt = text
        return outs

    def beam_search(self, prompts, params: BeamSearchParams, lora_request=None,
                    use_tqdm=False, concurrency_limit: int | None = None
                    ) -> list[BeamSearchOutput]:
        """vLLM's beam search: for each prompt (as `generate` takes them) its `beam_width`
        best sequences, best first (runtime/beam_search.py). Each step runs every live
        beam of every prompt as a one-token request, in one batch; `concurrency_limit`
        (vLLM's): at most that many prompts at a time, in order (None: all).
        `lora_request` and a prompt's "cache_salt" as in `generate` (one adapter for all
        prompts or one per prompt); `use_tqdm` as there too."""
        if not isinstance(params, BeamSearchParams):
            raise BrazeError(f"beam search takes braze.BeamSearchParams(beam_width=..., "
                             f"max_tokens=...), got {type(params).__name__} (vLLM's LLM."
                             f"beam_search takes the same; SamplingParams are for generate)",
                             param="params")
        params.validate()
        v = concurrency_limit
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise BrazeError(f"concurrency_limit must be null (all prompts at once) or an "
                             f"integer >= 1, got {v!r}", param="concurrency_limit")
        plist = _prompt_list(prompts)
        # each prompt's adapter and cache_salt go with every one of its beams' requests
        loras = _per_prompt(lora_request, len(plist), "lora_requests")
        salts = _cache_salts(prompts)
        searches = [BeamSearch(self.engine.encode(p), params, self.engine.eos_token_ids,
                               self.engine.max_model_len) for p in plist]
        step = params.step_params()
        size = concurrency_limit or max(1, len(searches))
        for start in range(0, len(searches), size):
            batch = range(start, min(start + size, len(searches)))
            while not all(searches[i].done for i in batch):
                beams = [(i, ids) for i in batch if not searches[i].done
                         for ids in searches[i].pending()]      # step_prompts' order
                outs = self.generate([_tokens_prompt(ids, salts[i]) for i, ids in beams], step,
                                     lora_request=[loras[i] for i, _ in beams])
                advance_all([searches[i] for i in batch],
                            [[(t, lp) for t, lp in o.logprobs[0].top] for o in outs])
        results = [s.result() for s in searches]
        if self.tokenizer is not None:
            for r in results:
                for seq in r.sequences:
                    seq.text = self.tokenizer.decode(seq.token_ids)
        return results

    def stats(self) -> dict:
        return self.engine.stats()

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every prompt prefix the device's KV cache holds (the next prompts
        compute theirs again). True."""
        return self.engine.reset_prefix_cache()

    def close(self) -> None:
        """Finish the KV tiers' writes in flight and stop the other ranks of a
        tensor-parallel artifact (Engine.close; also done when the process exits). The LLM
        cannot generate after this."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _per_prompt(value, n: int, name: str) -> list:
    """One value for all `n` prompts, or a list of one per prompt."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise BrazeError(f"{len(value)} {name} for {n} prompts; give one, or one per "
                             f"prompt")
        return list(value)
    return [value] * n


PROMPT_FORMS = ("a prompt is a string, a list of token ids, {\"prompt\": text} or "
                "{\"prompt_token_ids\": ids}")


def _prompt_list(prompts) -> list:
    """One prompt or a list of them, as a list of strings and lists of token ids."""
    prompts = _as_list(prompts)
    if not isinstance(prompts, (list, tuple)):
        raise BrazeError(f"{PROMPT_FORMS}, or a list of those; got {type(prompts).__name__}",
                         param="prompt")
    return [_one_prompt(p) for p in prompts]


def _as_list(prompts):
    """One prompt (a string, ids, a dict) as a list of one; a list as it is."""
    prompts = _listed(prompts)
    return [prompts] if isinstance(prompts, (str, dict)) or _is_ids(prompts) else prompts


def _cache_salts(prompts) -> list:
    """Each prompt's "cache_salt" (vLLM's TextPrompt / TokensPrompt key), None without."""
    prompts = _as_list(prompts)
    if not isinstance(prompts, (list, tuple)):
        return []
    return [p.get("cache_salt") if isinstance(p, dict) else None for p in prompts]


def _tokens_prompt(ids: list[int], salt) -> dict:
    """vLLM's TokensPrompt of `ids`, with its cache_salt where it has one."""
    return {"prompt_token_ids": ids} if salt is None else {"prompt_token_ids": ids,
                                                           "cache_salt": salt}


def _listed(p):
    """A 1-D numpy array or tensor of ids as a list of ints."""
    return p.tolist() if hasattr(p, "tolist") and getattr(p, "ndim", None) == 1 else p


def _is_ids(p) -> bool:
    return (isinstance(p, (list, tuple)) and len(p) > 0
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in p))


def _one_prompt(p):
    if isinstance(p, dict):
        keys = set(p) - {"cache_salt"}
        if keys == {"prompt"} and isinstance(p["prompt"], str):
            return p["prompt"]
        if keys == {"prompt_token_ids"} and _is_ids(_listed(p["prompt_token_ids"])):
            return [int(t) for t in _listed(p["prompt_token_ids"])]
        media = " (braze takes text only: no multi_modal_data)" \
            if "multi_modal_data" in keys else ""
        raise BrazeError(f"{PROMPT_FORMS}; got a dict with keys {sorted(keys)}{media}",
                         param="prompt")
    p = _listed(p)
    if isinstance(p, str):
        return p
    if _is_ids(p):
        return [int(t) for t in p]
    if isinstance(p, (list, tuple)) and not p:
        return []                     # the engine's error: the prompt is empty
    raise BrazeError(f"{PROMPT_FORMS}; got {p!r:.60}", param="prompt")


def pick_samples(params: SamplingParams, samples: list[RequestOutput]) -> RequestOutput:
    """The report of a prompt from its samples: with best_of, the n of highest cumulative
    logprob (best first; ties keep sample order), else all n in order. The first is the
    report itself and all are in its `outputs` (itself alone for one sample)."""
    if len(samples) == 1:
        samples[0].outputs = [samples[0]]
        return samples[0]
    chosen = samples
    if params.best_of is not None and params.best_of > params.n:
        chosen = sorted(samples, key=lambda o: -o.cumulative_logprob)[:params.n]
        if params.logprobs is None:            # they were computed only to rank the samples
            for o in chosen:
                o.logprobs = o.new_logprobs = o.cumulative_logprob = None
    for i, o in enumerate(chosen):
        o.index = i
    head = chosen[0]
    head.outputs = list(chosen)
    head.prompt_logprobs = samples[0].prompt_logprobs     # the first sample computes them
    return head
