"""DeepSeek-V3's grouped sigmoid router as one op.

    %w: f32[T, 8], %ids: i64[T, 8] = grouped_topk(%logits, @bias) {n_group=8, topk_group=4, top_k=8, renormalize=true, scale=2.5}

    logits  [T, E] f32   the router's logits (x @ gate.T)
    bias    [E]    f32   e_score_correction_bias: it steers the choice, not the weights

Semantics (models/deepseek_v3.py GroupedSigmoidMoE.route, transformers' DeepseekV3TopkRouter):

    scores = sigmoid(logits)                           # f32
    choice = scores + bias
    if n_group > 1:     # E experts in n_group groups of E / n_group
        group[t, g] = sum of the 2 largest choice values in group g
        keep the topk_group best groups; choice of every other group's experts = -inf
    ids    = the top_k experts by choice
    w      = scores[ids]                               # the unbiased scores
    w      = w / (w.sum(-1) + 1e-20)   if renormalize
    w      = w * scale                                 # routed_scaling_factor

Ties (the kernel, codegen/kernels/router.py, does the same): the lower group or expert id
wins among equal values, and exactly topk_group groups are kept, as torch.topk keeps them
when values are distinct (the model's reference form keeps every group that ties the
topk_group-th best). ids come in descending choice order. A NaN choice value counts as
-inf, so even a garbage row selects top_k distinct experts.
"""

from __future__ import annotations

import torch

from .errors import BrazeError
from .ops import REQUIRED, OpDef, register
from .types import TensorType

RENORM_EPS = 1e-20       # DeepSeek-V3's denominator guard (w.sum() + 1e-20)


def check_grouping(num_experts: int, n_group, topk_group, top_k, op: str = "grouped_topk") -> None:
    """The grouping attributes against E experts: a clear error naming the one at fault."""
    for name, v in (("n_group", n_group), ("topk_group", topk_group), ("top_k", top_k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BrazeError(f"{op}: {name} must be a positive int, got {v!r}")
    if num_experts % n_group:
        raise BrazeError(f"{op}: n_group={n_group} does not divide the {num_experts} experts")
    per = num_experts // n_group
    if n_group > 1 and per < 2:
        raise BrazeError(f"{op}: groups score their 2 best experts, so each of the n_group="
                         f"{n_group} groups needs 2 or more of the {num_experts} experts")
    if topk_group > n_group:
        raise BrazeError(f"{op}: topk_group={topk_group} is more than n_group={n_group}")
    if top_k > topk_group * per:
        raise BrazeError(f"{op}: top_k={top_k} is more than the {topk_group * per} experts "
                         f"of the topk_group={topk_group} kept groups")


def _infer(types, attrs):
    logits, bias = types
    if logits.rank != 2 or logits.dtype != "f32":
        raise BrazeError(f"grouped_topk: logits must be f32 [T, E], got {logits}")
    e = logits.shape[1]
    if bias.rank != 1 or bias.dtype != "f32" or bias.shape[0] != e:
        raise BrazeError(f"grouped_topk: bias must be f32 [{e}] (one per expert), got {bias}")
    if not isinstance(e, int):
        raise BrazeError(f"grouped_topk: the number of experts must be concrete, got {e}")
    check_grouping(e, attrs["n_group"], attrs["topk_group"], attrs["top_k"])
    if not isinstance(attrs["renormalize"], bool):
        raise BrazeError(f"grouped_topk: renormalize must be true or false, "
                         f"got {attrs['renormalize']!r}")
    if not isinstance(attrs["scale"], (int, float)) or isinstance(attrs["scale"], bool):
        raise BrazeError(f"grouped_topk: scale must be a number, got {attrs['scale']!r}")
    shape = (logits.shape[0], attrs["top_k"])
    return [TensorType(shape, "f32"), TensorType(shape, "i64")]


def top_ids(x, k: int):
    """The k largest along the last dim, the lowest index first among equal values."""
    return torch.sort(x, dim=-1, descending=True, stable=True)[1][..., :k]


def _grouped_topk(logits, bias, *, n_group, topk_group, top_k, renormalize, scale):
    scores = logits.float().sigmoid()
    choice = scores + bias.float()
    choice = torch.where(torch.isnan(choice), float("-inf"), choice)
    t, e = choice.shape
    if n_group > 1:
        grouped = choice.view(t, n_group, e // n_group)
        best2 = grouped.gather(-1, top_ids(grouped, 2))
        group_scores = best2[..., 0] + best2[..., 1]
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device)
        keep.scatter_(1, top_ids(group_scores, topk_group), True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, e)
    ids = top_ids(choice, top_k)
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return w * scale, ids


register(OpDef(
    "grouped_topk", ("logits", "bias"), _infer, _grouped_topk,
    attrs={"n_group": REQUIRED, "topk_group": REQUIRED, "top_k": REQUIRED,
           "renormalize": REQUIRED, "scale": 1.0},
    doc="DeepSeek-V3's router: sigmoid scores, + bias for the choice, the topk_group best "
        "groups (by their 2 best), top_k experts among them; (weights f32, ids i64)"))
