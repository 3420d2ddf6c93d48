"""`braze compile`: model directory (or .gguf file) -> IR -> passes -> artifact.

    [1/3] trace      frontend: models/ definition -> IR, weights located and checked
    [2/3] optimise   the -O pipeline (passes/), timed per pass
    [3/3] package    derived weights computed (merged QKV, ...), artifact written (codegen)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from braze.codegen.artifact_writer import check_destination, write_artifact
from braze.codegen.emit import emit_kernels, emit_mtp_kernels
from braze.codegen.mtp_writer import write_assistant, write_mtp
from braze.codegen.plan import build_plan
from braze.frontend import load_model
from braze.frontend.kv_groups import assign_kv_groups
from braze.frontend.gguf import GGUFSource, is_gguf
from braze.ir import Graph, print_graph, verify
from braze.ir.errors import BrazeError
from braze.models.rope import context_limit
from braze.passes import PassContext, PassManager, dump_after_each
from braze.passes.manager import pipeline
from braze.passes.shard import parallel_manifest, rank_loader
from braze.signing import default_private_key, load_private_key

from .config import CompileOptions


def _quiet(msg: str) -> None:
    pass


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compile(model_dir, out, *, force: bool = False, dump_ir=None, explain: bool = False,
            log=None, sign=None, mtp_assistant=None, **options):
    """Compile a Hugging Face model directory, or a GGUF file, into an artifact at `out`;
    returns the Artifact. `mtp_assistant`: a Gemma 4 target's assistant model directory
    (Gemma4AssistantForCausalLM), compiled beside it for speculative method 'mtp'.

    The artifact is signed with the Ed25519 private key file `sign`, or by default with
    the per-user key (braze/signing.py), so that hosts trusting the key run it as it is."""
    # what --explain was asked for is shown even when progress is not (-q)
    explain = (log or _stderr) if explain else None
    log = log or _quiet
    opts = CompileOptions(**options)
    opts.validate()
    key = load_private_key(sign) if sign else default_private_key(log=log)   # fail early
    t0 = time.perf_counter()
    out = Path(out)
    check_destination(out, force)        # before minutes of work, not after
    if dump_ir:
        _make_dump_dir(Path(dump_ir), out)
    log(f"[1/3] tracing {model_dir}")
    gguf = GGUFSource(model_dir, log=log) if is_gguf(model_dir) else None
    try:
        return _compile(gguf.dir if gguf else Path(model_dir), out, opts, key, t0, force,
                        dump_ir, explain, log, gguf, mtp_assistant)
    finally:
        if gguf:
            gguf.close()


def _compile(model_dir: Path, out: Path, opts, key, t0, force, dump_ir, explain, log, gguf,
             mtp_assistant=None):
    """`model_dir`: the HF directory, or the staging directory of a GGUF file (`gguf`)."""
    loaded = load_model(model_dir, dtype=opts.dtype, block_size=opts.block_size, log=log,
                        checkpoint=gguf.checkpoint if gguf else None,
                        hidden_output=mtp_assistant is not None,
                        max_model_len=opts.max_model_len)
    if gguf:
        gguf.adjust(loaded)
    spec, graph = loaded.spec, loaded.graph
    if opts.max_model_len is None:
        opts.max_model_len = spec.max_position_embeddings
    else:
        limit, why = context_limit(spec.rope, spec.max_position_embeddings)
        if opts.max_model_len > limit:
            raise BrazeError(f"--max-model-len {opts.max_model_len} exceeds the {limit} "
                             f"tokens this model serves ({why}); pass --max-model-len "
                             f"{limit} or less")
    opts.dtype = loaded.dtype
    kv_groups = assign_kv_groups(graph)     # one block table per kind of attention
    verify(graph)
    ops_before = graph.op_counts()
    traced_inputs = {v.name: v.type for v in graph.inputs}    # KV heads before sharding
    after_each = None
    if dump_ir:
        d = Path(dump_ir)
        after_each = dump_after_each(d)
        (d / "00-traced.bir").write_text(print_graph(graph))
        log(f"dumping IR after each stage into {d}")
    log(f"[2/3] optimising at -O{opts.opt_level}")
    ctx = PassContext(options=opts.to_json())
    tp = opts.tensor_parallel_size
    # sharding first, at every -O level: the fusions (and add-lora) then see the rank's sizes
    names = (["shard"] if tp > 1 else []) + pipeline(opts.opt_level)
    if opts.lora_slots:
        from braze.passes.add_lora import with_lora
        names = with_lora(names)
    if tp > 1:
        log(f"sharding for {tp} tensor-parallel ranks"
            + (", whole experts per rank (expert parallelism)" if opts.expert_parallel else ""))
    verify_each = bool(os.environ.get("BRAZE_VERIFY_EACH"))
    records = PassManager(names, ctx=ctx, after_each=after_each, log=log,
                          verify_each=verify_each).run(graph)
    try:
        verify(graph)
    except BrazeError as e:     # a pass broke it; verifying after each one names which
        raise BrazeError(f"after the -O{opts.opt_level} passes: {e}; rerun with "
                         f"BRAZE_VERIFY_EACH=1 to find the pass that left it so") from None
    if explain:
        for r in ctx.refusals:
            explain(f"  refused [{r.pass_name}] {r.node}: {r.reason}")
        if not ctx.refusals:
            explain("  --explain: nothing refused; " + (
                f"the -O{opts.opt_level} passes took every pattern they met" if records
                else f"-O{opts.opt_level} runs no passes"))
    lora = graph.meta.pop("lora", None)         # the adapter contract: the manifest's
    shards = ctx.records.get("shards", {})
    if tp > 1:
        load_param = materialize(graph, None, [rank_loader(loaded.load_param, shards, r,
                                                           loaded.load_part)
                                               for r in range(tp)])
    else:
        load_param = materialize(graph, loaded.load_param)
    log(f"[3/3] writing artifact {out}")
    model = manifest_model(loaded, model_dir)
    if gguf:
        model["source"] = gguf.identity()
    compile_info = {
        "passes": [{"name": r.name, "matches": r.matches, "ms": r.ms} for r in records],
        "ops_before": ops_before,
        "ops_after": graph.op_counts(),
        "refusals": len(ctx.refusals),
    }
    extra = {"compile": compile_info, "limits": opts.limits().to_json(),
             "kv_groups": kv_groups, **({"lora": lora} if lora else {})}
    if tp > 1:
        extra["parallel"] = parallel_manifest(graph, shards, tp, opts.expert_parallel)
    plan = build_plan(graph, opts.to_json())
    if "small_m_gemm" in plan:
        _check_small_m(plan["small_m_gemm"], log)
    kernel_count = len(plan["kernels"])
    compile_info["extern_ops"] = plan["extern_ops"]
    log(f"codegen: {sum(len(s['launches']) for s in plan['segments'])} launches, "
        f"{kernel_count} kernel variants, extern: "
        f"{', '.join(f'{k} x{n}' for k, n in plan['extern_ops'].items()) or 'none'}")

    from .compile_mtp import prepare_assistant, prepare_mtp
    if mtp_assistant is not None:        # widens kv_groups' windows before they are written
        assistant, assistant_load = prepare_assistant(loaded, opts, graph, kv_groups,
                                                      mtp_assistant, log, traced_inputs,
                                                      shards)
    mtp, mtp_load = prepare_mtp(loaded, opts, graph, log, shards)
    second = assistant if mtp_assistant is not None else mtp
    # the MTP graph's own launch plan: its proposer runs Triton kernels like the main graph
    mtp_plan = build_plan(second.graph, opts.to_json()) if second is not None else None

    def emit(root: Path) -> dict:
        entries = emit_kernels(plan, root, opts.target_list(), log)
        entries.update(write_mtp(root, loaded.checkpoint, loaded.mtp, loaded.dtype, log=log,
                                 mtp=mtp, load_param=mtp_load))
        if mtp_assistant is not None:
            entries.update(write_assistant(root, assistant, assistant_load, log=log))
        if mtp_plan is not None:
            entries["mtp"].update(emit_mtp_kernels(mtp_plan, root, opts.target_list(), log))
        return entries

    write_artifact(out, graph, load_param, model, opts.to_json(), Path(model_dir),
                   extra=extra,
                   overwrite=force, log=log, emit=emit, signing_key=key)
    log(f"compiled {spec.architecture} to {out} in {time.perf_counter() - t0:.1f}s")
    from braze.runtime.loader import open_artifact
    return open_artifact(out, check_hashes=False)      # hashed above, from the bytes written


def manifest_model(loaded, model_dir) -> dict:
    """The manifest's "model" section for a traced model (`config`: written beside it as
    config.json, not into the manifest)."""
    spec = loaded.spec
    model = {
        "architecture": spec.architecture, "family": spec.family, "dtype": loaded.dtype,
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers, "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "bos_token_id": spec.bos_token_id, "eos_token_ids": _eos_ids(model_dir, spec),
        "config": loaded.config,
    }
    if loaded.source:
        model["source"] = loaded.source
    if loaded.multimodal:
        model["multimodal"] = loaded.multimodal
    return model


def _make_dump_dir(d: Path, out: Path) -> None:
    """--dump-ir's directory, made (or found) before tracing: a path that is a file, or
    that cannot be written, or inside the artifact (which is written whole, replacing what
    is there), is the user's to fix, said before minutes of work."""
    if d.resolve() == out.resolve() or out.resolve() in d.resolve().parents:
        raise BrazeError(f"--dump-ir {d} is inside the artifact {out}, which the compile "
                         f"writes whole: give --dump-ir a directory outside it")
    if d.exists() and not d.is_dir():
        raise BrazeError(f"--dump-ir {d} is a file, not a directory: give a directory to "
                         f"write the IR files into")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BrazeError(f"--dump-ir {d}: cannot make the directory ({e.strerror}); give a "
                         f"directory you can write") from None


def _check_small_m(small: dict, log) -> None:
    """`--small-m-gemm triton` must apply to some linear of the graph: say so, or refuse."""
    used = [e for e in small["linears"] if "when" in e]
    if not used:
        why = (f"none of its {len(small['linears'])} linears can run it (e.g. "
               f"{small['linears'][0]['weight']}: {small['linears'][0]['extern_because']})"
               if small["linears"] else "the graph has no linear op")
        raise BrazeError(f"--small-m-gemm triton has nothing to apply to: {why}; compile "
                         f"with --small-m-gemm extern")
    log(f"small-M GEMMs: the Triton kernel at T <= {small['max_tokens']} for {len(used)} of "
        f"{len(small['linears'])} linears, cuBLAS above")


def materialize(graph: Graph, load_source, rank_sources=None):
    """Turn derived params into plain ones the artifact ships, and drop params only they used.

    Returns a loader that computes each derived weight from its sources (recipes are
    plain IR ops, evaluated with their reference implementation at compile time); with
    `rank_sources` (one source loader per tensor-parallel rank), a list of such loaders."""
    recipes = {name: p.recipe for name, p in graph.params.items() if p.recipe is not None}

    def loader(source):
        def load(name: str) -> torch.Tensor:
            r = recipes.get(name)
            if r is None:
                return source(name)
            out = r.opdef.impl(*[load(s.name) for s in r.operands], **r.attrs)
            return (out[0] if isinstance(out, (tuple, list)) else out).contiguous()
        return load

    for p in graph.params.values():
        p.recipe = None
    graph.remove_unused_params()
    if rank_sources is not None:
        return [loader(s) for s in rank_sources]
    return loader(load_source)


def _eos_ids(model_dir, spec) -> list[int]:
    """eos ids from config.json, plus generation_config.json's (which often lists more)."""
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
