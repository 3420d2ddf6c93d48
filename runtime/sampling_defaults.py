"""The model's own sampling defaults, as vLLM applies them (`--generation-config auto`, its
default): a request that leaves temperature, top_p, top_k, min_p, repetition_penalty or its
token limit unset gets the value the checkpoint's generation_config.json gives, not the
API's generic default. Qwen3's file, for one, says temperature 0.6, top_p 0.95, top_k 20;
sampled at the API's temperature 1.0 with no top-k, such a model answers worse.

`braze compile` copies generation_config.json into the artifact (beside the tokenizer).
The options (runtime/options.EngineOptions, vLLM's names):
  - generation_config: "auto" (the artifact's file), "vllm" (none: the API's defaults), or
    a directory holding a generation_config.json (or that file's path);
  - override_generation_config: {key: value} over what the file says, e.g.
    {"temperature": 0.5}; the keys are GENERATION_KEYS'.

The result is SamplingParams keywords (max_new_tokens is max_tokens). The OpenAI server
applies them to each request's unset fields (serving/protocol.sampling_kwargs), and
`LLM.generate` / `LLM.chat` when no SamplingParams are given (`get_default_sampling_params`).
Explicit values always win, and a max_new_tokens only stands in for an unset limit.
"""

from __future__ import annotations

import json
from pathlib import Path

from braze.ir.errors import BrazeError

from .sampler import SamplingParams

FILE = "generation_config.json"
# generation_config.json's key -> SamplingParams' (vLLM reads these and no others)
GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                   "max_new_tokens": "max_tokens"}


def check_override(override) -> None:
    """`override_generation_config`: None or {key: value} with GENERATION_KEYS' keys."""
    if override is None:
        return
    if not isinstance(override, dict):
        raise BrazeError(f"override_generation_config must be a JSON object such as "
                         f'{{"temperature": 0.6}}, got {override!r}',
                         param="override_generation_config")
    bad = sorted(k for k in override if k not in GENERATION_KEYS)
    if bad:
        raise BrazeError(f"override_generation_config sets {bad[0]!r}, which braze does not "
                         f"read; the keys are {', '.join(GENERATION_KEYS)}",
                         param="override_generation_config")


def sampling_defaults(tokenizer_dir: Path | None, source: str = "auto",
                      override: dict | None = None) -> dict:
    """SamplingParams keywords: what `source`'s generation_config.json says, `override` on
    top; checked, so that a bad file fails at start-up and not in every request."""
    config, where = {}, []
    path = None if source == "vllm" else _path(tokenizer_dir, source)
    if path is not None:
        config, where = _read(path), [str(path)]
    if override:
        config, where = {**config, **override}, where + ["override_generation_config"]
    out = {ours: config[theirs] for theirs, ours in GENERATION_KEYS.items()
           if config.get(theirs) is not None}
    if out.get("top_k") == -1:
        out["top_k"] = 0
    try:
        SamplingParams(**out).validate()
    except BrazeError as e:
        raise BrazeError(f"the model's sampling defaults ({' with '.join(where)}): {e}; fix "
                         f"them, or pass "
                         f"--generation-config vllm (generation_config='vllm') to use the "
                         f"API's defaults instead", param="generation_config") from None
    return out


def _path(tokenizer_dir: Path | None, source: str) -> Path | None:
    if source == "auto":
        path = tokenizer_dir / FILE if tokenizer_dir is not None else None
        return path if path is not None and path.is_file() else None
    p = Path(source)
    path = p / FILE if p.is_dir() else p
    if not path.is_file():
        raise BrazeError(f"--generation-config {source}: no {FILE} there; give a directory "
                         f"holding one, 'auto' (the artifact's) or 'vllm' (none)",
                         param="generation_config")
    return path


def _read(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BrazeError(f"{path} cannot be read as JSON ({e}); fix it, or pass "
                         f"--generation-config vllm to ignore it",
                         param="generation_config") from None
    if not isinstance(config, dict):
        raise BrazeError(f"{path} holds {type(config).__name__}, not a JSON object; fix it, "
                         f"or pass --generation-config vllm to ignore it",
                         param="generation_config")
    return config
