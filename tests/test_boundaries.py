"""Architecture rules: braze never uses TorchDynamo; the runtime never imports the compiler."""

from __future__ import annotations

import pathlib
import subprocess
import sys


import braze

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_never_invokes_dynamo(store, tmp_path, monkeypatch):
    """Make every TorchDynamo / torch.compile / torch.export entry point raise, then compile
    and generate. Dynamo's frame hook is trapped too: installing any callback (which every
    optimize/compile path does) fails, while torch's own `disable` wrappers still work."""
    import torch._dynamo
    import torch._dynamo.eval_frame as eval_frame

    ckpt = store.checkpoint("qwen3_moe-dense-middle")

    def boom(*a, **k):
        raise AssertionError("braze called TorchDynamo")

    real_set = eval_frame._maybe_set_eval_frame

    def guarded_set(callback):
        if callable(callback):
            raise AssertionError("braze installed a TorchDynamo frame callback")
        return real_set(callback)

    monkeypatch.setattr(torch, "compile", boom)
    monkeypatch.setattr(torch._dynamo, "optimize", boom)
    monkeypatch.setattr(torch._dynamo, "export", boom)
    monkeypatch.setattr(eval_frame, "_maybe_set_eval_frame", guarded_set)
    monkeypatch.setattr(torch.export, "export", boom)
    art = braze.compile(ckpt, tmp_path / "a.braze")
    out = braze.LLM(art.root).generate([[1, 2, 3]], braze.SamplingParams(max_tokens=3))
    assert len(out[0].token_ids) >= 1


def test_source_never_mentions_dynamo():
    pattern = ("torch.compile", "torch._dynamo", "torch.export", "torch.jit.trace")
    offenders = []
    for sub in ("braze", "ir", "passes", "codegen", "runtime", "models", "frontend"):
        for f in (ROOT / sub).rglob("*.py"):
            text = f.read_text()
            offenders += [f"{f.relative_to(ROOT)}: {p}" for p in pattern if p in text]
    assert not offenders


def test_runtime_does_not_import_the_compiler(store):
    """Serving an artifact imports no compiler package and no transformers."""
    art = store.artifact("llama")
    code = f"""
import sys
from braze.runtime import LLM, SamplingParams
from braze.inspect import summarize
summarize({str(art)!r})
LLM({str(art)!r}).generate("hi", SamplingParams(max_tokens=2))
bad = [m for m in sys.modules if m.split('.')[:2] in (['braze', 'frontend'], ['braze', 'passes'],
       ['braze', 'models'], ['braze', 'codegen'], ['braze', 'compiler']) or m == 'transformers']
print(bad)
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# The one sanctioned reach of the runtime into codegen: verifying an artifact that no
# trusted key signed regenerates its plans with codegen's lowering (a pure function of the
# IR), imported lazily inside the function that needs it (docs/trust.md). Nothing else.
RUNTIME_MAY_IMPORT = {("runtime/trust.py",
                       "from braze.codegen.plan import regenerate")}


def test_import_direction():
    """ir imports nothing of braze; runtime imports no compiler package (static check)."""
    import re
    rules = {"ir": ("braze.", "from ..", "import braze"),
             "runtime": ("braze.frontend", "braze.passes", "braze.models", "braze.codegen",
                         "braze.compiler"),
             "models": ("braze.frontend", "braze.passes", "braze.codegen", "braze.runtime"),
             "passes": ("braze.frontend", "braze.codegen", "braze.runtime", "braze.models")}
    bad = []
    for sub, banned in rules.items():
        for f in (ROOT / sub).rglob("*.py"):
            for line in f.read_text().splitlines():
                if re.match(r"\s*(from|import)\s", line) and any(b in line for b in banned):
                    where = (f.relative_to(ROOT).as_posix(), line.strip())
                    if where in RUNTIME_MAY_IMPORT and line.startswith(" "):   # lazily only
                        continue
                    bad.append(f"{where[0]}: {where[1]}")
    assert not bad, bad
