"""Tiny DeepSeek-V3 checkpoints with one complete multi-token-prediction layer, named as
DeepSeek's checkpoints name it (`model.layers.{num_hidden_layers}.*`): a random one, and
one built to guess its target well (for acceptance and rollback tests and benchmarks).
Used by the MTP tests and benchmarks/speculative.py."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file


def with_mtp_layer(src, dst, seed: int = 7, scale: float = 1.0) -> dict:
    """A copy of checkpoint `src` with one MTP layer appended: enorm, hnorm, eh_proj, a
    decoder layer shaped like the last main layer (fresh random weights), shared_head.norm,
    and the copies of the embedding and LM head DeepSeek's checkpoints keep under the
    layer (equal to the main ones). Returns the added tensors."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    weights = load_file(dst / "model.safetensors")
    n, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    p = f"model.layers.{n}."
    extra = {p + "enorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
             p + "hnorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
             p + "eh_proj.weight": torch.randn(h, 2 * h, generator=g) * (2 * h) ** -0.5,
             p + "shared_head.norm.weight": 1 + 0.1 * torch.randn(h, generator=g),
             p + "embed_tokens.weight": weights["model.embed_tokens.weight"].clone()}
    if "lm_head.weight" in weights:
        extra[p + "shared_head.head.weight"] = weights["lm_head.weight"].clone()
    last = f"model.layers.{n - 1}."
    for k, v in weights.items():
        if k.startswith(last):
            name = p + k[len(last):]
            if k.endswith("layernorm.weight"):
                extra[name] = 1 + 0.1 * torch.randn(v.shape, generator=g)
            elif k.endswith("e_score_correction_bias"):
                extra[name] = 0.1 * torch.randn(v.shape, generator=g)
            else:
                extra[name] = scale * v.std() * torch.randn(v.shape, generator=g)
    save_file({**weights, **extra}, dst / "model.safetensors", metadata={"format": "pt"})
    return extra


def guessing_mtp_checkpoint(src, dst, mix: float = 0.03):
    """An MTP layer that guesses the target well: the target's layers are scaled down
    (their outputs by `mix`), so its next token depends mostly on the current one; the
    MTP layer passes enorm(embed(t+1)) through (eh_proj = [I, 0], its decoder layer's
    output projections zero) to the LM head with the target's final norm weight: it
    predicts what the target would from token t+1 alone. Right most of the time, not
    always: accepted and rejected guesses both happen."""
    shutil.copytree(src, dst)
    w = load_file(dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    n, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    p = f"model.layers.{n}."
    for k in list(w):
        if k.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) or \
                ".down_proj." in k:
            w[k] = w[k] * (0.0 if k.startswith(p) else mix)
    w[p + "eh_proj.weight"] = torch.cat((torch.eye(h), torch.zeros(h, h)), 1)
    w[p + "enorm.weight"] = w["model.norm.weight"].clone()
    w[p + "shared_head.norm.weight"] = torch.ones(h)
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def guessing_deepseek(d, mix: float = 0.03):
    """The tiny DeepSeek-V3 checkpoint (seed 1) with a next-n layer built to guess it well
    (`guessing_mtp_checkpoint`), in directory `d` (base/, m0/, m/): -> the checkpoint."""
    import contextlib
    import io

    from braze.tiny import make_checkpoint
    with contextlib.redirect_stderr(io.StringIO()):      # the checkpoint writer's progress
        base = make_checkpoint("deepseek_v3", d / "base", seed=1)
    with_mtp_layer(base, d / "m0")
    return guessing_mtp_checkpoint(d / "m0", d / "m", mix=mix)
