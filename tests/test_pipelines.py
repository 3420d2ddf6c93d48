"""Pipelines come from the places passes declare (stage, after, before, level)."""

from __future__ import annotations

import pytest

from braze.ir import BrazeError
from braze.passes import PIPELINES, STAGES, all_passes, pipeline, register_pass
from braze.passes import manager


def test_the_pipelines_are_the_ones_braze_has_always_run():
    assert PIPELINES[0] == []
    assert PIPELINES[1] == ["canonicalize"]
    assert PIPELINES[2] == ["canonicalize", "merge-projections", "fuse-moe", "fuse-grouped-topk",
                            "fuse-linear-glu", "fuse-norm", "prune-logits",
                            "tabulate-positions", "fuse-rope", "fuse-attention", "absorb-mla",
                            "canonicalize",
                            "fuse-pointwise", "split-segments", "plan-memory"]
    with pytest.raises(BrazeError, match="no pipeline for -O3"):
        pipeline(3)


@pytest.mark.parametrize("level", [1, 2])
def test_every_declared_place_holds(level):
    order = PIPELINES[level]
    first = {n: order.index(n) for n in order}
    last = {n: len(order) - 1 - order[::-1].index(n) for n in order}
    for name in order:
        info = all_passes()[name]
        assert info.level is not None and info.level <= level
        for other in info.after:
            if other in first:
                assert first[other] < last[name], f"{name} must run after {other}"
        for other in info.before:
            if other in first:
                assert first[name] < last[other], f"{name} must run before {other}"
    # the stages come in STAGES order: each pass's stage is found at or after the last one
    slot = 0
    for name in order:
        stage = all_passes()[name].stage
        while STAGES[slot][0] != stage:
            slot += 1               # IndexError: a stage ran out of order


@pytest.fixture
def scratch_passes():
    """Register passes for one test only."""
    saved = dict(manager.PASSES)
    yield
    manager.PASSES.clear()
    manager.PASSES.update(saved)


def test_a_new_pass_lands_where_it_says(scratch_passes):
    @register_pass("fuse-example", after=("fuse-norm",), before=("fuse-rope",))
    def fuse_example(g, ctx):
        return 0

    order = PIPELINES[2]
    assert order.index("fuse-norm") < order.index("fuse-example") < order.index("fuse-rope")
    assert "fuse-example" not in PIPELINES[1]


def test_a_pass_with_level_none_runs_only_when_named(scratch_passes):
    @register_pass("debug-example", level=None)
    def debug_example(g, ctx):
        return 0

    assert "debug-example" not in PIPELINES[2] and "debug-example" in all_passes()


@pytest.mark.parametrize("kw, message", [
    (dict(after=("no-such-pass",)), "unknown pass 'no-such-pass'"),
    (dict(stage="group", before=("fuse-norm",)), "the stages run in the other order"),
    (dict(after=("fuse-rope",), before=("fuse-norm",)), "cycle"),
])
def test_impossible_places_are_errors(scratch_passes, kw, message):
    register_pass("bad-example", **kw)(lambda g, ctx: 0)
    with pytest.raises(BrazeError, match=message):
        pipeline(2)


def test_an_unknown_stage_is_an_error():
    with pytest.raises(ValueError, match="stage must be one of"):
        register_pass("bad-stage", stage="later")
