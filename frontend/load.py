"""From a Hugging Face model directory to an IR graph plus where each weight comes from."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from braze.artifact import is_artifact
from braze.ir import Graph
from braze.ir.errors import BrazeError
from braze.ir.types import torch_dtype
from braze.models.registry import (FLOAT16_UNSTABLE, build_model, build_spec, family_of,
                                   supported_architectures, weight_sources)
from braze.models.spec import ModelSpec

from .dir_hints import missing_dir_hint, no_config_hint
from .fp8 import FP8Checkpoint, fp8_scheme, without_quantization
from .mtp import mtp_tensors
from .multimodal import TextCheckpoint, multimodal_architecture, origin_record, text_config
from .trace import trace_to_ir
from .weights import Checkpoint, check_sources, head_is_tied, load_source

DTYPE_ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "fp32": "f32",
                 "fp16": "f16", "bf16": "bf16", "f32": "f32", "f16": "f16", "half": "f16",
                 "float": "f32"}


def parse_dtype(text: str) -> str:
    key = str(text).replace("torch.", "").lower()
    if key not in DTYPE_ALIASES:
        raise BrazeError(f"unsupported dtype {text!r}; use float32, float16 or bfloat16")
    return DTYPE_ALIASES[key]


@dataclass
class LoadedModel:
    graph: Graph
    spec: ModelSpec
    config: dict                                     # config.json as written
    dtype: str
    checkpoint: Checkpoint | None = None
    computed: dict[str, torch.Tensor] = field(default_factory=dict)   # e.g. RoPE inv_freq
    sources: dict = field(default_factory=dict)                        # param -> WeightSource
    # each traced param's dtype: the compile dtype, except what the model keeps wider
    # (DeepSeek-V3's float32 router), recorded before passes derive params from them
    param_dtypes: dict[str, str] = field(default_factory=dict)
    mtp: dict[int, list[str]] = field(default_factory=dict)   # MTP layer -> its tensors
    source: dict | None = None        # what the weights were, when not plain (fp8: fp8.py)
    multimodal: dict | None = None    # the manifest's model.multimodal (frontend/multimodal.py)

    def load_param(self, name: str) -> torch.Tensor:
        if name in self.computed:
            return self.computed[name]
        dtype = self.param_dtypes.get(name, self.dtype)
        return load_source(self.checkpoint, self.sources[name], torch_dtype(dtype))

    def load_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim `dim` of param `name`, reading only those of a stacked
        source (a rank's experts of a MoE checkpoint's per-expert tensors)."""
        src = self.sources.get(name)
        if name in self.computed or src is None or src.kind != "stack" or dim != 0:
            return self.load_param(name).narrow(dim, start, stop - start).contiguous()
        part = replace(src, names=list(src.names[start:stop]))
        dtype = self.param_dtypes.get(name, self.dtype)
        return load_source(self.checkpoint, part, torch_dtype(dtype))

    def unused_checkpoint_tensors(self) -> list[str]:
        used = {n for s in self.sources.values() for n in s.names}
        used.update(n for names in self.mtp.values() for n in names)
        return sorted(self.checkpoint.names() - used) if self.checkpoint else []


def auto_config(model_dir: Path):
    """transformers' config of `model_dir`; what it cannot read is one line naming the file."""
    from transformers import AutoConfig
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 -- also huggingface_hub's strict-dataclass
        # validation errors (a field of the wrong type), which are none of the builtins
        why = " ".join(str(e).split())
        raise BrazeError(f"{Path(model_dir) / 'config.json'}: transformers cannot read this "
                         f"config ({why})") from None


def read_config(model_dir: Path):
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise BrazeError(f"{model_dir} is a file; expected a Hugging Face model directory "
                         f"or a .gguf file")
    if not model_dir.is_dir():
        raise BrazeError(f"model directory {model_dir} does not exist{missing_dir_hint(model_dir)}")
    if is_artifact(model_dir):
        raise BrazeError(f"{model_dir} is a braze artifact, not a model directory: compile the "
                         f"Hugging Face model directory (or .gguf file) it was made from; an "
                         f"artifact is served as it is (braze generate/serve)")
    path = model_dir / "config.json"
    if not path.exists():
        raise BrazeError(f"{model_dir} has no config.json: expected a Hugging Face model "
                         f"directory{no_config_hint(model_dir)}")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise BrazeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise BrazeError(f"{path}: a JSON {type(raw).__name__}, not the object of a model "
                         f"config")
    archs = raw.get("architectures") or []
    if isinstance(archs, str):      # iterated, it read letter by letter
        raise BrazeError(f"{path}: architectures is the string {archs!r}; it is a list: "
                         f"\"architectures\": [\"{archs}\"]")
    if archs and not any(a in supported_architectures() for a in archs):
        raise BrazeError(f"unsupported architecture {', '.join(archs)} in {path}; braze "
                         f"supports: {', '.join(supported_architectures())}")
    cfg = auto_config(model_dir)
    multimodal = multimodal_architecture(cfg)
    if multimodal:              # its language model, compiled text-only
        cfg = text_config(cfg, multimodal)
    family_of(cfg)
    return raw, cfg, multimodal


def default_dtype(raw: dict, config_path: Path | None = None) -> str:
    d = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    try:
        return parse_dtype(d)
    except BrazeError:      # the user asked for nothing: say where the dtype came from
        raise BrazeError(f"{config_path or 'config.json'} declares dtype {d!r}, which braze "
                         f"does not compute in; pass --dtype float32, float16 or "
                         f"bfloat16") from None


def load_model(model_dir, dtype: str | None = None, block_size: int = 16,
               with_weights: bool = True, log=None, checkpoint=None,
               hidden_output: bool = False, max_model_len: int | None = None) -> LoadedModel:
    """Trace the model of `model_dir` to IR; with weights, check every weight's name and shape.

    `checkpoint` replaces the directory's safetensors (a GGUF file's tensors: frontend/gguf.py);
    a block-scaled fp8 checkpoint (config.json's quantization_config) is dequantized on read
    (frontend/fp8.py). `hidden_output`: Gemma 4 also outputs its final hidden state,
    "hidden_states" (for an assistant model, frontend/gemma4_assistant.py). `max_model_len`:
    the longest sequence compiled for (None: max_position_embeddings), which picks
    longrope's factor set (models/registry.longrope_uses_long)."""
    raw, cfg, multimodal = read_config(model_dir)
    fp8 = fp8_scheme(raw, Path(model_dir) / "config.json") if checkpoint is None else None
    spec = build_spec(cfg)
    spec.max_model_len = max_model_len
    _say_longrope(spec, log)
    if hidden_output:
        if spec.family != "gemma4":
            raise BrazeError(f"--mtp-assistant is for Gemma 4 targets (Gemma4ForCausalLM); "
                             f"{model_dir} is {spec.architecture}")
        spec.gemma4.hidden_output = True
    dt = parse_dtype(dtype) if dtype else default_dtype(raw, Path(model_dir) / "config.json")
    dt = _stable_dtype(spec, dt, asked=bool(dtype), log=log)
    if log:
        log(f"model: {spec.architecture} ({spec.num_params_hint}), dtype {dt}")
    t0 = time.perf_counter()
    ckpt = fp8_source = None
    if with_weights:
        if checkpoint is not None:
            ckpt = checkpoint
        elif fp8:
            ckpt = FP8Checkpoint(Path(model_dir), fp8, log=log)
            fp8_source = fp8.source(dt, len(ckpt.scales))
        else:
            ckpt = Checkpoint(Path(model_dir))
        if multimodal:
            ckpt = TextCheckpoint(ckpt)
        tied = head_is_tied(ckpt, spec.tie_word_embeddings)
        if tied != spec.tie_word_embeddings:
            spec.tie_word_embeddings = tied
            if log:
                log("note: config.json ties the LM head to the embeddings, but the checkpoint "
                    "holds its own lm_head.weight: using it, as transformers does")
    module = build_model(spec, torch_dtype(dt))
    graph = trace_to_ir(module, spec.architecture, block_size, dt, log=log)
    # the artifact holds dequantized weights: its config.json declares no quantization
    loaded = LoadedModel(graph, spec, without_quantization(raw) if fp8 else raw, dt)
    loaded.param_dtypes = {name: p.type.dtype for name, p in graph.params.items()}
    for name, p in graph.params.items():
        t = _real_tensor(module, name)
        if t is not None:
            loaded.computed[name] = t
    if with_weights:
        loaded.source = fp8_source
        loaded.checkpoint = ckpt
        available = ckpt.names()
        for name, p in graph.params.items():
            if name in loaded.computed:
                continue
            src = weight_sources(spec, name, p.type.shape, available)
            check_sources(ckpt, name, src, p.type.shape)
            loaded.sources[name] = src
        loaded.mtp = mtp_tensors(spec, available, log=log)
        unused = loaded.unused_checkpoint_tensors()
        if unused and log:
            log(f"note: {len(unused)} checkpoint tensor(s) not used by the model, e.g. {unused[0]}")
    if multimodal:
        loaded.multimodal = origin_record(multimodal, loaded.checkpoint)
        if log:
            log(f"{multimodal}: compiling its language model text-only"
                + (f"; {loaded.checkpoint.skipped_tensors} tensors of "
                   f"{', '.join(loaded.checkpoint.skipped_modules)} not read"
                   if loaded.checkpoint else ""))
    if log:
        log(f"frontend done in {time.perf_counter() - t0:.2f}s: {len(graph.nodes)} ops, "
            f"{len(graph.params)} parameters")
    return loaded


def _stable_dtype(spec, dt: str, asked: bool, log) -> str:
    """`dt`, unless the family is unstable in float16 (FLOAT16_UNSTABLE): then float16
    asked for is refused, and float16 from config.json becomes bfloat16 (vLLM's auto)."""
    why = FLOAT16_UNSTABLE.get(spec.family)
    if dt != "f16" or why is None:
        return dt
    if asked:
        raise BrazeError(f"--dtype float16: {spec.architecture} is numerically unstable in "
                         f"float16 ({why}); pass --dtype bfloat16 or --dtype float32")
    if log:
        log(f"note: config.json declares float16, in which {spec.architecture} is unstable "
            f"({why}): compiling in bfloat16 (--dtype float32 for full precision)")
    return "bf16"


def _real_tensor(module, name: str):
    import operator
    t = operator.attrgetter(name)(module)
    return None if t.is_meta else t.detach()


__all__ = ["load_model", "LoadedModel", "parse_dtype"]


def _say_longrope(spec, log) -> None:
    """A longrope model compiled for more than its original length rotates every position
    with the long factors (vLLM's rule): said, with how to get the short ones."""
    rope = spec.rope or {}
    original = rope.get("original_max_position_embeddings")
    if log is None or (rope.get("rope_type") or rope.get("type")) != "longrope" or not original:
        return
    from braze.models.registry import longrope_uses_long
    if longrope_uses_long(spec, original):
        log(f"note: longrope uses its long factors at every position, since the artifact "
            f"serves up to {spec.max_model_len or spec.max_position_embeddings} tokens, more "
            f"than original_max_position_embeddings {original} (as vLLM does); compile with "
            f"--max-model-len {original} for the short factors if shorter sequences suffice")
