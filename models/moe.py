"""Mixture of experts in its dense reference form.

Every expert runs on every token and the results are weighted by the sparse
routing matrix (zero for experts a token did not pick). That is O(experts)
work and only a reference: the `fuse-moe` pass turns it into O(top_k).

Router: softmax over experts in float32, top-k, optional renormalisation of
the k weights (Mixtral always; Qwen3-MoE when `norm_topk_prob`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ACT_FNS


class Experts(nn.Module):
    """Expert weights stacked per projection: [E, I, H], [E, I, H], [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def dense(self, x, routing, act):
        """Every expert on every token, summed with the [T, E] `routing` weights (zero for
        experts a token did not pick): the form fuse-moe recognises."""
        gate = torch.einsum("th,eih->tei", x, self.gate_proj)
        up = torch.einsum("th,eih->tei", x, self.up_proj)
        out = torch.einsum("tei,ehi->teh", act(gate) * up, self.down_proj)
        return torch.einsum("te,teh->th", routing, out)


class DenseMoE(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int,
                 norm_topk_prob: bool, act: str, dtype: torch.dtype):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden, intermediate)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.act = ACT_FNS[act]
        self.out_dtype = dtype

    def forward(self, x):
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        routing = torch.zeros_like(probs).scatter(1, chosen, weights).to(self.out_dtype)
        return self.experts.dense(x, routing, self.act)
