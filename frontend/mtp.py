"""Multi-token-prediction (MTP) weights of a checkpoint: recognised and kept, not dropped.

DeepSeek-V3 checkpoints carry `num_nextn_predict_layers` extra layers after the
`num_hidden_layers` decoder layers, under the next layer indices
(`model.layers.61.*` for the 61-layer model): an embedding, `enorm`, `hnorm`, `eh_proj`,
a full decoder layer and a `shared_head`. The main model does not run them; a speculative
decoder's draft does. braze compiles the main model and ships these tensors beside it
(codegen/mtp_writer.py), named as in the checkpoint, for a later MTP proposer.
"""

from __future__ import annotations

import re

from braze.ir.errors import BrazeError

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
