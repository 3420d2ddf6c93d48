"""Load test for `braze serve`: N concurrent streaming clients on loopback.

Sends a bounded number of streaming /v1/completions requests (token-id prompts of a fixed
length, greedy, ignore_eos so every request generates exactly --max-tokens), at most
--concurrency at a time, and reports requests/s, output tokens/s, time to first token
and time per output token (p50/p99), end-to-end latency, and failures (must be 0; the
exit status is 1 otherwise).

    python benchmarks/serve_load.py --url http://127.0.0.1:8000
    python benchmarks/serve_load.py --artifact tiny.braze --backend reference --json
    python benchmarks/serve_load.py --artifact model.braze --concurrency 64 --requests 512

With --artifact it starts `braze serve ARTIFACT --port 0` itself and stops it (SIGTERM)
at the end. Not a test: record what it prints in benchmarks/RESULTS.md.

--big-request-mb M measures what one huge request does to everyone else: the load runs
twice on the same server, without and then with one M-MB text prompt sent once a quarter
of the requests have finished, and reports p99 time to first token of the other requests
in both runs (the target: it moves by no more than 10%). The server is started with a
body limit above M MB, so the big prompt is read and tokenised (then refused as longer
than the model allows); --big-request-limit default keeps the server's limit (413).

    python benchmarks/serve_load.py --artifact tiny.braze --backend reference \
        --concurrency 64 --requests 192 --big-request-mb 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int],
                      max_tokens: int, timeout: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    usage = None
    finish = None
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    return {"ok": False, "error": ev["error"].get("message")}
                if ev.get("usage"):
                    usage = ev["usage"]
                for ch in ev.get("choices") or ():
                    if ch.get("text") and first is None:
                        first = time.perf_counter()
                    finish = ch.get("finish_reason") or finish
    except (httpx.HTTPError, OSError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    n_out = (usage or {}).get("completion_tokens", 0)
    if usage is None or finish is None:
        return {"ok": False, "error": "the stream ended without usage or finish_reason"}
    ttft = (first or end) - t0
    tpot = (end - first) / (n_out - 1) if first is not None and n_out > 1 else None
    return {"ok": True, "ttft": ttft, "tpot": tpot, "latency": end - t0, "out": n_out,
            "in": usage.get("prompt_tokens", len(prompt)), "finish": finish}


def big_body(model: str, size: int) -> bytes:
    """A completion request whose prompt is `size` bytes of text, encoded once before the
    run (encoding 10 MB of JSON on this client's event loop would delay its own clocks)."""
    text = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size]
    return json.dumps({"model": model, "prompt": text, "max_tokens": 1}).encode()


async def big_request(client: httpx.AsyncClient, body: bytes, timeout: float) -> dict:
    """Send the big request; its status and how long it took."""
    size = len(body)
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/completions", timeout=timeout, content=body,
                              headers={"content-type": "application/json"})
        status = r.status_code
        code = (r.json().get("error") or {}).get("code") if status != 200 else None
    except (httpx.HTTPError, OSError) as e:
        status, code = None, f"{type(e).__name__}: {e}"
    return {"bytes": size, "status": status, "code": code, "start": t0,
            "seconds": time.perf_counter() - t0}


async def served_model(client, url: str) -> str:
    """The server's model name (GET /v1/models), or a one-line exit saying why not."""
    try:
        r = await client.get("/v1/models")
    except httpx.TransportError as e:
        raise SystemExit(f"serve_load: cannot reach {url} ({type(e).__name__}: {e}); start "
                         "`braze serve ARTIFACT` there, or give --artifact to start one")
    if r.status_code == 401:
        raise SystemExit(f"serve_load: {url} wants an API key (HTTP 401); give it with "
                         "--api-key or $BRAZE_API_KEY")
    if r.status_code != 200:
        raise SystemExit(f"serve_load: {url}/v1/models answered HTTP {r.status_code}: "
                         f"{r.text[:300]}")
    return r.json()["data"][0]["id"]


async def run_load(url: str, concurrency: int, num_requests: int, prompt_len: int,
                   max_tokens: int, timeout: float, warmup: int, seed: int,
                   big_bytes: int = 0, api_key: str | None = None) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout,
                                 headers=headers) as client:
        model = await served_model(client, url)
        rng = random.Random(seed)
        # ids 3..99 exist in every vocabulary (0-2 are pad/bos/eos in the tiny models)
        prompts = [[1] + [rng.randrange(3, 100) for _ in range(prompt_len - 1)]
                   for _ in range(num_requests + warmup)]
        for p in prompts[:warmup]:
            await one_request(client, model, p, max_tokens, timeout)
        todo = iter(prompts[warmup:])
        results: list[dict] = []

        async def worker():
            for p in todo:
                results.append(await one_request(client, model, p, max_tokens, timeout))

        big: dict = {}
        body = big_body(model, big_bytes) if big_bytes else b""

        async def send_big():                 # once a quarter of the requests are done
            while len(results) < num_requests // 4:
                await asyncio.sleep(0.005)
            big.update(await big_request(client, body, timeout))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)),
                             *([send_big()] if big_bytes else []))
        duration = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    failures = [r["error"] for r in results if not r["ok"]]
    out_tokens = sum(r["out"] for r in ok)

    def stats(key):
        vals = [r[key] for r in ok if r.get(key) is not None]
        return {"p50": percentile(vals, 50), "p99": percentile(vals, 99),
                "mean": sum(vals) / len(vals) if vals else None}

    return {"url": url, "model": model, "concurrency": concurrency, "requests": len(results),
            "prompt_tokens": prompt_len, "max_tokens": max_tokens, "duration_s": duration,
            "requests_per_s": len(ok) / duration, "output_tokens_per_s": out_tokens / duration,
            "output_tokens": out_tokens, "ttft_s": stats("ttft"), "tpot_s": stats("tpot"),
            "latency_s": stats("latency"), "failures": len(failures),
            "failure_examples": failures[:5],
            **({"big_request": {k: v for k, v in big.items() if k != "start"}} if big else {})}


def start_server(artifact: str, backend: str, extra: list[str], timeout: float = 300.0):
    """`braze serve ARTIFACT --port 0`; returns (process, url, stderr log path)."""
    log = Path(tempfile.mkdtemp(prefix="serve_load-")) / "server.log"
    out = log.with_name("stdout.txt")
    with open(out, "w") as o, open(log, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "braze", "serve", artifact, "--port", "0",
                                 "--backend", backend, "--log-level", "warning", *extra],
                                stdout=o, stderr=e, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"http://[\w.\[\]:]+:\d+", out.read_text())
        if m:
            return proc, m.group(0), log
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_server(proc)
    raise SystemExit(f"serve_load: the server did not start:\n{log.read_text()[-2000:]}")


def stop_server(proc) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def fmt(v, scale=1000.0, unit="ms") -> str:
    return "-" if v is None else f"{v * scale:.1f} {unit}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--artifact", help="start `braze serve ARTIFACT` on a free port")
    p.add_argument("--backend", default="auto", help="with --artifact (default auto)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra `braze serve` argument (repeatable), e.g. --server-arg=--num-kv-blocks=512")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens (default 64)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--big-request-mb", type=float, default=0, metavar="M",
                   help="also run with one M-MB prompt in the middle and compare p99 TTFT")
    p.add_argument("--big-request-limit", choices=("raise", "default"), default="raise",
                   help="with --artifact: start the server with a body limit above the big "
                   "request, so it is tokenised (raise, default), or keep the server's (413)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--api-key", metavar="KEY", help="the server's API key (default: "
                   "$BRAZE_API_KEY, else $VLLM_API_KEY, as `braze serve` reads them)")
    a = p.parse_args(argv)
    for name in ("concurrency", "requests", "prompt_len", "max_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    proc = None
    url = a.url
    key = a.api_key or os.environ.get("BRAZE_API_KEY") or os.environ.get("VLLM_API_KEY")
    big_bytes = int(a.big_request_mb * 1e6)
    extra = list(a.server_arg)
    if big_bytes and a.big_request_limit == "raise":
        extra.append(f"--max-request-body-bytes={big_bytes + 1_000_000}")
    if a.artifact:
        proc, url, _ = start_server(a.artifact, a.backend, extra)
    try:
        res = asyncio.run(run_load(url.rstrip("/"), a.concurrency, a.requests, a.prompt_len,
                                   a.max_tokens, a.timeout, a.warmup, a.seed, api_key=key))
        if big_bytes:
            with_big = asyncio.run(run_load(url.rstrip("/"), a.concurrency, a.requests,
                                            a.prompt_len, a.max_tokens, a.timeout, a.warmup,
                                            a.seed + 1, big_bytes, api_key=key))
            base, moved = res["ttft_s"]["p99"], with_big["ttft_s"]["p99"]
            res = {**res, "with_big_request": with_big,
                   "ttft_p99_ratio": moved / base if base and moved else None}
    finally:
        if proc is not None:
            rc = stop_server(proc)
            if rc != 0:
                print(f"serve_load: the server exited with status {rc}", file=sys.stderr)
    res["machine"] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                      "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if a.artifact:
        res["artifact"], res["backend"] = a.artifact, a.backend
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['requests']} requests, {a.concurrency} concurrent, prompt {a.prompt_len} "
              f"tokens, {a.max_tokens} output tokens each, model {res['model']!r} at {url}")
        print(f"  duration          {res['duration_s']:.2f} s")
        print(f"  requests/s        {res['requests_per_s']:.2f}")
        print(f"  output tokens/s   {res['output_tokens_per_s']:.1f}")
        for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("latency_s", "latency")):
            s = res[key]
            print(f"  {name:<8} p50 {fmt(s['p50']):>10}   p99 {fmt(s['p99']):>10}")
        print(f"  failures          {res['failures']}")
        for e in res["failure_examples"]:
            print(f"    {e}")
        if "with_big_request" in res:
            w, b = res["with_big_request"], res["with_big_request"].get("big_request", {})
            print(f"  with one {b.get('bytes', 0) / 1e6:.1f} MB request in the middle "
                  f"(HTTP {b.get('status')} {b.get('code') or ''} after "
                  f"{b.get('seconds', 0):.2f} s):")
            for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
                s = w[key]
                print(f"  {name:<8} p50 {fmt(s['p50']):>10}   p99 {fmt(s['p99']):>10}")
            ratio = res["ttft_p99_ratio"]
            print(f"  p99 TTFT with / without: {'-' if ratio is None else f'{ratio:.2f}x'}")
            print(f"  failures          {w['failures']}")
    failed = res["failures"] or res.get("with_big_request", {}).get("failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
