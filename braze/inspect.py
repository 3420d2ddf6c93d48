"""`braze inspect`: a readable summary of an artifact (uses the runtime loader only)."""

from __future__ import annotations

import json

from braze.runtime.chat_template import template_source
from braze.runtime.loader import open_artifact


def summarize(path, check_hashes: bool = True, trusted_keys=None, kernels: bool = False) -> dict:
    """The artifact at `path` as a dict (`braze inspect --json`); `kernels`: also every
    stored cubin's resources (codegen/cubin_report.py)."""
    # inspecting runs nothing from the artifact, so an untrusted one is shown, not refused
    art = open_artifact(path, check_hashes=check_hashes, trusted_keys=trusted_keys,
                        require_trust=False)
    out = _summary(art, check_hashes)
    if kernels:
        out["cubin_resources"] = _cubin_resources(art)
    return out


def _cubin_resources(art) -> list[dict]:
    from braze.codegen.cubin_report import cuobjdump, kernel_rows
    from braze.ir.errors import BrazeError
    m = art.manifest
    if not m.get("targets"):
        return []
    tool = cuobjdump()
    if tool is None:
        raise BrazeError("inspect --kernels needs the cuobjdump that Triton's NVIDIA backend "
                         "ships: install triton (pip install triton), or leave out --kernels")
    rows = kernel_rows(art.root, m, tool)
    mtp = m.get("mtp") or {}
    if mtp.get("kernels"):
        rows += [dict(r, variant="mtp:" + r["variant"])
                 for r in kernel_rows(art.root, mtp, tool)]
    return rows


def _summary(art, check_hashes: bool) -> dict:
    m = art.manifest
    g = art.graph
    compile_info = m.get("compile", {})
    segments = g.meta.get("segments") or []
    memory = g.meta.get("memory") or {}
    return {
        "artifact": str(art.root),
        "format_version": m["format_version"],
        "versions": m.get("versions", {}),
        "model": {k: v for k, v in m["model"].items()},
        "options": m["options"],
        "ops": g.op_counts(),
        "ops_before_passes": compile_info.get("ops_before", {}),
        "nodes": len(g.nodes),
        "passes": compile_info.get("passes", []),
        "segments": len(segments),
        "graph_breaks": int(g.meta.get("graph_breaks", 0)),
        "arena_bytes": int(memory.get("arena_bytes", 0)),
        "gemms": _gemms(m),
        "small_m_gemm": _small_m(m),
        "kernels": {vid: {"module": k["module"], "fn": k["fn"], "specs": k.get("specs", []),
                          "shared": {t: max((e.get("shared", 0) for e in by_key.values()),
                                            default=0)
                                     for t, by_key in k.get("cubins", {}).items()}}
                    for vid, k in (m.get("kernels") or {}).items()},
        "targets": m.get("targets", []),
        "cubins_stored": _cubins_stored(m.get("kernels") or {}),
        "cubins_here": _cubins_here(m),
        "extern_ops": (m.get("plan") or {}).get("extern_ops", {}),
        "launches": sum(len(s["launches"]) for s in (m.get("plan") or {}).get("segments", [])),
        "inputs": {v.name: str(v.type) for v in g.inputs},
        "outputs": {k: str(v.type) for k, v in g.outputs.items()},
        "parameters": len(g.params),
        "parameter_bytes": m["weights"]["bytes"],
        "weight_files": m["weights"]["files"],
        "tokenizer": m.get("tokenizer") is not None,
        "chat_template": template_source(art.tokenizer_dir, _tokenizer_config(art)) is not None,
        "stop_tokens": _stop_tokens(art),
        "mtp_layers": (m.get("mtp") or {}).get("num_layers", 0),
        "mtp_graph": (m.get("mtp") or {}).get("graph"),
        "mtp_kind": (m.get("mtp") or {}).get("kind"),
        "mtp_plan": _mtp_plan(m.get("mtp") or {}),
        "lora": {k: v for k, v in m["lora"].items() if k in ("slots", "max_rank", "targets")}
        | {"pools": len(m["lora"]["modules"])} if m.get("lora") else None,
        "hashes_verified": check_hashes,
        "trust": {"how": art.trust.how, "detail": art.trust.detail,
                  "remedy": None if art.trust.admitted else art.trust.remedy},
        "parallel": m.get("parallel"),
        "mtp_parallel": (m.get("mtp") or {}).get("parallel"),
        "kv_groups": m.get("kv_groups"),
        "text_only_origin": art.text_only_origin,
    }


def _tokenizer_config(art) -> dict:
    d = art.tokenizer_dir
    f = d / "tokenizer_config.json" if d is not None else None
    try:
        return json.loads(f.read_text()) if f is not None and f.is_file() else {}
    except ValueError:
        return {}


def _stop_tokens(art) -> list[list]:
    """[id, text] of each token generation stops on (text None without a tokenizer): what
    to check when a model runs on past the end of its turn."""
    ids = [int(i) for i in art.manifest["model"].get("eos_token_ids") or []]
    texts = [None] * len(ids)
    if art.tokenizer_dir is not None and (art.tokenizer_dir / "tokenizer.json").is_file():
        from braze.runtime.tokenizer import Tokenizer
        texts = Tokenizer(art.tokenizer_dir).convert_ids_to_tokens(ids)
    return [[i, t] for i, t in zip(ids, texts)]


def _small_m(m: dict) -> dict | None:
    """Which linears launch the Triton skinny GEMM (--small-m-gemm triton), at which of
    the default buckets; None when every GEMM is an extern call."""
    small = (m.get("plan") or {}).get("small_m_gemm")
    if not small:
        return None
    from braze.ir.contract import default_buckets
    limit = small["max_tokens"]
    tokens = (m.get("limits") or {}).get("max_num_tokens") or m["options"]["max_num_tokens"]
    kinds: dict[str, int] = {}
    refused: dict[str, str] = {}
    for e in small["linears"]:
        # @model.layers.3.self_attn.qkv_proj.weight -> qkv_proj; @lm_head.weight -> lm_head
        parts = e["weight"].lstrip("@").split(".")
        name = parts[-2] if len(parts) > 1 else parts[-1]
        if "embed" in name:                 # tied embeddings: the LM head reads that table
            name = f"lm_head (tied {name})"
        if "epilogue" in e:                 # linear_glu: the activation in the GEMM's epilogue
            name = f"{name} + {e['epilogue']}"
        if "when" in e:
            kinds[name] = kinds.get(name, 0) + 1
        else:
            refused[name] = e["extern_because"]
    return {"max_tokens": limit, "buckets": [b for b in default_buckets(tokens) if b <= limit],
            "triton": kinds, "extern": refused,
            "count": sum(kinds.values()), "linears": len(small["linears"])}


def _gemms(m: dict) -> str:
    small = (m.get("plan") or {}).get("small_m_gemm")
    if small:
        return (f"Triton skinny GEMM at T <= {small['max_tokens']} (--small-m-gemm triton), "
                f"extern (torch/cuBLAS) above")
    return "extern (torch/cuBLAS)"


def _mtp_plan(mtp: dict) -> dict | None:
    """The MTP graph's own launch plan, counted like the main one's (None: it has none,
    and the proposer runs it on the reference interpreter)."""
    plan = mtp.get("plan")
    if not plan:
        return None
    return {"launches": sum(len(s["launches"]) for s in plan.get("segments", [])),
            "kernels": len(mtp.get("kernels") or {}), "extern_ops": plan.get("extern_ops", {})}


def _source_line(src: dict) -> str:
    """Where the weights came from, when not plain float tensors: a GGUF file, or an fp8
    checkpoint dequantized at compile time."""
    if src.get("format") == "fp8-e4m3":
        return (f"source     {src.get('summary', 'fp8-e4m3')} at compile time "
                f"({src.get('quantized_tensors', '?')} fp8 weights with block scales)")
    types = ", ".join(f"{k} x{n}" for k, n in (src.get("tensor_types") or {}).items())
    mix = f"; file type {src['file_type_name']}" if src.get("file_type_name") else ""
    return (f"source     {src.get('format', '?')} {src.get('file', '?')} "
            f"({src.get('gguf_architecture', '?')}; {types}{mix}), sha256 "
            f"{str(src.get('sha256', '?'))[:16]}...")


def _stops_line(stops: list) -> str:
    return "stops on   " + ", ".join(f"{i} {t}" if t is not None else str(i) for i, t in stops)


def _text_only_line(origin: str, mm: dict) -> str:
    """An artifact of a multimodal checkpoint's language model (frontend/multimodal.py)."""
    skipped = ", ".join(mm.get("skipped_modules") or []) or "its towers"
    return (f"text-only  the language model of {origin}; {skipped} "
            f"({mm.get('skipped_tensors', '?')} tensors) not compiled: chat requests with "
            f"image or audio parts get a 400")


def _cubins_stored(kernels: dict) -> dict[str, int]:
    """target -> how many cubins the kernel table lists for it (one per variant and spec)."""
    out: dict[str, int] = {}
    for k in kernels.values():
        for target, by_key in (k.get("cubins") or {}).items():
            out[target] = out.get(target, 0) + len(by_key)
    return out


def _cubins_here(m: dict) -> dict:
    """Whether this host would launch the stored cubins, and why not."""
    import triton

    from braze.runtime.cubins import device_target, unusable_reason
    target = device_target()
    return {"triton_built": m.get("versions", {}).get("triton"), "triton_here": triton.__version__,
            "gpu_here": target, "unusable": unusable_reason(m, triton.__version__, target)}


def format_summary(s: dict) -> str:
    model, opts = s["model"], s["options"]
    lines = [
        f"artifact   {s['artifact']}  (format v{s['format_version']}, braze "
        f"{s['versions'].get('braze', '?')}, torch {s['versions'].get('torch', '?')})",
        f"model      {model['architecture']} ({model['family']}): {model['num_layers']} layers, "
        f"hidden {model['hidden_size']}, heads {model['num_heads']}/{model['num_kv_heads']} kv, "
        f"head_dim {model['head_dim']}, vocab {model['vocab_size']}, dtype {model['dtype']}",
        *([_source_line(model["source"])] if model.get("source") else []),
        *([_text_only_line(s["text_only_origin"], model.get("multimodal") or {})]
          if s.get("text_only_origin") else []),
        f"options    -O{opts['opt_level']}, max_model_len {opts['max_model_len']}, block_size "
        f"{opts['block_size']}, max_num_tokens {opts['max_num_tokens']}, max_num_seqs "
        f"{opts['max_num_seqs']}, targets {opts['targets']}, cudagraph {opts['cudagraph_mode']}",
        f"weights    {s['parameters']} tensors, {s['parameter_bytes'] / 2**20:.1f} MiB in "
        f"{len(s['weight_files'])} file(s); tokenizer: {'yes' if s['tokenizer'] else 'no'}"
        f"{', chat template' if s.get('chat_template') else ''}",
        *([_stops_line(s["stop_tokens"])] if s.get("stop_tokens") else []),
        f"graph      {s['nodes']} ops (traced: {sum(s['ops_before_passes'].values()) or s['nodes']}); "
        f"{s['segments']} segments, {s['graph_breaks']} graph breaks; arena "
        f"{s['arena_bytes'] / 2**20:.1f} MiB",
        f"codegen    {s['launches']} launches; {len(s['kernels'])} Triton kernel variants"
        f"{' with cubins for ' + ', '.join(s['targets']) if s['targets'] else ' (no cubins: --targets was empty)'}; "
        f"GEMMs {s['gemms']}; extern: "
        + (", ".join(f"{k} x{n}" for k, n in s["extern_ops"].items()) or "none"),
    ]
    sm = s.get("small_m_gemm")
    if sm:
        lines.append(f"small-M    linear at buckets {', '.join(map(str, sm['buckets']))} "
                     f"(T <= {sm['max_tokens']}): Triton skinny_gemm for {sm['count']} of "
                     f"{sm['linears']} linears ("
                     + ", ".join(f"{k} x{n}" for k, n in sm["triton"].items())
                     + "); cuBLAS at larger buckets"
                     + "".join(f"; {k} stays cuBLAS: {why}" for k, why in sm["extern"].items()))
    here = s["cubins_here"]
    n_specs = sum(len(k["specs"]) for k in s["kernels"].values())
    stored = s.get("cubins_stored") or {}
    if not stored:
        lines.append(f"cubins     none stored: the {n_specs} specialisations of "
                     f"{len(s['kernels'])} variants are JIT-compiled from their source at "
                     f"first use")
    else:
        lines.append(f"cubins     {', '.join(f'{n} for {t}' for t, n in stored.items())} "
                     f"({n_specs} specialisations of {len(s['kernels'])} variants), built "
                     f"with triton {here['triton_built']}; here (triton {here['triton_here']}, "
                     f"{here['gpu_here'] or 'no GPU'}): "
                     + ("launched from the cubins" if here["unusable"] is None
                        else f"not used: {here['unusable']}"))
    if s["passes"]:
        lines.append("passes     " + ", ".join(f"{p['name']} {p['matches']} ({p['ms']:.0f} ms)"
                                              for p in s["passes"]))
    width = max(len(k) for k in s["ops"]) if s["ops"] else 0
    for name, n in sorted(s["ops"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {name:<{width}}  {n}")
    if s.get("mtp_kind") == "gemma4_assistant":
        lines.append("mtp        Gemma 4 assistant model: a second graph (mtp.bir) for "
                     "--speculative method 'mtp'")
    if s.get("mtp_layers"):
        lines.append(f"mtp        {s['mtp_layers']} multi-token-prediction layer(s): "
                     + ("a second graph (mtp.bir) for --speculative method 'mtp'"
                        if s.get("mtp_graph") else
                        "tensors shipped (mtp-*.safetensors), no graph: method 'mtp' refused"))
    mp = s.get("mtp_plan")
    if mp:
        lines.append(f"mtp plan   {mp['launches']} launches; {mp['kernels']} Triton kernel "
                     f"variants (cubins in mtp-cubin/); extern: "
                     + (", ".join(f"{k} x{n}" for k, n in mp["extern_ops"].items()) or "none"))
    elif s.get("mtp_graph"):
        lines.append("mtp plan   none: the proposer runs mtp.bir on the reference interpreter "
                     "(recompile with this braze for its Triton kernels)")
    cache_prefixes = ("k_cache.", "v_cache.", "kv_latent.")
    caches = sum(k.startswith(cache_prefixes) for k in s["inputs"])
    pools = sum(k.startswith(("lora_a.", "lora_b.")) for k in s["inputs"])
    step = [(k, v) for k, v in s["inputs"].items()
            if not k.startswith(cache_prefixes + ("lora_a.", "lora_b."))]
    lines.append("inputs     " + ", ".join(f"%{k}: {v}" for k, v in step)
                 + (f", + {caches} KV-cache tensors" if caches else "")
                 + (f", + {pools} LoRA adapter pools" if pools else ""))
    if s.get("kv_groups") and any(g["window"] for g in s["kv_groups"]):
        lines.append("kv groups  " + "; ".join(
            f"{'window ' + str(g['window']) if g['window'] else 'full attention'}: layers "
            f"{','.join(map(str, g['layers']))}" for g in s["kv_groups"])
            + " (window blocks are freed as they slide out)")
    if s.get("lora"):
        lo = s["lora"]
        lines.append(f"lora       {lo['slots']} adapter slots, max rank {lo['max_rank']}, targets "
                     f"{','.join(lo['targets'])}, {lo['pools']} linears with a delta"
                     + ("; each rank's pools hold its share of every adapter, cut like "
                        "the weights below" if s.get("parallel") else ""))
    if s.get("parallel"):
        lines += _parallel_lines(s["parallel"])
    if s.get("mtp_parallel"):           # the MTP graph, sharded by the same pass
        lines += _parallel_lines(s["mtp_parallel"], "mtp par   ", "the MTP graph (mtp.bir)",
                                 "MTP call")
    lines.append(f"hashes     {'verified' if s['hashes_verified'] else 'not checked'}")
    lines.append(f"trust      {s['trust']['how']}: {s['trust']['detail']}"
                 + ("" if s["trust"]["how"] != "none" else
                    f" (generate and serve refuse it; {s['trust']['remedy']})"))
    if "cubin_resources" in s:
        from braze.codegen.cubin_report import format_rows
        lines.append("")
        lines.append("kernels    what each stored cubin asks of an SM (cuobjdump; warps/SM: "
                     "resident warps and what limits them)" if s["cubin_resources"] else
                     "kernels    no cubins stored (compiled with --targets \"\")")
        if s["cubin_resources"]:
            lines.append(format_rows(s["cubin_resources"]))
    return "\n".join(lines)


def _values(v: list) -> str:
    return str(v[0]) if len(v) == 1 else f"[{v[0]}..{v[-1]}]"


def _parallel_lines(p: dict, title: str = "parallel  ", graph: str = "one graph (SPMD)",
                    call: str = "step") -> list[str]:
    """How a tensor-parallel artifact is split (passes/shard.py): each weight, each collective."""
    n = p["tensor_parallel_size"]
    lines = [f"{title} tensor-parallel over {n} ranks: {graph}, weight shards per "
             f"rank; {len(p['collectives'])} collectives per {call}"]
    ex = p.get("experts")
    if p.get("expert_parallel") and ex:
        lines.append(f"  expert-parallel: {ex['num_experts']} experts, whole experts per rank: "
                     + ", ".join(f"r{r}[{a}:{b}]" for r, (a, b) in enumerate(ex["ranges"])))
    for name, spec in sorted(p["shards"].items()):
        if "values" in spec:
            lines.append(f"  shard @{name}: per rank " + ", ".join(
                f"r{r}={_values(v)}" for r, v in enumerate(spec["values"])))
        else:
            lines.append(f"  shard @{name} dim {spec['dim']}: " + ", ".join(
                f"r{r}[{a}:{b}]" for r, (a, b) in enumerate(spec["ranges"]))
                + (" (experts)" if spec.get("experts") else "")
                + (f" (zero rows past {spec['size']})" if "size" in spec else ""))
    for c in p["collectives"]:
        lines.append(f"  collective {c['result']}: {c['type']} = {c['op']} (node {c['node']})")
    return lines
