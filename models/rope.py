"""RoPE inverse frequencies and attention scaling from a Hugging Face config.

Mirrors `transformers.modeling_rope_utils` (transformers 5) bit for bit, without
importing it: float32 tensors, int64 `arange`, the same order of operations.

Supported `rope_type`s:
  default  inv_freq[i] = 1 / theta ** (2i / d), d = int(head_dim * partial_rotary_factor).
  linear   default / factor: positions are interpolated by `factor` (Kaiokendev).
  dynamic  NTK-aware: theta is enlarged from `factor`; at initialisation (seq_len =
           max_position_embeddings) that is the frequency set HF builds; HF grows it later
           in forward, which is not modelled here.
  llama3   Llama 3.1: low frequencies (wavelength > orig/low_freq_factor) are divided by
           `factor`, high ones (wavelength < orig/high_freq_factor) kept, the rest blended.
  yarn     YaRN: per-dimension blend of extrapolated and interpolated (/ factor) frequencies
           via a linear ramp set by beta_fast/beta_slow, plus an attention (cos/sin) scale.
  longrope Phi-3 / Phi-4: inv_freq[i] = 1 / (ext[i] * theta ** (2i / d)) with ext the
           `short_factor` list, or `long_factor` (`longrope_frequencies` returns both; an
           artifact compiled for sequences longer than original_max_position_embeddings
           uses the long set at every position, as vLLM: models/registry.py
           longrope_uses_long), plus an attention (cos/sin) scale
           sqrt(1 + ln(factor) / ln(original)), factor = max_position_embeddings / original.
  proportional  Gemma 4's global layers: the whole head rotates (rotate-half over head_dim),
           the first a = int(partial_rotary_factor * head_dim // 2) frequency pairs are
           1 / theta ** (2i / head_dim) (exponents over the WHOLE head, hence "proportional")
           and the other head_dim / 2 - a are 0 (cos 1, sin 0: passed through); / factor.
"""

import math

import torch

from braze.ir.errors import BrazeError

SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "proportional")


def rope_frequencies(
    rope: dict, head_dim: int, max_position_embeddings: int, partial_rotary_factor: float = 1.0
) -> tuple[torch.Tensor, float]:
    """returns (inv_freq float32 tensor of shape [rotary_dim // 2], attention_scaling float)

    `rope` is `config.rope_parameters`, or a legacy `rope_scaling` dict merged with
    `rope_theta`. A `partial_rotary_factor` inside `rope` is used when the argument is left
    at 1.0; the two may not disagree otherwise.
    """
    rope = dict(rope or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in SUPPORTED:
        raise BrazeError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(SUPPORTED)}")
    _check_numbers(rope)

    def need(key):
        if rope.get(key) is None:
            raise BrazeError(f"RoPE type {rope_type!r} needs {key!r} in rope_parameters")
        return rope[key]

    base = need("rope_theta")
    in_dict = rope.get("partial_rotary_factor")
    if in_dict is not None and partial_rotary_factor != 1.0 and in_dict != partial_rotary_factor:
        raise BrazeError(
            f"partial_rotary_factor {partial_rotary_factor} disagrees with rope_parameters' {in_dict}"
        )
    partial = in_dict if in_dict is not None else partial_rotary_factor
    if rope_type == "proportional":
        angles = int(partial * head_dim // 2)
        exps = torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim
        inv_freq = torch.cat((1.0 / (base ** exps), torch.zeros(head_dim // 2 - angles)))
        return inv_freq / rope.get("factor", 1.0), 1.0
    dim = int(head_dim * partial)
    # HF's standardisation fills this in with max_position_embeddings for llama3/yarn.
    original = rope.get("original_max_position_embeddings") or max_position_embeddings

    def inv_freq_for(theta):
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    if rope_type == "default":
        return inv_freq_for(base), 1.0

    if rope_type == "longrope":
        inv_freq, _, attention = _longrope(rope, need, base, dim, max_position_embeddings)
        return inv_freq, attention

    if rope_type == "linear":
        return inv_freq_for(base) / need("factor"), 1.0

    if rope_type == "dynamic":
        factor, seq_len = need("factor"), max_position_embeddings
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return inv_freq_for(base), 1.0

    if rope_type == "llama3":
        factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        inv_freq = inv_freq_for(base)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(is_medium, smoothed, scaled), 1.0

    # yarn
    factor = rope.get("factor")
    if factor is None:  # DeepSeek-V3 style: implied by the context extension
        factor = max_position_embeddings / original

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32  # `or`, like HF: 0 also means the default
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)  # HF clamps to dim - 1, not dim // 2 - 1
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


NUMBERS = ("rope_theta", "factor", "attention_factor", "mscale", "mscale_all_dim", "beta_fast",
           "beta_slow", "low_freq_factor", "high_freq_factor",
           "original_max_position_embeddings", "partial_rotary_factor")


def _check_numbers(rope: dict) -> None:
    """transformers validates which keys rope_parameters has, not their types."""
    for key in NUMBERS:
        v = rope.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise BrazeError(f"config.json rope_parameters {key!r} is {v!r}, not a number")


def longrope_frequencies(rope: dict, head_dim: int, max_position_embeddings: int
                         ) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """longrope's (short inv_freq, long inv_freq, attention_scaling, original_max_position_embeddings).

    transformers picks the long set for a whole forward call once its longest position
    passes `original`. braze picks one set per artifact (models/registry.longrope_uses_long,
    vLLM's rule), so a query and every cached key it reads rotate alike: the same as
    transformers for any sequence within `original` (short set) or any forward call that
    passes it (long set).
    """
    rope = dict(rope or {})
    _check_numbers(rope)

    def need(key):
        if rope.get(key) is None:
            raise BrazeError(f"RoPE type 'longrope' needs {key!r} in rope_parameters")
        return rope[key]

    dim = int(head_dim * (rope.get("partial_rotary_factor") or 1.0))
    short, long, attention = _longrope(rope, need, need("rope_theta"), dim, max_position_embeddings)
    return short, long, attention, int(need("original_max_position_embeddings"))


def _longrope(rope, need, base, dim, max_position_embeddings):
    original = need("original_max_position_embeddings")
    factor = rope.get("factor")
    if factor is None:   # Phi-3: implied by the context extension, as in HF
        factor = max_position_embeddings / original
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    sets = []
    for key in ("short_factor", "long_factor"):
        ext = need(key)
        if len(ext) != dim // 2:
            raise BrazeError(f"rope_parameters {key!r} has {len(ext)} entries; the rotary "
                             f"dimension {dim} needs {dim // 2}")
        sets.append(1.0 / (torch.tensor(ext, dtype=torch.float32) * base ** shape))
    return sets[0], sets[1], float(attention)


def context_limit(rope: dict, max_position_embeddings: int) -> tuple[int, str]:
    """The longest sequence a model with `rope` serves, and what sets it (for an error).

    vLLM's rule: YaRN extends the original_max_position_embeddings it was trained on by
    `factor`, linear scaling extends max_position_embeddings by `factor` (both fixed
    frequencies, equal to transformers' at every position); every other type stops at
    max_position_embeddings (dynamic NTK too: transformers recomputes its frequencies
    past it, which fixed ones cannot follow)."""
    rope = rope or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    factor = rope.get("factor")
    if kind == "yarn" and factor and rope.get("original_max_position_embeddings"):
        original = rope["original_max_position_embeddings"]
        limit = int(original * factor)
        if limit > max_position_embeddings:
            return limit, (f"its YaRN RoPE's original_max_position_embeddings {original} "
                           f"x factor {factor:g}")
    if kind == "linear" and factor and factor > 1:
        return (int(max_position_embeddings * factor),
                f"max_position_embeddings {max_position_embeddings} x its linear RoPE "
                f"factor {factor:g}")
    why = f"max_position_embeddings {max_position_embeddings}"
    if kind == "dynamic":
        why += (" (dynamic NTK RoPE: transformers recomputes its frequencies past it, which "
                "an artifact's fixed ones cannot follow)")
    return max_position_embeddings, why
