"""Write tiny GGUF files the way llama.cpp's convert_hf_to_gguf.py does, for the GGUF tests.

No GGUF can be downloaded here, so the tests build a tiny random transformers model,
and write it with gguf's own writer: llama.cpp's metadata keys and tensor names
(`blk.N.attn_q.weight`, ...), its Q/K row permutation for llama, 1-D tensors kept in
F32, and the matrices in the quant type asked for. gguf's Python quantizer has no
K-quants (Q4_K, Q6_K), so those are written as random blocks (any bytes are a valid
block once the f16 scales are finite): both braze and transformers must read the same
values from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SPM_PIECES = ["▁", "▁t", "he", "▁the", "▁a", "in", "er", "▁s", "on", "▁w", "at", "en",
              "re", "▁o", "it", "▁b", "an", "or", "ll", "▁c", "▁f", "▁m", "is", "ar"]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '[' + message['role'] + '] ' + "
    "message['content'] + '\n' }}{% endfor %}")


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Q and K (interleaved rotary pairs), as its converter writes."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def spm_vocab(size: int):
    """A SentencePiece-style (llama) vocabulary: <unk> <s> </s>, 256 byte tokens, pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = SPM_PIECES + [f"▁w{i}" for i in range(size)]
    for p in pieces[:size - len(tokens)]:
        tokens.append(p)
        types.append(1)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def bpe_vocab(size: int):
    """A byte-level BPE (gpt2/qwen2 style) vocabulary and merges, from braze's tiny tokenizer
    (trained on a short English text) with Qwen's three control tokens at the end."""
    import tempfile

    from braze.tiny import make_tokenizer
    with tempfile.TemporaryDirectory() as d:
        make_tokenizer(d, vocab_size=size - 3)
        data = json.loads((Path(d) / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in ("<pad>", "<s>", "</s>") else 1 for t in tokens]
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        tokens.append(t)
        types.append(3)
    while len(tokens) < size:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(4)
    return tokens, merges, types


def tiny_hf_model(arch: str, vocab_size: int, seed: int = 0, **overrides):
    """A tiny transformers Llama, Qwen2, Qwen3, Phi-3, Mixtral or Qwen3-MoE with random
    weights (fp32, eval)."""
    import transformers as tf
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False)
    common.update(overrides)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "qwen2":                    # q/k/v biases, none on o_proj
        cfg = tf.Qwen2Config(**common)
    elif arch == "qwen3":
        common.setdefault("head_dim", 128)     # transformers reads no head_dim from a qwen3 GGUF
        cfg = tf.Qwen3Config(**common)
    elif arch == "phi3":                     # fused qkv_proj and gate_up_proj tensors
        cfg = tf.Phi3Config(**{"pad_token_id": None, **common})
    elif arch == "gemma3":                   # (1 + w) norms, sliding and global layers
        common.pop("rope_theta")             # its own two: 10000 local, 1e6 global
        cfg = tf.Gemma3TextConfig(**{**common, "head_dim": 16, "query_pre_attn_scalar": 16,
                                     "sliding_window": 4, "num_hidden_layers": 6,
                                     "tie_word_embeddings": True, **overrides})
    elif arch == "mixtral":                  # written by llama.cpp as a llama with experts
        cfg = tf.MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **common})
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**{"num_experts": 4, "num_experts_per_tok": 2,
                                   "moe_intermediate_size": 64, "head_dim": 16,
                                   "norm_topk_prob": True, **common})
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return model


# no Python quantizer in gguf; all but the K-quants (and Q8_1, for the error test) hold
# their f16 scale d in the first two bytes of a block
RANDOM_BLOCK_TYPES = ("Q4_K", "Q6_K", "IQ1_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
                      "IQ3_S", "IQ4_NL", "IQ4_XS", "Q8_1")


def _encode(arr: np.ndarray, qtype, rng: np.random.Generator):
    """(data, raw_dtype) for GGUFWriter.add_tensor; K- and I-quants as random blocks whose
    f16 scales are small and finite."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    if qtype == Q.F32:
        return arr.astype(np.float32), None
    if qtype == Q.F16:
        return arr.astype(np.float16), None
    if qtype.name in RANDOM_BLOCK_TYPES:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        lead, cols = arr.shape[:-1], arr.shape[-1]
        rows = int(np.prod(lead))
        raw = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
        scale = np.full((rows, cols // block), 0.002, np.float16).view(np.uint8)
        scale = scale.reshape(rows, cols // block, 2)
        if qtype == Q.Q4_K:                  # d, dmin: the first four bytes
            raw[..., 0:2] = scale
            raw[..., 2:4] = scale
        elif qtype == Q.Q6_K:                # d: the last two bytes
            raw[..., type_size - 2:] = scale
        else:                                # the I-quants (and Q8_1): d first
            raw[..., 0:2] = scale
        return raw.reshape(*lead, -1), qtype
    return gguf.quants.quantize(arr.astype(np.float32), qtype), qtype


# the llama.cpp architecture of a transformers model type, where the names differ
GGUF_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}


def _split_experts(state_dict):
    """(name, tensor) as llama.cpp's converter sees them: transformers' fused experts
    `gate_up_proj` (experts x 2*inter x hidden) as separate gate and up projections."""
    for name, t in state_dict.items():
        if name.endswith(".experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            yield name.replace("gate_up_proj", "gate_proj"), gate
            yield name.replace("gate_up_proj", "up_proj"), up
        else:
            yield name, t


def write_gguf(model, path, qtype="F32", tokenizer: str = "bpe", arch: str | None = None,
               vocab=None, extra_kv=None, seed: int = 0, tensor_types=None, rope_freqs=None,
               name: str | None = None, eos: str = "<|im_end|>",
               bos: str = "<|endoftext|>", file_type: str | None = None,
               split_max_tensors: int = 0) -> Path:
    """Write `model` (a transformers Llama/Qwen3) to `path` as llama.cpp would.

    `qtype`: GGMLQuantizationType names, comma-separated: the 2-D weights take them in
    turn (a mixed file, like llama.cpp's Q4_K_M); a weight whose rows do not fit the
    block size, and every 1-D tensor (norms), stays F32. `tensor_types` names the type of single
    tensors; `arch` overrides general.architecture (for the error tests); `rope_freqs`
    adds Llama 3's frequency-divisor tensor; `eos` and `bos` name a BPE vocabulary's
    end and begin tokens (Qwen's by default); `file_type` the llama.cpp name of the mix
    (general.file_type: "MOSTLY_Q4_K_M"; by default the first of `qtype`);
    `split_max_tensors` splits the file as llama-gguf-split does (path-00001-of-0000N.gguf:
    the metadata in the first part only, every part holding split.no/count).
    Returns the path of the file, or of the first part of a split one."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    cfg = model.config
    family = GGUF_ARCH.get(cfg.model_type, cfg.model_type)
    arch = arch or family
    cycle = [Q[q] for q in qtype.split(",")]
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name(name or f"tiny-{family}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    if family == "gemma3":                    # llama.cpp keeps the global layers' RoPE
        rope = rope["full_attention"]
        w.add_sliding_window(cfg.sliding_window)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if family in ("llama", "phi3"):
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type") == "longrope":  # as convert_hf_to_gguf.py's Phi3MiniModel
        orig = rope["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
    w.add_vocab_size(cfg.vocab_size)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if getattr(cfg, "moe_intermediate_size", None):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    first, known = qtype.split(",")[0], gguf.LlamaFileType.__members__
    file_type = file_type or next((n for n in (f"MOSTLY_{first}", f"MOSTLY_{first}_M")
                                   if n in known), "ALL_F32")
    w.add_file_type(int(known[file_type]))
    if tokenizer is None:
        pass
    elif tokenizer == "spm":
        tokens, scores, types = vocab or spm_vocab(cfg.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_chat_template(LLAMA_CHAT_TEMPLATE)
    else:
        tokens, merges, types = vocab or bpe_vocab(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(tokens.index(eos))
        w.add_pad_token_id(tokens.index(bos))
        w.add_bos_token_id(tokens.index(bos))
        w.add_add_bos_token(False)
        w.add_chat_template(QWEN_CHAT_TEMPLATE)
    for k, v in (extra_kv or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.upper()], cfg.num_hidden_layers)
    rng = np.random.default_rng(seed)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    k = 0
    for hf_name, t in _split_experts(model.state_dict()):
        base, suffix = hf_name.rsplit(".", 1)
        if ".experts." in hf_name:             # blk.N.ffn_gate_exps.weight: experts stacked
            name = names.get_name(hf_name) + ".weight"
        else:
            name = names.get_name(base) + "." + suffix
        arr = t.detach().float().numpy()
        if family == "gemma3" and name.endswith("norm.weight"):
            arr = arr + 1.0                      # llama.cpp stores Gemma's norms as 1 + w
        if family == "llama" and name.endswith("attn_q.weight"):
            arr = llama_permute(arr, cfg.num_attention_heads)
        elif family == "llama" and name.endswith("attn_k.weight"):
            arr = llama_permute(arr, cfg.num_key_value_heads)
        qt = Q[tensor_types[name]] if name in (tensor_types or {}) else cycle[k % len(cycle)]
        if arr.ndim == 1 or arr.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
        else:
            k += 1
            data, raw = _encode(np.ascontiguousarray(arr), qt, rng)
            w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))[0]
    return path


def hf_from_gguf(path):
    """transformers' own reading of a GGUF file: the model (fp32, eval) and tokenizer."""
    import contextlib
    import io

    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, tok


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3's `rope_freqs` tensor, computed as llama.cpp's converter does
    (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors)."""
    import math
    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
