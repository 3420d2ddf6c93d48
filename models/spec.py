"""ModelSpec: the few numbers our model definitions need, read from a HF config.

The config is read through `transformers.AutoConfig`, which fills each family's
defaults and normalises legacy keys (`rope_scaling` + `rope_theta` become
`rope_parameters`), so real checkpoints of any age read the same way.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from braze.ir.errors import BrazeError

from .spec_gemma4 import Gemma4Spec, gemma4_spec

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


@dataclass
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    # DeepSeek-V3 routing (models/mla_spec.py); the defaults are Mixtral's and Qwen3-MoE's
    scoring: str = "softmax"           # softmax | sigmoid
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_experts: int = 0            # always-on experts beside the routed ones


@dataclass
class ModelSpec:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict
    hidden_act: str = "silu"
    rotary_dim: int = 0                # RoPE on the first rotary_dim of each head (0: all)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = True           # with attention_bias: does o_proj have one? (Qwen2: no)
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: list[int] = field(default_factory=list)   # per layer, 0 = full attention
    moe: MoESpec | None = None
    moe_layers: list[bool] = field(default_factory=list)       # per layer: sparse MoE block?
    # Gemma 3: local (sliding) layers rotate with their own RoPE; query_pre_attn_scalar**-0.5
    # as the attention scale; tanh soft-caps (0 = none) of attention scores and final logits
    rope_local: dict | None = None
    attn_scale: float | None = None
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    mla: object | None = None          # DeepSeek-V3's latent attention: mla_spec.MLASpec
    mtp_layers: int = 0                # multi-token-prediction layers the config declares
    # the longest sequence the artifact is compiled for (braze compile --max-model-len; None:
    # max_position_embeddings): longrope rotates every position with its long factors when
    # this exceeds original_max_position_embeddings, else with the short ones (as vLLM)
    max_model_len: int | None = None

    gemma4: Gemma4Spec | None = None   # Gemma 4's per-layer facts (spec_gemma4.py)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def num_params_hint(self) -> str:
        return f"{self.num_layers} layers, hidden {self.hidden_size}, vocab {self.vocab_size}"


def _get(cfg, name, default=None):
    v = getattr(cfg, name, default)
    return default if v is None else v


def _require(cfg, name):
    v = getattr(cfg, name, None)
    if v is None:
        raise BrazeError(f"config.json has no '{name}', which {type(cfg).__name__} needs")
    return v


def spec_from_config(cfg, family: str) -> ModelSpec:
    if getattr(cfg, "is_heterogeneous", False):
        # Gemma 4: head_dim and num_key_value_heads vary per layer; the global values are
        # the common (sliding) layers', and spec_gemma4.py reads per_layer_config for the rest
        cfg.allow_global_per_layer_attribute_access = True
        with _quiet("transformers.integrations.heterogeneity.configuration_utils"):
            return _spec_from_config(cfg, family)
    return _spec_from_config(cfg, family)


@contextlib.contextmanager
def _quiet(logger: str):
    """Silence a logger (transformers warns on each global read of a per-layer value)."""
    log = logging.getLogger(logger)
    saved, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = saved


def _positive(cfg, *names) -> None:
    """Counts (and a set sliding_window) must be positive: a 0 or a negative reached the
    tracer or the arithmetic as a traceback, or compiled as is."""
    for name in names:
        v = getattr(cfg, name, None)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and v > 0):
            raise BrazeError(f"config.json {name}={v} must be a positive number"
                             + (" (or null: no sliding window)" if name == "sliding_window"
                                else "") + "; does config.json match the checkpoint?")


def _spec_from_config(cfg, family: str) -> ModelSpec:
    _positive(cfg, "hidden_size", "num_attention_heads", "num_hidden_layers",
              "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
              "max_position_embeddings", "sliding_window", "num_experts_per_tok",
              "moe_intermediate_size", "decoder_sparse_step", "query_pre_attn_scalar",
              "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
    hidden = _require(cfg, "hidden_size")
    heads = _require(cfg, "num_attention_heads")
    layers = _require(cfg, "num_hidden_layers")
    head_dim = _get(cfg, "head_dim") or hidden // heads
    act = _get(cfg, "hidden_activation", None) or _get(cfg, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise BrazeError(f"config.json hidden_act={act!r} is not supported; "
                         f"supported: {', '.join(ACTIVATIONS)}")
    rope = dict(_get(cfg, "rope_parameters", None) or {})
    rope_local = None
    if "full_attention" in rope or "sliding_attention" in rope:   # one RoPE per layer type
        rope_local = dict(rope.get("sliding_attention") or {}) or None
        rope = dict(rope.get("full_attention") or {})
    if not rope:
        rope = dict(_get(cfg, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", _get(cfg, "rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor")     # not `or`: a 0 read as 1.0
    if partial is None:
        partial = _get(cfg, "partial_rotary_factor", 1.0)
    if not 0 < partial <= 1:
        raise BrazeError(f"config.json partial_rotary_factor={partial} is not in (0, 1]")
    rope["partial_rotary_factor"] = partial
    window = _get(cfg, "sliding_window", 0) or 0
    layer_types = _get(cfg, "layer_types", None)
    if layer_types:
        windows = [window if t == "sliding_attention" else 0 for t in layer_types]
    else:
        windows = [window] * layers
    eos = _get(cfg, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    spec = ModelSpec(
        architecture=(_get(cfg, "architectures", None) or ["?"])[0], family=family,
        vocab_size=_require(cfg, "vocab_size"), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=_get(cfg, "num_key_value_heads", heads),
        head_dim=head_dim, rotary_dim=int(head_dim * partial), intermediate_size=_require(cfg, "intermediate_size"),
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        max_position_embeddings=_get(cfg, "max_position_embeddings", 2048), rope=rope,
        hidden_act=act, tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        attention_bias=bool(_get(cfg, "attention_bias", False)),
        mlp_bias=bool(_get(cfg, "mlp_bias", False)), qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_windows=windows, bos_token_id=_get(cfg, "bos_token_id", None), eos_token_ids=eos,
    )
    if family == "qwen2":             # q/k/v biases, none on o_proj (not a config key)
        spec.attention_bias, spec.o_proj_bias = True, False
    if family == "gemma3":
        _gemma3(cfg, spec, rope_local)
    if family == "gemma4":
        spec.rope_local = rope_local
        spec.gemma4 = gemma4_spec(cfg, spec)
        return spec
    if family == "deepseek_v3":
        from .mla_spec import read_deepseek_v3
        read_deepseek_v3(cfg, spec)
    elif family == "mixtral":
        spec.moe = MoESpec(_require(cfg, "num_local_experts"), _require(cfg, "num_experts_per_tok"),
                           spec.intermediate_size, True)
        spec.moe_layers = [True] * layers
    elif family == "qwen3_moe":
        experts = _get(cfg, "num_experts", None) or _get(cfg, "num_local_experts", 0)
        spec.moe = MoESpec(experts, _require(cfg, "num_experts_per_tok"),
                           _require(cfg, "moe_intermediate_size"),
                           bool(_get(cfg, "norm_topk_prob", False)))
        only = set(_get(cfg, "mlp_only_layers", []) or [])
        step = _get(cfg, "decoder_sparse_step", 1) or 1
        spec.moe_layers = [i not in only and experts > 0 and (i + 1) % step == 0
                           for i in range(layers)]
    elif family != "deepseek_v3":
        spec.moe_layers = [False] * layers
    if spec.moe and spec.moe.top_k > spec.moe.num_experts:
        raise BrazeError(f"config.json num_experts_per_tok={spec.moe.top_k} exceeds the "
                         f"{spec.moe.num_experts} experts")
    if heads % spec.num_kv_heads:
        raise BrazeError(f"config.json num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={spec.num_kv_heads}")
    return spec


def _gemma3(cfg, spec: ModelSpec, rope_local: dict | None) -> None:
    if _get(cfg, "use_bidirectional_attention", False):
        raise BrazeError("config.json use_bidirectional_attention=true (an encoder-style Gemma 3) "
                         "is not supported; braze serves causal decoders")
    if rope_local is not None:
        rope_local["partial_rotary_factor"] = spec.rope["partial_rotary_factor"]
    spec.rope_local = rope_local
    spec.qk_norm = True
    spec.attn_scale = float(_require(cfg, "query_pre_attn_scalar")) ** -0.5
    # transformers' Gemma3Attention keeps attn_logit_softcapping but never passes it to the
    # attention (unlike Gemma 2): Gemma 3 checkpoints are trained and served without it, so
    # braze follows the reference model and leaves it off (the kernel supports a cap).
    spec.attn_softcap = 0.0
    spec.final_softcap = float(_get(cfg, "final_logit_softcapping", 0.0) or 0.0)
