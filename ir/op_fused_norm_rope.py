"""Fused RMSNorm and RoPE ops: what `fuse-norm` and `fuse-rope` produce.

Each reference implementation is the model's own torch math (models/layers.py)
in the same order with the same casts, so a fused graph is bit-identical to the
unfused one on the reference interpreter in every dtype; kernels are checked
against these.

    rms_norm(x, w) {eps}                  w * (x.f32 * rsqrt(mean(x.f32^2, -1) + eps)).to(x.dtype)
    rms_norm(x, w) {eps, scale_f32=true}  (w * (x.f32 * rsqrt(mean(x.f32^2, -1) + eps))).to(x.dtype)
                                          (Gemma: scaled in f32, then the one cast; w is the
                                          compile-time 1 + w.f32)
    add_rms_norm(a, b, w) {eps}           -> (rms_norm(a + b, w), a + b)
    rope(q, k, cos, sin, q_w?, k_w?) {style, eps}     -> (q', k')
    rope1(x, cos, sin, w?) {style, eps}               -> x'       (one tensor rotated alone)
    rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, q_w?, k_w?) {style, eps}
                                          -> q'; writes k' and v at each token's slot

where x' = x * cos + rotate(x) * sin, with x first replaced by rms_norm(x, w)
{eps, scale_f32} when the (per-head QK-norm) weight is given. `style` is
    "neox"  rotate-half:  cat(-x[..., h:], x[..., :h])            h = head_dim / 2
    "gptj"  interleaved:  stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2)
q/k/x are [T, heads, head_dim]; cos/sin [T, 1, head_dim]; norm weights [head_dim].
With `rotary_dim` R (0: the whole head) only x[..., :R] rotates, by cos/sin [T, 1, R], and
x[..., R:] passes through (partial rotary: Phi-3, Phi-4); no QK-norm weights then.
The two QK-norm weights come together or not at all (optional operands are positional).
"""

from __future__ import annotations

import torch

from .errors import BrazeError
from .op_attention import _cache_write, _cache_write_infer
from .ops import REQUIRED, OpDef, register
from .types import TensorType, dims_equal, dtype_name, is_float, torch_dtype

STYLES = ("neox", "gptj")


def _promote(*dtypes: str) -> str:
    out = torch_dtype(dtypes[0])
    for d in dtypes[1:]:
        out = torch.promote_types(out, torch_dtype(d))
    return dtype_name(out)


# -- reference math ------------------------------------------------------------------------

def rms_norm_ref(x, w, eps, scale_f32=False):
    """models/layers.py RMSNorm (GemmaRMSNorm with scale_f32), op for op (the cast back is
    to x's own dtype)."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    if scale_f32:
        return (h * w).to(x.dtype)
    return w * h.to(x.dtype)


def rotate(x, style):
    if style == "neox":
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def rope_ref(x, cos, sin, w, style, eps, rotary_dim=0, scale_f32=False):
    if w is not None:
        x = rms_norm_ref(x, w, eps, scale_f32)
    if rotary_dim and rotary_dim < x.shape[-1]:
        x_rot = x[..., :rotary_dim]
        out = (x_rot * cos) + (rotate(x_rot, style) * sin)
        return torch.cat((out, x[..., rotary_dim:]), dim=-1)
    return (x * cos) + (rotate(x, style) * sin)


# -- inference -----------------------------------------------------------------------------

def _norm_type(op, x: TensorType, w: TensorType, scale_f32=False) -> TensorType:
    if x.rank < 1 or not is_float(x.dtype) or not is_float(w.dtype):
        raise BrazeError(f"{op}: x {x} and weight {w} must be floating point, x of rank >= 1")
    if w.rank != 1 or not dims_equal(w.shape[0], x.shape[-1]):
        raise BrazeError(f"{op}: weight {w} must be 1-D of the last dim of x {x}")
    return TensorType(x.shape, x.dtype if scale_f32 else _promote(w.dtype, x.dtype))


def _check_eps(op, attrs, needed):
    eps = attrs["eps"]
    if needed and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        raise BrazeError(f"{op}: eps must be a number, got {eps!r}")
    if not needed and eps is not None:
        raise BrazeError(f"{op}: eps={eps!r} given without norm weights")


def _gathered(op, x: TensorType, rows) -> TensorType:
    """x's type, or with `rows` (an index of x's rows: the norm reads only those, in that
    order) its type with that many rows; x must then be [N, D]."""
    if rows is None:
        return x
    if x.rank != 2 or rows.rank != 1 or rows.dtype not in ("i64", "i32"):
        raise BrazeError(f"{op}: rows {rows} must be a 1-D integer index of a 2-D input, "
                         f"got {x}")
    return x.with_shape((rows.shape[0], x.shape[1]))


def _rms_norm_infer(types, attrs):
    x, w, *rows = types
    _check_eps("rms_norm", attrs, True)
    return [_norm_type("rms_norm", _gathered("rms_norm", x, rows[0] if rows else None), w,
                       attrs["scale_f32"])]


def _add_rms_norm_infer(types, attrs):
    a, b, w, *rows = types
    _check_eps("add_rms_norm", attrs, True)
    if a.rank != b.rank or not all(dims_equal(x, y) for x, y in zip(a.shape, b.shape)):
        raise BrazeError(f"add_rms_norm: a {a} and b {b} must have one shape")
    s = TensorType(_gathered("add_rms_norm", a, rows[0] if rows else None).shape,
                   _promote(a.dtype, b.dtype))
    return [_norm_type("add_rms_norm", s, w, attrs["scale_f32"]), s]


def _rope_type(op, x: TensorType, cos: TensorType, sin: TensorType, w, attrs) -> TensorType:
    if attrs["style"] not in STYLES:
        raise BrazeError(f"{op}: style must be one of {STYLES}, got {attrs['style']!r}")
    if x.rank != 3 or not is_float(x.dtype):
        raise BrazeError(f"{op}: {x} must be a floating [T, heads, head_dim] tensor")
    d = x.shape[2]
    if not isinstance(d, int) or d % 2:
        raise BrazeError(f"{op}: head_dim of {x} must be a concrete even number")
    rd = attrs.get("rotary_dim") or 0
    if rd:
        if not isinstance(rd, int) or rd % 2 or not 0 < rd <= d:
            raise BrazeError(f"{op}: rotary_dim={rd!r} must be an even number in (0, {d}]")
        if w is not None:
            raise BrazeError(f"{op}: QK-norm weights with a partial rotary_dim are not supported")
        d = rd
    for t in (cos, sin):
        if t.rank != 3 or not is_float(t.dtype) or not (
                dims_equal(t.shape[0], x.shape[0]) and t.shape[1] == 1 and t.shape[2] == d):
            raise BrazeError(f"{op}: cos/sin {t} must be [{x.shape[0]}, 1, {d}] to rotate {x}")
    if w is not None:
        x = _norm_type(op, x, w, attrs.get("scale_f32", False))
    return TensorType(x.shape, _promote(_promote(x.dtype, cos.dtype), _promote(x.dtype, sin.dtype)))


def _split_weights(op, ws, attrs):
    if len(ws) not in (0, 2):
        raise BrazeError(f"{op}: give both QK-norm weights or neither, got {len(ws)}")
    _check_eps(op, attrs, bool(ws))
    return ws if ws else [None, None]


def _pair_types(op, q, k, cos, sin, ws, attrs):
    qw, kw = _split_weights(op, ws, attrs)
    if q.rank == 3 and k.rank == 3 and not (
            dims_equal(q.shape[0], k.shape[0]) and q.shape[2] == k.shape[2]):
        raise BrazeError(f"{op}: q {q} and k {k} differ in tokens or head_dim")
    return _rope_type(op, q, cos, sin, qw, attrs), _rope_type(op, k, cos, sin, kw, attrs)


def _rope_infer(types, attrs):
    q, k, cos, sin, *ws = types
    return list(_pair_types("rope", q, k, cos, sin, ws, attrs))


def _rope1_infer(types, attrs):
    x, cos, sin, *ws = types
    _check_eps("rope1", attrs, bool(ws))
    return [_rope_type("rope1", x, cos, sin, ws[0] if ws else None, attrs)]


def _rope_cache_write_infer(types, attrs):
    q, k, v, cos, sin, k_cache, v_cache, slots, *ws = types
    q_out, k_out = _pair_types("rope_cache_write", q, k, cos, sin, ws, attrs)
    _cache_write_infer([k_out, v, k_cache, v_cache, slots], {})
    return [q_out]


# -- implementations -----------------------------------------------------------------------

def _rope(q, k, cos, sin, q_w=None, k_w=None, *, style, eps, rotary_dim=0, scale_f32=False):
    return (rope_ref(q, cos, sin, q_w, style, eps, rotary_dim, scale_f32),
            rope_ref(k, cos, sin, k_w, style, eps, rotary_dim, scale_f32))


def _rope1(x, cos, sin, w=None, *, style, eps, rotary_dim=0, scale_f32=False):
    return rope_ref(x, cos, sin, w, style, eps, rotary_dim, scale_f32)


def _rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, q_w=None, k_w=None, *,
                      style, eps, rotary_dim=0, scale_f32=False):
    q_out, k_out = _rope(q, k, cos, sin, q_w, k_w, style=style, eps=eps, rotary_dim=rotary_dim,
                         scale_f32=scale_f32)
    _cache_write(k_out, v, k_cache, v_cache, slot_mapping)
    return (q_out,)


_ROPE_ATTRS = {"style": REQUIRED, "eps": None, "rotary_dim": 0, "scale_f32": False}

def _rms_norm(x, w, rows=None, *, eps, scale_f32=False):
    return rms_norm_ref(x if rows is None else x.index_select(0, rows), w, eps, scale_f32)


register(OpDef("rms_norm", ("x", "w", "rows?"), _rms_norm_infer, _rms_norm,
               attrs={"eps": REQUIRED, "scale_f32": False}, last_dim_rowwise=True,
               doc="w * (x.float() * rsqrt(mean(x.float()^2, -1, keepdim) + eps)).to(x.dtype); "
                   "scale_f32: (w * x.float() * rsqrt(..)).to(x.dtype), Gemma's order; with "
                   "rows, of x's rows at those indices only (prune-logits)"))
def _add_rms_norm(a, b, w, rows=None, *, eps, scale_f32=False):
    if rows is not None:
        a, b = a.index_select(0, rows), b.index_select(0, rows)
    s = a + b
    return rms_norm_ref(s, w, eps, scale_f32), s


register(OpDef("add_rms_norm", ("a", "b", "w", "rows?"), _add_rms_norm_infer, _add_rms_norm,
               attrs={"eps": REQUIRED, "scale_f32": False}, last_dim_rowwise=True,
               doc="s = a + b (the residual stream); returns (rms_norm(s, w) {eps, scale_f32}, s); "
                   "with rows, of a's and b's rows at those indices only (prune-logits)"))
register(OpDef("rope", ("q", "k", "cos", "sin", "q_norm_w?", "k_norm_w?"), _rope_infer, _rope,
               attrs=dict(_ROPE_ATTRS),
               doc="(q * cos + rotate(q) * sin, k * cos + rotate(k) * sin); with the norm "
                   "weights q, k are first rms_norm(., w) {eps}; rotate per `style` (neox|gptj)"))
register(OpDef("rope1", ("x", "cos", "sin", "norm_w?"), _rope1_infer, _rope1,
               attrs=dict(_ROPE_ATTRS),
               doc="`rope` of one tensor (only q or only k rotated): x * cos + rotate(x) * sin"))
register(OpDef("rope_cache_write",
               ("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "slot_mapping",
                "q_norm_w?", "k_norm_w?"),
               _rope_cache_write_infer, _rope_cache_write, attrs=dict(_ROPE_ATTRS), writes=(5, 6),
               doc="`rope` of q and k, then cache_write(k', v, k_cache, v_cache, slot_mapping) "
                   "(slot -1 skipped); returns q'"))
