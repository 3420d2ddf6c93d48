"""What a Gemma 4 text config adds to ModelSpec, per layer where it varies.

Read from `Gemma4TextConfig` (transformers 5), whose `per_layer_config` gives the global
(full-attention) layers their own head_dim (`global_head_dim`) and, with
`attention_k_eq_v`, their own kv head count (`num_global_key_value_heads`).

KV sharing: the last `num_kv_shared_layers` layers compute no k and v; each attends over
the cache of the last earlier layer of its own type (sliding or full), as transformers'
`kv_sharing_modes` ("store" then "reuse") does. braze gives those layers no cache at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from braze.ir.errors import BrazeError


@dataclass
class Gemma4Spec:
    head_dims: list[int]              # per layer
    kv_heads: list[int]               # per layer
    k_eq_v: list[bool]                # per layer: v is k's projection (no v_proj)
    kv_from: list[int | None]         # per layer: the earlier layer whose cache it reads
    intermediate: list[int]           # per layer: dense MLP width (double on shared layers)
    ple_dim: int = 0                  # hidden_size_per_layer_input (0: no per-layer inputs)
    ple_vocab: int = 0                # vocab_size_per_layer_input
    num_experts: int = 0              # enable_moe_block: the MoE beside the dense MLP
    top_k: int = 0
    moe_intermediate: int = 0
    # the final hidden state (after the norm) as a second output, "hidden_states": what
    # the assistant model of speculative method 'mtp' reads (models/gemma4_assistant.py)
    hidden_output: bool = False


def _get(cfg, name, default=None):
    v = getattr(cfg, name, default)
    return default if v is None else v


def _layer_value(cfg, layer: int, name: str, default):
    per = getattr(cfg, "per_layer_config", None)
    if per is None:
        return default
    try:
        v = getattr(per[layer], name, None)
    except (KeyError, IndexError, ValueError, TypeError):
        return default
    return default if v is None else v


def gemma4_spec(cfg, spec) -> Gemma4Spec:
    """Fill `spec` (ModelSpec) with the Gemma 4 facts and return its Gemma4Spec."""
    n = spec.num_layers
    bidir = _get(cfg, "use_bidirectional_attention", None)
    if bidir:
        raise BrazeError(f"config.json use_bidirectional_attention={bidir!r} is not supported; "
                         f"braze serves causal text decoders")
    layer_types = list(_get(cfg, "layer_types", None) or ["full_attention"] * n)
    if len(layer_types) != n:
        raise BrazeError(f"config.json layer_types has {len(layer_types)} entries for "
                         f"num_hidden_layers={n}")
    head_dims = [int(_layer_value(cfg, i, "head_dim", spec.head_dim)) for i in range(n)]
    kv_heads = [int(_layer_value(cfg, i, "num_key_value_heads", spec.num_kv_heads))
                for i in range(n)]
    for i, kv in enumerate(kv_heads):
        if spec.num_heads % kv:
            raise BrazeError(f"config.json: layer {i} has {kv} kv heads, which does not divide "
                             f"num_attention_heads={spec.num_heads}")
    k_eq_v = bool(_get(cfg, "attention_k_eq_v", False))
    shared = int(_get(cfg, "num_kv_shared_layers", 0))
    if not 0 <= shared < n:
        raise BrazeError(f"config.json num_kv_shared_layers={shared} must be below "
                         f"num_hidden_layers={n}: some layer has to write the cache the others share")
    first = n - shared
    kv_from: list[int | None] = [None] * n
    for i in range(first, n):
        producers = [j for j in range(first) if layer_types[j] == layer_types[i]]
        if not producers:
            raise BrazeError(f"config.json: layer {i} ({layer_types[i]}) shares the KV cache, but "
                             f"no earlier unshared layer of that type writes one")
        kv_from[i] = producers[-1]
    double = bool(_get(cfg, "use_double_wide_mlp", False))
    inter = spec.intermediate_size
    g = Gemma4Spec(
        head_dims=head_dims, kv_heads=kv_heads,
        k_eq_v=[k_eq_v and t != "sliding_attention" for t in layer_types],
        kv_from=kv_from,
        intermediate=[inter * 2 if double and kv_from[i] is not None else inter for i in range(n)],
        ple_dim=int(_get(cfg, "hidden_size_per_layer_input", 0) or 0),
        ple_vocab=int(_get(cfg, "vocab_size_per_layer_input", spec.vocab_size)),
    )
    if _get(cfg, "enable_moe_block", False):
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if not _get(cfg, key, None):
                raise BrazeError(f"config.json enable_moe_block=true needs '{key}'")
        g.num_experts, g.top_k = int(cfg.num_experts), int(cfg.top_k_experts)
        g.moe_intermediate = int(cfg.moe_intermediate_size)
        if g.top_k > g.num_experts:
            raise BrazeError(f"config.json top_k_experts={g.top_k} exceeds the "
                             f"{g.num_experts} experts")
    spec.qk_norm = True
    spec.attn_scale = 1.0            # the q/k norms replace the 1/sqrt(d) scale
    spec.attn_softcap = 0.0
    spec.final_softcap = float(_get(cfg, "final_logit_softcapping", 0.0) or 0.0)
    spec.rotary_dim = 0              # proportional RoPE rotates whole heads (zero frequencies)
    spec.moe_layers = [False] * n
    return g
