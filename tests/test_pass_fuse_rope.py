"""fuse-rope: rotary math on q and k -> rope / rope1 / rope_cache_write (+ folded QK-norm).

The fused ops compute the model's own torch math op for op, so the equivalence
checks are bit-exact (atol=0), caches included.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.ir import NB, Graph, T, TensorType, parse_graph, print_graph, run_graph, verify
from braze.ir.types import torch_dtype
from braze.passes import PassManager, all_passes
from pass_helpers import (assert_model_pass_preserves, assert_pass_preserves,
                          materialize_params, model_graph, opt_text, random_feeds, run_passes,
                          same_text)

HEAD = """graph @g(%q: f32[T, 4, 8], %k: f32[T, 2, 8], %cos: f32[T, 1, 8], %sin: f32[T, 1, 8]) {"""

Q_ROPE = """
  %0: f32[T, 4, 8] = mul(%q, %cos)
  %1: f32[T, 4, 4] = slice(%q) {dim=2, end=4}
  %2: f32[T, 4, 4] = slice(%q) {dim=2, start=4}
  %3: f32[T, 4, 4] = neg(%2)
  %4: f32[T, 4, 8] = cat(%3, %1) {dim=-1}
  %5: f32[T, 4, 8] = mul(%4, %sin)
  %6: f32[T, 4, 8] = add(%0, %5)"""

# the other operand orders: cos * k, sin * rotated, and the sum the other way round
K_ROPE = """
  %10: f32[T, 2, 8] = mul(%cos, %k)
  %11: f32[T, 2, 4] = slice(%k) {dim=-1, start=0, end=4}
  %12: f32[T, 2, 4] = slice(%k) {dim=-1, start=4}
  %13: f32[T, 2, 4] = neg(%12)
  %14: f32[T, 2, 8] = cat(%13, %11) {dim=2}
  %15: f32[T, 2, 8] = mul(%sin, %14)
  %16: f32[T, 2, 8] = add(%15, %10)"""

PAIR = HEAD + Q_ROPE + K_ROPE + "\n  return q=%6, k=%16\n}\n"


def test_neox_pair():
    assert same_text(opt_text(PAIR, "fuse-rope"), HEAD + """
      %6: f32[T, 4, 8], %16: f32[T, 2, 8] = rope(%q, %k, %cos, %sin) {style="neox"}
      return q=%6, k=%16
    }
    """)
    assert_pass_preserves(PAIR, ["fuse-rope"], {"T": 3}, atol=0, rtol=0)


def test_only_q_is_rotated():
    text = HEAD + Q_ROPE + "\n  return q=%6, k=%k\n}\n"
    assert same_text(opt_text(text, "fuse-rope"), HEAD + """
      %6: f32[T, 4, 8] = rope1(%q, %cos, %sin) {style="neox"}
      return q=%6, k=%k
    }
    """)


GPTJ_Q = """
  %0: f32[T, 4, 8] = mul(%q, %cos)
  %1: f32[T, 4, 4] = slice(%q) {dim=2, step=2}
  %2: f32[T, 4, 4] = slice(%q) {dim=2, start=1, step=2}
  %3: f32[T, 4, 4] = neg(%2)
  %4: f32[T, 4, 4, 1] = unsqueeze(%3) {dim=-1}
  %5: f32[T, 4, 4, 1] = unsqueeze(%1) {dim=-1}
  %6: f32[T, 4, 4, 2] = cat(%4, %5) {dim=-1}
  %7: f32[T, 4, 8] = reshape(%6) {shape=[-1, 4, 8]}
  %8: f32[T, 4, 8] = mul(%7, %sin)
  %9: f32[T, 4, 8] = add(%0, %8)"""


GPTJ_K = """
  %k0: f32[T, 2, 8] = mul(%k, %cos)
  %k1: f32[T, 2, 4] = slice(%k) {dim=2, start=0, step=2}
  %k2: f32[T, 2, 4] = slice(%k) {dim=-1, start=1, step=2}
  %k3: f32[T, 2, 4] = neg(%k2)
  %k4: f32[T, 2, 4, 1] = unsqueeze(%k3) {dim=3}
  %k5: f32[T, 2, 4, 1] = unsqueeze(%k1) {dim=3}
  %k6: f32[T, 2, 4, 2] = cat(%k4, %k5) {dim=3}
  %k7: f32[T, 2, 8] = reshape(%k6) {shape=[-1, 2, 8]}
  %k8: f32[T, 2, 8] = mul(%sin, %k7)
  %k9: f32[T, 2, 8] = add(%k8, %k0)"""


def test_gptj_interleaved_pair():
    text = HEAD + GPTJ_Q + GPTJ_K + "\n  return q=%9, k=%k9\n}\n"
    assert same_text(opt_text(text, "fuse-rope"), HEAD + """
      %9: f32[T, 4, 8], %k9: f32[T, 2, 8] = rope(%q, %k, %cos, %sin) {style="gptj"}
      return q=%9, k=%k9
    }
    """)
    assert_pass_preserves(text, ["fuse-rope"], {"T": 4}, atol=0, rtol=0)


def test_gptj_stacked_along_the_wrong_dim_is_refused():
    """stack(.., dim=-2).flatten(-2) is cat((-x2, x1), -1): not the interleaved rotation."""
    text = HEAD + GPTJ_Q.replace("[T, 4, 4, 1] = unsqueeze(%3) {dim=-1}", "[T, 4, 1, 4] = unsqueeze(%3) {dim=2}") \
        .replace("[T, 4, 4, 1] = unsqueeze(%1) {dim=-1}", "[T, 4, 1, 4] = unsqueeze(%1) {dim=2}") \
        .replace("[T, 4, 4, 2] = cat(%4, %5) {dim=-1}", "[T, 4, 2, 4] = cat(%4, %5) {dim=2}") \
        + "\n  return q=%9\n}\n"
    out, why = refused(text, "fuse-rope")
    assert same_text(out, text) and any("must stack along a new last dim" in r for r in why), why


NORMED_HEAD = HEAD.replace("%q: f32[T, 4, 8], %k: f32[T, 2, 8]", "%qp: f32[T, 4, 8], %kp: f32[T, 2, 8]")
NORMS = """
  param @qw: f32[8]
  param @kw: f32[8]
  %q: f32[T, 4, 8] = rms_norm(%qp, @qw) {eps=1e-06}
  %k: f32[T, 2, 8] = rms_norm(%kp, @kw) {eps=1e-06}"""


def test_qk_norm_folds_in():
    text = NORMED_HEAD + NORMS + Q_ROPE + K_ROPE + "\n  return q=%6, k=%16\n}\n"
    assert same_text(opt_text(text, "fuse-rope"), NORMED_HEAD + """
      param @qw: f32[8]
      param @kw: f32[8]
      %6: f32[T, 4, 8], %16: f32[T, 2, 8] = rope(%qp, %kp, %cos, %sin, @qw, @kw) {style="neox", eps=1e-06}
      return q=%6, k=%16
    }
    """)
    assert_pass_preserves(text, ["fuse-rope"], {"T": 3}, atol=0, rtol=0)


def refused(text, *passes):
    g = parse_graph(text)
    verify(g)
    g, ctx = run_passes(g, list(passes))
    return print_graph(g), [r.reason for r in ctx.refusals]


def test_qk_norm_needs_both_and_one_eps():
    text = NORMED_HEAD + NORMS.replace("@kw) {eps=1e-06}", "@kw) {eps=1e-05}") + Q_ROPE + K_ROPE \
        + "\n  return q=%6, k=%16\n}\n"
    out, why = refused(text, "fuse-rope")
    assert out.count("rms_norm") == 2 and 'rope(%q, %k, %cos, %sin) {style="neox"}' in out
    assert any("differ in eps" in r for r in why), why
    text = NORMED_HEAD + NORMS + Q_ROPE + K_ROPE + "\n  return q=%6, k=%16, kn=%k\n}\n"
    out, why = refused(text, "fuse-rope")     # k's norm is read elsewhere: neither folds
    assert out.count("rms_norm") == 2 and any("only one of q, k" in r for r in why), why
    assert_pass_preserves(text, ["fuse-rope"], {"T": 2}, atol=0, rtol=0)


ATTN_HEAD = HEAD.replace(") {", ", %v: f32[T, 2, 8], %k_cache.0: f32[NB, 4, 2, 8], "
                               "%v_cache.0: f32[NB, 4, 2, 8], %slot_mapping: i64[T], "
                               "%query_start_loc: i32[S + 1], %seq_lens: i32[S], "
                               "%block_tables: i32[S, MB]) {")
ATTN = """
  cache_write(%16, %v, %k_cache.0, %v_cache.0, %slot_mapping)
  %20: f32[T, 4, 8] = paged_attention(%6, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.25}
  return o=%20
}
"""


def test_cache_write_fuses_in_place():
    text = ATTN_HEAD + K_ROPE + Q_ROPE + ATTN       # k first: the attention says which is q
    assert same_text(opt_text(text, "fuse-rope"), ATTN_HEAD + """
      %6: f32[T, 4, 8] = rope_cache_write(%q, %k, %v, %cos, %sin, %k_cache.0, %v_cache.0, %slot_mapping) {style="neox"}
      %20: f32[T, 4, 8] = paged_attention(%6, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.25}
      return o=%20
    }
    """)


def test_cache_write_stays_when_k_is_read_elsewhere():
    text = ATTN_HEAD + Q_ROPE + K_ROPE + ATTN.replace("return o=%20", "return o=%20, k=%16")
    out, why = refused(text, "fuse-rope")
    assert "rope(%q, %k, %cos, %sin)" in out and "cache_write(%16, %v," in out
    assert any("has other users" in r for r in why), why


UNEVEN = [("%1: f32[T, 4, 4] = slice(%q) {dim=2, end=4}", "%1: f32[T, 4, 3] = slice(%q) {dim=2, end=3}"),
          ("%2: f32[T, 4, 4] = slice(%q) {dim=2, start=4}", "%2: f32[T, 4, 5] = slice(%q) {dim=2, start=3}"),
          ("%3: f32[T, 4, 4] = neg", "%3: f32[T, 4, 5] = neg")]


@pytest.mark.parametrize("edits, reason", [
    ([("cat(%3, %1)", "cat(%1, %3)")], "comes from slice, pattern wants neg"),   # sign flipped
    (UNEVEN, "rotate-half must be cat(-x[..., 4:], x[..., :4]); got -x[..., 3:None:1]"),
    ([("return q=%6", "return n=%3, q=%6")], "also used by a graph output"),
    ([("%sin: f32[T, 1, 8]", "%sin: f32[T, 4, 8]")], "cos/sin %sin is f32[T, 4, 8]"),
])
def test_near_misses_are_refused_and_left_alone(edits, reason):
    text = HEAD + Q_ROPE + "\n  return q=%6\n}\n"
    for edit in edits:
        text = text.replace(*edit)
    out, why = refused(text, "fuse-rope")
    assert same_text(out, text) and any(reason in r for r in why), why


def test_rotation_along_heads_is_refused():
    text = """graph @g(%q: f32[T, 8, 8], %cos: f32[T, 1, 8], %sin: f32[T, 1, 8]) {
      %0: f32[T, 8, 8] = mul(%q, %cos)
      %1: f32[T, 4, 8] = slice(%q) {dim=1, end=4}
      %2: f32[T, 4, 8] = slice(%q) {dim=1, start=4}
      %3: f32[T, 4, 8] = neg(%2)
      %4: f32[T, 8, 8] = cat(%3, %1) {dim=1}
      %5: f32[T, 8, 8] = mul(%4, %sin)
      %6: f32[T, 8, 8] = add(%0, %5)
      return q=%6
    }"""
    out, why = refused(text, "fuse-rope")
    assert "rope" not in out and any("not the last" in r for r in why), why


# -- hypothesis: random rotations, matching or not, bit-identical outputs and caches ----------

def rotation(g: Graph, x, cos, sin, *, style, swap_mul, swap_add, wrong):
    d = x.type.shape[2]
    h = d // 2
    if style == "neox":
        lo = g.op("slice", x, dim=2, end=h + (1 if wrong == "half" else 0))
        hi = g.op("slice", x, dim=-1, start=h + (1 if wrong == "half" else 0))
        parts = (lo, g.op("neg", hi)) if wrong == "order" else (g.op("neg", hi), lo)
        rot = g.op("cat", *parts, dim=-1)
    else:
        ev = g.op("slice", x, dim=2, step=2)
        od = g.op("slice", x, dim=2, start=1, step=2)
        parts = (ev, g.op("neg", od)) if wrong == "order" else (g.op("neg", od), ev)
        rot = g.op("reshape", g.op("cat", *(g.op("unsqueeze", p, dim=3) for p in parts), dim=-1),
                   shape=[-1, x.type.shape[1], d])
    if wrong == "extra":
        g.set_output(f"extra{len(g.outputs)}", rot)
    a = g.op("mul", cos, x) if swap_mul else g.op("mul", x, cos)
    b = g.op("mul", sin, rot) if swap_mul else g.op("mul", rot, sin)
    return g.op("add", b, a) if swap_add else g.op("add", a, b)


@settings(max_examples=30, deadline=None)
@given(half=st.integers(1, 6), hq=st.integers(1, 4), hkv=st.integers(1, 3),
       style=st.sampled_from(["neox", "gptj"]), dt=st.sampled_from(["f32", "f16", "bf16"]),
       cos_dt=st.sampled_from([None, "f32"]), which=st.sampled_from(["qk", "q", "k"]),
       norm=st.sampled_from([None, "both", "q"]), cache=st.booleans(),
       swap_mul=st.booleans(), swap_add=st.booleans(),
       wrong=st.sampled_from([None, None, None, "order", "half", "extra"]),
       t=st.integers(1, 5), seed=st.integers(0, 100))
def test_random_rotations_equivalent(half, hq, hkv, style, dt, cos_dt, which, norm, cache,
                                     swap_mul, swap_add, wrong, t, seed):
    if wrong == "half" and (style != "neox" or half == 1):
        wrong = None
    d, bs = 2 * half, 4
    g = Graph("g")
    qp = g.add_input("q", TensorType((T, hq, d), dt))
    kp = g.add_input("k", TensorType((T, hkv, d), dt))
    v = g.add_input("v", TensorType((T, hkv, d), dt))
    cos = g.add_input("cos", TensorType((T, 1, d), cos_dt or dt))
    sin = g.add_input("sin", TensorType((T, 1, d), cos_dt or dt))
    q, k = qp, kp
    if norm:
        q = g.op("rms_norm", qp, g.add_param("qw", TensorType((d,), dt)), eps=1e-6)
        if norm == "both":
            k = g.op("rms_norm", kp, g.add_param("kw", TensorType((d,), "f32")), eps=1e-6)
    kw = dict(style=style, swap_mul=swap_mul, swap_add=swap_add)
    if "q" in which:
        q = rotation(g, q, cos, sin, wrong=wrong, **kw)
    if "k" in which:
        k = rotation(g, k, cos, sin, wrong=None, **kw)
    g.set_output("q", q)
    caches = {}
    if cache:
        kc = g.add_input("k_cache.0", TensorType((NB, bs, hkv, d), dt))
        vc = g.add_input("v_cache.0", TensorType((NB, bs, hkv, d), dt))
        g.add_node("cache_write", [k, v, kc, vc, g.add_input("slot_mapping", TensorType((T,), "i64"))])
        gen = torch.Generator().manual_seed(seed)
        slots = torch.randperm(3 * bs, generator=gen)[:t]
        slots[torch.rand(t, generator=gen) < 0.3] = -1
        caches = {"k_cache.0": torch.randn(3, bs, hkv, d, generator=gen).to(torch_dtype(dt)),
                  "v_cache.0": torch.randn(3, bs, hkv, d, generator=gen).to(torch_dtype(dt)),
                  "slot_mapping": slots}
    else:
        g.set_output("k", k)
    verify(g)
    counts = check_equivalent(g, t, seed, caches).op_counts()

    q_ok, k_ok = "q" in which and wrong is None, "k" in which
    q_norm, k_norm = norm in ("both", "q"), norm == "both"
    fused = counts.get("rope", 0) * 2 + counts.get("rope1", 0) + counts.get("rope_cache_write", 0) * 2
    assert fused == q_ok + k_ok
    assert counts.get("rope_cache_write", 0) == int(cache and q_ok and k_ok)
    if q_ok and k_ok:
        norms_left = 0 if q_norm and k_norm else q_norm + k_norm
    else:
        norms_left = (q_norm and not q_ok) + (k_norm and not k_ok)
    assert counts.get("rms_norm", 0) == norms_left


def check_equivalent(g: Graph, t: int, seed: int, extra_feeds: dict) -> Graph:
    """Before/after on the same values: outputs and the (written) caches bit-identical."""
    text = print_graph(g)
    feeds, params = random_feeds(g, {"T": t, "NB": 3}, seed)
    feeds.update(extra_feeds)
    want_feeds = {k: v.clone() for k, v in feeds.items()}
    want = run_graph(parse_graph(text), want_feeds, params)
    after, _ = run_passes(parse_graph(text), ["fuse-rope"])
    got_feeds = {k: v.clone() for k, v in feeds.items()}
    got = run_graph(after, got_feeds, materialize_params(after, params))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)
    for k in feeds:
        torch.testing.assert_close(got_feeds[k], want_feeds[k], atol=0, rtol=0)
    return after


# -- real graphs --------------------------------------------------------------------------

FAMILIES = {"llama": (2, False), "mistral": (2, False), "qwen3": (2, True), "mixtral": (3, False),
            "qwen3_moe": (3, True)}


def _check_counts(g, layers, qk_norm, matches):
    counts = g.op_counts()
    assert counts.get("rope_cache_write") == layers
    assert "cache_write" not in counts and "rope" not in counts and "rope1" not in counts
    assert "neg" not in counts and "slice" not in counts
    assert counts.get("rms_norm") == 1 and counts.get("add_rms_norm") == 2 * layers
    folded = [n for n in g.nodes if n.op == "rope_cache_write" and len(n.operands) == 10]
    assert len(folded) == (layers if qk_norm else 0)       # the QK norms went into the rope
    assert matches == layers * (3 + (2 if qk_norm else 0))   # q, k, the write (+ 2 norms)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_graphs(family, tmp_path_factory):
    layers, qk_norm = FAMILIES[family]
    g, params = model_graph(family, tmp_path_factory.mktemp("m"))
    g2 = parse_graph(print_graph(g))
    records = PassManager(["fuse-norm", "fuse-rope"]).run(g2)
    assert_model_pass_preserves(g, params, ["fuse-norm", "fuse-rope"], atol=0, rtol=0)
    _check_counts(g, layers, qk_norm, records[1].matches)


def test_llama3_rope_scaling(tmp_path):
    from braze.tiny import tiny_llama3_rope
    g, params = model_graph("llama", tmp_path, rope_scaling=tiny_llama3_rope())
    assert_model_pass_preserves(g, params, ["fuse-norm", "fuse-rope"], atol=0, rtol=0)
    assert g.op_counts().get("rope_cache_write") == 2


@pytest.mark.parametrize("family", ["qwen3", "mixtral"])
def test_after_canonicalize_and_merge_projections(family, tmp_path_factory):
    """The -O2 order: q/k come from reshape(split(linear)), the f32 casts are gone."""
    pipeline = [p for p in ("canonicalize", "merge-projections") if p in all_passes()]
    layers, qk_norm = FAMILIES[family]
    g, params = model_graph(family, tmp_path_factory.mktemp("m"))
    g = assert_model_pass_preserves(g, params, pipeline + ["fuse-norm", "fuse-rope"], atol=0, rtol=0)
    counts = g.op_counts()
    assert counts.get("rope_cache_write") == layers and counts.get("rms_norm") == 1


def test_raw_traced_graph_without_fuse_norm(tmp_path_factory):
    """fuse-rope alone on qwen3: the QK norms are still math, so they stay and rope fuses."""
    g, params = model_graph("qwen3", tmp_path_factory.mktemp("m"))
    g = assert_model_pass_preserves(g, params, ["fuse-rope"], atol=0, rtol=0)
    counts = g.op_counts()
    assert counts.get("rope_cache_write") == 2 and counts.get("rsqrt") == 2 * 2 + 5


def test_real_graph_in_half(tmp_path):
    from braze.frontend import load_model
    from braze.tiny import make_checkpoint
    d = make_checkpoint("qwen3", tmp_path / "q", with_tokenizer=False)
    for dt in ("bfloat16", "float16"):
        loaded = load_model(d, dtype=dt)
        params = {n: loaded.load_param(n) for n in loaded.graph.params}
        g = assert_model_pass_preserves(loaded.graph, params, ["fuse-norm", "fuse-rope"], atol=0, rtol=0)
        assert g.op_counts().get("rope_cache_write") == 2


# -- partial rotary (Phi-3 / Phi-4): cat(rotation of x[..., :R], x[..., R:]) ---------------

PARTIAL_HEAD = ("graph @g(%qh: f32[T, 4, 12], %kh: f32[T, 2, 12], %cos: f32[T, 1, 8], "
                "%sin: f32[T, 1, 8]) {")
PARTIAL = PARTIAL_HEAD + """
  %q: f32[T, 4, 8] = slice(%qh) {dim=-1, end=8}
  %qp: f32[T, 4, 4] = slice(%qh) {dim=-1, start=8}""" + Q_ROPE + """
  %7: f32[T, 4, 12] = cat(%6, %qp) {dim=-1}
  %k: f32[T, 2, 8] = slice(%kh) {dim=-1, end=8}
  %kp: f32[T, 2, 4] = slice(%kh) {dim=-1, start=8}""" + K_ROPE + """
  %17: f32[T, 2, 12] = cat(%16, %kp) {dim=-1}
  return q=%7, k=%17
}
"""


def test_partial_rotary_pair_covers_the_whole_head():
    assert same_text(opt_text(PARTIAL, "fuse-rope"), PARTIAL_HEAD + """
      %7: f32[T, 4, 12], %17: f32[T, 2, 12] = rope(%qh, %kh, %cos, %sin) {style="neox", rotary_dim=8}
      return q=%7, k=%17
    }
    """)
    assert_pass_preserves(PARTIAL, ["fuse-rope"], {"T": 3}, atol=0, rtol=0)


def test_partial_rotary_with_another_tail_is_refused_but_rotation_fused():
    """The pass-through half is not x[..., R:] of the same head: the rotation alone fuses
    (rope of the slices) and --explain says why the whole head did not."""
    text = PARTIAL.replace("%qp: f32[T, 4, 4] = slice(%qh) {dim=-1, start=8}",
                           "%qp: f32[T, 4, 4] = slice(%qh) {dim=-1, start=4, end=8}")
    g, ctx = run_passes(parse_graph(text), ["fuse-rope"])
    reasons = [r.reason for r in ctx.refusals]
    assert any("pass-through half" in r for r in reasons), reasons
    assert_pass_preserves(text, ["fuse-rope"], {"T": 3}, atol=0, rtol=0)


def test_phi3_graph_fuses_partial_rotary_with_the_cache_write(tmp_path):
    g, params = model_graph("phi3", tmp_path)
    assert_model_pass_preserves(g, params, ["fuse-norm", "fuse-rope"], atol=0, rtol=0)
    writes = [n for n in g.nodes if n.op == "rope_cache_write"]
    assert len(writes) == 2 and all(n.attrs["rotary_dim"] == 12 for n in writes)
    assert "cache_write" not in g.op_counts() and "neg" not in g.op_counts()


# bfloat16, not float16: braze refuses Gemma 3 in float16 (models/registry.FLOAT16_UNSTABLE)
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_gemma3_qk_norm_scaled_in_f32_folds_into_the_rope(dtype, tmp_path_factory):
    g, params = model_graph("gemma3", tmp_path_factory.mktemp("g"), dtype=dtype)
    run_passes(g, ["canonicalize"])
    assert_model_pass_preserves(g, params, ["fuse-norm", "fuse-rope"], atol=0, rtol=0)
    writes = [n for n in g.nodes if n.op == "rope_cache_write"]
    assert len(writes) == 3 and all(len(n.operands) == 10 for n in writes)
    assert all(bool(n.attrs.get("scale_f32")) == (dtype is not None) for n in writes)
