"""Server extensions: operator code that adds routes or middleware to the app at start-up.

`braze serve ARTIFACT --extension SPEC` (repeatable) calls `function(app)` once, after
braze's own routes and middleware are installed and before the server accepts
connections. SPEC is either

- `package.module:function`: imported from the Python path, or
- `NAME`: the entry point NAME of the group `braze.serve_extensions`, which a package
  declares in its pyproject.toml:

      [project.entry-points."braze.serve_extensions"]
      audit = "my_package.braze_ext:install"

`app` is the FastAPI application: `app.include_router(...)`, `@app.get(...)`,
`app.add_middleware(...)` (it then runs outside braze's middleware, so it sees every
request, X-Request-Id included, and its responses still get one only if it calls on),
and `app.state.service` (serving/app.Service: the engine thread, tokenizer, model name).
Nothing is loaded unless named: installing a package does not change what a server runs.
A failing extension stops start-up with one line naming it.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from braze.ir.errors import BrazeError

log = logging.getLogger("braze.serving")

GROUP = "braze.serve_extensions"


def load(spec: str):
    """The callable SPEC names (module:function, or an entry point of GROUP)."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise BrazeError(f"--extension {spec}: cannot import {module_name!r} "
                             f"({type(e).__name__}: {e})") from None
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
        if fn is None:
            raise BrazeError(f"--extension {spec}: {module_name!r} has no {attr!r}")
    else:
        found = [ep for ep in entry_points(group=GROUP) if ep.name == spec]
        if not found:
            names = sorted(ep.name for ep in entry_points(group=GROUP))
            raise BrazeError(f"--extension {spec}: no entry point {spec!r} in the group "
                             f"{GROUP!r} (installed: {', '.join(names) or 'none'}); or give "
                             "module:function")
        try:
            fn = found[0].load()
        except Exception as e:
            raise BrazeError(f"--extension {spec}: cannot load {found[0].value!r} "
                             f"({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise BrazeError(f"--extension {spec}: {fn!r} is not callable")
    return fn


def load_all(specs: list[str]) -> list[tuple[str, object]]:
    return [(spec, load(spec)) for spec in specs]


def install(app, hooks: list[tuple[str, object]]) -> None:
    """Call each (spec, function) of `load_all` with the app."""
    for spec, fn in hooks:
        try:
            fn(app)
        except BrazeError:
            raise
        except Exception as e:
            raise BrazeError(f"--extension {spec} failed: {type(e).__name__}: {e}") from None
        log.info("extension %s installed", spec)
