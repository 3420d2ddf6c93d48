"""The token ids a GGUF model stops on, decided as llama.cpp decides them.

A GGUF names one `tokenizer.ggml.eos_token_id`, but converters long wrote the base model's
end-of-text there (Llama 3 Instruct: <|end_of_text|>, while every chat turn ends with
<|eot_id|>), so llama.cpp ends generation on more: the eot/eom ids, the FIM pad, repo and
file-separator ids, and every token spelled as a known end-of-turn marker. The Hugging Face
originals agree: Llama 3 Instruct's generation_config.json stops on <|end_of_text|> and
<|eot_id|>, Qwen2.5-Instruct's on <|im_end|> and <|endoftext|>.
"""

from __future__ import annotations

# the spellings llama.cpp treats as end of generation wherever they are in a vocabulary
END_OF_TURN = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",          # Llama 3
    "<|im_end|>", "<|endoftext|>",                          # ChatML: Qwen, many others
    "<|end|>", "<end_of_turn>", "<EOT>", "_<EOT>",          # Phi-3, Gemma, CodeLlama
    "<end_of_utterance>", "<|return|>", "<|call|>",
})

# metadata ids that end generation besides the eos id
STOP_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
             "tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.fim_rep_token_id",
             "tokenizer.ggml.fim_sep_token_id")


def stop_token_ids(eos: list[int], field, tokens: list[str] | None) -> list[int]:
    """`eos` (the config's ids, first kept first), then the other metadata stop ids, then
    the vocabulary's end-of-turn tokens in id order. `field(key)`: a GGUF metadata value."""
    out = list(eos)
    extra = [field(k) for k in STOP_KEYS]
    extra += [i for i, t in enumerate(tokens or ()) if t in END_OF_TURN]
    n = len(tokens) if tokens else None
    for t in extra:
        if isinstance(t, int) and 0 <= t < (n or t + 1) and t not in out:
            out.append(t)
    return out


__all__ = ["stop_token_ids", "END_OF_TURN"]
