"""add-lora: give each targeted linear a LoRA delta read from per-slot adapter pools.

Runs only when compiling with `--lora-slots K` (the compiler puts it in the pipeline
right after merge-projections, so at -O2 it sees merged QKV / gate-up linears and
gives each one delta for all its parts; at -O0 it sees the plain linears).

Before (-O2, after merge-projections):
    %113: f32[T, 128] = linear(%19, @model.layers.0.self_attn.qkv_proj.weight)
    %114: f32[T, 64], %115: f32[T, 32], %116: f32[T, 32] = split(%113) {sizes=[64, 32, 32], dim=-1}
After (K=4 slots, rank R=8):
    input %lora_slots: i32[T]
    input %lora_a.model.layers.0.self_attn.qkv_proj: f32[4, 24, 64]
    input %lora_b.model.layers.0.self_attn.qkv_proj: f32[4, 128, 8]
    %113: f32[T, 128] = linear(%19, @model.layers.0.self_attn.qkv_proj.weight)
    %200: f32[T, 128] = lora(%19, %lora_a.model.layers.0.self_attn.qkv_proj, %lora_b.model.layers.0.self_attn.qkv_proj, %lora_slots) {sizes=[64, 32, 32]}
    %201: f32[T, 128] = add(%113, %200)
    %114: f32[T, 64], %115: f32[T, 32], %116: f32[T, 32] = split(%201) {sizes=[64, 32, 32], dim=-1}

The pools are graph inputs, not weights: the runtime owns them (fixed [K, ...] tensors
it writes adapters into), so the compiled graph, its kernels and its CUDA graphs never
change when adapters come and go. A linear is targeted when its weight is a param
named `<module>.weight` whose last module name is a target (`q_proj`, ...), or a
merged weight (a `cat` recipe, merge-projections) one of whose parts is; a merged
linear's untargeted parts get zero rows. What the pass did is recorded in
`graph.meta["lora"]`, which the compiler moves into the manifest (the contract the
runtime loads adapters by): slots, max rank, targets, per pool its parts (module
name, output rows) and input width, and the linears --lora-targets left out (so an
adapter for one of those is told to recompile, not that the model lacks it).

Tensor parallelism: the pass runs after `shard`, on one rank's graph, so the pools take
the rank's sizes and nothing here knows about ranks. A column-parallel linear (q, k, v,
gate, up: output rows split) gets pools over its local rows: A whole, B the rows the
rank's weight holds, part by part for a merged one (a replicated KV head's rows too). A
row-parallel linear (o, down: input split, an `all_reduce` after it) gets pools over its
local input: A the columns the rank's weight holds, B whole; its delta is added before
the `all_reduce` (the `add` goes right after the linear), which then sums the ranks'
partial deltas with the partial products, as the delta is linear in its input. Which
rows or columns are the rank's is the parts' weights' shard records (the manifest's
`parallel.shards`, `<module>.weight`); runtime/lora.py cuts each adapter by them.
"""

from __future__ import annotations

from braze.ir import Graph, Node
from braze.ir.errors import BrazeError
from braze.ir.types import T, TensorType

from .manager import PassContext, register_pass

# --lora-targets short names -> the module names Hugging Face models use
TARGET_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# a checkpoint's own fused projections (Phi-3), which braze's models split at load: as a
# target they stand for their parts (runtime/lora.py splits such adapters the same way)
FUSED_TARGETS = {"qkv": ("q_proj", "k_proj", "v_proj"), "qkv_proj": ("q_proj", "k_proj", "v_proj"),
                 "gate_up": ("gate_proj", "up_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
DEFAULT_TARGETS = "q,k,v,o,gate,up,down"
SLOTS_INPUT = "lora_slots"


def target_modules(spec: str) -> list[str]:
    """`q,k,v` (or `q_proj,k_proj`, or `qkv`) -> ["q_proj", "k_proj", "v_proj"]; unknown
    names fail."""
    out = []
    for t in (s.strip() for s in str(spec).split(",")):
        if not t:
            continue
        names = FUSED_TARGETS.get(t) or (TARGET_NAMES.get(t, t),)
        if names[0] not in TARGET_NAMES.values():
            raise BrazeError(f"--lora-targets entry {t!r} is not one of "
                             f"{', '.join(TARGET_NAMES)}, qkv, gate_up (or their module names "
                             f"{', '.join(TARGET_NAMES.values())})")
        out += [n for n in names if n not in out]
    if not out:
        raise BrazeError("--lora-targets names no module; give e.g. q,k,v,o")
    return out


def pool_names(module: str) -> tuple[str, str]:
    return f"lora_a.{module}", f"lora_b.{module}"


def _module(param_name: str) -> str | None:
    return param_name[:-len(".weight")] if param_name.endswith(".weight") else None


def _parts(g: Graph, node: Node) -> list[tuple[str, int]] | None:
    """[(module, output rows)] of a linear's weight: one part, or a merged weight's parts."""
    w = node.operands[1]
    if w.kind != "param" or w.type.rank != 2:
        return None
    r = w.recipe
    sources = list(r.operands) if r is not None and r.op == "cat" and r.attrs.get("dim") == 0 \
        else [w] if r is None else None
    if not sources:
        return None
    parts = []
    for s in sources:
        m = _module(s.name)
        if m is None or s.recipe is not None:
            return None
        parts.append((m, int(s.type.shape[0])))
    return parts


@register_pass("add-lora", stage="merge", level=None, after=("merge-projections",),
               options=("lora_slots", "max_lora_rank", "lora_targets"))
def add_lora(g: Graph, ctx: PassContext) -> int:
    """linear(x, @W) -> add(linear(x, @W), lora(x, %lora_a.M, %lora_b.M, %lora_slots))."""
    K = ctx.option("lora_slots", 0)
    if not K:
        raise BrazeError("add-lora needs the lora_slots option (braze compile --lora-slots K)")
    R = int(ctx.option("max_lora_rank", 16))
    targets = target_modules(ctx.option("lora_targets", DEFAULT_TARGETS))
    plan, untargeted = [], []
    for node in g.nodes:
        if node.op != "linear":
            continue
        parts = _parts(g, node)
        if parts is None:
            continue
        hit = [m for m, _ in parts if m.rsplit(".", 1)[-1] in targets]
        untargeted += [m for m, _ in parts if m not in hit
                       and m.rsplit(".", 1)[-1] in TARGET_NAMES.values()]
        if not hit:
            continue
        x = node.operands[0]
        if x.type.rank != 2:
            ctx.refuse(node, f"no LoRA: its input {x.ref} is {x.type}, not [T, H]")
            continue
        plan.append((node, parts, hit))
    if not plan:
        raise BrazeError(f"--lora-targets {','.join(targets)}: the model has no linear layer "
                         f"with those module names")
    slots = g.add_input(SLOTS_INPUT, TensorType((T,), "i32"))
    modules = {}
    for node, parts, hit in plan:
        x, w = node.operands[0], node.operands[1]
        pool = _module(w.name)
        dtype = w.type.dtype
        sizes = [o for _, o in parts]
        a_name, b_name = pool_names(pool)
        a = g.add_input(a_name, TensorType((K, R * len(parts), x.type.shape[1]), dtype))
        b = g.add_input(b_name, TensorType((K, sum(sizes), R), dtype))
        y = node.results[0]
        after = g.nodes[g.index(node) + 1] if g.index(node) + 1 < len(g.nodes) else None
        with g.inserting_before(after):
            d = g.op("lora", x, a, b, slots, sizes=sizes)
            out = g.op("add", y, d)
        readers = [u for u in g.users(y) if u is not out.producer]
        for u in dict.fromkeys(readers):
            u.operands = tuple(out if v is y else v for v in u.operands)
        for k, v in list(g.outputs.items()):
            if v is y:
                g.outputs[k] = out
        modules[pool] = {"parts": [[m, o] for m, o in parts], "targeted": hit,
                         "in": int(x.type.shape[1])}
    g.meta["lora"] = {"slots": int(K), "max_rank": R, "targets": targets, "dtype": dtype,
                      "modules": modules, "untargeted": untargeted}
    return len(plan)


def with_lora(names: list[str]) -> list[str]:
    """A pipeline with add-lora in its place: right after merge-projections, or first
    (before any fusion) when the level has no merge-projections; always after `shard`,
    which then never meets a `lora` op (see the module docstring: tensor parallelism)."""
    for anchor in ("merge-projections", "shard"):
        if anchor in names:
            i = names.index(anchor) + 1
            return names[:i] + ["add-lora"] + names[i:]
    return ["add-lora"] + names
