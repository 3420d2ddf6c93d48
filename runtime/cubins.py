"""Load the artifact's ahead-of-time cubins instead of compiling kernels at first use.

Each kernel variant ships cubins per target and per spec key (braze/launch.py): what
Triton's JIT would build for the argument values the variant sees at each batch bucket.
A launch takes the cubin of its own key, or else the most specialised stored cubin its
key admits. A stored cubin is only usable under the Triton version that built it and
on a GPU of a target it was built for; otherwise every kernel is JIT-compiled from the
source the artifact ships, which costs start-up time and can change numerics, so that
is said loudly: one warning at load naming both versions, `stats()` counts (see
`counts`), a line in `braze inspect`, a Prometheus gauge from `braze serve`.
Loading goes through Triton's own CompiledKernel with the metadata file Triton wrote
at compile time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from braze.launch import admits, specialised_source

from .trust import check_loaded_cubin

log = logging.getLogger("braze.runtime")


def device_target() -> str | None:
    import torch
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def unusable_reason(manifest: dict, triton_version: str, target: str | None) -> str | None:
    """Why an artifact's cubins cannot run here (None: they can), as one sentence."""
    built = manifest.get("versions", {}).get("triton")
    targets = manifest.get("targets") or []
    if not targets:
        return "the artifact has no cubins (compiled with an empty --targets)"
    if built != triton_version:
        return (f"the artifact's cubins were built with triton {built}, this host runs triton "
                f"{triton_version}: every kernel is JIT-compiled from source at first use; "
                f"compile artifacts for a GPU fleet with that fleet's Triton")
    if target is None:
        return "this host has no CUDA GPU"
    if target not in targets:
        return (f"the artifact has cubins for {', '.join(targets)}, this GPU is {target}: every "
                f"kernel is JIT-compiled from source; recompile with --targets {target}")
    return None


class CubinCache:
    def __init__(self, root: Path, manifest: dict, modules):
        import triton
        self.root, self.modules = Path(root), modules
        self.kernels = manifest.get("kernels", {})
        self.files = manifest["files"]
        self.target = device_target()
        self.reason = unusable_reason(manifest, triton.__version__, self.target)
        self.usable = self.reason is None
        self._resolved: dict[tuple, tuple] = {}   # (variant, key) -> (kernel or None, how)
        self._loaded: dict[tuple, object] = {}
        self._warned: set = set()
        if not self.usable:
            log.warning("cubins not used: %s", self.reason)

    def get(self, variant_id: str, launch: dict, key: str):
        """A launchable CompiledKernel for this variant at spec `key` (the launch's own,
        from its argument values), or None to JIT-compile from source."""
        got = self._resolved.get((variant_id, key))
        if got is None:
            kernel, how = None, "jit"
            chosen = self._choose(variant_id, key) if self.usable else None
            if chosen is not None:
                if (variant_id, chosen) not in self._loaded:
                    self._loaded[(variant_id, chosen)] = self._load(variant_id, launch, chosen)
                kernel = self._loaded[(variant_id, chosen)]
                if kernel is not None:
                    how = "cubin" if chosen == key else "cubin_less_specialised"
            got = self._resolved[(variant_id, key)] = (kernel, how)
        return got[0]

    def counts(self) -> dict[str, int]:
        """Kernel specialisations launched so far, by how: from the cubin built for them,
        from a less specialised cubin, or JIT-compiled from source."""
        out = {"cubin": 0, "cubin_less_specialised": 0, "jit": 0}
        for _, how in self._resolved.values():
            out[how] += 1
        return out

    def _choose(self, variant_id: str, key: str) -> str | None:
        stored = self.kernels.get(variant_id, {}).get("cubins", {}).get(self.target, {})
        if key in stored:
            return key
        fits = [k for k in stored if admits(k, key)]
        if not fits:
            self._warn(variant_id, f"no stored {self.target} cubin of {variant_id} admits this "
                                   f"launch (spec {key}; stored: {', '.join(sorted(stored)) or 'none'}): "
                                   f"JIT-compiling it")
            return None
        return max(fits, key=lambda k: sum(c != "-" for c in k))

    def _load(self, variant_id: str, launch: dict, key: str):
        entry = self.kernels[variant_id]["cubins"][self.target][key]
        try:
            from triton.compiler import ASTSource
            from triton.compiler.compiler import CompiledKernel
            fn = self.modules.get(launch["module"], launch["fn"])
            sig, constexprs, attrs = specialised_source(launch, fn.arg_names, key)
            src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
            name = entry["name"]
            group = {f"{name}.json": str(self.root / entry["meta"]),
                     f"{name}.cubin": str(self.root / entry["cubin"])}
            kernel = CompiledKernel(src, group, entry.get("hash") or f"{variant_id}@{key}")
            check_loaded_cubin(kernel, self.root, entry, self.files)   # the bytes Triton read
            return kernel
        except Exception as e:  # a Triton internals mismatch: compile from source instead
            self._warn(variant_id, f"cubin {entry['cubin']} could not be loaded "
                                   f"({type(e).__name__}: {e}); JIT-compiling {variant_id}")
            return None

    def _warn(self, variant_id: str, message: str) -> None:
        if variant_id not in self._warned:
            self._warned.add(variant_id)
            log.warning("%s", message)
