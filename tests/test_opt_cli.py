"""`braze opt` for pass writers: --list-passes from the registry, --set giving a pass the
compile options it declares, and every option a pass reads declared."""

from __future__ import annotations

import pytest

from cli_helpers import assert_one_line_error, run
from pass_helpers import traced_file


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    return traced_file(tmp_path_factory.mktemp("opt"))


def test_list_passes_shows_every_registered_pass_and_its_options():
    from braze.passes.manager import all_passes
    code, out, err = run("opt", "--list-passes")
    assert code == 0, err
    heads = {line.split()[0]: line for line in out.splitlines() if not line.startswith(" ")}
    passes = all_passes()
    assert set(heads) == set(passes)
    for name, info in passes.items():
        line = heads[name]
        assert ("only when named" in line) == (info.level is None)
        shown = line.split("options: ")[1].split(", ") if "options: " in line else []
        assert shown == list(info.options), name


def test_set_gives_the_pass_its_option(traced):
    """--set tensor_parallel_size=2 makes shard write the graph one rank of two runs, the
    same graph the pass manager gives with that option; without it shard changes nothing."""
    from braze.ir import parse_graph, print_graph
    from braze.passes import PassContext, PassManager
    code, plain, err = run("opt", traced, "--passes", "shard")
    assert code == 0, err
    assert plain == traced.read_text()
    code, out, err = run("opt", traced, "--passes", "shard", "--set", "tensor_parallel_size=2")
    assert code == 0, err
    g = parse_graph(traced.read_text())
    PassManager(["shard"], PassContext(options={"tensor_parallel_size": 2})).run(g)
    assert out == print_graph(g)
    assert "all_reduce" in out


def test_set_reaches_a_pass_that_refuses_without_it(traced):
    code, _, err = run("opt", traced, "--passes", "canonicalize,tabulate-positions",
                       "--explain")
    assert code == 0 and "no max_model_len" in err
    code, out, err = run("opt", traced, "--passes", "canonicalize,tabulate-positions",
                         "--set", "max_model_len=64", "--explain")
    assert code == 0 and "no max_model_len" not in err, err
    assert "tabulate-positions" not in err


@pytest.mark.parametrize("args, names", [
    (["--passes", "shard", "--set", "tensor_parallel_size=two"], ["tensor_parallel_size",
                                                                  "integer"]),
    (["--passes", "canonicalize", "--set", "max_model_len=64"], ["max_model_len", "--list-passes"]),
    (["--passes", "shard", "--set", "colour=red"], ["colour", "tensor_parallel_size"]),
    (["--passes", "shard", "--set", "tensor_parallel_size"], ["KEY=VALUE"]),
    (["--passes", "shard", "--set", "expert_parallel=yes"], ["--expert-parallel",
                                                             "--tensor-parallel-size"]),
])
def test_bad_set_is_one_line_naming_it(traced, args, names):
    code, _, err = run("opt", traced, *args)
    assert_one_line_error(code, err, *names)


def test_no_file_says_what_to_give():
    code, _, err = run("opt")
    assert_one_line_error(code, err, "FILE.bir", "--list-passes")


def test_a_pass_reading_an_undeclared_option_is_caught():
    """The declaration is what --list-passes and --set trust: reading past it is an error."""
    from braze.passes import PassContext
    ctx = PassContext(options={"lora_slots": 2})
    ctx.current = "shard"
    assert ctx.option("tensor_parallel_size", 1) == 1
    with pytest.raises(ValueError, match="lora_slots"):
        ctx.option("lora_slots")
