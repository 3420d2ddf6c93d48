"""`braze compile` and `braze opt` options as a user types them: each honoured, or refused in
one line naming the option and what to do, before any tracing; never silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error


def _main(capsys, *args):
    """`braze ARGS` in this process (no interpreter start-up) -> (code, stdout, stderr)."""
    from braze.cli import main
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    from pass_helpers import traced_file
    return traced_file(tmp_path_factory.mktemp("surface"))


def test_dump_ir_at_a_file_is_refused_before_tracing(store, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    out = tmp_path / "a.braze"
    code, _, err = _main(capsys, "compile", store.checkpoint("llama"), "-o", out,
                         "--opt-level", "0", "--targets", "", "--dump-ir", blocker)
    assert_one_line_error(code, err, "--dump-ir", str(blocker))
    assert "internal error" not in err and "tracing" not in err
    assert blocker.read_text() == "mine" and not out.exists()


def test_opt_on_a_file_that_is_not_text_is_one_line(tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x00\xba\xff\xfe" * 64)
    code, out, err = _main(capsys, "opt", f, "--passes", "canonicalize")
    assert_one_line_error(code, err, str(f), "UTF-8")
    assert out == ""


@pytest.mark.parametrize("flag, value, reader", [("--max-num-tokens", "64", "plan-memory"),
                                                 ("--cudagraph-mode", "none", "split-segments")])
def test_opt_flag_for_a_pass_not_named_is_refused_and_honoured_when_named(
        traced, capsys, flag, value, reader):
    """braze opt's shortcuts for compile options are checked like --set: an option no pass
    in --passes reads is an error, not silently dropped; named with its reader, it reaches
    the pass exactly as --set gives it."""
    key = flag[2:].replace("-", "_")
    code, _, err = _main(capsys, "opt", traced, "--passes", "canonicalize", flag, value)
    assert_one_line_error(code, err, key, "--list-passes")
    code, by_flag, err = _main(capsys, "opt", traced, "--passes", reader, flag, value)
    assert code == 0, err
    code, by_set, err = _main(capsys, "opt", traced, "--passes", reader, "--set",
                              f"{key}={value}")
    assert code == 0, err
    assert by_flag == by_set
    code, default, err = _main(capsys, "opt", traced, "--passes", reader)
    assert code == 0 and default != by_flag


@pytest.mark.parametrize("flag, value", [("--max-lora-rank", "8"),
                                         ("--lora-targets", "q,v")])
def test_lora_options_without_lora_slots_are_refused(store, tmp_path, capsys, flag, value):
    """Without --lora-slots the artifact serves no adapters: a rank or targets given for them
    would be recorded and dropped. vLLM refuses --max-lora-rank without --enable-lora too."""
    out = tmp_path / "a.braze"
    code, _, err = _main(capsys, "compile", store.checkpoint("llama"), "-o", out,
                         "--opt-level", "0", "--targets", "", flag, value)
    assert_one_line_error(code, err, flag, "--lora-slots")
    assert "tracing" not in err and not out.exists()


def test_lora_options_with_lora_slots_reach_the_manifest(store):
    from braze.artifact import read_manifest
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8, lora_targets="q,v")
    opts = read_manifest(art)["options"]
    assert (opts["lora_slots"], opts["max_lora_rank"], opts["lora_targets"]) == (2, 8, "q,v")


@pytest.mark.parametrize("targets, bad", [("sm_99", "sm_99"), ("sm_80,sm_9", "sm_9"),
                                          ("sm_800", "sm_800")])
def test_a_target_no_gpu_has_is_refused_before_tracing(store, tmp_path, capsys, targets, bad):
    """A typo in --targets (sm_99 for sm_90) made Triton's LLVM print a crash dump of
    hundreds of lines per kernel and the error blame the first kernel; it is the flag's."""
    out = tmp_path / "a.braze"
    code, _, err = _main(capsys, "compile", store.checkpoint("llama"), "-o", out,
                         "--opt-level", "0", "--targets", targets)
    assert_one_line_error(code, err, "--targets", repr(bad), "sm_90")
    assert "tracing" not in err and not out.exists()


@pytest.mark.parametrize("level", ["0", "1"])
def test_dash_O_is_the_opt_level(store, tmp_path, capsys, level):
    """`-O1` as cc, mlir-opt and vLLM spell it (DESIGN: -O0 nothing, -O1 canonicalisation,
    -O2 everything): the same pipeline as --opt-level."""
    from braze.artifact import read_manifest
    out = tmp_path / "a.braze"
    code, _, err = _main(capsys, "compile", store.checkpoint("llama"), "-o", out,
                         f"-O{level}", "--targets", "", "-q")
    assert code == 0, err
    got = read_manifest(out)
    want = read_manifest(store.artifact("llama", opt_level=int(level)))
    assert got["options"]["opt_level"] == int(level)
    assert got["compile"]["passes"] == [dict(p, ms=q["ms"]) for p, q in
                                        zip(want["compile"]["passes"], got["compile"]["passes"])]
    assert (out / "graph.bir").read_text() == (store.artifact("llama", opt_level=int(level))
                                               / "graph.bir").read_text()


def test_explain_is_shown_under_quiet_and_says_when_nothing_was_refused(store, tmp_path,
                                                                         capsys):
    """-q silences progress, not what --explain was asked for: each refusal is one line (the
    manifest counts them), and a compile that refused nothing says so rather than nothing."""
    from braze.artifact import read_manifest
    out = tmp_path / "g.braze"
    code, _, err = _main(capsys, "compile", store.checkpoint("gemma4-ple-kvshare-moe"), "-o",
                         out, "--targets", "", "--explain", "-q")
    assert code == 0, err
    said = [ln for ln in err.splitlines() if ln.strip().startswith("refused [")]
    assert len(said) == read_manifest(out)["compile"]["refusals"] > 0, err
    assert "[1/3]" not in err                    # still quiet otherwise
    code, _, err = _main(capsys, "compile", store.checkpoint("llama"), "-o", tmp_path / "l",
                         "-O1", "--targets", "", "--explain", "-q")
    assert code == 0 and read_manifest(tmp_path / "l")["compile"]["refusals"] == 0
    assert "nothing" in err and "refused" in err


def test_opt_explain_says_when_nothing_was_refused(traced, capsys):
    code, _, err = _main(capsys, "opt", traced, "--passes", "canonicalize,fuse-norm",
                         "--explain")
    assert code == 0 and err.strip() == "--explain: nothing refused"
    code, _, err = _main(capsys, "opt", traced, "--passes", "tabulate-positions", "--explain")
    assert code == 0 and "refused [tabulate-positions]" in err and "nothing" not in err


def test_dump_ir_into_a_reused_directory_holds_only_this_compiles_stages(store, tmp_path,
                                                                         capsys):
    """A second --dump-ir into the same directory (at -O1 after -O2) left the -O2 run's
    02-merge-projections.bir ... 15-plan-memory.bir beside the new files, read as this
    compile's; the user's own files there stay."""
    from braze.passes.manager import pipeline
    d = tmp_path / "ir"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    for i, level in enumerate((2, 1)):
        code, _, err = _main(capsys, "compile", store.checkpoint("llama"), "-o",
                             tmp_path / f"a{i}", f"-O{level}", "--targets", "", "-q",
                             "--dump-ir", d)
        assert code == 0, err
    want = {"00-traced.bir", "notes.txt"} | {f"{i + 1:02d}-{n}.bir"
                                            for i, n in enumerate(pipeline(1))}
    assert {p.name for p in d.iterdir()} == want
    assert (d / "notes.txt").read_text() == "mine"


def test_opt_print_after_all_with_no_passes_prints_the_graph(traced, capsys):
    """--print-after-all replaces the final print with one per pass: with --passes '' that
    printed nothing at all, where the graph as read (the fixed point) is the answer."""
    code, out, err = _main(capsys, "opt", traced, "--print-after-all")
    assert code == 0, err
    assert out == traced.read_text()


def test_python_api_takes_target_lists_as_the_flags_comma_lists(store, tmp_path):
    """braze.compile(targets=["sm_80"]) raised AttributeError: 'list' object has no attribute
    'split', and lora_targets=["q", "v"] an error about the entry "['q'"."""
    import braze
    from braze.artifact import read_manifest
    braze.compile(store.checkpoint("llama"), tmp_path / "a", opt_level=0, targets=[],
                  lora_slots=2, lora_targets=["q", "v"])
    opts = read_manifest(tmp_path / "a")["options"]
    assert (opts["targets"], opts["lora_targets"]) == ("", "q,v")
    from braze.ir.errors import BrazeError
    with pytest.raises(BrazeError, match="--targets.*sm_80"):
        braze.compile(store.checkpoint("llama"), tmp_path / "b", targets=5)


@pytest.mark.parametrize("option, value", [("opt_level", "2"), ("max_num_tokens", "8192"),
                                           ("max_model_len", 64.5), ("lora_slots", None)])
def test_python_api_names_an_option_of_the_wrong_type(tmp_path, option, value):
    """A string from a config file ("2") was told 'must be 0, 1 or 2, got 2', or failed
    inside with "TypeError: '<' not supported"; the option is named with what it takes."""
    from braze.config import CompileOptions
    from braze.ir.errors import BrazeError
    with pytest.raises(BrazeError, match=f"--{option.replace('_', '-')}.*integer.*{value!r}"):
        CompileOptions(**{option: value}).validate()


@pytest.fixture
def broken_pass():
    """A pass under development that crashes (level None: in no pipeline), removed after."""
    from braze.passes import register_pass
    from braze.passes.manager import PASSES, all_passes
    all_passes()

    @register_pass("zz-broken", level=None)
    def broken(g, ctx):
        """zz-broken: a pass with a bug."""
        return {}["missing"]
    yield "zz-broken"
    del PASSES["zz-broken"]


def test_a_pass_that_crashes_is_named(traced, capsys, monkeypatch, broken_pass):
    """A bug in a pass being written said 'internal error: KeyError: missing' with no word
    of which pass of --passes raised it."""
    monkeypatch.delenv("BRAZE_DEBUG", raising=False)
    code, out, err = _main(capsys, "opt", traced, "--passes", f"canonicalize,{broken_pass}")
    assert code != 0 and out == ""
    assert "Traceback" not in err and broken_pass in err and "KeyError" in err, err


@pytest.fixture
def corrupting_pass():
    """A pass under development in the -O1 pipeline that leaves a wrong declared type."""
    from braze.ir import TensorType
    from braze.passes import register_pass
    from braze.passes.manager import PASSES, all_passes
    all_passes()

    @register_pass("zz-corrupt", stage="simplify", level=1, after=("canonicalize",))
    def corrupt(g, ctx):
        """zz-corrupt: declares the embedding's result f16."""
        n = next(n for n in g.nodes if n.op == "embedding")
        n.results[0].type = TensorType(n.results[0].type.shape, "f16")
        return 1
    yield "zz-corrupt"
    del PASSES["zz-corrupt"]


def test_a_malformed_graph_after_the_passes_says_how_to_find_the_pass(
        store, tmp_path, capsys, monkeypatch, corrupting_pass):
    monkeypatch.delenv("BRAZE_VERIFY_EACH", raising=False)
    args = ("compile", store.checkpoint("llama"), "-O1", "--targets", "", "-q")
    code, _, err = _main(capsys, *args, "-o", tmp_path / "a")
    assert_one_line_error(code, err, "embedding", "BRAZE_VERIFY_EACH=1")
    monkeypatch.setenv("BRAZE_VERIFY_EACH", "1")
    code, _, err = _main(capsys, *args, "-o", tmp_path / "b")
    assert_one_line_error(code, err, "embedding", f"after pass {corrupting_pass}")


def test_a_pass_that_changes_nodes_after_a_schedule_pass_is_refused(traced, capsys):
    """--passes split-segments,plan-memory,fuse-norm printed a graph whose segments and
    memory plan named node indices and values fuse-norm had since changed (a last segment
    ending at node 101 of 73), and the verifier passed it."""
    code, out, err = _main(capsys, "opt", traced, "--passes",
                           "canonicalize,split-segments,plan-memory,fuse-norm")
    assert_one_line_error(code, err, "fuse-norm", "split-segments", "before")
    assert out == ""
    code, out, err = _main(capsys, "opt", traced, "--passes",
                           "canonicalize,fuse-norm,split-segments,plan-memory")
    assert code == 0, err


@pytest.mark.parametrize("level", ["0", "1"])
def test_max_logits_rows_below_O2_is_refused(store, tmp_path, capsys, level):
    """Below -O2 no prune-logits runs: every token has its logits row, and the runtime
    reads --max-logits-rows only from a pruned artifact, so it was recorded and ignored."""
    out = tmp_path / "a.braze"
    code, _, err = _main(capsys, "compile", store.checkpoint("llama"), "-o", out,
                         f"-O{level}", "--targets", "", "--max-logits-rows", "512")
    assert_one_line_error(code, err, "--max-logits-rows", f"-O{level}", "-O2")
    assert not out.exists()


def test_a_graph_header_wrapped_over_lines_parses_as_docs_write_it(tmp_path, capsys):
    """docs/writing-a-pass.md shows fuse-attention's input with its header over two lines;
    braze opt refused it ('expected graph @name(...) {' on line 1). It reads as one line."""
    from braze.ir import parse_graph
    doc = (Path(__file__).parents[1] / "docs" / "writing-a-pass.md").read_text()
    block = doc.split("    graph @g(", 1)[1].split("\n    }\n", 1)[0]
    text = "graph @g(" + block.replace("\n    ", "\n") + "\n}\n"
    assert "\n" in text.split("{", 1)[0]                      # wrapped, as in the doc
    f = tmp_path / "fa.bir"
    f.write_text(text)
    code, out, err = _main(capsys, "opt", f, "--passes", "fuse-attention")
    assert code == 0, err
    assert "= attention(" in out and "paged_attention" not in out
    one_line = text.split("{", 1)[0].replace("\n", " ") + "{" + text.split("{", 1)[1]
    g = parse_graph(one_line)
    from braze.ir import print_graph
    assert print_graph(parse_graph(text)) == print_graph(g)
    f.write_text("graph @g(%x: f32[T],\n  %y: f32[T]\n")
    code, _, err = _main(capsys, "opt", f)
    assert_one_line_error(code, err, str(f), "line 1", "{")


@pytest.mark.parametrize("inside", ["ir", "."])
def test_dump_ir_inside_the_artifact_is_refused_before_tracing(store, tmp_path, capsys,
                                                               inside):
    """-o out --dump-ir out/ir made out/ before the compile, which then ended, after all
    its work, with 'out already exists; pass --force' (and --force would delete the dump)."""
    out = tmp_path / "a.braze"
    code, _, err = _main(capsys, "compile", store.checkpoint("llama"), "-o", out, "-O0",
                         "--targets", "", "--dump-ir", out / inside)
    assert_one_line_error(code, err, "--dump-ir", str(out))
    assert "tracing" not in err and not out.exists()


def test_a_target_named_twice_is_compiled_once():
    """--targets sm_80,sm_90,sm_80 compiled every kernel for sm_80 twice (twice the time)."""
    from braze.config import CompileOptions
    assert CompileOptions(targets="sm_80, sm_90,sm_80").target_list() == ["sm_80", "sm_90"]
