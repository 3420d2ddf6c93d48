"""How `braze serve` runs its HTTP side: one options object, like runtime/options.EngineOptions
for the engine, built once from the command line (braze/cli.py) or by a Python caller of
`serving.server.serve`, checked once, and read by the server, the app and its middleware.

Secrets: `api_keys` never leave this object (not in /server_info, not in logs).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from braze.ir.errors import BrazeError

DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024   # ~1M tokens of text; raise for longer
API_KEY_ENV = ("BRAZE_API_KEY", "VLLM_API_KEY")   # read in this order when no --api-key


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 256                  # requests waiting for the running batch
    # the model's name, or vLLM's list of names (every one answered, the first the one
    # responses give); None: the artifact directory's name
    served_model_name: str | list[str] | None = None
    drain_timeout: float = 30.0           # seconds in-flight requests get on SIGTERM
    log_level: str = "info"
    # seconds one engine step may run before /health calls the engine stalled (vLLM's
    # VLLM_ENGINE_ITERATION_TIMEOUT_S, 60 s, is the same bound)
    engine_iteration_timeout: float = 60.0
    read_timeout: float = 30.0            # seconds for a request's headers, and its body
    limit_concurrency: int = 1024         # open connections and requests
    allowed_hosts: str | None = None      # comma-separated Host names (serving/hosts.py)
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    api_keys: list[str] = field(default_factory=list)     # empty: no authentication
    allowed_origins: list[str] = field(default_factory=list)   # CORS; empty: no CORS headers
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    trust_request_chat_template: bool = False   # may a request bring its own chat_template
    chat_template: str | None = None      # a file or the template text; None: the model's
    extensions: list[str] = field(default_factory=list)   # module:function or entry-point names
    tool_call_parser: str | None = None   # None: the one the chat template points to, if any
    enable_auto_tool_choice: bool = False   # vLLM's flag: then a parser must be found
    lora_modules: list[str] = field(default_factory=list)   # name=path adapters loaded at start
    allow_runtime_lora_updating: bool = False   # /v1/load_lora_adapter and /v1/unload_...
    # vLLM's LoRA flags, checked against the artifact's --lora-slots / --max-lora-rank
    enable_lora: bool = False
    max_loras: int | None = None
    max_lora_rank: int | None = None
    # vLLM's: usage.prompt_tokens_details.cached_tokens, the prompt tokens the prefix cache
    # (or a KV tier) served
    enable_prompt_tokens_details: bool = False
    # vLLM's: chat template keywords every chat request gets (e.g. {"enable_thinking":
    # false}), under the request's own chat_template_kwargs; a dict or its JSON text
    default_chat_template_kwargs: dict | None = None
    # /v1/responses kept by id (previous_response_id, background, GET/DELETE), the last
    # responses_store_size of them; vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1 turns it on too
    enable_responses_store: bool = False
    responses_store_size: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_queue", "limit_concurrency", "max_request_body_bytes",
                     "responses_store_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BrazeError(f"{name} must be a positive integer, got {v!r}")
        p = self.port
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 65535:
            raise BrazeError(f"--port must be a TCP port from 0 to 65535 (0 picks a free "
                             f"one), got {p!r}")
        if not self.drain_timeout >= 0:
            raise BrazeError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if not 0 < self.engine_iteration_timeout < float("inf"):
            raise BrazeError(f"--engine-iteration-timeout must be a positive number of "
                             f"seconds, got {self.engine_iteration_timeout}")
        if not 0 < self.read_timeout < float("inf"):
            raise BrazeError(f"--read-timeout must be a positive number of seconds, got "
                             f"{self.read_timeout}")
        names = self.served_model_names
        if any(not isinstance(n, str) or not n.strip() for n in names) or \
                len(set(names)) < len(names):
            raise BrazeError(f"--served-model-name takes distinct non-empty names, got "
                             f"{self.served_model_name!r}")
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            raise BrazeError("an API key must be a non-empty string")
        self.default_chat_template_kwargs = _template_kwargs(self.default_chat_template_kwargs)
        if self.allow_credentials and "*" in self.allowed_origins:
            # browsers refuse credentialed responses with `Access-Control-Allow-Origin: *`;
            # starlette would then echo any origin, which is worse: say so instead
            raise BrazeError("--allow-credentials needs the origins listed in "
                             "--allowed-origins, not '*'")

    @property
    def served_model_names(self) -> list[str]:
        """--served-model-name as a list (empty: the artifact directory's name)."""
        n = self.served_model_name
        return [] if n is None else list(n) if isinstance(n, (list, tuple)) else [n]

    @classmethod
    def of(cls, options: "ServerOptions | None" = None, **overrides) -> "ServerOptions":
        """`options` (or the defaults) with keyword overrides, checked; an unknown keyword is
        an error that names it."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise BrazeError(f"unknown server option {bad[0]!r}; the options are "
                             f"{', '.join(sorted(known))}")
        return cls(**{**asdict(options or cls()), **overrides})

    def public(self) -> dict:
        """What /server_info may show: everything but the keys (only whether there are any)."""
        d = asdict(self)
        d.pop("api_keys")
        d["api_key_required"] = bool(self.api_keys)
        return d


# vLLM's switch for its /v1/load_lora_adapter and /v1/unload_lora_adapter, read as vLLM
# reads it ("1" or "true", any case): a vLLM deployment's environment turns them on here too
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_lora_updating_from(flag: bool, environ=os.environ) -> bool:
    """`--allow-runtime-lora-updating`, else $VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
    return bool(flag) or environ.get(RUNTIME_LORA_ENV, "0").strip().lower() in ("1", "true")


def api_keys_from(flag_values: list[str] | None, environ=os.environ) -> tuple[list[str], str]:
    """The API keys to require and where they came from: `--api-key` (repeatable), else
    $BRAZE_API_KEY, else $VLLM_API_KEY (so a vLLM deployment's environment works as is)."""
    if flag_values:
        return _not_blank(list(flag_values), "--api-key"), "--api-key"
    for name in API_KEY_ENV:
        if environ.get(name):
            return _not_blank([environ[name]], f"${name}"), f"${name}"
    return [], ""


def _not_blank(keys: list[str], source: str) -> list[str]:
    """A key of only whitespace (an empty secret in a deployment template) is a mistake:
    say where it came from, since a variable does not show on the command line."""
    if any(not k.strip() for k in keys):
        raise BrazeError(f"{source} is blank: give a non-empty API key, or unset it to "
                         f"serve without one")
    return keys


def _template_kwargs(value) -> dict | None:
    """--default-chat-template-kwargs: a JSON object (or a dict), not setting what braze
    passes to the template itself."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BrazeError(f"--default-chat-template-kwargs is not valid JSON ({e}); give "
                             f"an object, e.g. '{{\"enable_thinking\": false}}'") from None
    if not isinstance(value, dict):
        raise BrazeError(f"--default-chat-template-kwargs must be a JSON object, got "
                         f"{type(value).__name__}")
    from braze.runtime.chat_template import RESERVED_TEMPLATE_KWARGS
    bad = [k for k in value if k in RESERVED_TEMPLATE_KWARGS]
    if bad:
        raise BrazeError(f"--default-chat-template-kwargs must not set {bad[0]!r}: braze "
                         f"passes {', '.join(RESERVED_TEMPLATE_KWARGS)} to the template itself")
    return value


def name_list(text: str | None) -> list[str]:
    """A list option: a JSON list (vLLM's form, '["a", "b"]') or comma-separated names."""
    if text is None:
        return []
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise BrazeError(f"{text!r} is not a JSON list ({e})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BrazeError(f"{text!r} must be a JSON list of strings")
        return value
    return [v.strip() for v in text.split(",") if v.strip()]
