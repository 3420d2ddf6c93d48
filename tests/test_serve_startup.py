"""`braze serve` options an operator gets wrong are refused at start-up, in one line that
names the option, instead of a traceback, an internal error, or a server that starts and
ignores them (docs/serving.md: "Startup errors ... are one line on stderr and exit status 1").

A server that wrongly starts is killed by `run`'s timeout, which fails the test."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from cli_helpers import assert_one_line_error, run  # noqa: E402
from lora_helpers import make_adapter  # noqa: E402

START = 120     # seconds: a refused start exits long before; a started server is killed


def _serve(artifact, *flags, env=None):
    return run("serve", artifact, "--port", "0", "--backend", "reference", *flags,
               env=env, timeout=START)


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_one_line(store, port):
    code, _, err = _serve(store.artifact("llama"), "--port", port)
    assert code == 1
    assert_one_line_error(code, err, "--port", port)


def test_runtime_lora_updating_needs_a_lora_artifact(store):
    """The load/unload routes could only ever answer 400 on an artifact without LoRA slots."""
    code, _, err = _serve(store.artifact("llama"), "--allow-runtime-lora-updating")
    assert_one_line_error(code, err, "--allow-runtime-lora-updating", "--lora-slots")


def test_an_adapter_named_like_the_served_model_is_refused(store, tmp_path):
    """A request naming the served model runs the base model, so such an adapter could never
    be reached; /v1/load_lora_adapter refuses that name too."""
    ad = make_adapter(store.checkpoint("llama"), tmp_path / "ad", seed=3, r=2)
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    code, _, err = _serve(art, "--served-model-name", "mine", "--lora-modules", f"mine={ad}")
    assert_one_line_error(code, err, "--lora-modules", "'mine'", "served model")


def test_vllms_lora_flags_are_checked_against_the_artifact(store):
    """`--enable-lora --max-loras K --max-lora-rank R`, pasted from a vLLM command line: the
    artifact fixed its slots and rank, so the flags are checks naming the compile flag."""
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    code, _, err = _serve(art, "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16")
    assert_one_line_error(code, err, "max_lora_rank=16", "--max-lora-rank 8")
    code, _, err = _serve(store.artifact("llama"), "--enable-lora")
    assert_one_line_error(code, err, "enable_lora=True", "--lora-slots")


@pytest.mark.parametrize("flags, env, source", [
    (("--api-key", " "), {}, "--api-key"),
    ((), {"BRAZE_API_KEY": " "}, "$BRAZE_API_KEY"),
    ((), {"BRAZE_API_KEY": "", "VLLM_API_KEY": "\t"}, "$VLLM_API_KEY")])
def test_a_blank_api_key_names_where_it_came_from(store, flags, env, source):
    """A key set to spaces (a templated deployment with an empty secret) is refused, naming
    the flag or variable to fix, since with a variable nothing on the command line shows it."""
    code, _, err = _serve(store.artifact("llama"), *flags,
                          env={"BRAZE_API_KEY": "", "VLLM_API_KEY": "", **env})
    assert_one_line_error(code, err, source, "blank")


@pytest.mark.parametrize("flags, advice", [
    (["--dtype", "bfloat16"], "braze compile MODEL_DIR -o ARTIFACT --dtype"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size N"),
    (["-tp", "2"], "--tensor-parallel-size N"),
    (["--enforce-eager"], "--cudagraph-mode none"),
    (["--trust-remote-code"], "loads no model code"),
    (["--uvicorn-log-level", "warning"], "--log-level"),
    (["--kv-cache-dtype", "fp8"], "braze compile"),
    (["--ssl-keyfile", "k.pem"], "reverse proxy")])
def test_vllm_flags_braze_does_not_take_say_what_to_do(flags, advice, capsys):
    """A flag pasted from a vLLM command line that braze serve has no use for is refused
    naming it and the braze way to get what it asked for (argparse alone said only
    "unrecognized arguments")."""
    from braze.cli import build_parser
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "art.braze", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flags[0] in err and advice in err, err


@pytest.mark.parametrize("flag", ["--enable-auto-tool-choice", "--disable-log-stats"])
def test_vllm_flags_for_what_braze_always_does_are_taken(flag):
    """vLLM's switches for behaviour braze has by default (tool calls read for tool_choice
    "auto"; no periodic stats log) keep a vLLM command line working."""
    from braze.cli import build_parser
    a = build_parser().parse_args(["serve", "art.braze", flag])
    assert a.artifact == "art.braze"
