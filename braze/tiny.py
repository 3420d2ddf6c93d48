"""Tiny random-weight Hugging Face checkpoints for ``braze demo`` and the tests.

Model weights can never be downloaded here, so everything is built locally:

* :func:`make_tokenizer` trains a ~256-token byte-level BPE tokenizer on a
  short embedded English text and saves it in the Hugging Face layout.
* :func:`tiny_config` returns a tiny config (hidden 64, 4 heads, 2 KV heads)
  for each supported family in :data:`FAMILIES`.
* :func:`make_checkpoint` builds the ``*ForCausalLM`` model from that config,
  fills it with deterministic random weights and ``save_pretrained``-s it
  (safetensors, optionally sharded) together with the tokenizer.

Token ids follow the Llama convention: ``<pad>`` = 0, ``<s>`` (bos) = 1,
``</s>`` (eos) = 2.  Encoding prepends ``<s>`` (like Llama tokenizers); pass
``add_special_tokens=False`` to avoid it.  The base alphabet is the 128 ASCII
bytes only (the full 256-byte alphabet would not fit a 256-token vocabulary),
so ASCII text round-trips exactly while non-ASCII characters are dropped.
"""

from __future__ import annotations

import json
import math
import pathlib

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "phi3", "gemma3",
            "gemma4", "deepseek_v3")

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 in this order
MODEL_MAX_LENGTH = 256

# A minimal chat template (BOS, "role: content" lines, then "assistant:"), so that
# `braze serve` can answer /v1/chat/completions for tiny models.  Like real templates
# it writes the BOS itself (transformers tokenizes a rendered chat without adding one).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A compiler turns a program written
in one language into another language, usually one that a machine can run. It
reads the source, builds an intermediate representation, improves it with a
series of passes, and finally emits code for the target.

Large language models predict the next token of a text from the tokens that
came before it. Each layer mixes information between positions with attention
and then transforms every position on its own with a small feed-forward network.
Serving such a model quickly means keeping the cache of keys and values on the
device, batching many requests together, and fusing small operations into
larger kernels so that memory is read as few times as possible.

Once upon a time there was a little town by the sea. Every morning the fishermen
went out in their boats, and every evening they came back with the day's catch.
The children played on the beach, the bakers made bread, and the old clock in the
square told everyone when it was time to go home. "Hello, world!" said the
robot; it was 9:45 on Monday, 12 March, and the sky was blue (mostly).
"""


def _byte_chars(limit: int = 128) -> set[str]:
    """Characters the GPT-2 byte-to-unicode table uses for bytes ``0..limit-1``."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {chars[b] for b in range(limit)}


def make_tokenizer(out_dir, vocab_size: int = 256) -> int:
    """Train and save a small byte-level BPE tokenizer; return its vocab size.

    The vocabulary is 3 special tokens + 128 ASCII bytes + BPE merges, so the
    result is at least 131 and at most ``vocab_size``.

    Writes ``tokenizer.json`` and ``tokenizer_config.json`` (with a small chat
    template, :data:`CHAT_TEMPLATE`) into ``out_dir`` so
    that both ``tokenizers.Tokenizer.from_file`` and
    ``transformers.AutoTokenizer.from_pretrained`` load it.  Deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=sorted(_byte_chars(128)),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != [PAD_ID, BOS_ID, EOS_ID]:
        raise RuntimeError("special tokens did not get ids 0, 1, 2")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.save(str(out / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok.get_vocab_size()


def tiny_llama3_rope() -> dict:
    """``rope_scaling`` dict for Llama-3 style RoPE scaling sized for tiny configs."""
    return {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }


def tiny_longrope(rotary_dim: int, original: int | None = None) -> dict:
    """``rope_parameters`` for longrope (Phi-3/Phi-4) with distinct short and long factors."""
    half = rotary_dim // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.5 + 0.75 * i for i in range(half)]}
    if original is not None:
        rope["original_max_position_embeddings"] = original
    return rope


def tiny_config(family: str, **overrides):
    """Tiny ``PretrainedConfig`` for ``family``; ``overrides`` go to the constructor."""
    import transformers as tf

    common = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        dtype="float32",
    )
    if family == "llama":
        cls, extra = tf.LlamaConfig, {}
    elif family == "mistral":
        cls, extra = tf.MistralConfig, dict(sliding_window=8)
    elif family == "qwen2":       # q/k/v biases, none on o_proj
        cls, extra = tf.Qwen2Config, dict(tie_word_embeddings=True)
    elif family == "qwen3":
        cls, extra = tf.Qwen3Config, dict(head_dim=24, tie_word_embeddings=True)
    elif family == "mixtral":
        cls, extra = tf.MixtralConfig, dict(num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2)
    elif family == "qwen3_moe":
        cls, extra = tf.Qwen3MoeConfig, dict(
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            mlp_only_layers=[1],
            decoder_sparse_step=1,
            norm_topk_prob=True,
        )
    elif family == "phi3":
        # Phi-4-mini's features: fused qkv/gate_up tensors, rope on 3/4 of each head,
        # longrope (its short factors: the original length is the whole context; the
        # tests' "phi3-longfactors" case takes the long ones), tied embeddings
        cls, extra = tf.Phi3Config, dict(partial_rotary_factor=0.75, tie_word_embeddings=True,
                                         original_max_position_embeddings=256,
                                         rope_parameters=tiny_longrope(12))
    elif family == "gemma3":
        # Gemma 3's features: (1 + w) norms, sandwich norms, q/k norms, GeLU-tanh, scaled
        # embeddings, query_pre_attn_scalar != head_dim, sliding layers (window 8 < the test
        # prompt) with their own RoPE base, a linearly scaled global RoPE, tied embeddings,
        # and a final logit soft-cap (Gemma 2's; Gemma 3 checkpoints leave it unset)
        cls, extra = tf.Gemma3TextConfig, dict(
            num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            final_logit_softcapping=30.0, architectures=["Gemma3ForCausalLM"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                "rope_theta": 1000000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    elif family == "deepseek_v3":
        # DeepSeek-V3's features: MLA with a q low-rank bottleneck, distinct nope/rope/v
        # head dims, interleaved rope, YaRN with mscale_all_dim (a softmax scale of 1.30),
        # one dense first layer then MoE with 4 groups of 2 experts (2 groups kept),
        # sigmoid routing with a correction bias, scaled and renormalised weights, and a
        # shared expert
        cls, extra = tf.DeepseekV3Config, dict(
            num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_group=4, topk_group=2,
            num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
            first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_interleave=True, num_nextn_predict_layers=0,
            architectures=["DeepseekV3ForCausalLM"],
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                             "original_max_position_embeddings": 64, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})

    elif family == "gemma4":
        # Gemma 4's text features in one model: sliding (window 8) and global layers, the
        # global ones with their own head_dim (32 vs 16), one kv head and v = k (26B/31B's
        # attention_k_eq_v), proportional partial RoPE; per-layer inputs (E2B/E4B's PLE);
        # the last 2 layers share the KV cache of layers 2 and 1 (E2B's
        # num_kv_shared_layers), with double-wide MLPs; the MoE block beside the dense
        # MLP (26B-A4B); tied embeddings and a final logit soft-cap
        cls, extra = tf.Gemma4TextConfig, dict(
            num_hidden_layers=5, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
            attention_k_eq_v=True, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                         "sliding_attention", "full_attention"],
            hidden_size_per_layer_input=8, vocab_size_per_layer_input=256,
            num_kv_shared_layers=2, use_double_wide_mlp=True, enable_moe_block=True,
            num_experts=4, top_k_experts=2, moe_intermediate_size=32,
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            final_logit_softcapping=30.0, architectures=["Gemma4ForCausalLM"])
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    kwargs = {**common, **extra, **overrides}
    # transformers 5 spells it `rope_parameters`; accept the legacy name too.
    if "rope_scaling" in kwargs:
        rope = kwargs.pop("rope_scaling")
        kwargs["rope_parameters"] = None if rope is None else dict(rope)
    return cls(**kwargs)


@torch.no_grad()
def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic re-initialisation with non-trivial outputs.

    Matrices (linear, embedding, fused experts, routers) get normal(0, 1/sqrt(fan_in))
    (fan_in = last dim; 0.125 for hidden 64) so that attention is far from uniform and
    RoPE/mask mistakes show up in the logits; RMSNorm weights get 1 + normal(0, 0.1).
    """
    gen = torch.Generator().manual_seed(seed)
    norm_params = {
        id(m.weight) for m in model.modules() if "RMSNorm" in type(m).__name__ and getattr(m, "weight", None) is not None
    }
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if id(p) in norm_params:
            p.copy_(1.0 + 0.1 * noise)
        elif p.dim() >= 2:
            p.copy_(noise / math.sqrt(p.shape[-1]))
        elif name.endswith(("router.scale", "router.per_expert_scale")):
            p.copy_(1.0 + 0.1 * noise)      # Gemma 4's router scales, ones in transformers
        else:  # biases (Qwen2's q/k/v ones): small
            p.copy_(0.02 * noise)
    for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        if name.endswith("e_score_correction_bias"):   # DeepSeek-V3: make routing depend on it
            b.copy_(0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float32))

        if name.endswith("layer_scalar"):   # Gemma 4: a saved buffer, ones in transformers
            b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def make_checkpoint(
    family: str,
    out_dir,
    seed: int = 0,
    with_tokenizer: bool = True,
    max_shard_size: str | None = None,
    **overrides,
) -> pathlib.Path:
    """Build, randomly initialise and save a tiny ``family`` checkpoint in ``out_dir``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _init_weights(model, seed)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **save_kwargs)
    if with_tokenizer:
        make_tokenizer(out, vocab_size=config.vocab_size)
    return out
