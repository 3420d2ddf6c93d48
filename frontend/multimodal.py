"""Multimodal checkpoints compiled text-only.

The published Gemma 3 (4B and up) and Gemma 4 checkpoints are `*ForConditionalGeneration`:
vision (and audio) towers and their projectors beside a language model. braze compiles the
language model alone, as the text `*ForCausalLM` it is (models/registry.py MULTIMODAL names
the architectures taken this way):

  - the config: the multimodal config's `text_config`, with what the wrapper decides for it
    (whether the LM head is tied to the embeddings; whether the head soft-caps its logits);
  - the weights: the language model's tensors under the text model's names. transformers 5
    saves them under `model.language_model.` (Gemma 4), or in the published Gemma 3 layout
    `language_model.model.` (which transformers still writes); the head is `lm_head.` or
    `language_model.lm_head.`, absent when tied. Tower and projector tensors are never read,
    not even their shapes.

    model.language_model.layers.0.self_attn.q_proj.weight -> model.layers.0.self_attn.q_proj.weight
    language_model.model.embed_tokens.weight              -> model.embed_tokens.weight
    language_model.lm_head.weight                         -> lm_head.weight
    model.vision_tower.encoder.layers.0.mlp.fc1.weight    -> (skipped)
"""

from __future__ import annotations

import copy

from braze.models.registry import MULTIMODAL

# checkpoint prefix -> the text CausalLM's prefix
TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                 "lm_head.": "lm_head.", "language_model.lm_head.": "lm_head."}
# where the towers and projectors sit: under `model.` (transformers 5) or at the top (the
# older layout); a peft adapter names them as the transformers that trained it did
TOWER_CONTAINERS = ("model.", "")


def multimodal_architecture(cfg) -> str | None:
    """The ConditionalGeneration class `cfg` names, when braze compiles its text model alone."""
    return next((a for a in getattr(cfg, "architectures", None) or [] if a in MULTIMODAL), None)


def text_config(cfg, architecture: str):
    """The text model's config, as the ConditionalGeneration model runs it."""
    entry = MULTIMODAL[architecture]
    text = copy.deepcopy(cfg.get_text_config())
    text.architectures = [entry.text_architecture]
    # the wrapper ties its lm_head by its own (top-level) tie_word_embeddings
    text.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", text.tie_word_embeddings))
    if not entry.final_softcap:
        text.final_logit_softcapping = None
    # published configs keep bos/eos at the top (gemma-3-4b-it: eos [1, 106]); the text
    # config then holds only its class defaults
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(cfg, key, None) is not None:
            setattr(text, key, getattr(cfg, key))
    return text


def text_name(name: str) -> str | None:
    """The text model's name for checkpoint tensor `name`; None for a tower's tensor."""
    for prefix, ours in TEXT_PREFIXES.items():
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    return None


class TextCheckpoint:
    """The language model's tensors of a multimodal checkpoint, under the text model's names
    (the same interface as frontend/weights.Checkpoint)."""

    def __init__(self, inner):
        self.inner = inner
        self.dir = getattr(inner, "dir", None)
        self._names: dict[str, str] = {}
        skipped = []
        for n in sorted(inner.names()):
            ours = text_name(n)
            if ours is None:
                skipped.append(n)
            else:
                self._names[ours] = n
        self.skipped_modules = sorted({_module(n) for n in skipped})
        self.skipped_tensors = len(skipped)

    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._names[name])

    def get(self, name: str):
        return self.inner.get(self._names[name])


def _module(name: str) -> str:
    """The tower a skipped tensor belongs to: `model.vision_tower.x.y` -> `vision_tower`."""
    parts = name.split(".")
    return parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]


def origin_record(architecture: str, ckpt: TextCheckpoint | None) -> dict:
    """The manifest's `model.multimodal`: the artifact is the text model of `architecture`.

    Its `adapter_prefixes` map the module names of a LoRA adapter trained on the multimodal
    model (runtime/lora.py) to the text model's: a language-model prefix to the text model's,
    a skipped tower's or projector's to null (nothing of it is in the artifact)."""
    rec = {"architecture": architecture, "text_only": True}
    towers = []
    if ckpt is not None:
        rec["skipped_modules"] = ckpt.skipped_modules
        rec["skipped_tensors"] = ckpt.skipped_tensors
        towers = ckpt.skipped_modules
    rec["adapter_prefixes"] = {**TEXT_PREFIXES, **{f"{c}{m}.": None for m in towers
                                                   for c in TOWER_CONTAINERS}}
    return rec


__all__ = ["multimodal_architecture", "text_config", "text_name", "TextCheckpoint",
           "origin_record", "TEXT_PREFIXES", "TOWER_CONTAINERS"]
