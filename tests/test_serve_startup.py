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


def test_vllms_parallel_flags_are_checked_against_the_artifact(store):
    """`-tp N` / `--enable-expert-parallel`, on nearly every pasted vLLM command line: the
    artifact fixed its split, so they are checks naming the compile flag (-tp was refused
    even where it said what the artifact does), made before any rank starts."""
    from braze.cli import _check_parallel_flags, build_parser
    art = store.artifact("llama")
    code, _, err = _serve(art, "-tp", "2")
    assert_one_line_error(code, err, "tensor_parallel_size=2",
                          "compiled for --tensor-parallel-size 1")
    code, _, err = _serve(art, "--enable-expert-parallel")
    assert_one_line_error(code, err, "enable_expert_parallel=True", "--expert-parallel")
    for flags in (["--tensor-parallel-size", "1"], ["-tp", "1"], []):
        a = build_parser().parse_args(["serve", str(art), *flags])
        _check_parallel_flags(a)            # what the artifact does: taken


@pytest.mark.parametrize("flags, advice", [
    (["--dtype", "bfloat16"], "braze compile MODEL_DIR -o ARTIFACT --dtype"),
    (["--pipeline-parallel-size", "2"], "--tensor-parallel-size N"),
    (["--enforce-eager"], "--cudagraph-mode none"),
    (["--trust-remote-code"], "loads no model code"),
    (["--uvicorn-log-level", "warning"], "--log-level"),
    (["--kv-cache-dtype", "fp8"], "braze compile"),
    (["--ssl-keyfile", "k.pem"], "reverse proxy"),
    (["--distributed-executor-backend", "mp"], "starts its N ranks itself"),
    (["--speculative-model", "/d"], "--speculative-config"),
    (["--num-speculative-tokens", "3"], "--speculative-config")])
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


@pytest.mark.parametrize("flag", ["--disable-log-stats"])
def test_vllm_flags_for_what_braze_always_does_are_taken(flag):
    """vLLM's switches for behaviour braze has by default (no periodic stats log) keep a
    vLLM command line working."""
    from braze.cli import build_parser
    a = build_parser().parse_args(["serve", "art.braze", flag])
    assert a.artifact == "art.braze"


def test_several_served_model_names_are_taken(monkeypatch):
    """vLLM's `--served-model-name a b`: every name is answered, the first is the one
    responses and /metrics give (it was 'unrecognized arguments: b')."""
    from braze.cli import _server_options, build_parser
    for name in ("BRAZE_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    a = build_parser().parse_args(["serve", "art.braze", "--served-model-name", "llama",
                                   "gpt-4o-mini", "--port", "9"])
    so = _server_options(a)
    assert so.served_model_names == ["llama", "gpt-4o-mini"] and so.port == 9
    one = _server_options(build_parser().parse_args(["serve", "art.braze",
                                                     "--served-model-name", "m"]))
    assert one.served_model_names == ["m"]
    assert _server_options(build_parser().parse_args(["serve", "art.braze"])) \
        .served_model_names == []
    # before ARTIFACT (as a braze command line could always give it), the names end there
    from braze.cli import _take_artifact
    a = build_parser().parse_args(["serve", "--served-model-name", "m", "alias", "art.braze"])
    _take_artifact(a)
    assert a.artifact == "art.braze" and _server_options(a).served_model_names == ["m", "alias"]
    a = build_parser().parse_args(["serve", "--served-model-name", "m", "art.braze"])
    _take_artifact(a)
    assert a.artifact == "art.braze" and _server_options(a).served_model_names == ["m"]


def test_a_request_may_name_any_served_model_name(store):
    """Every --served-model-name is a card of /v1/models and runs the model; responses
    name the first, as vLLM's do; other names are still a 404."""
    from fastapi.testclient import TestClient

    from braze.runtime.engine import Engine
    from braze.serving.app import Service, create_app
    from braze.serving.async_engine import AsyncEngine
    from braze.serving.metrics import Metrics
    engine = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64)
    metrics = Metrics("llama")
    svc = Service(AsyncEngine(engine, metrics=metrics), metrics, "llama", engine.max_model_len,
                  engine.tokenizer, None, model_aliases=("gpt-4o-mini",))
    body = {"prompt": [1, 9, 10, 11], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(svc)) as client:
        assert [c["id"] for c in client.get("/v1/models").json()["data"]] == \
            ["llama", "gpt-4o-mini"]
        assert client.get("/v1/models/gpt-4o-mini").json()["id"] == "gpt-4o-mini"
        first = client.post("/v1/completions", json={**body, "model": "llama"}).json()
        alias = client.post("/v1/completions", json={**body, "model": "gpt-4o-mini"})
        assert alias.status_code == 200, alias.text
        assert alias.json()["model"] == "llama"
        assert alias.json()["choices"][0]["text"] == first["choices"][0]["text"]
        assert client.post("/v1/completions", json={**body, "model": "other"}).status_code \
            == 404
