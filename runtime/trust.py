"""Whether an artifact's executable parts may run, decided once when it is opened.

An artifact is code as much as data: its kernel sources are Python that Triton executes,
its launch plans choose the pointers, sizes and grids honest kernels are launched with,
and its cubins are machine code. They run only if one of these holds:

  signed     signature.json is a valid Ed25519 signature of manifest.json by a key this
             host trusts (braze/signing.py); the manifest hashes every file, so this
             covers everything, cubins included
  verified   this braze regenerates the launch plans and kernel sources from graph.bir
             and gets the same bytes; cubins are not covered (they cannot be rebuilt
             cheaply), so kernels compile from their verified source instead
  operator   the operator passed --trust-artifact (trust_artifact=True): logged loudly

Anything else is refused with one line that names the file that failed and the three
ways to admit it. A signature that does not match the manifest is refused outright: the
artifact was changed after it was signed.

Verification imports codegen's lowering (codegen/plan.py, lowering.py, kernels/): a pure
function from IR to plans and kernel text that needs only ir, sympy, torch and triton,
which a serving host has anyway. It is imported lazily, only for an artifact that no
trusted key signed; frontend, passes and models are never imported (tests check both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from braze import __version__
from braze.artifact import GRAPH_FILE, SIGNATURE
from braze.ir import Graph
from braze.ir.errors import BrazeError
from braze.signing import read_signature, trusted_keys

log = logging.getLogger("braze.runtime")

HOW_TO_ADMIT = ("admit it one of three ways: sign it (`braze compile --sign KEY`) and give "
                "this host its public key (--trusted-keys DIR); recompile it with this braze "
                "so that it verifies; or, if you trust where it came from, pass "
                "--trust-artifact (Python: trusted_keys=DIR, trust_artifact=True)")
# a signed artifact whose signature does not hold was changed after signing: no flag admits
# it as it is (docs/trust.md), so the refusal says what does
HOW_TO_REPLACE = ("this is refused even with --trust-artifact: copy the artifact again from "
                  "where it was signed, or recompile it; if you changed it on purpose, delete "
                  f"its {SIGNATURE}, and it then loads if this braze regenerates it or with "
                  "--trust-artifact")


@dataclass
class Trust:
    how: str                        # "signed", "verified", "operator", or "none"
    detail: str                     # who signed it, how long verifying took, or why not
    kernel_hashes: dict[str, str] = field(default_factory=dict)   # module -> sha256 to run
    cubins: bool = False            # stored cubins may be loaded
    remedy: str = HOW_TO_ADMIT      # what a refusal tells the user to do

    @property
    def admitted(self) -> bool:
        return self.how != "none"


def establish(root: Path, manifest: dict, manifest_bytes: bytes, graph: Graph,
              trusted_keys_dir=None, trust_artifact: bool = False) -> Trust:
    """Decide what may run from the opened artifact at `root` (its files already checked
    against the manifest's hashes by braze.artifact.verify_files)."""
    signed_by = None
    try:
        sig = read_signature(root, manifest_bytes)
    except BrazeError as e:
        return Trust("none", str(e), remedy=HOW_TO_REPLACE)
    if sig is not None and not sig.valid:
        return Trust("none", f"{SIGNATURE} does not match manifest.json: the artifact was "
                             f"changed after {sig.key_id} signed it", remedy=HOW_TO_REPLACE)
    if sig is not None:
        key = trusted_keys(trusted_keys_dir).get(sig.raw)
        if key is not None:
            return Trust("signed", f"signed by {sig.key_id} ({key.file})",
                         _listed_kernel_hashes(manifest), cubins=True)
        signed_by = sig.key_id
    if trust_artifact:
        log.warning("TRUSTING ARTIFACT %s WITHOUT VERIFICATION (--trust-artifact): its kernel "
                    "sources, launch plans and cubins run as they are, and they can do anything "
                    "this process can", root)
        return Trust("operator", "trusted by the operator (--trust-artifact), not verified",
                     _listed_kernel_hashes(manifest), cubins=True)
    t0 = time.perf_counter()
    failed, hashes = _regenerate(root, manifest, graph)
    seconds = time.perf_counter() - t0
    if failed is None:
        mtp = manifest.get("mtp")
        sources = GRAPH_FILE + (f" and {mtp['graph']}" if isinstance(mtp, dict) and "plan" in mtp
                                else "")
        log.info("artifact %s verified: its plans and kernel sources are what this braze "
                 "generates from %s (%.2f s)", root, sources, seconds)
        return Trust("verified", f"plans and kernel sources regenerated by braze {__version__} "
                                 f"from {sources} ({seconds:.2f} s); its cubins are not used "
                                 f"unless it is signed", hashes, cubins=False)
    made_by = (manifest.get("versions") or {}).get("braze")
    if made_by and made_by != __version__:
        failed += f" (it was made by braze {made_by}, this is {__version__})"
    unsigned = (f"it is signed by {signed_by}, a key this host does not trust" if signed_by
                else f"it has no {SIGNATURE}")
    return Trust("none", f"{failed}, and {unsigned}")


def refusal(root: Path, trust: Trust) -> str:
    return f"artifact {root} is not trusted: {trust.detail}; {trust.remedy}"


def _listed_kernel_hashes(manifest: dict) -> dict[str, str]:
    return {rel[len("kernels/"):-len(".py")]: digest
            for rel, digest in manifest["files"].items()
            if rel.startswith("kernels/") and rel.endswith(".py")}


def _canon(value) -> str:
    # one spelling per JSON value: 1, 1.0 and true differ, key order does not
    return json.dumps(value, sort_keys=True)


def _regenerate(root: Path, manifest: dict, graph: Graph) -> tuple[str | None, dict]:
    """-> (None, module -> sha256) when the plans and kernel files are what this braze
    generates from the graph, else (what differs, naming the file, {})."""
    from braze.codegen.plan import regenerate
    options = manifest.get("options") or {}
    try:
        entries, files = regenerate(graph, options)
    except Exception as e:     # a hostile graph can upset any lowering: none of it runs
        return f"its {GRAPH_FILE} does not lower to launch plans ({type(e).__name__}: " \
               f"{str(e)[:200]})", {}
    # the MTP graph's own plan (codegen/emit.py emit_mtp_kernels): its kernels share kernels/
    mtp = manifest.get("mtp") if isinstance(manifest.get("mtp"), dict) else {}
    second = None
    if "plan" in mtp or "kernels" in mtp:
        name = mtp.get("graph")
        try:
            from braze.ir import parse_graph, verify
            g = parse_graph((root / name).read_text(encoding="utf-8"), source=name)
            verify(g)
            second, more = regenerate(g, options)
        except Exception as e:     # as above: a hostile second graph runs nothing
            return f"its MTP graph {name} does not lower to launch plans " \
                   f"({type(e).__name__}: {str(e)[:200]})", {}
        files = {**files, **more}
    listed = {rel for rel in manifest["files"] if rel.startswith("kernels/")}
    for rel in sorted(listed | set(files)):
        if rel not in files:
            return f"{rel} is not a kernel this braze generates for its {GRAPH_FILE}", {}
        if rel not in listed:
            return f"kernels/ lacks {rel}, which this braze generates for its {GRAPH_FILE}", {}
        if (root / rel).read_bytes() != files[rel]:
            return f"{rel} differs from the kernel source this braze generates", {}
    for where, got, want, source in [("", manifest, entries, GRAPH_FILE)] + \
            ([("MTP ", mtp, second, mtp.get("graph"))] if second is not None else []):
        failed = _plan_differs(got, want)
        if failed:
            return f"manifest.json's {where}{failed} differs from what this braze generates " \
                   f"from its {source}", {}
    return None, {rel[len("kernels/"):-len(".py")]: hashlib.sha256(data).hexdigest()
                  for rel, data in files.items()}


def _plan_differs(got: dict, want: dict) -> str | None:
    """Where a manifest entry's "plan" and "kernels" (`got`) differ from the regenerated
    `want`, as "launch plan at ..." / "kernel table at ...", or None."""
    plan = got.get("plan") if isinstance(got.get("plan"), dict) else {}
    for key, w in want["plan"].items():
        if _canon(plan.get(key)) != _canon(w):
            return f"launch plan{_first_difference(plan.get(key), w, key)}"
    # each variant as far as codegen describes it; what compiling cubins adds is not
    # compared: a verified artifact's cubins are never loaded
    kernels = got.get("kernels") if isinstance(got.get("kernels"), dict) else {}
    stripped = {vid: ({k: entry.get(k) for k in want["kernels"].get(vid, entry)}
                      if isinstance(entry, dict) else entry) for vid, entry in kernels.items()}
    if _canon(stripped) != _canon(want["kernels"]):
        return f"kernel table{_first_difference(stripped, want['kernels'], 'kernels')}"
    return None


def _first_difference(got, want, path: str = "") -> str:
    """Where two JSON values first differ, as a path like `segments[2].launches[5].grid`."""
    if isinstance(got, dict) and isinstance(want, dict):
        for k in sorted(set(got) | set(want), key=str):
            if _canon(got.get(k)) != _canon(want.get(k)):
                return _first_difference(got.get(k), want.get(k), f"{path}.{k}")
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        for i, (a, b) in enumerate(zip(got, want)):
            if _canon(a) != _canon(b):
                return _first_difference(a, b, f"{path}[{i}]")
    return f" at {path}" if path else ""


def check_loaded_cubin(kernel, root: Path, entry: dict, files: dict) -> None:
    """After Triton's CompiledKernel has read a cubin and its metadata from disk: what it
    will load is what the manifest hashed (the files could change after the check at open)."""
    import dataclasses
    if hashlib.sha256(kernel.kernel).hexdigest() != files.get(entry["cubin"]):
        raise BrazeError(f"cubin {root / entry['cubin']} changed after the artifact was opened")
    meta = (root / entry["meta"]).read_bytes()
    got = dict(kernel.metadata._asdict())
    got["target"] = dataclasses.asdict(got["target"])
    if hashlib.sha256(meta).hexdigest() != files.get(entry["meta"]) \
            or _canon(got) != _canon(json.loads(meta)):
        raise BrazeError(f"cubin metadata {root / entry['meta']} changed after the artifact "
                         f"was opened")
