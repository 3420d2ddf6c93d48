"""models/rope.py against transformers' own RoPE initialisers, on real config objects."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPTNeoXConfig, LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from braze.ir.errors import BrazeError
from braze.models.rope import longrope_frequencies, rope_frequencies

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
QWEN_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
DEEPSEEK_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                 "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

# yarn's correction dim for beta is 64 * ln(32768 / (2 pi beta)) / (2 ln 1e6); solve for it to equal 9.995.
BETA_AT_9_995 = 32768 / (2 * math.pi * math.exp(9.995 * 2 * math.log(1e6) / 64))


def hf_reference(config):
    rope_type = config.rope_parameters["rope_type"]
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config)
    # Llama's default ignores partial_rotary_factor; GPT-NeoX's honours it.
    if isinstance(config, GPTNeoXConfig):
        return GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
    return LlamaRotaryEmbedding.compute_default_rope_parameters(config)


def check(config, head_dim, partial_rotary_factor=1.0):
    want_freq, want_scale = hf_reference(config)
    got_freq, got_scale = rope_frequencies(
        config.rope_parameters, head_dim, config.max_position_embeddings, partial_rotary_factor
    )
    assert got_freq.dtype == torch.float32
    assert got_freq.shape == (int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0)) // 2,)
    torch.testing.assert_close(got_freq, want_freq, rtol=0, atol=0)
    assert isinstance(got_scale, float)
    assert got_scale == pytest.approx(want_scale, rel=1e-12, abs=0)


def llama(rope_scaling, head_dim=128, theta=10000.0, max_pos=4096, **kw):
    # Copy: transformers writes rope_theta etc. into the dict it is given.
    rope_scaling = dict(rope_scaling) if rope_scaling is not None else None
    return LlamaConfig(rope_scaling=rope_scaling, rope_theta=theta, head_dim=head_dim,
                       max_position_embeddings=max_pos, **kw)


CASES = {
    "default": (llama(None), 128),
    "default-theta1e6-hd64": (llama(None, head_dim=64, theta=1e6), 64),
    "linear-2": (llama({"type": "linear", "factor": 2.0}), 128),
    "linear-4-partial": (llama({"rope_type": "linear", "factor": 4.0}, head_dim=64, partial_rotary_factor=0.5), 64),
    "dynamic-2": (llama({"type": "dynamic", "factor": 2.0}, head_dim=64), 64),
    "dynamic-8": (llama({"rope_type": "dynamic", "factor": 8.0}, theta=5e5, max_pos=8192), 128),
    "llama3.1": (llama(LLAMA31, theta=500000.0, max_pos=131072), 128),
    "llama3.2-hd64": (llama({**LLAMA31, "factor": 32.0}, head_dim=64, theta=500000.0, max_pos=131072), 64),
    "llama3-no-original": (llama({k: v for k, v in LLAMA31.items() if k != "original_max_position_embeddings"},
                                 theta=500000.0, max_pos=8192), 128),
    "yarn-qwen": (llama(QWEN_YARN, theta=1e6, max_pos=131072), 128),
    "yarn-deepseek-mscale": (llama(DEEPSEEK_YARN, head_dim=64, max_pos=163840), 64),
    "yarn-mscale-differs": (llama({**DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 1.0}, head_dim=64,
                                  max_pos=163840), 64),
    "yarn-attention-factor": (llama({**QWEN_YARN, "attention_factor": 0.8, "beta_fast": 16, "beta_slow": 2},
                                    theta=1e6, max_pos=131072), 128),
    "yarn-no-truncate": (llama({**QWEN_YARN, "truncate": False}, head_dim=64, theta=150000.0, max_pos=131072), 64),
    "yarn-factor-none": (llama({**QWEN_YARN, "factor": None}, head_dim=64, theta=1e6, max_pos=131072), 64),
    "yarn-no-original": (llama({"rope_type": "yarn", "factor": 2.0}, head_dim=64, max_pos=8192), 64),
    "yarn-partial": (llama(QWEN_YARN, theta=1e6, max_pos=131072, partial_rotary_factor=0.5), 128),
    "yarn-factor-1": (llama({**QWEN_YARN, "factor": 1.0}, head_dim=64, theta=1e6, max_pos=32768), 64),
    # small theta, long original context: the ramp's upper end is clamped to dim - 1
    "yarn-high-clamped": (llama({**QWEN_YARN, "original_max_position_embeddings": 131072}, head_dim=64,
                                max_pos=524288), 64),
    # beta_fast == beta_slow without truncation: a zero-width ramp, which HF widens by 0.001
    "yarn-equal-betas": (llama({**QWEN_YARN, "beta_fast": 8, "beta_slow": 8, "truncate": False}, head_dim=64,
                               theta=1e6, max_pos=131072), 64),
    # ... with the ramp's start 0.005 below index 10, so the 0.001 width shows in the result
    "yarn-ramp-width": (llama({**QWEN_YARN, "truncate": False, "beta_fast": BETA_AT_9_995, "beta_slow": BETA_AT_9_995},
                              head_dim=64, theta=1e6, max_pos=131072), 64),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_transformers(name):
    config, head_dim = CASES[name]
    check(config, head_dim)


def test_default_partial_rotary_factor():
    config = GPTNeoXConfig(hidden_size=512, num_attention_heads=4, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    check(config, head_dim=128)
    # The same, with the factor passed as an argument instead of inside the dict.
    got, _ = rope_frequencies({"rope_theta": 10000.0}, 128, 2048, partial_rotary_factor=0.5)
    torch.testing.assert_close(got, hf_reference(config)[0], rtol=0, atol=0)


def phi(rope, original=4096, max_pos=131072, head_dim=96, partial=0.75):
    n = int(head_dim * partial) // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, **rope,
            "short_factor": [1.0 + 0.05 * i for i in range(n)],
            "long_factor": [1.0 + 1.5 * i for i in range(n)]}
    return Phi3Config(hidden_size=head_dim * 4, num_attention_heads=4, partial_rotary_factor=partial,
                      max_position_embeddings=max_pos, original_max_position_embeddings=original,
                      rope_parameters=rope)


@pytest.mark.parametrize("config", [
    phi({}),                                                         # Phi-4-mini: factor implied
    phi({"factor": 8.0}, partial=1.0, head_dim=64),                  # Phi-3-mini-128k shape
    phi({"attention_factor": 1.3}, original=8192),
    phi({}, original=131072),                                        # no extension: scale 1
])
def test_longrope_matches_transformers(config):
    """Both frequency sets and the cos/sin scale equal HF's: short at initialisation, long
    for a sequence past original_max_position_embeddings."""
    rope, head_dim = config.rope_parameters, config.hidden_size // 4
    original = rope["original_max_position_embeddings"]
    short, long, scale, got_original = longrope_frequencies(rope, head_dim, config.max_position_embeddings)
    want_short, want_scale = ROPE_INIT_FUNCTIONS["longrope"](config)
    want_long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, seq_len=original + 1)
    torch.testing.assert_close(short, want_short, rtol=0, atol=0)
    torch.testing.assert_close(long, want_long, rtol=0, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12) and got_original == original
    check(config, head_dim)


def test_longrope_factor_list_of_wrong_length_names_it():
    rope = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 64,
            "short_factor": [1.0] * 3, "long_factor": [1.0] * 4}
    with pytest.raises(BrazeError, match="short_factor.*3 entries.*needs 4"):
        longrope_frequencies(rope, 8, 256)


def test_legacy_rope_scaling_dict():
    config = llama(LLAMA31, theta=500000.0, max_pos=131072)
    legacy = {**{k: v for k, v in LLAMA31.items() if k != "rope_type"}, "type": "llama3", "rope_theta": 500000.0}
    got, scale = rope_frequencies(legacy, 128, 131072)
    torch.testing.assert_close(got, hf_reference(config)[0], rtol=0, atol=0)
    assert scale == 1.0


@pytest.mark.parametrize("factor, partial, head_dim", [(1.0, 0.25, 512), (1.0, 0.25, 32),
                                                      (2.0, 0.5, 64), (1.0, 1.0, 16)])
def test_proportional_matches_transformers(factor, partial, head_dim):
    """Gemma 4's global-layer RoPE: exponents over the whole head, zero frequencies past the
    rotated fraction, bit for bit what transformers computes."""
    from transformers import Gemma4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": partial,
            "factor": factor}
    cfg = Gemma4TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                           global_head_dim=head_dim,
                           rope_parameters={"full_attention": rope,
                                            "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": 1e4}})
    want, want_scale = ROPE_INIT_FUNCTIONS["proportional"](cfg, None, layer_type="full_attention")
    got, scale = rope_frequencies(rope, head_dim, 4096)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.shape == (head_dim // 2,) and (got[int(partial * head_dim // 2):] == 0).all()
    assert scale == want_scale == 1.0


@pytest.mark.parametrize("rope_type", ["mrope", "axial"])
def test_unsupported_type_names_it(rope_type):
    with pytest.raises(BrazeError, match=rope_type) as info:
        rope_frequencies({"rope_type": rope_type, "rope_theta": 1e4, "factor": 2.0}, 64, 4096)
    assert "llama3" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("rope, key", [
    ({"rope_type": "linear", "rope_theta": 1e4}, "factor"),
    ({"rope_type": "dynamic", "rope_theta": 1e4}, "factor"),
    ({**LLAMA31, "rope_theta": 1e4, "high_freq_factor": None}, "high_freq_factor"),
    ({"rope_type": "default"}, "rope_theta"),
])
def test_missing_key_names_it(rope, key):
    with pytest.raises(BrazeError, match=key):
        rope_frequencies(rope, 64, 4096)


def test_conflicting_partial_rotary_factor():
    with pytest.raises(BrazeError, match="partial_rotary_factor"):
        rope_frequencies({"rope_theta": 1e4, "partial_rotary_factor": 0.25}, 64, 4096, partial_rotary_factor=0.5)


@settings(max_examples=60, deadline=None)
@given(
    rope_type=st.sampled_from(["linear", "llama3"]),
    theta=st.floats(100.0, 1e7),
    factor=st.floats(1.0, 64.0),
    head_dim=st.integers(4, 128).map(lambda n: 2 * n),
    low=st.floats(0.5, 4.0),
    gap=st.floats(0.5, 8.0),
    original=st.sampled_from([2048, 4096, 8192, 32768]),
)
def test_property_linear_llama3(rope_type, theta, factor, head_dim, low, gap, original):
    rope = {"rope_type": rope_type, "factor": factor}
    if rope_type == "llama3":
        rope |= {"low_freq_factor": low, "high_freq_factor": low + gap, "original_max_position_embeddings": original}
    check(llama(rope, head_dim=head_dim, theta=theta, max_pos=4 * original), head_dim)
