"""The numbers DeepSeek-V3 (`DeepseekV3ForCausalLM`) adds to a ModelSpec, read from its config.

Multi-head latent attention (MLA): each token's keys and values are compressed into one
`kv_lora_rank` latent (plus a `qk_rope_head_dim` rotary key shared by all heads), which
is all the KV cache keeps; `kv_b_proj` expands the latent into per-head keys
(`qk_nope_head_dim`) and values (`v_head_dim`). Queries come from `q_proj`, or, with
`q_lora_rank`, through their own low-rank bottleneck (`q_a_proj`, `q_a_layernorm`,
`q_b_proj`).

MoE routing: sigmoid scores plus `e_score_correction_bias` choose the experts (the
bias only chooses; the weights are the plain sigmoid scores), restricted to the
`topk_group` best of `n_group` expert groups (a group scores the sum of its two best
experts); `norm_topk_prob` renormalises the chosen weights, `routed_scaling_factor`
scales them, and `n_shared_experts` always-on experts run beside them. The first
`first_k_dense_replace` layers have a dense MLP instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from braze.ir.errors import BrazeError


@dataclass
class MLASpec:
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None      # None: a plain q_proj
    rope_interleave: bool        # the rotary dims are stored as interleaved pairs
    scale: float                 # softmax scale, with YaRN's mscale_all_dim folded in

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """What the KV cache holds per token (one "head"): the latent, then the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def _get(cfg, name, default=None):
    v = getattr(cfg, name, default)
    return default if v is None else v


def _need(cfg, name):
    v = getattr(cfg, name, None)
    if v is None:
        raise BrazeError(f"config.json has no '{name}', which DeepseekV3ForCausalLM needs")
    return v


def yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def read_deepseek_v3(cfg, spec) -> None:
    """Fill `spec.mla`, `spec.moe`, `spec.moe_layers` and `spec.mtp_layers` from `cfg`."""
    from .spec import MoESpec
    mla = MLASpec(kv_lora_rank=int(_need(cfg, "kv_lora_rank")),
                  qk_nope_head_dim=int(_need(cfg, "qk_nope_head_dim")),
                  qk_rope_head_dim=int(_need(cfg, "qk_rope_head_dim")),
                  v_head_dim=int(_need(cfg, "v_head_dim")),
                  q_lora_rank=_get(cfg, "q_lora_rank", None),
                  rope_interleave=bool(_get(cfg, "rope_interleave", True)), scale=0.0)
    if mla.qk_rope_head_dim % 2:
        raise BrazeError(f"config.json qk_rope_head_dim={mla.qk_rope_head_dim} must be even")
    scale = mla.qk_head_dim ** -0.5
    rope = spec.rope
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        mscale_all_dim = rope.get("mscale_all_dim") or 0
        if mscale_all_dim:
            m = yarn_mscale(float(_need_rope(rope, "factor")), mscale_all_dim)
            scale = scale * m * m
    mla.scale = scale
    spec.mla = mla
    spec.head_dim = mla.qk_rope_head_dim          # RoPE runs on the rope part only
    spec.rotary_dim = mla.qk_rope_head_dim
    experts = int(_get(cfg, "n_routed_experts", 0) or 0)
    groups, topk_group = int(_get(cfg, "n_group", 1) or 1), int(_get(cfg, "topk_group", 1) or 1)
    if experts:
        if experts % groups:
            raise BrazeError(f"config.json n_routed_experts={experts} is not a multiple of "
                             f"n_group={groups}")
        if not 1 <= topk_group <= groups:
            raise BrazeError(f"config.json topk_group={topk_group} must be between 1 and "
                             f"n_group={groups}")
        if experts // groups < 2 and groups > 1:
            raise BrazeError(f"config.json: {experts} experts in {groups} groups leave fewer "
                             f"than the 2 per group that group scores add up")
        spec.moe = MoESpec(experts, int(_need(cfg, "num_experts_per_tok")),
                           int(_need(cfg, "moe_intermediate_size")),
                           bool(_get(cfg, "norm_topk_prob", True)), scoring="sigmoid",
                           n_group=groups, topk_group=topk_group,
                           routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", 1.0)),
                           shared_experts=int(_get(cfg, "n_shared_experts", 0) or 0))
    first_dense = int(_get(cfg, "first_k_dense_replace", 0) or 0)
    spec.moe_layers = [bool(experts) and i >= first_dense for i in range(spec.num_layers)]
    spec.mtp_layers = int(_get(cfg, "num_nextn_predict_layers", 0) or 0)


def _need_rope(rope: dict, key: str):
    if rope.get(key) is None:
        raise BrazeError(f"RoPE type {rope.get('rope_type')!r} needs {key!r} in rope_parameters")
    return rope[key]
