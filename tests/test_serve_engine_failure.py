"""The engine thread of `braze serve` failing under load (serving/async_engine.py): every
request in flight or just accepted gets an answer (503, not a hang), and /metrics says what
happened (the failed requests counted as errors, nothing left running). The real engine on
the tiny llama, its step made to raise as a device fault would."""

from __future__ import annotations

import asyncio
import re

import pytest

pytest.importorskip("fastapi")

from braze.runtime.engine import Engine  # noqa: E402
from braze.runtime.sampler import SamplingParams  # noqa: E402
from braze.serving.async_engine import AsyncEngine, Unavailable  # noqa: E402
from braze.serving.metrics import Metrics  # noqa: E402
from serve_helpers import parse_metrics  # noqa: E402

from conftest import prompts_of  # noqa: E402

GUARD = 30.0          # a hang guard, not a timing assertion


class DeviceFault(RuntimeError):
    pass


def _failing_engine(artifact, after_steps: int) -> Engine:
    """An engine whose step raises after `after_steps` good ones."""
    engine = Engine(artifact, backend="reference", num_kv_blocks=64)
    step, count = engine.step, [0]

    def faulty():
        count[0] += 1
        if count[0] > after_steps:
            raise DeviceFault("simulated device fault")
        return step()
    engine.step = faulty
    return engine


def test_a_request_accepted_in_the_failing_step_gets_503_not_a_hang(store):
    """The engine accepts the request, then its first step fails: the client must hear
    about it (before the fix `add` awaited an acknowledgement that never came)."""
    engine = _failing_engine(store.artifact("llama"), after_steps=0)
    (prompt,) = prompts_of([6], seed=3)

    async def main():
        aeng = AsyncEngine(engine, metrics=Metrics("m"))
        aeng.start()
        try:
            with pytest.raises(Unavailable, match="simulated device fault"):
                await asyncio.wait_for(
                    aeng.add("r0", prompt, SamplingParams(max_tokens=4), len(prompt)), GUARD)
            assert not aeng.alive and aeng.num_inflight == 0
        finally:
            await aeng.stop()
    asyncio.run(main())


def test_requests_failed_by_the_engine_are_counted_and_nothing_shows_running(store):
    """Two streams running when the engine fails: each ends with Unavailable, /metrics
    counts both as finish_reason "error" and shows no request running or KV block held
    (the gauges had stayed at the last good step's values for ever)."""
    engine = _failing_engine(store.artifact("llama"), after_steps=3)
    prompts = prompts_of([5, 7], seed=4)
    metrics = Metrics("m")

    async def main():
        aeng = AsyncEngine(engine, metrics=metrics)
        aeng.start()
        try:
            # both sent before either is acknowledged: awaited one by one, the first could
            # run its three good steps (and the engine fail) before the second was sent
            streams = await asyncio.gather(*(
                aeng.add(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True), len(p))
                for i, p in enumerate(prompts)))
            for s in streams:
                with pytest.raises(Unavailable, match="simulated device fault"):
                    async for _ in s:
                        pass
            return parse_metrics(metrics.render(aeng.snapshot()))
        finally:
            await aeng.stop()
    m = asyncio.run(asyncio.wait_for(main(), GUARD))
    assert m['braze_requests_total{finish_reason="error"}'] == 2
    assert sum(m[f'braze_requests_total{{finish_reason="{r}"}}']
               for r in ("stop", "length", "abort")) == 0
    assert m["braze_requests_running"] == 0 and m["braze_requests_waiting"] == 0
    assert m["braze_kv_cache_usage"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_over_http_the_failure_is_a_503_and_logged_as_an_error(store, stream, caplog):
    """Through the app: the request the failing step took gets an OpenAI-shaped 503 (a
    stream: its error event), and the request's log line says it ended in an error, as
    /metrics counts it (it said "finish abort", as for a client that went away)."""
    from fastapi.testclient import TestClient

    from braze.serving.app import Service, create_app
    engine = _failing_engine(store.artifact("llama"), after_steps=2)
    metrics = Metrics("m")
    svc = Service(AsyncEngine(engine, metrics=metrics), metrics, "m", engine.max_model_len,
                  engine.tokenizer, None)
    body = {"model": "m", "prompt": [1, 7, 8], "max_tokens": 20, "ignore_eos": True,
            "stream": stream}
    with caplog.at_level("INFO", logger="braze.serving"), TestClient(create_app(svc)) as client:
        r = client.post("/v1/completions", json=body)
        if stream:
            assert r.status_code == 200
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and '"type":"service_unavailable"' in events[-2]
            assert "simulated device fault" in events[-2]
        else:
            assert r.status_code == 503, r.text
            assert "simulated device fault" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503
    (line,) = [rec.getMessage() for rec in caplog.records if "output tokens, finish" in
               rec.getMessage()]
    assert "finish error" in line, line
    assert parse_metrics(metrics.render(svc.aengine.snapshot()))[
        'braze_requests_total{finish_reason="error"}'] == 1


def _wait_for(pred, what: str):
    """Poll `pred` until it holds (a hang guard of GUARD seconds, not a timing assertion)."""
    import time
    deadline = time.monotonic() + GUARD
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_hung_step_makes_health_503_until_it_returns(store, caplog):
    """A step that never returns (a hung kernel) left /health at 200 for ever: only a dead
    engine thread was noticed. Past --engine-iteration-timeout, /health and /ping answer 503
    naming the stall, /metrics' braze_engine_stalled reads 1 and the log says so; once the
    step returns all is well again and the request finishes with its tokens."""
    import threading

    from fastapi.testclient import TestClient

    from braze.serving.app import Service, create_app
    engine = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64)
    step, count = engine.step, [0]
    entered, release = threading.Event(), threading.Event()

    def hanging():
        count[0] += 1
        if count[0] == 2:             # the second step hangs until the test lets it go
            entered.set()
            release.wait(GUARD)
        return step()
    engine.step = hanging
    metrics = Metrics("m")
    aeng = AsyncEngine(engine, metrics=metrics, iteration_timeout=0.2)
    svc = Service(aeng, metrics, "m", engine.max_model_len, engine.tokenizer, None)
    body = {"model": "m", "prompt": [1, 7, 8], "max_tokens": 5, "ignore_eos": True}
    with caplog.at_level("INFO", logger="braze.serving"), TestClient(create_app(svc)) as client:
        assert client.get("/health").status_code == 200
        result = {}
        t = threading.Thread(target=lambda: result.update(r=client.post("/v1/completions",
                                                                         json=body)))
        t.start()
        try:
            assert entered.wait(GUARD)
            _wait_for(lambda: client.get("/health").status_code == 503,
                      "/health never noticed the hung step")
            for path in ("/health", "/ping"):
                r = client.get(path)
                assert r.status_code == 503, path
                message = r.json()["error"]["message"]
                assert "stalled" in message and "--engine-iteration-timeout" in message
            m = parse_metrics(client.get("/metrics").text)
            assert m["braze_engine_stalled"] == 1
            _wait_for(lambda: any("engine is stalled" in rec.getMessage()
                                  for rec in caplog.records), "no log line named the stall")
        finally:
            release.set()
            t.join(GUARD)
        r = result["r"]
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        assert client.get("/health").status_code == 200
        assert client.get("/ping").status_code == 200
        assert parse_metrics(client.get("/metrics").text)["braze_engine_stalled"] == 0


def test_an_adapter_that_fails_to_reload_fails_its_request_only(store, tmp_path):
    """An adapter evicted from the host cache is read from disk again when a request needs
    it; if its files are gone meanwhile that read fails inside the engine's step. The step
    raised, and the server failed every waiting request (and the running one had its
    step's tokens counted as computed without the step running). Now only the request
    naming that adapter fails, with the adapter's error; the others finish with the tokens
    transformers + peft give, and the server keeps serving."""
    import shutil

    from braze.runtime.lora import LoRARequest
    from lora_helpers import make_adapter, peft_greedy
    ck = store.checkpoint("llama")
    paths = {n: make_adapter(ck, tmp_path / n, seed=s, r=4, alpha=8, scale=3.0)
             for n, s in (("a", 11), ("b", 12), ("c", 13))}
    prompt = [1, 17, 93, 4, 250, 66, 7, 31]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = peft_greedy(ck, paths["b"], prompt, params.max_tokens)
    engine = Engine(store.artifact("llama", opt_level=0, lora_slots=2, max_lora_rank=8),
                    backend="reference", num_kv_blocks=64, max_num_seqs=4)
    for i, n in enumerate("abc"):
        engine.add_lora(LoRARequest(n, i + 1, str(paths[n])))
    # two slots, two host copies: "a" is held nowhere now; its next use reads the disk
    shutil.rmtree(paths["a"])

    async def tokens(stream) -> list[int]:
        out = [o async for o in stream][-1]
        assert out.finish_reason == "length"
        return list(out.token_ids)

    async def main():
        aeng = AsyncEngine(engine, metrics=Metrics("m"))
        aeng.start()
        try:
            running = await aeng.add("running", prompt, params, len(prompt), lora="b")
            bad, waiting = await asyncio.gather(
                aeng.add("bad", prompt, params, len(prompt), lora="a"),
                aeng.add("waiting", prompt, params, len(prompt), lora="b"))
            ended = [o async for o in bad][-1]      # ended by the engine, saying why
            assert ended.finish_reason == "abort"
            assert re.search("LoRA adapter 'a'.*read again from disk", ended.stop_reason)
            got = [await tokens(running), await tokens(waiting)]
            after = await aeng.add("after", prompt, params, len(prompt), lora="b")
            got.append(await tokens(after))
            assert aeng.alive and aeng.unavailable_reason() is None
            return got
        finally:
            await aeng.stop()
    assert asyncio.run(asyncio.wait_for(main(), GUARD)) == [want] * 3
