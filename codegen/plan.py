"""Lower a passed graph into launch plans: every node to kernel launches or an extern call.

Nodes whose op has a kernel template (codegen/kernels/) become Triton launches;
ops the registry marks `extern` (GEMMs: `linear`, `matmul`, `einsum`; views) stay
extern calls through torch (cuBLAS on a GPU), and so does any op without a template
yet, which `braze inspect` lists. Launches are grouped by the segments split-segments
recorded, and identical kernel variants are shared through one kernel table.
"""

from __future__ import annotations

import json
from pathlib import Path

from braze.ir import Graph
from braze.ir.errors import BrazeError

from .kernels import kernel_module_for, lower_node
from .small_m_gemm import (MAX_TOKENS, extern_guard, lower_glu, lower_guarded, record,
                           wants_triton)
from .specialize import step_sizes, variant_keys

TEMPLATE_DIR = Path(__file__).parent / "kernels"


def variant_key(launch: dict) -> str:
    sig = [a["ty"] for a in launch["args"]]
    return json.dumps([launch["module"], launch["fn"], sig, sorted(launch["constexprs"].items()),
                       launch["num_warps"], launch["num_stages"]])


def build_plan(g: Graph, options: dict) -> dict:
    """-> {"segments": [...], "workspaces": {...}, "kernels": {id: variant}, "sources": {...},
    "extern_ops": {op: count}}, and "small_m_gemm" (codegen/small_m_gemm.py) under
    `--small-m-gemm triton`; each variant lists the spec keys to compile it for
    (codegen/specialize.py), given the compile `options`."""
    segments = g.meta.get("segments") or [["eager", 0, len(g.nodes) - 1]]
    kernels: dict[str, dict] = {}
    ids: dict[str, str] = {}
    workspaces: dict[str, dict] = {}
    sources: dict[str, str] = {}
    extern: dict[str, int] = {}
    per_node: list[list[dict]] = []
    small_m = wants_triton(options)
    chosen: list[dict] = []

    def add_kernels(launches: list[dict]) -> None:
        for launch in launches:
            key = variant_key(launch)
            if key not in ids:
                ids[key] = f"{launch['module']}.{launch['fn']}#{len(ids)}"
                kernels[ids[key]] = {k: launch[k] for k in ("module", "fn", "constexprs",
                                                            "num_warps", "num_stages")}
                kernels[ids[key]]["signature"] = [a["ty"] for a in launch["args"]]
            launch["kernel"] = ids[key]

    for i, node in enumerate(g.nodes):
        if node.op == "linear_glu":     # kernels and an extern call, by bucket
            try:
                launches, ws, why = lower_glu(node, i)
            except BrazeError as e:
                raise BrazeError(f"lowering node {i} ({node.op}): {e}") from None
            chosen.append(record(node, i, why))
            workspaces.update(ws)
            add_kernels([ln for ln in launches if "extern" not in ln])
            extern["linear"] = extern.get("linear", 0) + 1
            per_node.append(launches)
            continue
        if not node.opdef.extern and kernel_module_for(node.op) is not None:
            try:
                launches, ws, srcs = lower_node(node, i)
            except BrazeError as e:
                raise BrazeError(f"lowering node {i} ({node.op}): {e}") from None
            workspaces.update(ws)
            sources.update(srcs)
            add_kernels(launches)
            per_node.append(launches)
            continue
        extern[node.op] = extern.get(node.op, 0) + 1
        call = {"node": i, "extern": node.op, "args": [{"buf": v.ref} for v in node.operands],
                "attrs": node.attrs, "results": [r.ref for r in node.results]}
        if small_m and node.op == "linear":
            try:
                launches, ws, why = lower_guarded(node, i)
            except BrazeError as e:
                raise BrazeError(f"lowering node {i} ({node.op}) for --small-m-gemm triton: "
                                 f"{e}") from None
            chosen.append(record(node, i, why))
            if why is None:
                workspaces.update(ws)
                add_kernels(launches)
                call["when"] = extern_guard()
                per_node.append(launches + [call])
                continue
        per_node.append([call])
    workspaces = _share_workspaces(per_node, workspaces)
    out_segments = []
    for kind, first, last in segments:
        launches = [launch for i in range(first, last + 1) for launch in per_node[i]]
        out_segments.append({"kind": kind, "first": first, "last": last, "launches": launches})
    every = [launch for launches in per_node for launch in launches]
    for vid, keys in variant_keys(g, kernels, every, step_sizes(options)).items():
        kernels[vid]["specs"] = keys
    plan = {"segments": out_segments, "workspaces": workspaces, "kernels": kernels,
            "sources": sources, "extern_ops": dict(sorted(extern.items()))}
    if small_m or chosen:
        plan["small_m_gemm"] = {"max_tokens": MAX_TOKENS, "linears": chosen}
    return plan


def _share_workspaces(per_node: list[list[dict]], workspaces: dict) -> dict:
    """One workspace per (role, spec) instead of one per node: the launches of a step run
    in order on one stream and no workspace outlives its node's launches (a `zero` one is
    zeroed again by them), so every layer's attention can use the same split-KV buffers.
    A node's `ws.<node>.<role>` becomes the first such node's name; returns the specs kept."""
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for name, spec in workspaces.items():
        key = (name.split(".", 2)[2], json.dumps(spec, sort_keys=True))
        rename[name] = first.setdefault(key, name)
    for launches in per_node:
        for launch in launches:
            for a in launch.get("args", ()):
                if "ws" in a:
                    a["ws"] = rename[a["ws"]]
    return {name: spec for name, spec in workspaces.items() if rename[name] == name}


def regenerate(graph: Graph, options: dict) -> tuple[dict, dict[str, bytes]]:
    """What `braze compile` with `options` writes for `graph`, cubins apart: the manifest
    entries and kernel files of `artifact_parts`. Loading an artifact that no trusted key
    signed compares its own against these (runtime/trust.py); the plan is a function of
    the graph and `options` (`small_m_gemm`, the step limits its spec keys are worked out for)."""
    return artifact_parts(build_plan(graph, options))


def artifact_parts(plan: dict) -> tuple[dict, dict[str, bytes]]:
    """What an artifact holds for `plan`, cubins apart: its manifest's "plan" and "kernels"
    entries (each variant without the "targets" its cubins add) and its kernel files
    (kernels/<module>.py -> source bytes). `braze compile` writes exactly these, and
    `regenerate` gives them again for verification."""
    entries = {"plan": {"segments": plan["segments"], "workspaces": plan["workspaces"],
                        "extern_ops": plan["extern_ops"]},
               "kernels": plan["kernels"]}
    if "small_m_gemm" in plan:
        entries["plan"]["small_m_gemm"] = plan["small_m_gemm"]
    files = {}
    for m in sorted({v["module"] for v in plan["kernels"].values()}):
        files[f"kernels/{m}.py"] = (plan["sources"][m].encode() if m in plan["sources"]
                                    else (TEMPLATE_DIR / f"{m}.py").read_bytes())
    return entries, files
