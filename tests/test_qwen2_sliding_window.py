"""Qwen2 with its sliding window on (`use_sliding_window`, windows from layer
`max_window_layers` up): each layer attends as transformers' Qwen2 does, and with the
window off (the published Qwen2.5 configs: `use_sliding_window: false` beside a
`sliding_window` value) every layer attends to the whole sequence."""

from __future__ import annotations

import pytest

from conftest import (
    PROMPT,
    _Store,
    assert_greedy_matches_transformers,
    assert_steps_match_transformers,
    executor,
)

# window 8 < the 20-token test prompt; layer 0 full, layers 1 and 2 windowed
CASES = {
    "qwen2-window": ("qwen2", {"num_hidden_layers": 3, "use_sliding_window": True,
                               "sliding_window": 8, "max_window_layers": 1}),
    "qwen2-window-off": ("qwen2", {"num_hidden_layers": 3, "use_sliding_window": False,
                                   "sliding_window": 8, "max_window_layers": 1}),
}


@pytest.fixture(scope="module")
def qs(tmp_path_factory):
    return _Store(tmp_path_factory, CASES)


@pytest.mark.parametrize("case, windows", [("qwen2-window", [0, 8, 8]),
                                           ("qwen2-window-off", [0, 0, 0])])
def test_windows_per_layer_follow_transformers(qs, case, windows):
    from transformers import AutoConfig

    from braze.models.registry import build_spec
    cfg = AutoConfig.from_pretrained(qs.checkpoint(case))
    assert build_spec(cfg).sliding_windows == windows
    # transformers' own reading of the same config agrees
    assert [cfg.sliding_window if t == "sliding_attention" else 0
            for t in cfg.layer_types] == windows


@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(qs, case, opt_level):
    assert_steps_match_transformers(qs, case, executor(qs, case, opt_level=opt_level))


def test_greedy_past_the_window_equals_generate(qs):
    """The engine frees window blocks as they slide out (KV groups of equal layer counts per
    kind of layer, sharing one pool);
    the greedy continuation still equals transformers' generate."""
    from braze.runtime import open_artifact
    art = open_artifact(qs.artifact("qwen2-window", opt_level=2))
    groups = [(g["window"], g["layers"]) for g in art.manifest["kv_groups"]]
    assert groups == [(0, [0]), (8, [1]), (8, [2])]     # cut to equal layer counts
    ex = executor(qs, "qwen2-window", opt_level=2)
    assert_greedy_matches_transformers(qs, "qwen2-window", ex, PROMPT[:12], max_tokens=12)


def test_the_window_changes_the_reference_logits(qs):
    """Both cases hold the same weights (same seed): transformers' logits past the window
    differ between them, so the comparisons above do test the window."""
    import torch

    from conftest import hf_model
    with torch.no_grad():
        on, off = (hf_model(qs.checkpoint(c))(torch.tensor([PROMPT])).logits[0] for c in CASES)
    torch.testing.assert_close(on[:8], off[:8])
    assert (on[-1] - off[-1]).abs().max() > 1e-2
