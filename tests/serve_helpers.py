"""`braze serve` in a subprocess, for the serving tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

MODEL = "tiny-llama"
START_TIMEOUT = 120.0


class Server:
    def __init__(self, artifact, workdir: Path, *extra: str, env: dict | None = None,
                 api_key: str = "x"):
        self.out, self.err = workdir / "stdout.txt", workdir / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "braze", "serve", str(artifact), "--port", "0",
                 "--backend", "reference", "--served-model-name", MODEL, *extra],
                stdout=out, stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            m = re.search(r"http://127\.0\.0\.1:\d+", self.out.read_text())
            if m:
                self.url = m.group(0)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.stderr()[-3000:]}")
            time.sleep(0.1)
        self.http = httpx.Client(base_url=self.url, timeout=60,
                                 headers={"Authorization": f"Bearer {api_key}"})
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                                    timeout=60)

    def stderr(self) -> str:
        return self.err.read_text()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.http.get("/metrics").text)

    def wait_metrics(self, pred, timeout=20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if pred(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus exposition text read by prometheus_client's own parser: each sample's
    value by its name and labels as written (`name{a="x",b="y"}`, labels in order)."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out
