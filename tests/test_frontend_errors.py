"""What the tracer says about code it cannot map: the function, the module and the line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from braze.frontend.trace import trace_to_ir
from braze.ir.errors import BrazeError


class Inner(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=0)   # no IR op for this


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.block = Inner()

    def forward(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                block_tables, logits_indices):
        return self.block(self.embed(input_ids))


class ShapeReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                block_tables, logits_indices):
        x = self.embed(input_ids)
        return x.view(x.shape[0], 2, 2)


def test_unmapped_function_names_module_function_and_line():
    with pytest.raises(BrazeError) as e:
        trace_to_ir(Outer(), "Outer", 16, "f32")
    msg = str(e.value)
    assert "torch.cumsum" in msg
    assert "module block (Inner)" in msg
    assert "test_frontend_errors.py" in msg and "torch.cumsum(x, dim=0)" in msg


def test_reading_shapes_is_explained():
    with pytest.raises(BrazeError) as e:
        trace_to_ir(ShapeReader(), "ShapeReader", 16, "f32")
    assert "use -1" in str(e.value)


def test_traced_graph_is_symbolic_in_tokens():
    from braze.models.registry import build_model, build_spec
    from braze.tiny import tiny_config
    spec = build_spec(tiny_config("llama"))
    g = trace_to_ir(build_model(spec, torch.float32), "m", 16, "f32")
    assert str(g.outputs["logits"].type) == "f32[T, 256]"
    assert str(g.input("k_cache.0").type) == "f32[NB, 16, 2, 16]"
