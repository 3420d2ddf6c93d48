"""A GGUF file (llama.cpp, Ollama) read as if it were a Hugging Face model directory.

The rest of the compiler reads a model directory: config.json, tokenizer files and a
checkpoint of tensors with transformers' names. `GGUFSource` gives it exactly that:

  - a small staging directory with config.json (from the GGUF metadata, read by
    transformers' own GGUF config reader), generation_config.json (the end-of-generation
    ids llama.cpp stops on) and the tokenizer files (transformers' GGUF tokenizer
    converter, saved as tokenizer.json / tokenizer_config.json / chat_template.jinja);
  - `GGUFCheckpoint`, which names each GGUF tensor as transformers does (gguf's
    `TensorNameMap` applied to the transformers model's own parameter names), undoes
    llama.cpp's Q/K row permutation for llama, and dequantizes one tensor at a time
    with `gguf.quants.dequantize` when the artifact writer asks for it. The file is
    memory-mapped, so at most one dequantized tensor (plus the artifact shard being
    written) is in memory, never a second copy of the checkpoint.

What transformers does not read and llama.cpp does is read here too: RoPE scaling keys
(`{arch}.rope.scaling.*`, linear and yarn), Llama 3's `rope_freqs` tensor (per-frequency
divisors, applied to the RoPE inverse frequencies), Phi-3's longrope factor tensors and
partial rotary (`rope.dimension_count`), `attention.key_length` as head_dim, the MoE
expert width, Mixtral (a llama with `llama.expert_count`), Gemma 3's 1 + w norms and
query scale, and the tokens llama.cpp stops on (frontend/gguf_stops.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from braze.ir.errors import BrazeError

from .gguf_stops import stop_token_ids
from .progress import Progress

# general.architecture -> (transformers architecture, whether llama.cpp permuted Q/K rows)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
    "qwen3moe": ("Qwen3MoeForCausalLM", False),
    "phi3": ("Phi3ForCausalLM", False),
    "gemma3": ("Gemma3ForCausalLM", False),
}
# architectures whose norms llama.cpp stores as 1 + w (Gemma's (1 + w) RMSNorm, folded)
NORM_SHIFT = {"gemma3"}
FLOAT16_OVERFLOWS = {"gemma3"}
# llama.cpp names Mistral GGUFs "llama"; transformers then reads them as mistral
MISTRAL = ("MistralForCausalLM", True)
# ... and Mixtral "llama" too, told apart by llama.expert_count (transformers reads it as a
# dense Llama, its experts left out and its MLPs random)
MIXTRAL = "MixtralForCausalLM"

# the quant types braze dequantizes (through gguf.quants.dequantize): the legacy and
# K-quants, and the I-quants of llama.cpp's imatrix files
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
               "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
               "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
               "IQ4_NL", "IQ4_XS")

ROPE_FREQS = "rope_freqs.weight"
# Phi-3's longrope factors, which llama.cpp keeps as tensors (config values in transformers)
LONGROPE = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
# llama-gguf-split's part names: model-00002-of-00003.gguf
SPLIT_NAME = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
INV_FREQ = "model.rotary_emb.inv_freq"


def is_gguf(path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise BrazeError(f"reading a .gguf file needs the gguf package ({e}); "
                         f"pip install gguf") from None
    return gguf


class GGUFSource:
    """A .gguf file as a model directory (`dir`) plus a checkpoint; `close()` removes `dir`."""

    def __init__(self, path, log=None):
        gguf = _import_gguf()
        self.path = Path(path)
        self.log = log or (lambda msg: None)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError, IndexError, KeyError) as e:
            size = self.path.stat().st_size
            raise BrazeError(f"{self.path}: not a readable GGUF file ({str(e)[:200]}); a "
                             f"truncated file (an interrupted download) reads so: compare its "
                             f"{size} bytes with the original's, or download it again") from None
        self.arch = self._str("general.architecture") or "?"
        self.name = self._str("general.name") or ""
        self._check_supported()
        self.types = Counter(t.tensor_type.name for t in self.reader.tensors)
        size = self.path.stat().st_size
        self.log(f"GGUF {self.path.name}: {self.arch} {self.name!r}, "
                 f"{len(self.reader.tensors)} tensors ("
                 + ", ".join(f"{k} x{n}" for k, n in self.types.most_common())
                 + f"), {size / 2**30:.2f} GiB")
        self._tmp = tempfile.TemporaryDirectory(prefix="braze-gguf-")
        self.dir = Path(self._tmp.name)
        self.config = self._write_config()
        self._write_tokenizer()
        self.checkpoint = GGUFCheckpoint(self, self.config, log=self.log)

    # -- metadata -----------------------------------------------------------------------

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        return v.item() if isinstance(v, np.generic) else v

    def _str(self, key: str) -> str | None:
        v = self.field(key)
        return v if isinstance(v, str) else None

    def _check_supported(self) -> None:
        # first: llama-gguf-split writes the metadata (general.architecture too) into the
        # first part only, so a later part would read as architecture '?'
        splits = self.field("split.count", 1)
        if splits and int(splits) > 1:
            part = int(self.field("split.no", 0)) + 1
            first = (SPLIT_NAME.sub(f"-00001-of-{int(splits):05d}.gguf", self.path.name)
                     if SPLIT_NAME.search(self.path.name) or part == 1 else "FIRST-PART.gguf")
            raise BrazeError(f"{self.path} is part {part} of a {splits}-way split GGUF; merge "
                             f"the parts first (llama-gguf-split --merge {first} merged.gguf) "
                             f"and compile merged.gguf")
        if self.arch not in ARCHITECTURES:
            raise BrazeError(f"{self.path}: GGUF architecture {self.arch!r} is not supported; "
                             f"braze reads GGUF architectures: {', '.join(ARCHITECTURES)}")
        for key in ("attention.head_count", "attention.head_count_kv"):
            per_layer = self.field(f"{self.arch}.{key}")
            if isinstance(per_layer, list):
                raise BrazeError(f"{self.path}: {self.arch}.{key} is per layer ({per_layer}); "
                                 f"braze reads {self.arch} GGUFs with one count for all layers")
        for t in self.reader.tensors:
            if t.tensor_type.name not in QUANT_TYPES:
                raise BrazeError(f"{self.path}: tensor {t.name} has GGUF quant type "
                                 f"{t.tensor_type.name}, which braze does not dequantize; "
                                 f"supported: {', '.join(QUANT_TYPES)}")

    def default_dtype(self) -> str:
        """The dtype the weights were stored in: float32 if all are F32, bfloat16 if any is
        BF16, else float16 (llama.cpp's own compute type for quantized weights), but
        bfloat16 for the architectures whose activations overflow float16 (Gemma's pass
        65504: vLLM refuses float16 for them)."""
        types = set(self.types)
        if types <= {"F32"}:
            return "float32"
        if "BF16" in types or self.arch in FLOAT16_OVERFLOWS:
            return "bfloat16"
        return "float16"

    def _write_config(self):
        from transformers import AutoConfig
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                cfg = AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:  # noqa: BLE001 -- also huggingface_hub's strict-dataclass
            # validation errors (a metadata value of the wrong type), which are no builtin
            why = " ".join(str(e).split())[:200]
            raise BrazeError(f"{self.path}: transformers cannot read its GGUF metadata "
                             f"({why})") from None
        arch_name, _ = MISTRAL if cfg.model_type == "mistral" else ARCHITECTURES[self.arch]
        a = self.arch
        if cfg.model_type == "mistral":
            # MistralConfig's default 4096-token window, which the file does not state:
            # llama.cpp runs architecture llama (Mistral v0.2+ too) on the whole context
            cfg.sliding_window = None
        if a == "llama" and self.field("llama.expert_count"):
            cfg, arch_name = self._mixtral_config(cfg), MIXTRAL
        cfg.architectures = [arch_name]
        embd = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        if (self.field(f"{a}.vocab_size") is None and "tokenizer.ggml.tokens" not in
                self.reader.fields and embd is not None):
            # nothing states the vocabulary's size: transformers falls back to its class
            # default (32000 for llama); the embedding's rows are the size
            cfg.vocab_size = int(embd.shape[-1])
        if cfg.pad_token_id is not None and not 0 <= cfg.pad_token_id < cfg.vocab_size:
            # a class default (Phi-3's 32000) the file does not state: the file's or none
            cfg.pad_token_id = self.field("tokenizer.ggml.padding_token_id")
        if a == "gemma3":
            self._gemma3(cfg)
        moe_width = self.field(f"{a}.expert_feed_forward_length")
        if moe_width and hasattr(cfg, "moe_intermediate_size"):
            # transformers' qwen3moe reader skips it: its class default (768) would stand
            cfg.moe_intermediate_size = int(moe_width)
        key_length = self.field(f"{a}.attention.key_length")
        if key_length:
            cfg.head_dim = int(key_length)
        params = dict(getattr(cfg, "rope_parameters", None) or {})
        # Gemma 3 keeps RoPE per layer type: llama.cpp's keys are its global layers' (the
        # sliding ones keep their own base, unscaled)
        per_type = "full_attention" in params
        rope = dict(params["full_attention"]) if per_type else params
        before = dict(rope)
        rotary = self.field(f"{a}.rope.dimension_count")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if rotary and int(rotary) < head_dim:
            # partial rotary (Phi-4-mini rotates 96 of 128): transformers' reader skips the
            # key, which would rotate every dimension
            rope["partial_rotary_factor"] = int(rotary) / head_dim
        rope.update(self._longrope() or {})
        # as llama.cpp reads them: the factor under its old key (rope.scale_linear) too, and
        # a factor without a type is linear
        factor = self.field(f"{a}.rope.scaling.factor")
        if factor is None:
            factor = self.field(f"{a}.rope.scale_linear")
        scaling = self.field(f"{a}.rope.scaling.type")
        if scaling is None and factor and float(factor) != 1.0:
            scaling = "linear"
        if scaling and scaling != "none":
            if scaling not in ("linear", "yarn"):
                raise BrazeError(f"{self.path}: RoPE scaling type {scaling!r} is not supported "
                                 f"(braze reads linear and yarn from GGUF)")
            rope["rope_type"] = scaling
            rope["factor"] = float(factor or 1.0)
            orig = self.field(f"{a}.rope.scaling.original_context_length")
            if orig:
                rope["original_max_position_embeddings"] = int(orig)
        if rope != before:
            cfg.rope_parameters = {**params, "full_attention": rope} if per_type else rope
        cfg.dtype = self.default_dtype()
        cfg.save_pretrained(str(self.dir))
        raw = json.loads((self.dir / "config.json").read_text())
        eos = cfg.eos_token_id
        eos = stop_token_ids([eos] if isinstance(eos, int) else list(eos or []), self.field,
                             self.field("tokenizer.ggml.tokens"))
        gen = {"eos_token_id": eos}
        if cfg.bos_token_id is not None:
            gen["bos_token_id"] = cfg.bos_token_id
        (self.dir / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n")
        return raw

    def _longrope(self) -> dict | None:
        """Phi-3's longrope parameters from the GGUF: its factor tensors (transformers' reader
        drops them, leaving plain RoPE) and the original context length."""
        import gguf
        tensors = {t.name: t for t in self.reader.tensors if t.name in LONGROPE.values()}
        if not tensors:
            return None
        orig = self.field(f"{self.arch}.rope.scaling.original_context_length")
        if len(tensors) != 2 or not orig:
            raise BrazeError(f"{self.path}: longrope needs {' and '.join(LONGROPE.values())} "
                             f"and {self.arch}.rope.scaling.original_context_length; the file "
                             f"has only {', '.join(sorted(tensors)) or 'neither'}"
                             f"{'' if orig else ' and no original context length'}")
        out = {"rope_type": "longrope", "original_max_position_embeddings": int(orig)}
        for key, name in LONGROPE.items():
            t = tensors[name]
            out[key] = [float(x) for x in
                        np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(-1)]
        return out

    def _gemma3(self, cfg) -> None:
        """What llama.cpp fixes for Gemma 3 instead of writing it, and transformers' reader
        leaves at Gemma3TextConfig's defaults: queries scaled by 1/sqrt(head_dim), but by
        1/sqrt(hidden / heads) for the 62-layer 27B (llama.cpp's gemma3 hparams)."""
        if cfg.num_hidden_layers == 62:
            cfg.query_pre_attn_scalar = cfg.hidden_size // cfg.num_attention_heads
        else:
            cfg.query_pre_attn_scalar = cfg.head_dim

    def _mixtral_config(self, llama):
        """The MixtralConfig of a llama GGUF with experts: transformers' reading of its llama
        keys, plus the expert counts."""
        from transformers import MixtralConfig
        keep = {k: v for k, v in llama.to_dict().items()
                if k not in ("model_type", "architectures", "transformers_version")}
        return MixtralConfig(**keep, num_local_experts=int(self.field("llama.expert_count")),
                             num_experts_per_tok=int(self.field("llama.expert_used_count", 2)))

    def _write_tokenizer(self) -> None:
        """transformers' GGUF tokenizer converter, saved in the usual files."""
        if "tokenizer.ggml.tokens" not in self.reader.fields:
            self.log("note: the GGUF file has no tokenizer; prompts must be token ids")
            return
        from transformers import AutoTokenizer
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                tok = AutoTokenizer.from_pretrained(str(self.path.parent),
                                                    gguf_file=self.path.name)
                tok.save_pretrained(str(self.dir))
        except Exception as e:     # the converters raise many types; the artifact still works
            self.log(f"note: no tokenizer: transformers cannot convert this GGUF's tokenizer "
                     f"({type(e).__name__}: {str(e)[:200]}); prompts must be token ids")

    # -- identity -----------------------------------------------------------------------

    def identity(self) -> dict:
        """What the artifact records about its source: the file, its sha256, the types."""
        t0 = last = time.perf_counter()
        h = hashlib.sha256()
        size, done = self.path.stat().st_size, 0
        # tens of seconds for a large file: said before it starts, and every few seconds
        self.log(f"hashing {self.path.name} ({size / 2**30:.2f} GiB) for the manifest")
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
                done += len(chunk)
                now = time.perf_counter()
                if now - last >= 5.0:
                    last = now
                    self.log(f"  hashed {done / 2**30:.2f} of {size / 2**30:.2f} GiB "
                             f"in {now - t0:.0f}s")
        self.log(f"hashed {self.path.name} in {time.perf_counter() - t0:.1f}s")
        return {"format": "gguf", "file": self.path.name, "bytes": self.path.stat().st_size,
                "sha256": h.hexdigest(), "gguf_architecture": self.arch, "name": self.name,
                "file_type": self.field("general.file_type"),
                "file_type_name": _file_type_name(self.field("general.file_type")),
                "tensor_types": dict(self.types.most_common())}

    def adjust(self, loaded) -> None:
        """Apply what only the GGUF says to the traced model: Llama 3 `rope_freqs` divide
        the RoPE inverse frequencies (llama.cpp's `freq_factors`)."""
        factors = self.checkpoint.rope_freq_factors()
        if factors is None or INV_FREQ not in loaded.computed:
            return
        inv = loaded.computed[INV_FREQ]
        if factors.shape != inv.shape:
            raise BrazeError(f"{self.path}: {ROPE_FREQS} has shape {list(factors.shape)}, "
                             f"but the model's RoPE has {inv.shape[0]} frequencies")
        loaded.computed[INV_FREQ] = (inv / factors).to(inv.dtype)
        self.log(f"RoPE: frequencies divided by the GGUF's {ROPE_FREQS} (Llama 3 scaling)")

    def close(self) -> None:
        self._tmp.cleanup()


class GGUFCheckpoint:
    """The tensors of a GGUF file under transformers' names (the frontend's Checkpoint API)."""

    def __init__(self, source: GGUFSource, config: dict, log=None):
        self.source = source
        self.dir = source.path
        self.log = log or (lambda msg: None)
        self._permute = ARCHITECTURES[source.arch][1]
        self._norm_shift = source.arch in NORM_SHIFT
        self._heads = config.get("num_attention_heads")
        self._kv_heads = config.get("num_key_value_heads") or self._heads
        self.tensors = {t.name: t for t in source.reader.tensors}
        hf_names = _transformers_names(source, config)
        self.files = {}            # our name -> GGUF tensor name
        for gname in self.tensors:
            if gname == ROPE_FREQS or gname in LONGROPE.values():
                continue
            self.files[hf_names.get(gname, gname)] = gname
        self.progress = Progress(self.log, len(self.files), "GGUF tensors")

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[self.files[name]].shape))

    def get(self, name: str) -> torch.Tensor:
        import gguf
        gname = self.files[name]
        t = self.tensors[gname]
        self.progress.start()
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(self.shape(name))
        if self._permute and (".attn_q." in gname or ".attn_k." in gname):
            w = _unpermute(w, self._heads if ".attn_q." in gname else self._kv_heads)
        if self._norm_shift and gname.endswith("norm.weight"):
            w = w - 1.0
        w = np.ascontiguousarray(w, dtype=np.float32)
        out = torch.from_numpy(w if w.flags.writeable else w.copy())   # F32: a view of the map
        self.progress.step(t.n_bytes)
        return out

    def rope_freq_factors(self) -> torch.Tensor | None:
        t = self.tensors.get(ROPE_FREQS)
        if t is None:
            return None
        import gguf
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                         dtype=np.float32).reshape(-1))


def _file_type_name(file_type) -> str | None:
    """llama.cpp's name of a file's quantization mix (`general.file_type` 15: "Q4_K_M"), the
    name users know a GGUF by; None if the file states none or one gguf does not know."""
    import gguf
    try:
        name = gguf.LlamaFileType(int(file_type)).name
    except (TypeError, ValueError):
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `LlamaModel.permute`),
    as transformers' LlamaTensorProcessor does."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _transformers_names(source: GGUFSource, config: dict) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, found as transformers finds it:
    gguf's TensorNameMap applied to the parameter names of the transformers model (built
    on the meta device, so it costs no memory)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(str(source.dir))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == source.arch)
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    out = {}
    for hf_name in model.state_dict():
        base, dot, suffix = hf_name.rpartition(".")
        gname = name_map.get_name(base)
        if gname is not None:
            out[f"{gname}.{suffix}"] = hf_name
    # a MoE's experts: llama.cpp stacks each projection of all experts in one tensor
    # (blk.N.ffn_gate_exps.weight: experts x rows x cols), which is braze's own stacked
    # parameter (frontend weight_sources); transformers' model fuses gate and up instead
    for i in range(cfg.num_hidden_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            ours = f"model.layers.{i}.mlp.experts.{proj}"
            gname = name_map.get_name(ours)
            if gname is not None:
                out[f"{gname}.weight"] = ours
    return out


__all__ = ["GGUFSource", "GGUFCheckpoint", "is_gguf", "QUANT_TYPES", "ARCHITECTURES"]
