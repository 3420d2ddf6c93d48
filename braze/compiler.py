"""`braze compile`: model directory -> IR -> artifact.

The pipeline today: trace (frontend) -> verify -> write the artifact
(codegen). The pass pipeline (-O1/-O2) and kernels slot in between.
"""

from __future__ import annotations

import time
from pathlib import Path

from braze.codegen.artifact_writer import write_artifact
from braze.frontend import load_model
from braze.ir import print_graph, verify
from braze.ir.errors import BrazeError

from .config import CompileOptions


def _quiet(msg: str) -> None:
    pass


def compile(model_dir, out, *, force: bool = False, dump_ir=None, log=None, **options):
    """Compile a Hugging Face model directory into an artifact at `out`; returns the Artifact."""
    log = log or _quiet
    opts = CompileOptions(**options)
    opts.validate()
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not force:
        raise BrazeError(f"{out} already exists; pass --force to replace it")
    log(f"[1/3] tracing {model_dir}")
    loaded = load_model(model_dir, dtype=opts.dtype, block_size=opts.block_size, log=log)
    spec = loaded.spec
    if opts.max_model_len is None:
        opts.max_model_len = spec.max_position_embeddings
    elif opts.max_model_len > spec.max_position_embeddings:
        raise BrazeError(f"--max-model-len {opts.max_model_len} exceeds the model's "
                         f"max_position_embeddings ({spec.max_position_embeddings})")
    opts.dtype = loaded.dtype
    verify(loaded.graph)
    if dump_ir:
        d = Path(dump_ir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "00-traced.bir").write_text(print_graph(loaded.graph))
        log(f"dumped IR to {d}")
    log(f"[2/3] -O{opts.opt_level}: no passes to run")
    log(f"[3/3] writing artifact {out}")
    model = {
        "architecture": spec.architecture, "family": spec.family, "dtype": loaded.dtype,
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers, "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "bos_token_id": spec.bos_token_id, "eos_token_ids": _eos_ids(model_dir, spec),
        "config": loaded.config,
    }
    write_artifact(out, loaded.graph, loaded.load_param, model, opts.to_json(), Path(model_dir),
                   overwrite=force, log=log)
    log(f"compiled {spec.architecture} to {out} in {time.perf_counter() - t0:.1f}s")
    from braze.runtime.loader import open_artifact
    return open_artifact(out)


def _eos_ids(model_dir, spec) -> list[int]:
    """eos ids from config.json, plus generation_config.json's (which often lists more)."""
    import json
    ids = list(spec.eos_token_ids)
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        try:
            e = json.loads(gen.read_text()).get("eos_token_id")
        except ValueError:
            e = None
        for t in [e] if isinstance(e, int) else (e or []):
            if t not in ids:
                ids.append(t)
    return ids
