"""fuse-linear-glu: a gated MLP's up projection and activation -> one `linear_glu` op.

Runs only under `braze compile --small-m-gemm triton`, whose skinny GEMM kernel computes
act(gate) * up straight from its fp32 accumulators (codegen/kernels/skinny_gemm.py): at the
decode buckets (T <= 16) the pointwise launch after the GEMM and the [T, 2I] round trip
through memory are gone, one launch per layer. At larger buckets the op still lowers to
cuBLAS and a pointwise kernel (codegen/small_m_gemm.py), the two launches it was before.
With the default `extern` GEMMs there is nothing to gain, and the pass does nothing.

Before (merge-projections made gate_up_proj; Phi-3's checkpoint has it already):
    %117: f32[T, 256] = linear(%51, @model.layers.0.mlp.gate_up_proj.weight)
    %118: f32[T, 128], %119: f32[T, 128] = split(%117) {sizes=[128, 128], dim=-1}
    %52: f32[T, 128] = silu(%118)
    %55: f32[T, 128] = mul(%52, %119)
After:
    %55: f32[T, 128], %117: f32[T, 256] = linear_glu(%51, @model.layers.0.mlp.gate_up_proj.weight) {act="silu"}

The activation is silu (Llama, Qwen, Mistral, Phi-3), GeLU tanh (Gemma) or GeLU erf, on
the first half; `mul` may take its operands either way round; a bias is kept. Refused,
with the reason (`--explain`): a split into unequal halves or not along the last dim,
halves also read elsewhere (a LoRA delta added to the product reads it too), the
activation on the second half, a weight that is not a parameter.
"""

from __future__ import annotations

from braze.ir import Graph, Node

from .manager import PassContext, register_pass
from .rewrite import Rewriter, Rule


def _act(node: Node | None) -> str | None:
    if node is None:
        return None
    if node.op == "silu":
        return "silu"
    if node.op == "gelu":
        return {"tanh": "gelu_tanh", "none": "gelu"}.get(node.attrs.get("approximate", "none"))
    return None


def _fuse(mul: Node, rw: Rewriter):
    g = rw.g
    if len(mul.operands) != 2:
        return None
    for act_v, up in (mul.operands, reversed(mul.operands)):
        act = _act(act_v.producer)
        if act is None:
            continue
        gate = act_v.producer.operands[0]
        split = gate.producer
        if split is None or split.op != "split" or split is not up.producer or gate is up:
            continue
        h = split.operands[0]
        lin = h.producer
        if lin is None or lin.op != "linear":
            return None
        sizes, dim = split.attrs.get("sizes"), split.attrs.get("dim")
        if len(split.results) != 2 or sizes[0] != sizes[1] or dim not in (-1, h.type.rank - 1):
            return f"{split.results[0].ref}: the product is not cut into two equal halves " \
                   f"along its last dim (split sizes={sizes} dim={dim})"
        if split.results.index(gate) != 0:
            return f"{mul.results[0].ref}: the activation is on the second half of {h.ref}"
        if not lin.operands[1].ref.startswith("@"):
            return f"{lin.operands[1].ref}: the weight is computed, not a parameter"
        outputs = set(g.outputs.values())
        for v, readers in ((h, {split}), (gate, {act_v.producer, mul}), (up, {mul}),
                           (act_v, {mul})):
            others = [u for u in g.users(v) if u not in readers]
            if others or v in outputs:
                where = others[0].op if others else "a graph output"
                return f"{v.ref} is also read by {where}, outside the gated MLP"
        dead = [mul, act_v.producer, split, lin]
        # y takes the mul's place (and name), h the linear's, so readers and text stay put
        rw.rebuild(mul, dead, "linear_glu", list(lin.operands), {"act": act},
                   replacing=[mul.results[0], h])
        return 1
    return None


@register_pass("fuse-linear-glu", after=("fuse-moe",), options=("small_m_gemm",))
def fuse_linear_glu(g: Graph, ctx: PassContext) -> int:
    """A gated MLP's up projection, activation and product (silu or GeLU of the first half
    times the second) -> linear_glu, under --small-m-gemm triton only."""
    if ctx.option("small_m_gemm", "extern") != "triton":
        return 0
    return Rewriter(g, ctx).run([Rule("mul", _fuse, explain="fuse-linear-glu: ")])
