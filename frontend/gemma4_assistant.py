"""Gemma 4's assistant checkpoint (`Gemma4AssistantForCausalLM`), traced beside its target.

`braze compile TARGET -o OUT --mtp-assistant DIR` reads DIR's config.json (model_type
"gemma4_assistant") and weights, and traces models/gemma4_assistant.py into a second
graph (like DeepSeek-V3's MTP layer, frontend/mtp.py) with one more input, the target's
final hidden states. Its layers read the target's KV cache: each the cache of the
target's last unshared layer of its type (transformers' "store" layers), with that
cache's KV cache group's block table (frontend/kv_groups.py). The assistant's sliding
layers see one key more than the target's window (models/gemma4_assistant.py), so the
target's window group must keep W + 1 keys: `assistant_windows` says how many.
"""

from __future__ import annotations

import copy
import operator
from pathlib import Path

import torch

from braze.ir.contract import cache_names, group_step_inputs
from braze.ir.errors import BrazeError
from braze.ir.types import T, TensorType, torch_dtype

from .kv_groups import _layer
from .load import auto_config
from .mtp import HIDDEN_INPUT, MTPGraph

KIND = "gemma4_assistant"


def read_assistant_config(assistant_dir: Path):
    """The assistant's Gemma4AssistantConfig, refused with one line unless braze serves it."""
    assistant_dir = Path(assistant_dir)
    path = assistant_dir / "config.json"
    if not path.exists():
        raise BrazeError(f"--mtp-assistant {assistant_dir} has no config.json: expected a "
                         f"Gemma4AssistantForCausalLM checkpoint directory")
    cfg = auto_config(assistant_dir)
    if getattr(cfg, "model_type", None) != KIND:
        raise BrazeError(f"--mtp-assistant {assistant_dir}: config.json model_type is "
                         f"{getattr(cfg, 'model_type', None)!r}, not 'gemma4_assistant' (a "
                         f"Gemma4AssistantForCausalLM checkpoint)")
    return cfg


def _cluster_of(ckpt, cfg, vocab: int) -> torch.Tensor:
    """use_ordered_embeddings: each token's cluster, from the checkpoint's token_ordering
    (cluster c holds tokens token_ordering[c * V/C : (c + 1) * V/C])."""
    c, k = int(cfg.num_centroids), int(cfg.centroid_intermediate_top_k)
    name = "masked_embedding.token_ordering"
    if vocab % c or not 0 < k <= c:
        raise BrazeError(f"assistant config.json: num_centroids={c} must divide vocab_size="
                         f"{vocab} and centroid_intermediate_top_k={k} be 1 .. {c}")
    if name not in ckpt.names():
        raise BrazeError(f"assistant checkpoint {ckpt.dir} has no {name}, which "
                         f"use_ordered_embeddings=true needs")
    order = ckpt.get(name).long().flatten()
    if order.numel() != vocab or not torch.equal(order.sort().values, torch.arange(vocab)):
        raise BrazeError(f"assistant checkpoint {ckpt.dir}: {name} is not a permutation of "
                         f"the {vocab} token ids")
    out = torch.empty(vocab, dtype=torch.int64)
    out[order] = torch.arange(vocab) // (vocab // c)
    return out


def _producers(target) -> dict[bool, int]:
    """The target layer whose cache each layer type's shared layers read (sliding: True):
    the last layer of that type with a cache of its own (transformers' "store" layer)."""
    out = {}
    for j, (w, src) in enumerate(zip(target.sliding_windows, target.gemma4.kv_from)):
        if src is None:
            out[bool(w)] = j
    return out


def assistant_spec(cfg, target):
    """The assistant's ModelSpec: its text config, every layer reading the target's cache
    of its type, sliding layers one key wider (bidirectional window)."""
    from braze.models.spec import spec_from_config
    text = copy.deepcopy(cfg.get_text_config())
    n = text.num_hidden_layers
    if int(getattr(text, "num_kv_shared_layers", n) or 0) != n:
        raise BrazeError(f"assistant config.json: num_kv_shared_layers="
                         f"{text.num_kv_shared_layers} but every one of its {n} layers must "
                         f"read the target's KV cache (Gemma4AssistantConfig shares them all)")
    text.num_kv_shared_layers = 0           # spec_gemma4 would refuse an all-shared model
    spec = spec_from_config(text, "gemma4")
    producers = _producers(target)
    for i, w in enumerate(spec.sliding_windows):
        kind = "sliding_attention" if w else "full_attention"
        if bool(w) not in producers:
            raise BrazeError(f"assistant layer {i} ({kind}) reads the target's KV cache of that "
                             f"type, but the target has no {kind} layer")
    spec.gemma4.kv_from = [producers[bool(w)] for w in spec.sliding_windows]
    spec.sliding_windows = [w + 1 if w else 0 for w in spec.sliding_windows]
    spec.final_softcap = 0.0       # Gemma4AssistantForCausalLM applies none
    return spec


def trace_assistant(loaded, assistant_dir, block_size: int, kv_groups: list[dict],
                    log=None, cache_types: dict | None = None) -> MTPGraph:
    """Trace the assistant in `assistant_dir` for the target `loaded` (traced with its
    hidden-state output) into a second graph; its own weights from its checkpoint, the
    target's embedding shared. `kv_groups`: the target's (manifest) groups. `cache_types`:
    the target's inputs as traced (before the shard pass split their KV heads), else
    `loaded.graph`'s."""
    from braze.models.gemma4_assistant import PREFIX, Gemma4Assistant
    from braze.models.registry import _no_init, gemma4_rotaries, weight_sources
    from .trace import trace_to_ir
    from .weights import Checkpoint, check_sources
    target = loaded.spec
    if target.family != "gemma4":
        raise BrazeError(f"--mtp-assistant is for Gemma 4 targets (Gemma4ForCausalLM); the "
                         f"target is {target.architecture}")
    cfg = read_assistant_config(assistant_dir)
    if cfg.backbone_hidden_size != target.hidden_size:
        raise BrazeError(f"--mtp-assistant {assistant_dir}: backbone_hidden_size="
                         f"{cfg.backbone_hidden_size} but the target's hidden_size is "
                         f"{target.hidden_size}: it was trained for another target")
    spec = assistant_spec(cfg, target)
    if spec.vocab_size != target.vocab_size:
        raise BrazeError(f"--mtp-assistant {assistant_dir}: vocab_size={spec.vocab_size} but "
                         f"the target's is {target.vocab_size}")
    dt = torch_dtype(loaded.dtype)
    rotary, local = gemma4_rotaries(spec, dt)
    ckpt = Checkpoint(Path(assistant_dir))
    ordered = ((int(cfg.num_centroids), int(cfg.centroid_intermediate_top_k))
               if cfg.use_ordered_embeddings else None)
    with torch.device("meta"), _no_init():
        module = Gemma4Assistant(spec, target, dt, rotary, local, ordered)
    if ordered:                        # real: computed here, shipped with its own weights
        module.assistant.masked_embedding.cluster_of = torch.nn.Parameter(
            _cluster_of(ckpt, cfg, spec.vocab_size), requires_grad=False)
    inputs = cache_types or {v.name: v.type for v in loaded.graph.inputs}
    extra = {HIDDEN_INPUT: TensorType((T, target.hidden_size), loaded.dtype)}
    for j in sorted(set(spec.gemma4.kv_from)):
        for name in cache_names(j):
            extra[name] = inputs[name]
    try:
        graph = trace_to_ir(module, "Gemma4Assistant", block_size, loaded.dtype,
                            extra_inputs=extra)
    except BrazeError as e:
        raise BrazeError(f"--mtp-assistant {assistant_dir} does not fit the target: {e}") from None
    _use_group_tables(graph, kv_groups)
    out = MTPGraph(graph, checkpoint=ckpt)
    main = set(loaded.graph.params)
    available = ckpt.names()
    for name, p in graph.params.items():
        t = operator.attrgetter(name)(module)
        if not t.is_meta:
            out.computed[name] = t.detach()
        elif not name.startswith(PREFIX):            # the target's embedding
            if name not in main:
                raise BrazeError(f"the assistant reads the target's {name}, which it lacks")
            out.shared.append(name)
        else:
            src = weight_sources(spec, name[len(PREFIX):], p.type.shape, available)
            check_sources(ckpt, name, src, p.type.shape)
            out.sources[name] = src
            out.dtypes[name] = p.type.dtype
    if log:
        log(f"MTP: traced the Gemma 4 assistant ({spec.num_layers} layers, hidden "
            f"{spec.hidden_size}) into a second graph ({len(graph.nodes)} ops, "
            f"{len(out.sources)} own parameters; it reads the target's KV cache of layers "
            f"{', '.join(map(str, sorted(set(spec.gemma4.kv_from))))})")
    return out


def _attention_groups(graph, kv_groups: list[dict]):
    """(attention op, the target's KV cache group of the cache it reads), each op."""
    group_of = {layer: g for g, grp in enumerate(kv_groups) for layer in grp["layers"]}
    return [(node, group_of[_layer(node.operands[1].name)]) for node in graph.nodes
            if node.op == "paged_attention"]


def _use_group_tables(graph, kv_groups: list[dict]) -> None:
    """Each attention op reads the block table of its cache's group (the target's)."""
    inputs = {v.name: v for v in graph.inputs}
    for node, g in _attention_groups(graph, kv_groups):
        if g == 0:
            continue
        name = f"block_tables.g{g}"
        if name not in inputs:
            inputs[name] = graph.add_input(name, group_step_inputs(g)[name])
        ops = list(node.operands)
        ops[5] = inputs[name]
        node.operands = ops


def assistant_windows(graph, kv_groups: list[dict]) -> None:
    """Widen each window group of the target (in place) to what the assistant's attention
    over it needs: its window W + 1 when that is wider."""
    for node, g in _attention_groups(graph, kv_groups):
        w = int(node.attrs.get("sliding_window") or 0)
        if w and kv_groups[g]["window"]:
            kv_groups[g]["window"] = max(kv_groups[g]["window"], w)
