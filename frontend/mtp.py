"""Multi-token-prediction (MTP) layers of a checkpoint: recognised, traced, not dropped.

DeepSeek-V3 checkpoints carry `num_nextn_predict_layers` extra layers after the
`num_hidden_layers` decoder layers, under the next layer indices
(`model.layers.61.*` for the 61-layer model): an embedding, `enorm`, `hnorm`, `eh_proj`,
a full decoder layer and a `shared_head`. The main model does not run them; the `mtp`
speculative method does: `trace_mtp` traces the first one (models/deepseek_mtp.py) into
a second graph with one more input, the main model's hidden states; braze/compile_mtp.py
optimises it and codegen/mtp_writer.py writes it beside the main graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from braze.ir import Graph
from braze.ir.errors import BrazeError
from braze.ir.types import T, TensorType, torch_dtype

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def mtp_tensors(spec, names: set[str], log=None) -> dict[int, list[str]]:
    """The checkpoint tensors of MTP layers, by layer index: every `model.layers.{i}.*`
    with i >= num_hidden_layers, for families whose checkpoints have MTP layers."""
    if spec.family != "deepseek_v3":
        return {}
    by_layer: dict[int, list[str]] = {}
    for n in names:
        m = _LAYER.match(n)
        if m and int(m.group(1)) >= spec.num_layers:
            by_layer.setdefault(int(m.group(1)), []).append(n)
    found = sorted(by_layer)
    expected = list(range(spec.num_layers, spec.num_layers + spec.mtp_layers))
    extra = [i for i in found if i not in expected]
    if extra:
        raise BrazeError(f"the checkpoint has weights of layer {extra[0]} (e.g. "
                         f"{sorted(by_layer[extra[0]])[0]}), but config.json declares "
                         f"{spec.num_layers} layers and num_nextn_predict_layers="
                         f"{spec.mtp_layers}: fix num_nextn_predict_layers")
    if log and found:
        log(f"MTP: kept {sum(map(len, by_layer.values()))} tensors of {len(found)} "
            f"multi-token-prediction layer(s) ({', '.join(map(str, found))}) for speculative "
            f"decoding")
    elif log and spec.mtp_layers:
        log(f"MTP: config.json declares {spec.mtp_layers} multi-token-prediction layer(s); "
            f"the checkpoint has no weights for them")
    return {i: sorted(by_layer[i]) for i in found}


# the tensors an MTP layer may keep of its own that are the main model's (DeepSeek-V3
# shares its embedding and LM head with the MTP layer): never shipped twice
_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
HIDDEN_INPUT = "hidden_states"


@dataclass
class MTPGraph:
    """The traced MTP layer: its graph, where its own weights come from, and which of
    its parameters are the main model's (`shared`, loaded from the main weights)."""

    graph: Graph
    sources: dict = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)
    computed: dict = field(default_factory=dict)      # e.g. RoPE frequencies
    dtypes: dict = field(default_factory=dict)        # as traced, before passes derive
    layer: int = 0
    checkpoint: object = None      # where its own weights are (None: the target's)
    # tensor parallelism: how its own weights are split per rank (the shard pass's records)
    shards: dict = field(default_factory=dict)


def trace_mtp(loaded, block_size: int, log=None) -> MTPGraph | None:
    """Trace the checkpoint's first MTP layer (models/deepseek_mtp.py) into a second graph
    with one more input, `hidden_states`; None when the checkpoint has none."""
    spec = loaded.spec
    if not loaded.mtp or spec.family != "deepseek_v3":
        return None
    from braze.models.deepseek_mtp import DeepseekV3MTP
    from braze.models.registry import _no_init, rotary_embedding, weight_sources
    from .trace import trace_to_ir
    from .weights import check_sources
    layer = spec.num_layers
    dt = torch_dtype(loaded.dtype)
    rotary = rotary_embedding(spec.rope, spec, dt)      # real: computed, not loaded
    with torch.device("meta"), _no_init():
        module = DeepseekV3MTP(spec, dt, rotary)
    hidden = TensorType((T, spec.hidden_size), loaded.dtype)
    graph = trace_to_ir(module, f"{spec.architecture}MTP", block_size, loaded.dtype,
                        extra_inputs={HIDDEN_INPUT: hidden})
    main = set(loaded.graph.params) | set(loaded.sources)
    out = MTPGraph(graph, layer=layer)
    available = loaded.checkpoint.names()
    prefix = f"model.layers.{layer}."
    import operator
    for name, p in graph.params.items():
        t = operator.attrgetter(name)(module)
        if not t.is_meta:
            out.computed[name] = t.detach()
            continue
        if not name.startswith(prefix):            # the embedding and the LM head
            if name not in main:
                raise BrazeError(f"the MTP layer reads {name}, which the main model lacks")
            out.shared.append(name)
            continue
        src = weight_sources(spec, name, p.type.shape, available)
        try:
            check_sources(loaded.checkpoint, name, src, p.type.shape)
        except BrazeError as e:
            raise BrazeError(f"MTP layer {layer} (num_nextn_predict_layers) is incomplete: "
                             f"{e}") from None
        out.sources[name] = src
        out.dtypes[name] = p.type.dtype
    if log:
        log(f"MTP: traced layer {layer} into a second graph ({len(graph.nodes)} ops, "
            f"{len(out.sources)} own parameters; embedding and LM head shared)")
    return out


def mtp_loader(loaded, mtp: MTPGraph):
    """Load an MTP graph parameter: its own from the checkpoint, in the dtype the graph
    traced it with (the router stays float32); computed ones (RoPE) as computed."""
    from .weights import load_source
    ckpt = mtp.checkpoint or loaded.checkpoint

    def load(name: str) -> torch.Tensor:
        if name in mtp.computed:
            return mtp.computed[name]
        if name in mtp.sources:
            return load_source(ckpt, mtp.sources[name],
                               torch_dtype(mtp.dtypes[name]))
        raise BrazeError(f"MTP parameter {name} is the main model's, not the MTP layer's")
    return load


def is_shared_copy(name: str) -> bool:
    return name.endswith(_SHARED_COPIES)
