"""`braze serve` options an operator gets wrong are refused at start-up, in one line that
names the option, instead of a traceback, an internal error, or a server that starts and
ignores them (docs/serving.md: "Startup errors ... are one line on stderr and exit status 1").

A server that wrongly starts is killed by `run`'s timeout, which fails the test."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from cli_helpers import assert_one_line_error, run  # noqa: E402

START = 120     # seconds: a refused start exits long before; a started server is killed


def _serve(artifact, *flags, env=None):
    return run("serve", artifact, "--port", "0", "--backend", "reference", *flags,
               env=env, timeout=START)


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_one_line(store, port):
    code, _, err = _serve(store.artifact("llama"), "--port", port)
    assert code == 1
    assert_one_line_error(code, err, "--port", port)
