"""Running the `braze` command as a user does, and checking its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys


def run(*args, env: dict | None = None, timeout: float = 300):
    """`python -m braze ARGS` -> (returncode, stdout, stderr); `env` adds variables."""
    r = subprocess.run([sys.executable, "-m", "braze", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return r.returncode, r.stdout, r.stderr


def assert_one_line_error(code, err, *needles):
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("braze: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
