"""Load the artifact's ahead-of-time cubins instead of compiling kernels at first use.

A stored cubin is used when it was built by this Triton version for this GPU's
architecture; otherwise the kernel is JIT-compiled from the source the artifact
ships, and the log says why. Loading goes through Triton's own CompiledKernel
with the metadata file Triton wrote at compile time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from braze.launch import aligned_attrs, kernel_signature

from .trust import check_loaded_cubin

log = logging.getLogger("braze.runtime")


def device_target() -> str | None:
    import torch
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


class CubinCache:
    def __init__(self, root: Path, manifest: dict, modules):
        import triton
        self.root, self.modules = Path(root), modules
        self.kernels = manifest.get("kernels", {})
        self.files = manifest["files"]
        self.target = device_target()
        made_with = manifest.get("versions", {}).get("triton")
        self.usable = made_with == triton.__version__ and self.target in manifest.get("targets", [])
        self._loaded: dict[str, object] = {}
        if not self.usable:
            log.info("artifact cubins not used (built with triton %s for %s; running triton %s "
                     "on %s): kernels compile from source at first use", made_with,
                     manifest.get("targets"), triton.__version__, self.target)

    def get(self, variant_id: str, launch: dict):
        """A launchable CompiledKernel for this variant, or None to JIT from source."""
        if not self.usable:
            return None
        if variant_id in self._loaded:
            return self._loaded[variant_id]
        entry = self.kernels.get(variant_id, {}).get("targets", {}).get(self.target)
        kernel = None
        if entry:
            try:
                from triton.compiler import ASTSource
                from triton.compiler.compiler import CompiledKernel
                fn = self.modules.get(launch["module"], launch["fn"])
                sig = kernel_signature(launch, fn.arg_names)
                src = ASTSource(fn=fn, signature=sig, constexprs=launch["constexprs"],
                                attrs=aligned_attrs(fn.arg_names, sig))   # as codegen compiled it
                name = entry["name"]
                group = {f"{name}.json": str(self.root / entry["meta"]),
                         f"{name}.cubin": str(self.root / entry["cubin"])}
                kernel = CompiledKernel(src, group, entry.get("hash") or variant_id)
                check_loaded_cubin(kernel, self.root, entry, self.files)
            except Exception as e:  # a Triton internals mismatch: compile from source instead
                log.warning("cubin for %s could not be loaded (%s: %s); compiling from source",
                            variant_id, type(e).__name__, e)
                kernel = None
        else:
            log.info("no %s cubin for %s in the artifact; compiling from source", self.target,
                     variant_id)
        self._loaded[variant_id] = kernel
        return kernel
