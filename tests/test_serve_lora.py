"""`braze serve` with LoRA adapters: --lora-modules at start, /v1/load_lora_adapter and
/v1/unload_lora_adapter with vLLM's shapes and errors, "model": <adapter> against
transformers + peft, /v1/models with parents, and unloading while a request streams."""

from __future__ import annotations

import json
import threading

import pytest
import torch

pytest.importorskip("openai")

from lora_helpers import make_adapter, peft_greedy, write_adapter  # noqa: E402
from serve_helpers import MODEL, Server  # noqa: E402

PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9]


@pytest.fixture(scope="module")
def adapters(store, tmp_path_factory):
    ck = store.checkpoint("llama")
    d = tmp_path_factory.mktemp("serve-adapters")
    return {"a": make_adapter(ck, d / "a", seed=21, r=4, scale=3.0),
            "b": make_adapter(ck, d / "b", seed=22, r=2, targets=["q_proj", "v_proj"], scale=3.0),
            "big": make_adapter(ck, d / "big", seed=23, r=16, targets=["q_proj"]),
            "odd": write_adapter(d / "odd", {
                "base_model.model.model.layers.0.mlp.c_fc.lora_A.weight": torch.ones(4, 64),
                "base_model.model.model.layers.0.mlp.c_fc.lora_B.weight": torch.ones(128, 4)})}


@pytest.fixture(scope="module")
def server(store, adapters, tmp_path_factory):
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    s = Server(art, tmp_path_factory.mktemp("serve-lora"), "--lora-modules",
               f"a={adapters['a']}", "--allow-runtime-lora-updating")
    try:
        yield s
    finally:
        s.stop()


def _complete(server, model, max_tokens=6, stream=False):
    return server.http.post("/v1/completions", json={
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True, "stream": stream})


def test_models_list_adapters_with_their_parent(server, adapters):
    data = server.http.get("/v1/models").json()["data"]
    assert data[0]["id"] == MODEL
    cards = {d["id"]: d for d in data[1:]}
    assert cards["a"]["parent"] == MODEL and cards["a"]["root"] == str(adapters["a"])


def test_requests_pick_an_adapter_by_model(server, store, adapters):
    ck = store.checkpoint("llama")
    got = _complete(server, "a").json()["choices"][0]["token_ids"]
    assert got == peft_greedy(ck, adapters["a"], PROMPT, 6)
    base = _complete(server, MODEL).json()["choices"][0]["token_ids"]
    assert base == peft_greedy(ck, None, PROMPT, 6) != got


def test_load_use_unload_reload(server, store, adapters):
    ck = store.checkpoint("llama")
    r = server.http.post("/v1/load_lora_adapter", json={"lora_name": "b",
                                                         "lora_path": str(adapters["b"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'b' added successfully."
    want = peft_greedy(ck, adapters["b"], PROMPT, 6)
    assert _complete(server, "b").json()["choices"][0]["token_ids"] == want
    r = server.http.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'b' removed successfully."
    r = _complete(server, "b")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "b" not in [d["id"] for d in server.http.get("/v1/models").json()["data"]]
    r = server.http.post("/v1/load_lora_adapter", json={"lora_name": "b",
                                                         "lora_path": str(adapters["b"])})
    assert r.status_code == 200
    assert _complete(server, "b").json()["choices"][0]["token_ids"] == want


@pytest.mark.parametrize("body,status,message", [
    ({"lora_name": "a", "lora_path": "/x"}, 400, "The lora adapter 'a' has already been loaded."),
    ({"lora_name": "n"}, 400, "Both 'lora_name' and 'lora_path' must be provided."),
    ({"lora_name": "n", "lora_path": "/no/such/dir"}, 404, "no adapter_config.json"),
    ({"lora_name": "n", "lora_path": "{big}"}, 400, "rank 16, more than the artifact's --max-lora-rank 8"),
    ({"lora_name": "n", "lora_path": "{odd}"}, 400, "targets module model.layers.0.mlp.c_fc, which "
                                                    "this model has no LoRA-capable linear for"),
])
def test_load_errors(server, adapters, body, status, message):
    body = {k: v.format(**{k: str(p) for k, p in adapters.items()}) for k, v in body.items()}
    r = server.http.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == status
    assert message in r.json()["error"]["message"]


def test_unload_unknown_is_404(server):
    r = server.http.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "The lora adapter 'nope' cannot be found."


def test_unload_while_streaming_lets_it_finish(server, store, adapters):
    r = server.http.post("/v1/load_lora_adapter", json={"lora_name": "c",
                                                         "lora_path": str(adapters["a"])})
    assert r.status_code == 200
    first = threading.Event()
    tokens: list[int] = []
    finish = []

    def stream():
        with server.http.stream("POST", "/v1/completions", json={
                "model": "c", "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    ch = json.loads(line[6:])["choices"][0]
                    tokens.extend(ch.get("token_ids") or [])
                    if ch.get("finish_reason"):
                        finish.append(ch["finish_reason"])
                    first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    assert server.http.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
    unloaded_at = len(tokens)
    assert _complete(server, "c").status_code == 404
    t.join(120)
    assert finish == ["length"] and unloaded_at < 200        # it was running when unloaded
    assert tokens == peft_greedy(store.checkpoint("llama"), adapters["a"], PROMPT, 200)


def test_responses_name_the_adapter_they_ran(server):
    """As vLLM answers: a response's "model" is the adapter the request named (plain,
    streamed, chat and beam search alike), and the served model's name without one."""
    assert _complete(server, "a").json()["model"] == "a"
    assert _complete(server, MODEL).json()["model"] == MODEL
    r = _complete(server, "a", stream=True)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert chunks and {c["model"] for c in chunks} == {"a"}
    msgs = [{"role": "user", "content": "hi"}]
    chat = server.client.chat.completions.create(model="a", messages=msgs, max_tokens=3)
    assert chat.model == "a"
    streamed = server.client.chat.completions.create(model="a", messages=msgs, max_tokens=3,
                                                     stream=True,
                                                     stream_options={"include_usage": True})
    assert {c.model for c in streamed} == {"a"}
    beam = server.http.post("/v1/completions", json={
        "model": "a", "prompt": PROMPT, "max_tokens": 2, "n": 2, "use_beam_search": True})
    assert beam.status_code == 200 and beam.json()["model"] == "a"


def test_load_inplace_replaces_the_adapter(server, store, adapters):
    """vLLM's load_inplace: new weights under a loaded adapter's name (an RL trainer's next
    checkpoint); without it the name is refused, with it new requests get the new weights."""
    ck = store.checkpoint("llama")
    load = {"lora_name": "d", "lora_path": str(adapters["a"])}
    assert server.http.post("/v1/load_lora_adapter", json=load).status_code == 200
    r = server.http.post("/v1/load_lora_adapter", json={**load, "lora_path": str(adapters["b"])})
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]
    assert _complete(server, "d").json()["choices"][0]["token_ids"] == \
        peft_greedy(ck, adapters["a"], PROMPT, 6)
    bad = server.http.post("/v1/load_lora_adapter", json={
        **load, "lora_path": str(adapters["big"]), "load_inplace": True})
    assert bad.status_code == 400                      # refused: the old one stays
    r = server.http.post("/v1/load_lora_adapter", json={
        **load, "lora_path": str(adapters["b"]), "load_inplace": True})
    assert r.status_code == 200
    assert _complete(server, "d").json()["choices"][0]["token_ids"] == \
        peft_greedy(ck, adapters["b"], PROMPT, 6)
    cards = {c["id"]: c for c in server.http.get("/v1/models").json()["data"]}
    assert cards["d"]["root"] == str(adapters["b"])


def test_lora_modules_repeated_and_as_json(store, adapters, tmp_path):
    """vLLM's --lora-modules forms: name=path, and a JSON object with name, path and
    base_model_name (the card's parent); a repeated flag adds to the list rather than
    replacing it."""
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    spec = json.dumps({"name": "j", "path": str(adapters["b"]), "base_model_name": "org/base"})
    s = Server(art, tmp_path, "--lora-modules", f"a={adapters['a']}", "--lora-modules", spec)
    try:
        cards = {d["id"]: d for d in s.http.get("/v1/models").json()["data"]}
        assert set(cards) == {MODEL, "a", "j"}
        assert cards["a"]["parent"] == MODEL and cards["j"]["parent"] == "org/base"
        assert cards["j"]["root"] == str(adapters["b"])
        assert _complete(s, "j").json()["choices"][0]["token_ids"] == \
            peft_greedy(store.checkpoint("llama"), adapters["b"], PROMPT, 6)
    finally:
        s.stop()


@pytest.mark.parametrize("spec, needle", [
    ('{"name": "j"}', "needs \"name\" and \"path\""),
    ('{"name": "j", "path": 3}', "needs \"name\" and \"path\""),
    ("{oops", "not valid JSON"),
    ('{"name": "j", "path": "/p", "rank": 8}', "'rank'"),
])
def test_bad_lora_modules_json_is_one_line(store, spec, needle):
    from cli_helpers import assert_one_line_error, run
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    code, _, err = run("serve", art, "--port", "0", "--backend", "reference",
                       "--lora-modules", spec, timeout=120)
    assert_one_line_error(code, err, "--lora-modules", needle)


def test_lora_modules_naming_an_adapter_twice_is_one_line(store, adapters):
    """Two --lora-modules entries with one name: a one-line error naming both paths (it said
    the adapter 'is already loaded ...; unload it first', advice a starting server cannot
    take)."""
    from cli_helpers import assert_one_line_error, run
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    code, _, err = run("serve", art, "--port", "0", "--backend", "reference",
                       "--lora-modules", f"a={adapters['a']}", f"a={adapters['b']}", timeout=120)
    assert_one_line_error(code, err, "--lora-modules", "'a' twice")
    assert str(adapters["a"]) in err and str(adapters["b"]) in err and "unload" not in err


def test_retrieve_a_model_or_an_adapter(server, adapters):
    """The openai client's models.retrieve (GET /v1/models/{id}): the base model's card or
    an adapter's, with its parent; 404 model_not_found for another name."""
    base = server.client.models.retrieve(MODEL)
    assert base.id == MODEL and base.object == "model"
    card = server.http.get("/v1/models/a").json()
    listed = {d["id"]: d for d in server.http.get("/v1/models").json()["data"]}
    assert card == listed["a"] and card["parent"] == MODEL
    r = server.http.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_load_and_unload_while_draining_get_503(store, adapters, tmp_path):
    """After SIGTERM the engine takes no more work: /v1/load_lora_adapter and /unload answer
    the 503 every new request gets while draining (they were a 500, 'a bug in braze')."""
    import signal
    import time

    import httpx
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    s = Server(art, tmp_path, "--lora-modules", f"a={adapters['a']}",
               "--allow-runtime-lora-updating", "--drain-timeout", "60")
    try:
        running = threading.Event()

        def long_one():
            with httpx.stream("POST", s.url + "/v1/completions", timeout=120, json={
                    "model": MODEL, "prompt": PROMPT, "max_tokens": 240, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as r:
                for _ in r.iter_lines():
                    running.set()

        t = threading.Thread(target=long_one, daemon=True)
        t.start()
        assert running.wait(60)
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "the drain never started"
            time.sleep(0.02)
        for path, body in (("/v1/load_lora_adapter", {"lora_name": "b",
                                                       "lora_path": str(adapters["b"])}),
                           ("/v1/unload_lora_adapter", {"lora_name": "a"})):
            r = httpx.post(s.url + path, json=body, timeout=30)
            assert r.status_code == 503, (path, r.text)
            assert "shutting down" in r.json()["error"]["message"]
        t.join(120)
        assert "Traceback" not in s.stderr()
    finally:
        s.stop()


def test_runtime_updating_off_says_how_to_turn_it_on_and_vllms_variable_does(store, adapters,
                                                                               tmp_path):
    """Without --allow-runtime-lora-updating the load/unload routes answer a 404 naming the
    flag (it was 'no route POST /v1/load_lora_adapter'); a vLLM deployment's
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True turns them on, as vLLM's does (it was ignored)."""
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    (tmp_path / "off").mkdir()
    s = Server(art, tmp_path / "off", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"})
    try:
        for path, body in (("/v1/load_lora_adapter", {"lora_name": "b",
                                                       "lora_path": str(adapters["b"])}),
                           ("/v1/unload_lora_adapter", {"lora_name": "b"})):
            r = s.http.post(path, json=body)
            assert r.status_code == 404
            assert "--allow-runtime-lora-updating" in r.json()["error"]["message"]
        assert [d["id"] for d in s.http.get("/v1/models").json()["data"]] == [MODEL]
    finally:
        s.stop()
    (tmp_path / "env").mkdir()
    s = Server(art, tmp_path / "env", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    try:
        r = s.http.post("/v1/load_lora_adapter", json={"lora_name": "b",
                                                       "lora_path": str(adapters["b"])})
        assert r.status_code == 200, r.text
        assert _complete(s, "b").json()["choices"][0]["token_ids"] == \
            peft_greedy(store.checkpoint("llama"), adapters["b"], PROMPT, 6)
        assert s.http.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
    finally:
        s.stop()


def test_an_adapter_whose_files_went_away_fails_its_request_alone(store, adapters, tmp_path):
    """--max-cpu-loras below the adapters loaded: one is read from disk again when a request
    needs it. Its directory deleted meanwhile, that request gets an error naming the adapter
    (it ended the engine and every request with it) and the server goes on serving; with
    --max-loras 1 /server_info says one adapter per batch."""
    import shutil
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    gone = shutil.copytree(adapters["b"], tmp_path / "gone")
    s = Server(art, tmp_path, "--lora-modules", f"gone={gone}", f"a={adapters['a']}",
               f"c={adapters['b']}", "--max-cpu-loras", "2", "--max-loras", "1")
    try:
        assert s.http.get("/server_info").json()["engine"]["lora"]["max_loras"] == 1
        shutil.rmtree(gone)
        r = _complete(s, "gone")
        assert r.status_code == 503 and "LoRA adapter 'gone'" in r.json()["error"]["message"]
        ck = store.checkpoint("llama")
        assert _complete(s, "a").json()["choices"][0]["token_ids"] == \
            peft_greedy(ck, adapters["a"], PROMPT, 6)
        assert "Traceback" not in s.stderr()
    finally:
        s.stop()


def test_beam_search_keeps_its_adapter_when_it_is_replaced_midway(store, adapters, tmp_path):
    """A beam search runs each step as new requests: it pins the adapter version it started
    with, as a sampled request does. Replaced in place (load_inplace) while it runs, it
    still gives LLM.beam_search's beams on that adapter (its later steps took the new
    weights), and unloading midway lets it finish (its next step was a 404)."""
    from braze.runtime.llm import LLM
    from braze.runtime.lora import LoRARequest
    from braze.runtime.beam_search import BeamSearchParams
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    n = 30
    llm = LLM(art, backend="reference", num_kv_blocks=64)
    want = {k: llm.beam_search([{"prompt_token_ids": PROMPT}], BeamSearchParams(
        beam_width=2, max_tokens=n, ignore_eos=True), lora_request=LoRARequest(
            k, 1, str(adapters[k])))[0].sequences for k in "ab"}
    s = Server(art, tmp_path, "--lora-modules", f"a={adapters['a']}",
               "--allow-runtime-lora-updating")
    try:
        # "a" replaced by b's weights while a search on a runs; then unloaded while one on
        # (now) b runs
        for change, ran in (({"lora_name": "a", "lora_path": str(adapters["b"]),
                              "load_inplace": True}, "a"), (None, "b")):
            got = {}

            def search():
                got["r"] = s.http.post("/v1/completions", json={
                    "model": "a", "prompt": PROMPT, "max_tokens": n, "n": 2,
                    "use_beam_search": True, "ignore_eos": True, "return_token_ids": True})

            t = threading.Thread(target=search)
            key = "braze_generation_tokens_total"
            before = s.metrics().get(key, 0)
            t.start()                   # a few steps in (two beams, a token each per step)
            s.wait_metrics(lambda m: m.get(key, 0) >= before + 8, timeout=60)
            r = (s.http.post("/v1/load_lora_adapter", json=change) if change else
                 s.http.post("/v1/unload_lora_adapter", json={"lora_name": "a"}))
            assert r.status_code == 200, r.text
            t.join(120)
            assert t.is_alive() is False and got["r"].status_code == 200, got["r"].text
            beams = [c["token_ids"] for c in got["r"].json()["choices"]]
            assert beams == [b.token_ids for b in want[ran]]
    finally:
        s.stop()
