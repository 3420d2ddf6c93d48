"""A tiny Gemma 4 target and its assistant model (`Gemma4AssistantForCausalLM`), random
weights saved with transformers' own save_pretrained: for tests/test_gemma4_assistant.py
and benchmarks. The target is braze/tiny.py's Gemma 4 (sliding and full layers, KV
sharing, PLE, MoE); the assistant has its own hidden size, two sliding layers and a
full one, every layer reading the target's KV (transformers makes them all shared)."""

from __future__ import annotations

import contextlib
import io
import pathlib

import torch


def has_gemma4_assistant() -> bool:
    try:
        from transformers import Gemma4AssistantForCausalLM  # noqa: F401
    except ImportError:
        return False
    return True


def assistant_config(target_dir, **overrides):
    """Gemma4AssistantConfig for the target in `target_dir` (its hidden size, vocabulary,
    head shapes and sliding window)."""
    import json
    import transformers as tf
    t = json.loads((pathlib.Path(target_dir) / "config.json").read_text())
    same = ("vocab_size", "num_key_value_heads", "head_dim", "attention_k_eq_v", "sliding_window",
            "max_position_embeddings", "rms_norm_eps", "rope_parameters", "bos_token_id",
            "eos_token_id", "pad_token_id")
    full = t["layer_types"].index("full_attention")      # the target's global head shape
    glob = (t.get("per_layer_config") or {}).get(str(full), {})
    text = dict({k: t[k] for k in same if k in t},
                global_head_dim=glob.get("head_dim", t["head_dim"]),
                num_global_key_value_heads=glob.get("num_key_value_heads",
                                                    t["num_key_value_heads"]),
                hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                intermediate_size=96, hidden_activation="gelu_pytorch_tanh",
                hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                tie_word_embeddings=True)
    text.update(overrides.pop("text", {}))
    return tf.Gemma4AssistantConfig(text_config=tf.Gemma4TextConfig(**text),
                                    backbone_hidden_size=t["hidden_size"], **overrides)


def make_assistant(target_dir, out_dir, seed: int = 5, **overrides) -> pathlib.Path:
    """A random assistant for the target in `target_dir`, saved in `out_dir`."""
    from transformers import Gemma4AssistantForCausalLM
    from .tiny import _init_weights
    cfg = assistant_config(target_dir, **overrides)
    torch.manual_seed(seed)
    with contextlib.redirect_stderr(io.StringIO()):
        model = Gemma4AssistantForCausalLM(cfg).to(torch.float32).eval()
    _init_weights(model, seed)
    if cfg.use_ordered_embeddings:          # a random order of the vocabulary's tokens
        g = torch.Generator().manual_seed(seed)
        model.masked_embedding.token_ordering.copy_(
            torch.randperm(cfg.get_text_config().vocab_size, generator=g))
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def make_pair(out_dir, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """(target, assistant) checkpoint directories under `out_dir`."""
    from .tiny import make_checkpoint
    out = pathlib.Path(out_dir)
    with contextlib.redirect_stderr(io.StringIO()):
        target = make_checkpoint("gemma4", out / "target", seed=seed)
    return target, make_assistant(target, out / "assistant", seed=seed + 5)


def make_guessing_pair(out_dir, seed: int = 0, mix: float = 1.0,
                       **target_overrides) -> tuple[pathlib.Path, pathlib.Path]:
    """(target, assistant) where the assistant guesses well, for acceptance and rollback
    tests: the assistant (hidden size the target's) passes the token's embedding through
    (pre_projection = [I, R/10]: the target's hidden state counts a little; its MLPs'
    down_proj zero, its attention outputs normed to a tenth: they still count) to the target's final norm and embedding as LM head: it
    predicts what the target would from the token alone. The tiny target's residual is mostly that embedding, so the guess is
    right often, not always (about 3 in 4 at k=1): accepted and rejected guesses both
    happen. `mix` < 1 scales the target's layer output norms down: more acceptance."""
    from safetensors.torch import load_file, save_file
    from .tiny import make_checkpoint
    out = pathlib.Path(out_dir)
    with contextlib.redirect_stderr(io.StringIO()):
        target = make_checkpoint("gemma4", out / "target", seed=seed, **target_overrides)
    path = target / "model.safetensors"
    w = load_file(path)
    for k in w if mix != 1.0 else ():
        if k.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight",
                       "post_per_layer_input_norm.weight")):
            w[k] = w[k] * mix
    save_file(w, path, metadata={"format": "pt"})
    h = w["model.embed_tokens.weight"].shape[1]
    assistant = make_assistant(target, out / "assistant", seed=seed + 5,
                               text={"hidden_size": h})
    apath = assistant / "model.safetensors"
    a = load_file(apath)
    for k in a:
        if k.endswith("down_proj.weight"):
            a[k] = torch.zeros_like(a[k])
        elif k.endswith("post_attention_layernorm.weight"):     # attention: a little
            a[k] = a[k] * 0.1
        elif k.endswith("layer_scalar"):
            a[k] = torch.ones_like(a[k])
    g = torch.Generator().manual_seed(seed)          # the target's h: a little too
    a["pre_projection.weight"] = torch.cat((torch.eye(h), 0.1 * torch.randn(h, h, generator=g)
                                            / h ** 0.5), 1)
    a["model.norm.weight"] = w["model.norm.weight"].clone()
    a["model.embed_tokens.weight"] = w["model.embed_tokens.weight"].clone()
    save_file(a, apath, metadata={"format": "pt"})
    return target, assistant
